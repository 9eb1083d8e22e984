"""The diffusion policy: a denoiser over action chunks conditioned on the observation history.

`plan(obs_history)` is the whole robot-side API: it needs torch and this package, no simulator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from envs.tasks import ObsConfig
from policy.network import ConditionalUnet1D, UNetConfig
from policy.vision import ObsEncoder, PlanningEncoder, VisionConfig
from policy.normalizer import Normalizer
from policy.backends import Runtime, check_device
from policy.denoiser import Denoiser, resolve_capture
from policy.samplers import (DISTILLED, SampleResult, SamplerConfig, aligner_choice, call_rows, chain_of,
                             resolve, takes_pad)
from policy.safety import (ACTION_FLOOR, ACTION_RELATIVE, MARGIN, OBS_MARGIN, UnsafeActions, check_actions,
                           check_observation, check_observation_range)
from policy.samplers.solvers import get_plan
from policy.schedule import ScheduleConfig, add_noise, make_scheduler
from policy.transformer import TransformerConfig, TransformerForDiffusion
from policy.warm import PlanSession, WarmStart

NETS = ("unet", "transformer")  # policy.net's choices


@dataclass
class PolicyConfig:
    horizon: int = 16  # actions predicted per plan
    n_obs_steps: int = 2  # observation history the plan is conditioned on
    n_action_steps: int = 8  # actions executed per plan
    net: str = "unet"  # the denoiser: Diffusion Policy's 1-D UNet, or its transformer ("transformer")
    unet: UNetConfig = field(default_factory=UNetConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)  # image policies' encoder

    # Diffusion Policy plans 16-64 actions; 1024 is 51 s of actions at 20 Hz. A horizon of 10**6
    # was killed for memory after 109 s of dp-train: every training window holds horizon actions.
    MAX_HORIZON = 1024

    def __post_init__(self):
        """Every number checked at start-up, before a command reads or writes anything: a one-line
        `UserError` naming the key (`policy.unet.n_groups: ...`)."""
        from common.checks import check_number

        if self.net not in NETS:
            raise UserError(f"policy.net: {self.net!r} is not a network here; one of {', '.join(NETS)}")
        if self.net == "unet" and isinstance(self.unet, UNetConfig):
            self.unet.check("policy.unet")
        if self.net == "transformer" and isinstance(self.transformer, TransformerConfig):
            self.transformer.check("policy.transformer")
        if isinstance(self.schedule, ScheduleConfig):
            self.schedule.check("policy.schedule")
        check_number("policy.horizon", self.horizon, 1, integer=True)
        if self.horizon > self.MAX_HORIZON:
            raise UserError(f"policy.horizon: {self.horizon} is more than {self.MAX_HORIZON} actions a plan "
                            "(51 s at 20 Hz; Diffusion Policy plans 16-64): every training window holds "
                            "horizon actions")
        check_number("policy.n_obs_steps", self.n_obs_steps, 1, integer=True)
        check_number("policy.n_action_steps", self.n_action_steps, 1, integer=True)
        unet = self.net == "unet" and isinstance(self.unet, UNetConfig)
        halvings = len(self.unet.down_dims) - 1 if unet else 0  # a transformer takes any horizon
        if self.horizon < 1 or self.horizon % 2**halvings:
            raise UserError(f"policy.horizon: {self.horizon} is not a positive multiple of {2**halvings} "
                            f"(the UNet halves it {halvings} times and doubles it back)")
        if not 1 <= self.n_action_steps <= self.horizon - self.n_obs_steps + 1:
            raise UserError(
                f"policy.n_action_steps: {self.n_action_steps} does not fit a horizon of {self.horizon} "
                f"after {self.n_obs_steps} observation steps"
            )


@dataclass
class PlanResult:
    actions: np.ndarray  # [n_actions, action_dim] (default n_action_steps), in the env's action units
    latency_ms: float  # wall clock of the whole plan call
    model_evals: int
    parallel_iters: int
    converged: bool
    encode_ms: float = 0.0  # of latency_ms: the observation encoder (camera frames), once per plan


class TrainingLoss(nn.Module):
    """`policy.loss` as a module's forward, so that DistributedDataParallel can wrap it (its
    gradient synchronisation hooks run on the forward of the module it wraps)."""

    def __init__(self, policy: DiffusionPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, obs, action, generator=None, part=None):
        return self.policy.loss(obs, action, generator, part)

    # What a training run asks of its objective besides the loss (ConsistencyLoss has a target network)
    def after_step(self) -> None:
        """Called after each optimizer step."""

    def extra_state(self) -> dict:
        """What a checkpoint's trainer state keeps for the objective."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore `extra_state()` from a checkpoint's trainer state."""


@dataclass
class Sampling:
    """A sampler made ready for one policy (`DiffusionPolicy.sampling`): set up once, no plan state."""

    spec: SamplerConfig
    fn: object  # samplers.Sampler
    options: dict  # its options: the aligner's taus read, the window chosen (window=auto) at the first plan
    auto_window: bool


class DiffusionPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig, obs_dim: int, action_dim: int, normalizer: Normalizer,
                 meta: dict | None = None):
        super().__init__()
        self.cfg, self.obs_dim, self.action_dim = cfg, obs_dim, action_dim
        self.normalizer = normalizer
        self.meta = dict(meta or {})  # task, obs_layout, obs, ...: what a checkpoint must match
        self.obs_config = ObsConfig.from_dict(self.meta.get("obs"))
        self.encoder: ObsEncoder | None = None
        if self.obs_config.image:
            image_dims = len(self.obs_config.image_keys) * int(np.prod(self.obs_config.image_shape))
            self.encoder = ObsEncoder(cfg.vision, obs_dim - image_dims, self.obs_config.image_keys,
                                      self.obs_config.image_shape)
        self.cond_dim = cfg.n_obs_steps * (obs_dim if self.encoder is None else self.encoder.out_dim)
        if cfg.net == "transformer":
            self.net = TransformerForDiffusion(action_dim, self.cond_dim, cfg.horizon, cfg.n_obs_steps,
                                               cfg.transformer)
        else:
            self.net = ConditionalUnet1D(action_dim, self.cond_dim, cfg.unet)
        self.scheduler = make_scheduler(cfg.schedule)
        # the one-caller API's plan state (`seed`, `plan`); callers may bring their own
        self.session = PlanSession()
        self._windows: dict[str, dict] = {}  # sampler setting -> its measured window (window=auto)
        # (precision, capture, device, backend) -> the samplers' denoiser
        self._denoisers: dict[tuple, Denoiser] = {}
        self._backends: dict[str, str] = {}  # sampler setting -> the backend backend=auto chose
        self.sampler = SamplerConfig(name="consistency", steps=1) if self.distilled else SamplerConfig()
        self._encoder_runtime: Runtime | None = None  # the encoder's planning path on the backend's runtime

    @property
    def sampler(self) -> SamplerConfig:
        """The sampler `plan` and `sample` use; setting it checks its options (one-line errors)."""
        return self._sampling.spec

    @sampler.setter
    def sampler(self, cfg: SamplerConfig) -> None:
        self.use(self.sampling(cfg))
        self.session.warm.reset()

    def sampling(self, cfg: SamplerConfig | dict) -> Sampling:
        """`cfg` checked and made ready for this policy: its function, and its options with the
        DPM-Aligner's timesteps read from the checkpoint (one-line errors)."""
        if not isinstance(cfg, SamplerConfig):
            cfg = SamplerConfig(**cfg)
        fn, options = resolve(cfg)
        self._check_kind(cfg)
        which = aligner_choice(cfg)
        if which is not None:  # the DPM-Aligner's timesteps for this chain, from the checkpoint
            from policy.aligner import load_taus

            chain = chain_of(cfg, self.cfg.schedule.num_train_timesteps)
            options["taus"] = load_taus(self.meta.get("checkpoint"), *chain, which,
                                        max_t=self.cfg.schedule.num_train_timesteps - 1)
        auto_window = options.get("window") == "auto"  # chosen on the first plan (policy.autowindow)
        if auto_window:
            options["window"] = None
        if cfg.capture == "graph" and not torch.cuda.is_available():
            # the one-line refusal, now rather than at the first plan
            resolve_capture("graph", torch.device("cpu"))
        check_device(cfg.backend, self.device)
        return Sampling(cfg, fn, options, auto_window)

    @property
    def distilled(self) -> dict | None:
        """How this policy was distilled (`policy.consistency`), or None for a diffusion policy."""
        return self.meta.get("distilled")

    def _check_kind(self, cfg: SamplerConfig) -> None:
        """A consistency student samples with the consistency sampler only, and a diffusion policy
        with every sampler but that one: its chain of noise estimates is not a consistency function's."""
        if self.distilled and cfg.name not in DISTILLED:
            raise UserError(f"sampler: {cfg.name} samples a diffusion policy; this one is a consistency "
                            f"student (distilled from {self.distilled.get('teacher')}): consistency1, "
                            "consistency2 or consistency3")
        if not self.distilled and cfg.name in DISTILLED:
            raise UserError(f"sampler: {cfg.name} samples a consistency student, and this policy is a "
                            "diffusion policy: distill one with dp-distill checkpoint=..., or sample this "
                            "one with ddpm, ddim, dpmsolver or their parallel forms")

    def use(self, sampling: Sampling) -> None:
        """Plan with `sampling` (from `sampling()`) from now on; no plan state changes."""
        self._sampling = sampling

    @property
    def _sample_options(self) -> dict:
        return self._sampling.options

    @property
    def warm(self) -> WarmStart:
        """The default session's warm-start state."""
        return self.session.warm

    @property
    def generator(self) -> torch.Generator | None:
        return self.session.generator

    @property
    def denoiser(self) -> Denoiser:
        """What the samplers call, `eps = denoiser(x, t, cond)`: the network on the sampler's
        `backend` (`policy.backends`; auto: measured), at its `precision`, eager or replaying CUDA
        graphs (`capture`; auto: graphs on CUDA)."""
        return self.denoiser_for(self.backend)

    def denoiser_for(self, backend: str) -> Denoiser:
        """The sampler's denoiser on `backend` (torch or openvino)."""
        key = (self.sampler.precision or "fp32", resolve_capture(self.sampler.capture, self.device),
               str(self.device), backend)
        # kept across sampler changes: its 16-bit copy, graphs and runtime model
        if key not in self._denoisers:
            self._denoisers[key] = Denoiser(self.net, key[0], key[1], self.device, backend)
        return self._denoisers[key]

    @property
    def backend(self) -> str:
        """The backend the sampler's denoiser calls run on: its `backend`, with `auto` resolved by
        measurement once per sampler setting (`policy.backends.choose`, cached per device)."""
        asked = self.sampler.backend or "torch"
        if asked != "auto":
            return asked
        setting = repr(self.sampler)
        if setting not in self._backends:
            from policy import backends

            self._backends[setting] = backends.choose(self, self.sampler)["backend"]
        return self._backends[setting]

    @property
    def trainable(self) -> nn.Module:
        """What training optimizes, EMA averages and a checkpoint's weights files hold: the
        denoiser, and for an image policy the observation encoder with it (keys net.*, encoder.*)."""
        return self.net if self.encoder is None else nn.ModuleDict({"net": self.net, "encoder": self.encoder})

    @trainable.setter
    def trainable(self, module: nn.Module) -> None:
        if self.encoder is None:
            self.net = module
        else:
            self.net, self.encoder = module["net"], module["encoder"]

    def neutral_obs(self) -> torch.Tensor:
        """One observation history [1, n_obs, obs_dim] at the centre of what the policy was
        trained on (low-dim at the normalizer's centre, frames mid-grey): for measuring, not acting."""
        low_dim = self.obs_dim if self.encoder is None else self.encoder.low_dim
        low = self.normalizer.unnormalize("obs",
                                          torch.zeros((1, self.cfg.n_obs_steps, low_dim), device=self.device))
        grey = torch.full((1, self.cfg.n_obs_steps, self.obs_dim - low_dim), 127.0, device=self.device)
        return torch.cat([low, grey], dim=-1)

    def sample_options(self, denoiser: Denoiser | None = None) -> dict:
        """The sampler function's options as the next plan uses them (padding when `denoiser`,
        default the policy's, is captured)."""
        pad = (denoiser or self.denoiser).pad and takes_pad(self._sampling.fn)
        return {**self._sample_options, **({"pad": True} if pad else {})}

    def choose_window(self, obs: torch.Tensor | None = None) -> dict | None:
        """For `sampler.window=auto`: the window measured for this device, checkpoint and sampler
        (cached; measured on observation histories `obs` [B, n_obs, D] if not yet: by default the
        one at the centre of the normalizer's range, for a server or loop to choose before its
        first plan), now in use. Returns the measurement (None when the window is not auto)."""
        if not self._sampling.auto_window:
            return None
        if obs is None:
            obs = self.neutral_obs()
        from policy import autowindow

        setting = repr(self.sampler)  # per policy: hashing the weights again on every plan would cost 20 ms
        entry = self._windows.get(setting)
        if entry is None:
            entry = self._windows[setting] = autowindow.choose(self, self.sampler, self.condition(obs[:1]))
        self._sample_options["window"] = entry["window"]
        return entry

    def prepare(self, obs: torch.Tensor | None = None) -> dict | None:
        """Everything a plan would otherwise do on its first run, now, for a loop or server before
        its first plan: `window=auto` chosen (`choose_window`, on `obs`; returned), `backend=auto`
        measured, and on a runtime every call shape this sampler's plans can have compiled."""
        entry = self.choose_window(obs)
        rows = call_rows(self.sampler, self.sample_options(), self.cfg.schedule.num_train_timesteps)
        self.denoiser.compile(rows, self.cfg.horizon, self.action_dim, self.cond_dim)
        return entry

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def seed(self, seed: int) -> None:
        """Seed the noise of the default session's plans; its next plan starts cold (a new episode)."""
        self.session.reseed(seed, self.device)

    def condition(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, n_obs_steps, obs_dim] raw observations -> [B, cond_dim] denoiser condition: the
        normalized vector, or for an image policy the encoder's features of each frame (random
        crops from `generator` in training mode, centre crops in eval) beside the normalized
        proprioception. Planning (eval mode, no gradient) runs the encoder on the sampler's backend."""
        if self.encoder is None:
            return self.normalizer.normalize("obs", obs).flatten(1)
        # thousands of windows (dp-align): a slice at a time
        if len(obs) > 256 and not torch.is_grad_enabled():
            return torch.cat([self.condition(part, generator) for part in obs.split(256)])
        low = self.normalizer.normalize("obs", obs[..., :self.encoder.low_dim])
        if torch.is_grad_enabled() or self.encoder.training or self.backend == "torch":
            return self.encoder(low, obs, generator)
        if self._encoder_runtime is None or self._encoder_runtime.module.encoder is not self.encoder:
            # follows its weights
            self._encoder_runtime = Runtime(PlanningEncoder(self.encoder), snippets=False)
        return self._encoder_runtime(low, obs)

    def loss(self, obs: torch.Tensor, action: torch.Tensor, generator: torch.Generator | None = None,
             part: tuple[int, int] | None = None) -> torch.Tensor:
        """Epsilon-prediction MSE on a batch of raw windows (obs [B, n_obs, D], action [B, H, A]).
        `part` (start, total): these are rows start.. of a batch of `total` split over processes
        (data parallel): the noise and steps are drawn for the whole batch and this part taken, so
        that the processes together draw what one process would."""
        x0 = self.normalizer.normalize("action", action)
        start, total = part if part is not None else (0, x0.shape[0])
        rows = slice(start, start + x0.shape[0])
        noise = torch.randn((total, *x0.shape[1:]), generator=generator, device=x0.device)[rows]
        t = torch.randint(0, self.cfg.schedule.num_train_timesteps, (total,), generator=generator,
                          device=x0.device)[rows]
        x_t = add_noise(self.scheduler, x0, noise, t)
        return nn.functional.mse_loss(self.net(x_t, t.float(), self.condition(obs, generator)), noise)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None, advance: int | None = None,
               step_noise: torch.Tensor | None = None, inpaint=None,
               session: PlanSession | None = None) -> tuple[torch.Tensor, SampleResult]:
        """Raw action chunks [B, horizon, A] for raw observation histories [B, n_obs, D]; the
        initial and step noise come from `generator` (default: the policy's, see `seed`), or are
        given (`noise`, and `step_noise` [n, B, horizon, A] for the sampler's chain).

        With `sampler.warm`, a plan `advance` control steps after the previous one (None: cold)
        shifts that plan's noise and starts from its chain (`policy.warm`). `inpaint`
        (`samplers.inpaint.Inpaint`, normalized actions) pulls the chain toward committed actions.
        `session`: the caller's plan state (default: the policy's own, `self.session`)."""
        session = self.session if session is None else session
        generator = session.generator if generator is None else generator
        shape = (obs.shape[0], self.cfg.horizon, self.action_dim)
        extra = {} if step_noise is None else {"step_noise": step_noise}
        if inpaint is not None:
            extra["inpaint"] = inpaint
        warmed = bool(self.sampler.warm) and noise is None
        if warmed:
            chain = get_plan(self.scheduler, *chain_of(self.sampler, self.cfg.schedule.num_train_timesteps),
                             self.device, torch.float32, self._sample_options.get("taus"))
            noise, extra["step_noise"], extra["init"] = session.warm.prepare(chain, shape, generator,
                                                                             self.device, torch.float32,
                                                                             advance)
        elif noise is None:
            noise = torch.randn(shape, generator=generator, device=self.device)
        if self._sampling.auto_window and self._sample_options["window"] is None:
            self.choose_window(obs)
        denoiser = self.denoiser
        start = time.perf_counter()
        cond = self.condition(obs)  # once per plan: every denoiser call of it (Picard rows too) reuses it
        if self.encoder is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        session.encode_ms = (time.perf_counter() - start) * 1e3
        with denoiser.planning():
            result = self._sampling.fn(denoiser, cond, self.scheduler, noise, generator,
                                     **self.sample_options(denoiser), **extra)
        if warmed:
            session.warm.keep(result.chain)
        return self.normalizer.unnormalize("action", result.x), result

    def _inpaint(self, committed: np.ndarray, frozen: int):
        from policy.samplers.inpaint import Inpaint, rtc_weights

        committed = check_observation(committed, "committed")  # float32, finite
        m = len(committed) if committed.ndim else 0
        if committed.ndim != 2 or committed.shape[1] != self.action_dim or not 1 <= m <= self.max_actions:
            raise ValueError(f"committed: shape {committed.shape}, expected "
                             f"[1..{self.max_actions}, {self.action_dim}]")
        try:  # the chunk is pulled toward them: they must be actions the policy could have planned
            check_actions(committed, *self.action_bounds)
        except UnsafeActions as err:
            raise ValueError(f"committed: {str(err).removeprefix('actions: ').split('; ')[0]}") from None
        if not 0 <= int(frozen) <= m:
            raise ValueError(f"frozen: {frozen} is not in 0..{m} (the committed actions)")
        first = self.cfg.n_obs_steps - 1  # chunk index of the current step
        prefix = torch.zeros((1, self.cfg.horizon, self.action_dim), device=self.device)
        prefix[0, first:first + m] = self.normalizer.normalize("action",
                                                               torch.as_tensor(committed, device=self.device))
        w = torch.zeros(self.cfg.horizon, device=self.device)
        w[first:] = rtc_weights(self.cfg.horizon - first, int(frozen), m, self.device)
        return Inpaint(prefix, w, self.sampler.inpaint or "replace")

    @property
    def action_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per action dimension, the range a plan may return (`policy.safety`): the trained range
        widened by the safety margin of each dimension's scale."""
        return self.normalizer.bounds("action", MARGIN, ACTION_FLOOR, ACTION_RELATIVE)

    @property
    def obs_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per observation dimension, the range a plan is made from (`policy.safety.OBS_MARGIN`):
        the trained range widened by ten times each dimension's scale; an image policy's pixels
        as if trained on 0..255."""
        lo, hi = self.normalizer.bounds("obs", OBS_MARGIN, 1.0, 1.0)
        pixels = self.obs_dim - len(lo)
        if pixels:
            lo = np.concatenate([lo, np.full(pixels, -OBS_MARGIN * 255, np.float32)])
            hi = np.concatenate([hi, np.full(pixels, 255 + OBS_MARGIN * 255, np.float32)])
        return lo, hi

    @property
    def max_actions(self) -> int:
        """The most actions a plan can return: the chunk from the current step to its end."""
        return self.cfg.horizon - self.cfg.n_obs_steps + 1

    def plan(self, obs_history: np.ndarray, n_actions: int | None = None, advance: int | None = None,
             committed: np.ndarray | None = None, frozen: int = 0,
             session: PlanSession | None = None) -> PlanResult:
        """The actions to execute next for one observation history [n_obs_steps, obs_dim]: the
        first `n_actions` (default `n_action_steps`; at most `max_actions`) from the current step.
        An asynchronous control loop asks for more than it executes, to cover the next plan's latency.
        `advance`: control steps since this episode's previous plan (None: the episode's first);
        only a warm-started sampler uses it, to shift that plan's noise and chain.
        `committed` [m, action_dim] (env units): the actions the robot will execute from the current
        step on while this plan runs (Real-Time Chunking): the new chunk is inpainted to agree with
        them, exactly on the first `frozen` (by replacement; `sampler.inpaint=guide`: guided toward
        them), with weights decaying over the rest (`samplers.inpaint`). `session`: the caller's
        plan state (default: the policy's own; `policy.warm.PlanSession`).

        Raises ValueError for an observation that is not finite as float32, and
        `policy.safety.UnsafeActions` for one far outside the trained range (before planning:
        `ObservationOutOfRange`), instead of returning a chunk with NaN or inf in it, or with
        actions outside the trained range (beyond `policy.safety.MARGIN`). A dimension trained on
        (almost) one value is returned in its trained range (`Normalizer.into_range`)."""
        start = time.perf_counter()
        n = self.cfg.n_action_steps if n_actions is None else int(n_actions)
        if not 1 <= n <= self.max_actions:
            raise ValueError(f"n_actions: {n} is not in 1..{self.max_actions}")
        obs = check_observation(obs_history, "obs_history")
        want = (self.cfg.n_obs_steps, self.obs_dim)
        if obs.shape != want:
            raise ValueError(f"obs_history: shape {obs.shape}, expected {want}")
        check_observation_range(obs, *self.obs_bounds)  # before the network: every backend alike
        inpaint = None if committed is None else self._inpaint(committed, frozen)
        session = self.session if session is None else session
        chunk, result = self.sample(torch.as_tensor(obs, device=self.device)[None], advance=advance,
                                    inpaint=inpaint, session=session)
        # chunk index 0 is the oldest observation's step; this is the current one
        first = self.cfg.n_obs_steps - 1
        actions = self.normalizer.into_range("action", chunk[0, first : first + n])  # one-value dimensions
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        try:
            actions = check_actions(actions.cpu().numpy(), *self.action_bounds)
        except UnsafeActions:
            session.warm.reset()  # a diverged chain must not seed the next plan
            raise
        return PlanResult(actions, (time.perf_counter() - start) * 1e3, result.model_evals,
                          result.parallel_iters, result.converged, session.encode_ms)
