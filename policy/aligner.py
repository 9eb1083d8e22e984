"""DPM-Aligner (published as TimeTuner, CVPR 2024): learned input timesteps for few-step samplers.

A few-step chain takes large steps, so the point it reaches at step i is not distributed like
the training data at t_i, and the denoiser, asked at t_i, points the wrong way. The aligner keeps
the network and the chain's coefficients and learns, per step, the timestep tau_i fed to the
network instead of t_i. Its loss (the paper's Eq. 5) asks that one step with tau_i leaves the
network's noise estimate where it was:

    L_i(tau_i) = E || eps(F(x_i, tau_i), t_{i+1}) - eps(x_i, t_i) ||^2

with F the solver's step from t_i to t_{i+1} using eps(x_i, tau_i). Here step i runs from
`timesteps[i]` to `timesteps[i + 1]` (index 0 is the noisiest) and t after the last step is 0.

The last step is not aligned unless asked (`align_last`): it lands on clean data, where the
loss's target eps(x, 0) is the network's guess at a noise of scale sqrt(1 - alpha_bar_0) ~ 0.01,
which it cannot predict (the loss there is ~100x the other steps' and mostly noise). Measured on
the lift policy, DDIM-5: final action error 0.82 plain, 0.67 with steps 1-4 aligned, 0.94 with
the last aligned as well.

- `sequential` (Algorithm 1): tau_0, tau_1, ... in order; x_i is reached by rolling the chain,
  with the taus already learned, from x_T = sqrt(a_T) x0 + sqrt(1 - a_T) noise. The rollout is
  kept for a fixed pool of training chunks and advanced once per learned step, instead of
  recomputed for every minibatch.
- `parallel` (Eq. 8): x_i is drawn from q(x_{t_i} | x0), so every tau trains at once.

x0 are normalized demonstration action chunks with their observation histories as the condition.
No library implements this (diffusers has no timestep aligner), hence the code here.

Learned taus live in the checkpoint directory: `aligner/<solver>-<steps>-<spacing>.json`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError
from policy.samplers.solvers import Plan, canonical_spacing, get_plan, new_history, step_rows

STRATEGIES = ("sequential", "parallel")


def aligner_file(checkpoint: str | Path, solver: str, steps: int, spacing: str) -> Path:
    return Path(checkpoint) / "aligner" / f"{solver}-{steps}-{canonical_spacing(spacing)}.json"


def align_command(checkpoint, solver: str, steps: int, spacing: str, strategy: str | None = None) -> str:
    extra = f" strategy={strategy}" if strategy and strategy != "default" else ""
    return (f"dp-align checkpoint={checkpoint} sampler={solver} steps={steps} "
            f"spacing={canonical_spacing(spacing)}{extra}")


def check_taus(taus, steps: int, max_t: float, where: str) -> tuple[float, ...]:
    """`taus` as floats if they are what `learn` makes of a chain of `steps`: one number a step,
    finite, in [0, max_t], strictly decreasing; otherwise UserError naming `where`."""
    if not isinstance(taus, list) or len(taus) != steps:
        raise UserError(f"{where}: taus must be a list of {steps} numbers (one per step), "
                        f"not {str(taus)[:60]}")
    for i, tau in enumerate(taus):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
            raise UserError(f"{where}: taus[{i}] is {tau!r}, not a finite number")
        if not 0 <= tau <= max_t:
            raise UserError(f"{where}: taus[{i}] = {tau:g} is outside the schedule's timesteps 0..{max_t:g}")
        if i and tau >= taus[i - 1]:
            raise UserError(f"{where}: taus[{i}] = {tau:g} does not decrease from "
                            f"taus[{i - 1}] = {taus[i - 1]:g} (a chain runs from noise to data)")
    return tuple(float(t) for t in taus)


def load_taus(checkpoint: str | Path | None, solver: str, steps: int, spacing: str,
              which: str = "default", max_t: float = 999.0) -> tuple[float, ...]:
    """The aligned timesteps of a chain, as `dp-align` stored them and checked (`check_taus`;
    `max_t`: the schedule's last training timestep). `which`: "default" (the strategy learned
    last) or a strategy. A missing file says which command makes it."""
    if checkpoint is None:
        raise UserError("sampler.aligner: this policy was not loaded from a checkpoint, "
                        "so it has no aligned timesteps")
    path = aligner_file(checkpoint, solver, steps, spacing)
    make = align_command(checkpoint, solver, steps, spacing, which)
    if not path.is_file():
        raise UserError(f"sampler.aligner: no aligned timesteps for {path.stem} (no {path}); "
                        f"make them with: {make}")
    try:
        doc = json.loads(path.read_text())
        entry = doc["strategies"][doc["strategy"] if which == "default" else which] if which in (
            "default", *doc["strategies"]) else None
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable aligner file ({err.__class__.__name__}: {err})") from None
    if entry is None:
        raise UserError(f"sampler.aligner: {path} has no {which} taus "
                        f"(it has {', '.join(doc['strategies'])}); make them with: {make}")
    return check_taus(entry.get("taus") if isinstance(entry, dict) else None, steps, max_t,
                      f"{path} ({doc['strategy'] if which == 'default' else which})")


@dataclass
class AlignSettings:
    solver: str = "ddim"
    steps: int = 5
    spacing: str = "trailing"
    strategy: str = "sequential"
    batch_size: int = 64  # chunks per gradient step
    pool: int = 1024  # training chunks (sequential: the rolled-out states are kept for these)
    max_iters: int = 300  # gradient steps per tau (parallel: for all taus at once, n times the batch)
    min_iters: int = 40
    lr: float = 0.5  # Adam step, in timesteps
    tol: float = 0.05  # converged when the mean tau of the last `window` steps moves less than this
    window: int = 20
    align_last: bool = False  # also align the step that lands on clean data (see the module doc)
    seed: int = 0


class _Chunks:
    """Normalized action chunks x0 [N, H, A] and their conditions [N, C]."""

    def __init__(self, policy, obs: np.ndarray, action: np.ndarray):
        dev = policy.device
        with torch.no_grad():
            self.x0 = policy.normalizer.normalize("action", torch.as_tensor(action, device=dev))
            self.cond = policy.condition(torch.as_tensor(obs, device=dev))

    def __len__(self) -> int:
        return len(self.x0)


def _next_t(plan: Plan) -> torch.Tensor:
    """The time each step arrives at: the next step's, and 0 after the last."""
    return torch.cat([plan.t[1:], plan.t.new_zeros(1)]) if plan.t.numel() else plan.t


def _rows(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (like.dim() - 1)))


def _step_noise(plan: Plan, k: torch.Tensor, shape, gen: torch.Generator) -> torch.Tensor:
    """The ancestral noise of steps k [M] (zero for ODE solvers and for steps that draw none)."""
    noisy = torch.tensor(plan.noisy, device=k.device, dtype=plan.std.dtype)[k]
    z = torch.randn(shape, generator=gen, device=k.device)
    return _rows(plan.std[k] * noisy, z) * z


def _loss(plan: Plan, net, x, k, cond, history, tau, z) -> torch.Tensor:
    """Eq. 5 per row, for rows x [M, ...] at steps k [M] with input timesteps tau [M] (the only
    differentiable input) and step noise z."""
    rows = torch.arange(len(x), device=x.device)
    x_next = step_rows(plan, net, cond, x, k, rows, history, t=tau) + z
    with torch.no_grad():
        target = net(x, plan.t[k], cond)
    pred = net(x_next, _next_t(plan)[k], cond)
    return (pred - target).square().flatten(1).mean(1)


def _decay(opt: torch.optim.Optimizer, s: AlignSettings) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay of the tau step to a tenth over max_iters: a noisy, nearly flat loss would
    otherwise leave Adam (whose steps are ~lr whatever the gradient's size) wandering."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(s.max_iters, 1), eta_min=0.1 * s.lr)


def _settled(trace: list, window: int, min_iters: int, tol: float) -> bool:
    """Whether the running mean of tau stopped moving: the mean of the last `window` values is
    within `tol` timesteps of the mean of the `window` before."""
    if len(trace) < max(min_iters, 2 * window):
        return False
    a = np.mean(trace[-window:], axis=0)
    b = np.mean(trace[-2 * window:-window], axis=0)
    return float(np.max(np.abs(a - b))) < tol


def _setup(policy, s: AlignSettings) -> tuple[Plan, torch.Generator, np.random.Generator]:
    """The chain's plan and the seeded random sources a strategy draws from."""
    plan = get_plan(policy.scheduler, s.solver, s.steps, s.spacing, policy.device)
    return plan, torch.Generator(policy.device).manual_seed(s.seed), np.random.default_rng(s.seed)


def _fit_taus(tau: torch.Tensor, batch_loss, s: AlignSettings, bar, max_t: float, trace: list,
              scale: int | None = None, frozen: int | None = None) -> list[float]:
    """Adam on the input timestep(s) `tau`, one step per iteration of `bar` (a tqdm range) on the
    minibatch loss `batch_loss()` draws, until the trace of tau settles. Appends tau to `trace`
    after every step (a float for one tau, an array for all of them) and returns the minibatch
    losses. `scale` multiplies the loss before the backward pass; tau[`frozen`] stays put."""
    opt = torch.optim.Adam([tau], lr=s.lr)
    sched = _decay(opt, s)
    curve = []
    for _ in bar:
        loss = batch_loss()
        opt.zero_grad()
        (loss if scale is None else loss * scale).backward()
        if frozen is not None:
            tau.grad[frozen] = 0.0  # Adam moves nothing whose gradient was always 0
        opt.step()
        sched.step()
        with torch.no_grad():
            tau.clamp_(0.0, max_t)
        trace.append(float(tau.detach()) if tau.dim() == 0 else tau.detach().cpu().numpy().copy())
        curve.append(float(loss.detach()))
        if _settled(trace, s.window, s.min_iters, s.tol):
            break
    bar.close()
    return curve


class _Pool:
    """The sequential strategy's training chunks rolled along the chain: their points `x` at the
    step being learned, the multistep solver's `history`, and that step's rows `ks` and noise `z`."""

    def __init__(self, plan: Plan, net, chunks: _Chunks, gen: torch.Generator, device):
        self.plan, self.net, self.cond, self.device = plan, net, chunks.cond, device
        self.ks = self.z = None  # set by start_step
        noise = torch.randn(chunks.x0.shape, generator=gen, device=device)
        self.x = plan.sqrt_a[0] * chunks.x0 + plan.sqrt_1ma[0] * noise
        self.history = new_history(plan, self.x)

    def __len__(self) -> int:
        return len(self.x)

    def start_step(self, k: int, gen: torch.Generator) -> None:
        self.ks = torch.full((len(self),), k, device=self.device, dtype=torch.long)
        self.z = _step_noise(self.plan, self.ks, self.x.shape, gen)  # this step's noise for every row, fixed

    def loss(self, idx: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        # history[idx] is a copy: what the training steps write stays out of the pool
        history = None if self.history is None else self.history[idx]
        return _loss(self.plan, self.net, self.x[idx], self.ks[idx], self.cond[idx], history,
                     tau.expand(len(idx)), self.z[idx]).mean()

    def batch_loss(self, rng: np.random.Generator, batch_size: int, tau: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(rng.integers(0, len(self), batch_size), device=self.device)
        return self.loss(idx, tau)

    @torch.no_grad()
    def advance(self, tau: torch.Tensor) -> None:
        """Every row one step along the chain, at input timestep `tau`."""
        N = len(self)
        for lo in range(0, N, 256):
            idx = torch.arange(lo, min(N, lo + 256), device=self.device)
            self.x[idx] = step_rows(self.plan, self.net, self.cond, self.x[idx], self.ks[idx], idx,
                                    self.history, t=tau.expand(len(idx))) + self.z[idx]


def align_sequential(policy, chunks: _Chunks, s: AlignSettings, progress: bool = True) -> dict:
    plan, gen, rng = _setup(policy, s)
    dev, n, max_t = policy.device, plan.n, plan_max_t(policy)
    pool = _Pool(plan, policy.net, chunks, gen, dev)
    eval_idx = torch.arange(min(len(chunks), 256), device=dev)
    taus, before, after, curve, iters, converged = [], [], [], [], [], []
    for k in range(n):
        pool.start_step(k, gen)
        t_k = float(plan.t[k])
        with torch.no_grad():
            before.append(float(pool.loss(eval_idx, torch.tensor(t_k, device=dev))))
        tau = torch.tensor(t_k, device=dev, requires_grad=True)
        trace = [t_k]
        todo = s.max_iters if (k < n - 1 or s.align_last) else 0
        bar = tqdm(range(todo), desc=f"align {s.solver}-{n} step {k + 1}/{n}", leave=False,
                   disable=not progress)
        curve += _fit_taus(tau, lambda: pool.batch_loss(rng, s.batch_size, tau), s, bar, max_t, trace)
        value = float(np.mean(trace[-s.window:]))  # averaged over the last steps: Adam jitters
        taus.append(value)
        iters.append(len(trace) - 1)
        converged.append(len(trace) - 1 < todo or todo == 0)
        with torch.no_grad():
            tau_v = torch.tensor(value, device=dev)
            after.append(float(pool.loss(eval_idx, tau_v)))
            pool.advance(tau_v)
    return {"taus": taus, "loss_before": before, "loss_after": after, "loss_curve": curve, "iters": iters,
            "converged": converged}


@dataclass(frozen=True)
class _Marginals:
    """The parallel strategy's states: x_{t_k} drawn from q(. | x0) for chunks of the training set."""
    plan: Plan
    net: torch.nn.Module
    chunks: _Chunks
    device: torch.device | str

    def states(self, idx, k, tau_all, noise) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_{t_k} ~ q(. | x0) and, for the multistep solver, the previous step's data estimate
        at the point q gives t_{k-1} with the same noise (the taus there held fixed)."""
        plan, x0 = self.plan, self.chunks.x0[idx]
        x = _rows(plan.sqrt_a[k], x0) * x0 + _rows(plan.sqrt_1ma[k], x0) * noise
        if not plan.multistep:
            return x, None
        km = (k - 1).clamp(min=0)
        with torch.no_grad():
            xp = _rows(plan.sqrt_a[km], x0) * x0 + _rows(plan.sqrt_1ma[km], x0) * noise
            x0p = plan.denoise(km, xp, self.net(xp, tau_all.detach()[km], self.chunks.cond[idx]))
        history = x.new_zeros((len(idx), plan.n, *x.shape[1:]))
        history[torch.arange(len(idx), device=self.device), km] = x0p
        return x, history

    def loss_rows(self, idx, k, tau_all, noise, z) -> torch.Tensor:
        x, history = self.states(idx, k, tau_all, noise)
        return _loss(self.plan, self.net, x, k, self.chunks.cond[idx], history, tau_all[k], z)

    def batch_loss(self, rng: np.random.Generator, per: int, tau_all: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
        """The mean loss of `per` random chunks, every step in every batch, at fresh noise."""
        n, dev = self.plan.n, self.device
        idx = torch.as_tensor(rng.integers(0, len(self.chunks), per), device=dev)
        k = torch.arange(per, device=dev) % n
        noise = torch.randn((per, *self.chunks.x0.shape[1:]), generator=gen, device=dev)
        return self.loss_rows(idx, k, tau_all, noise, _step_noise(self.plan, k, noise.shape, gen)).mean()


@dataclass(frozen=True)
class _EvalSet:
    """A fixed evaluation set: the same `m` chunks at every step, with fixed noise."""
    m: int
    idx: torch.Tensor
    k: torch.Tensor
    noise: torch.Tensor
    z: torch.Tensor

    @classmethod
    def draw(cls, plan: Plan, chunks: _Chunks, gen: torch.Generator, device) -> _EvalSet:
        m, n = min(len(chunks), 256), plan.n
        idx = torch.arange(m, device=device).repeat(n)
        k = torch.arange(n, device=device).repeat_interleave(m)
        noise = torch.randn((len(idx), *chunks.x0.shape[1:]), generator=gen, device=device)
        return cls(m, idx, k, noise, _step_noise(plan, k, noise.shape, gen))

    @torch.no_grad()
    def per_step(self, q: _Marginals, tau_all: torch.Tensor) -> list[float]:
        """Each step's mean loss over the set at input timesteps `tau_all`."""
        rows = torch.cat([q.loss_rows(self.idx[lo:lo + 512], self.k[lo:lo + 512], tau_all,
                                      self.noise[lo:lo + 512], self.z[lo:lo + 512])
                          for lo in range(0, len(self.idx), 512)])
        return [float(v) for v in rows.reshape(q.plan.n, self.m).mean(1)]


def align_parallel(policy, chunks: _Chunks, s: AlignSettings, progress: bool = True) -> dict:
    plan, gen, rng = _setup(policy, s)
    dev, n = policy.device, plan.n
    q = _Marginals(plan, policy.net, chunks, dev)
    evals = _EvalSet.draw(plan, chunks, gen, dev)
    tau_all = plan.t.clone().requires_grad_(True)
    before = evals.per_step(q, tau_all)
    total = s.max_iters
    bar = tqdm(range(total), desc=f"align {s.solver}-{n} all steps", leave=False, disable=not progress)
    per = s.batch_size * n  # batch_size rows per step: the sequential strategy's work, all at once
    trace = []
    # scale n: the sum of the steps' losses, so that each tau sees its own loss's gradient
    curve = _fit_taus(tau_all, lambda: q.batch_loss(rng, per, tau_all, gen), s, bar, plan_max_t(policy),
                      trace, scale=n, frozen=None if s.align_last else n - 1)
    taus = np.mean(trace[-s.window:], axis=0)
    after = evals.per_step(q, torch.as_tensor(taus, device=dev, dtype=torch.float32))
    return {"taus": [float(v) for v in taus], "loss_before": before, "loss_after": after, "loss_curve": curve,
            "iters": [len(trace)] * n, "converged": [len(trace) < total] * n}


def plan_max_t(policy) -> float:
    return float(policy.cfg.schedule.num_train_timesteps - 1)


def learn(policy, obs: np.ndarray, action: np.ndarray, s: AlignSettings, progress: bool = True) -> dict:
    """Learn the taus of chain (s.solver, s.steps, s.spacing) on the given training windows."""
    if s.strategy not in STRATEGIES:
        raise UserError(f"strategy: {s.strategy!r} is not one of {', '.join(STRATEGIES)}")
    for p in policy.net.parameters():  # the network stays as trained; only tau moves
        p.requires_grad_(False)
    chunks = _Chunks(policy, obs, action)
    start = time.perf_counter()
    fn = align_sequential if s.strategy == "sequential" else align_parallel
    out = fn(policy, chunks, s, progress)
    out["time_s"] = time.perf_counter() - start
    plan = get_plan(policy.scheduler, s.solver, s.steps, s.spacing, policy.device)
    out["timesteps"] = [float(v) for v in plan.t]
    return out


@torch.no_grad()
def trajectory_gap(policy, obs: np.ndarray, s: AlignSettings, taus: tuple[float, ...] | None,
                   reference: dict[int, torch.Tensor], noise: torch.Tensor) -> list[float]:
    """Mean L2 distance (normalized action chunks) between each point the few-step chain
    reaches and the reference trajectory's point at the same time; the last is the final error."""
    from policy.samplers import get_sampler

    cond = policy.condition(torch.as_tensor(obs, device=policy.device))
    points = []
    gen = torch.Generator(policy.device).manual_seed(s.seed + 1)
    get_sampler(s.solver)(policy.net, cond, policy.scheduler, noise, gen, steps=s.steps, spacing=s.spacing,
                          taus=taus, callback=lambda info: points.append(info["x"]))
    plan = get_plan(policy.scheduler, s.solver, s.steps, s.spacing, policy.device)
    times = [int(t) for t in plan.timesteps[1:]]
    times.append(-1)  # clean
    return [float((p - reference[t]).flatten(1).norm(dim=1).mean()) for p, t in zip(points, times)]


@torch.no_grad()
def reference_trajectory(policy, obs: np.ndarray, noise: torch.Tensor) -> dict[int, torch.Tensor]:
    """The full-step DDIM trajectory from `noise`: time -> point (-1: the final chunk)."""
    from policy.samplers import get_sampler

    cond = policy.condition(torch.as_tensor(obs, device=policy.device))
    T = policy.cfg.schedule.num_train_timesteps
    points = {T - 1: noise}
    out = []
    get_sampler("ddim")(policy.net, cond, policy.scheduler, noise, None, steps=T, spacing="trailing",
                        callback=lambda info: out.append(info["x"]))
    for j, x in enumerate(out):
        points[T - 2 - j] = x  # after step j (at t = T-1-j) the chain is at T-2-j; -1 is clean
    return points
