"""`dp-train`: the Diffusion Policy recipe on a demonstration store.

AdamW with warm-up and cosine decay, EMA weights (diffusers' EMAModel), periodic validation
loss, TensorBoard logs, atomic checkpoints. Running the same command again resumes from the
run's `latest` checkpoint; the same seed gives the same run.

Under `torchrun --nproc_per_node=N -m policy.train <same arguments>` the run is data parallel
(`policy.distributed`): every process draws the same global batch and trains on its share of it
(DistributedDataParallel averages the gradients), so N processes take the steps one would;
process 0 writes checkpoints and logs. The checkpoints do not depend on N: resume with another.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.cli import command
from common.errors import UserError
from common.lock import exclusive
from common.files import naming, remove_stale_partials
from envs.store import open_store, select_episodes
from envs.tasks import EXTERNAL, ObsConfig, TaskConfig, get_task
from policy.device import resolve_device
from policy.checkpoint import (latest, load_meta, load_normalizer, load_weights, read_file, save_checkpoint,
                               saved_config)
from policy.diffusion import DiffusionPolicy, PolicyConfig, TrainingLoss
from policy.distributed import World, join, leave
from policy.normalizer import Normalizer
from policy.windows import Observations, episode_split, gather, read_observations, window_index


@dataclass
class TrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    obs: ObsConfig = field(default_factory=ObsConfig)  # obs=image: cameras + proprioception (an image store)
    data: str = "data/${task.name}.zarr"
    # which of the store's episodes: all, or names of its per-episode records joined by "+"
    # (an mh store: better, okay, worse, operator<N>, clockwise, counterclockwise)
    episodes: str = "all"
    out: str = "outputs/${task.name}"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    steps: int = 2500
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 200
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    val_fraction: float = 0.05
    val_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # the newest N step-* directories (more: success against training time)
    log_every: int = 25
    min_episodes: int = 2
    seed: int = 0
    threads: int = 2
    device: str = "auto"  # auto: cuda when present
    stop_at: int | None = None  # stop (with a checkpoint) after this step, as an interruption would
    progress: bool = True
    nproc: int = 1  # processes on this machine training data parallel (torchrun's launcher, run for you)
    init: str | None = None  # a fresh run starts from this policy's EMA weights (a run, checkpoint or zoo/)

    def __post_init__(self):
        """Numbers that cannot make a run fail here, before anything is read or written."""
        at_least = {"steps": 1, "batch_size": 1, "threads": 1, "nproc": 1, "val_every": 1,
                    "checkpoint_every": 1, "log_every": 1, "warmup_steps": 0, "min_episodes": 1,
                    "keep_checkpoints": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise UserError(f"{name}: {getattr(self, name)} must be at least {low}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr: {self.lr} must be a positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"weight_decay: {self.weight_decay} must be a non-negative number")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val_fraction: {self.val_fraction} is not in [0, 1)")
        if not 0 <= self.ema_max_decay <= 1:
            raise UserError(f"ema_max_decay: {self.ema_max_decay} is not in [0, 1]")
        if not self.ema_power > 0:
            raise UserError(f"ema_power: {self.ema_power} must be positive")
        if self.stop_at is not None and self.stop_at < 1:
            raise UserError(f"stop_at: {self.stop_at} must be at least 1")


class Batches:
    """Random training windows drawn from arrays held in memory (stores here are small; camera
    frames stay uint8 until a window is drawn)."""

    def __init__(self, obs: Observations, action: np.ndarray, rows: np.ndarray, cfg: PolicyConfig):
        self.obs, self.action, self.rows, self.cfg = obs, action, rows, cfg

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        obs = gather(self.obs, rows, self.cfg.n_obs_steps)
        act = gather(self.action, rows, self.cfg.horizon)
        return torch.as_tensor(obs, device=device), torch.as_tensor(act, device=device)

    def sample(self, rng: np.random.Generator, batch: int, device: torch.device,
               share: tuple[int, int] | None = None):
        """`batch` random windows, or of them the rows `share` (start, stop): every process of a
        data-parallel run draws the same batch and takes its own part."""
        rows = self.rows[rng.integers(0, len(self.rows), batch)]
        return self.get(rows if share is None else rows[share[0]:share[1]], device)


def store_layout(cfg: TrainConfig, store, obs_cfg: ObsConfig) -> tuple[dict, dict]:
    """The observation layout a policy trained on `store` records, and what else its metadata
    says of the store: a robosuite task's, or for task=external the store's own (its features,
    for a robot client to send)."""
    if cfg.task.name == EXTERNAL:
        if obs_cfg.image:
            raise UserError("obs: task=external trains on the store's numeric features (obs=state); "
                            "its camera frames are kept in the store")
        if not store.attrs.get("obs_layout"):
            raise UserError(f"{cfg.data}: records no obs_layout (an imported LeRobotDataset does)")
        lerobot = store.attrs.get("lerobot") or {}
        features = {k: lerobot.get(k) for k in ("features", "obs", "action", "fps")}
        return store.attrs["obs_layout"], {"features": features}
    spec = get_task(cfg.task.name)
    if store["obs"].shape[1] != spec.obs_dim:
        raise UserError(f"{cfg.data}: data/obs has {store['obs'].shape[1]} dims; "
                        f"task {spec.name} has {spec.obs_dim}")
    if obs_cfg.image:
        return spec.layout(obs_cfg), {"obs": obs_cfg.to_dict()}
    return store.attrs.get("obs_layout") or {k: list(v) for k, v in spec.obs_layout.items()}, {}


def load_data(cfg: TrainConfig) -> tuple[Batches, Batches | None, Normalizer, dict]:
    obs_cfg = ObsConfig.from_dict(cfg.obs)
    with open_store(cfg.data, task=cfg.task.name) as store:
        if store.n_episodes < cfg.min_episodes:
            raise UserError(f"{cfg.data}: has {store.n_episodes} episodes; "
                            f"training needs at least {cfg.min_episodes}")
        for key in ("obs", "action"):
            if key not in store.keys:
                raise UserError(f"{cfg.data}: data/{key}: missing")
        layout, described = store_layout(cfg, store, obs_cfg)
        obs = read_observations(store, obs_cfg, str(cfg.data))
        action = np.asarray(store["action"], dtype=np.float32)
        ends = store.episode_ends
        chosen = select_episodes(store, cfg.episodes)
        if len(chosen) < cfg.min_episodes:
            raise UserError(f"episodes: {cfg.episodes!r} selects {len(chosen)} episodes of {cfg.data}; "
                            f"training needs at least {cfg.min_episodes}")
    p = cfg.policy
    train_eps, val_eps = (chosen[part] for part in episode_split(len(chosen), cfg.val_fraction, cfg.seed))
    train_rows = window_index(ends, train_eps, p.horizon, p.n_obs_steps, p.n_action_steps)
    val_rows = window_index(ends, val_eps, p.horizon, p.n_obs_steps, p.n_action_steps)
    starts = np.concatenate([[0], ends[:-1]])
    train_steps = np.concatenate([np.arange(starts[e], ends[e]) for e in train_eps])
    # An image policy normalizes its proprioception only; the encoder takes the frames as they are.
    normalizer = Normalizer.fit({"obs": obs.parts[0][train_steps], "action": action[train_steps]})
    meta = {"task": cfg.task.name, "obs_layout": {k: list(v) for k, v in layout.items()},
            # the training episodes are the selection's others: not written, as they follow from these
            "data": str(cfg.data), "val_episodes": val_eps.tolist(), **described,
            **({"episodes": cfg.episodes} if cfg.episodes != "all" else {}),
            # the scene its demonstrations were made in (can mh: the divider), which its episodes need
            **({"scene": store.attrs["scene"]} if store.attrs.get("scene") else {})}
    val = Batches(obs, action, val_rows, p) if len(val_rows) else None
    return Batches(obs, action, train_rows, p), val, normalizer, meta


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at `steps` (diffusers' schedule, as a function
    so that a resumed run needs no scheduler state)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def validation_loss(policy: DiffusionPolicy, net: torch.nn.Module, val: Batches, device, seed: int,
                    objective: torch.nn.Module | None = None) -> float:
    """Mean loss of `net` on every validation window, with fixed noise (comparable across steps):
    the training objective's (`objective`, over `policy`'s network; default the diffusion loss)."""
    objective = TrainingLoss(policy) if objective is None else objective
    g = torch.Generator(device).manual_seed(seed)
    trained, policy.trainable = policy.trainable, net
    policy.eval()  # centre crops: the loss of the policy as it plans
    try:
        losses = []
        for i in range(0, len(val), 512):
            obs, act = val.get(val.rows[i : i + 512], device)
            losses.append(objective(obs, act, g).item() * len(obs))
        return sum(losses) / len(val)
    finally:
        policy.trainable = trained
        policy.train()


def start_from(model: torch.nn.Module, init: str, policy: DiffusionPolicy) -> None:
    """Load the EMA weights of the policy at `init` into `model` (fine-tuning a trained policy on
    more data or for more steps); its network must be the one `policy` describes, on observations
    and actions as wide as this run's store. The normalizer is the new run's, fitted on its own store."""
    from policy.checkpoint import resolve, saved_difference

    ckpt = resolve(init)
    meta = load_meta(ckpt)
    diff = saved_difference(saved_config(meta), json.loads(json.dumps(asdict(policy.cfg))), "policy")
    if diff is not None:
        key, a, b = diff
        raise UserError(f"init: {ckpt} has {key}={a!r}, this run {b!r}; "
                        "start from a policy with the same network")
    for key in ("obs_dim", "action_dim"):  # the first layers' widths: its weights would not fit this network
        if meta.get(key) != getattr(policy, key):
            was = (meta.get("meta") or {}).get("task")
            now = f"{getattr(policy, key)} (task {policy.meta.get('task')}, {policy.meta.get('data')})"
            raise UserError(f"init: {ckpt} has {key} {meta.get(key)} (task {was}), this run {now}; "
                            "start from a policy trained on the same observations and actions")
    load_weights(model, ckpt / "weights_ema.safetensors")


def check_resumable(resume: Path, state: dict, cfg: TrainConfig, distilled: dict | None = None) -> None:
    """Refuse to resume checkpoint `resume` (its trainer `state`) with another policy config,
    another store, or as another kind of run or distillation (`distilled`), naming what differs;
    the same store spelled differently (relative, absolute, a trailing slash) is the same store."""
    out = resume.parent.parent
    was, now = Path(state["data"]).resolve(), Path(cfg.data).resolve()
    if was != now:
        raise UserError(f"{out}: holds a run on data={was}, not {now}; "
                        "choose another out= (or the same data)")
    meta = load_meta(resume)
    was = (meta.get("meta") or {}).get("distilled")
    if (was is None) != (distilled is None):
        kinds = ("a training run (dp-train)", "a distillation (dp-distill)")
        raise UserError(f"{out}: holds {kinds[was is not None]}, not {kinds[distilled is not None]}; "
                        "choose another out=")
    for diff in (first_difference(saved_config(meta), json.loads(json.dumps(asdict(cfg.policy))), "policy"),
                 first_difference(was, distilled, "distilled") if was is not None else None):
        if diff is not None:
            key, a, b = diff
            key = key.removeprefix("distilled.")  # a distillation's settings are dp-distill's keys
            raise UserError(f"{out}: holds a run with {key}={a!r}, not {b!r}; "
                            f"choose another out= (or the same {key})")


def first_difference(a, b, where: str) -> tuple[str, object, object] | None:
    """The first dotted key at which nested dicts `a` and `b` differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{where}.{k}")
            if d is not None:
                return d
        return None
    return None if a == b else (where, a, b)


def train(cfg: TrainConfig, distill=None, command: str = "dp-train") -> Path:
    """Train (or resume) the run in `cfg.out`; returns its latest checkpoint. Each checkpoint's
    config.yaml holds `cfg`, resolved. `distill` (`policy.consistency.ConsistencySpec`): the run
    distills the teacher it names into a consistency student instead (dp-distill)."""
    from omegaconf import OmegaConf

    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)

    torch.set_num_threads(cfg.threads)
    world, device = join(resolve_device(cfg.device))
    # one run an `out`: a second would resume from this one's step and interleave its checkpoints
    with exclusive(cfg.out, command) if world.main else contextlib.nullcontext():
        return _train(cfg, world, device, config_yaml, distill)


class _Run:
    """One training run's moving parts: the policy, its optimizer and EMA weights, the random
    sources, and the counters a checkpoint keeps."""

    def __init__(self, cfg: TrainConfig, world, device: torch.device, config_yaml: str, train_set: Batches,
                 normalizer: Normalizer, meta: dict, distill=None):
        from diffusers.training_utils import EMAModel

        self.cfg, self.world, self.device, self.config_yaml = cfg, world, device, config_yaml
        self.out = Path(cfg.out)
        teacher = None
        if distill is not None:  # the teacher's normalizer: its noise estimates are in its units
            from dataclasses import asdict

            from policy.checkpoint import load_policy

            teacher = load_policy(distill.teacher, device=str(device))
            normalizer, meta = teacher.normalizer, {**meta, "distilled": asdict(distill)}
        torch.manual_seed(cfg.seed)  # the network's initial weights
        self.policy = DiffusionPolicy(cfg.policy, train_set.obs.dim, train_set.action.shape[1], normalizer,
                                      meta).to(device)
        self.model = self.policy.trainable  # the denoiser, and an image policy's encoder with it
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.95, 0.999),
                                           weight_decay=cfg.weight_decay)
        if cfg.init is not None:
            start_from(self.model, cfg.init, self.policy)
        self.ema = EMAModel(self.model.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True,
                            inv_gamma=1.0, power=cfg.ema_power)
        self.ema_net = copy.deepcopy(self.model)
        if teacher is None:
            self.objective = self.loss = TrainingLoss(self.policy)
        else:
            from policy.consistency import ConsistencyLoss

            self.objective = self.loss = ConsistencyLoss(self.policy, teacher, distill)
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.objective = DistributedDataParallel(self.objective)  # gradients averaged over the processes
        self.rng = np.random.default_rng(cfg.seed)
        self.noise_gen = torch.Generator(device).manual_seed(cfg.seed)
        self.step, self.elapsed = 0, 0.0
        self.data_s = self.compute_s = 0.0

    def resume(self) -> None:
        """Continue from the run's latest checkpoint, if it has one: weights, normalizer, optimizer,
        EMA, random sources and counters."""
        resume = latest(self.out)
        if resume is None:
            return
        device = self.device
        state = read_file(resume / "trainer.pt",
                          lambda p: torch.load(p, map_location=device, weights_only=False))
        check_resumable(resume, state, self.cfg, self.policy.meta.get("distilled"))
        load_weights(self.model, resume / "weights.safetensors")
        self.policy.normalizer = load_normalizer(resume)
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.loss.load_extra_state(state)
        self.rng.bit_generator.state = state["numpy_rng"]
        self.noise_gen.set_state(state["torch_rng"].to("cpu") if device.type == "cpu" else state["torch_rng"])
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        if self.world.main:
            print(f"resuming {self.out} from step {self.step}")

    def checkpoint(self) -> Path:
        self.ema.copy_to(self.ema_net.parameters())
        state = {"step": self.step, "elapsed_s": self.elapsed, "optimizer": self.optimizer.state_dict(),
                 "ema": self.ema.state_dict(), "numpy_rng": self.rng.bit_generator.state,
                 "torch_rng": self.noise_gen.get_state(), "data": str(Path(self.cfg.data).resolve()),
                 **self.loss.extra_state()}
        return save_checkpoint(self.out, self.step, self.policy, self.ema_net, state, self.config_yaml,
                               keep=self.cfg.keep_checkpoints)

    def train_step(self, train_set: Batches, share: tuple[int, int]) -> torch.Tensor:
        """One optimizer and EMA step on this process's share of a random batch; its loss."""
        cfg = self.cfg
        t0 = time.perf_counter()
        obs, act = train_set.sample(self.rng, cfg.batch_size, self.device, share)
        t1 = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        loss = self.objective(obs, act, self.noise_gen, (share[0], cfg.batch_size))
        if not torch.isfinite(loss):
            last = latest(self.out)
            raise UserError(f"loss: became {loss.item()} at step {self.step}; stopped, "
                            f"the last good checkpoint is {last if last else 'none (none was written yet)'}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.ema.step(self.model.parameters())
        self.loss.after_step()
        t2 = time.perf_counter()
        self.data_s, self.compute_s = self.data_s + (t1 - t0), self.compute_s + (t2 - t1)
        self.elapsed += t2 - t0
        self.step += 1
        return loss

    def log(self, bar, writer, loss: torch.Tensor) -> None:
        data_s, compute_s, step = self.data_s, self.compute_s, self.step
        bar.set_postfix(loss=f"{loss.item():.4f}", data=f"{100 * data_s / (data_s + compute_s):.1f}%")
        writer.add_scalar("train/loss", loss.item(), step)
        writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], step)
        writer.add_scalar("train/data_time_fraction", data_s / (data_s + compute_s), step)

    def validate(self, writer, val_set: Batches) -> None:
        self.ema.copy_to(self.ema_net.parameters())
        val = validation_loss(self.policy, self.ema_net, val_set, self.device, self.cfg.seed, self.loss)
        writer.add_scalar("val/loss_ema", val, self.step)
        tqdm.write(f"step {self.step}: val loss (EMA) {val:.4f}")

    def summary(self, ckpt: Path | None) -> str:
        data_s, compute_s = self.data_s, self.compute_s
        share = 100 * data_s / max(data_s + compute_s, 1e-9)
        return (f"{self.out}: step {self.step}/{self.cfg.steps}, {self.elapsed / 60:.1f} min of training; "
                f"data loading {share:.1f}% of step time; checkpoint {ckpt}")


class _Logs:
    """TensorBoard's writer, whose failed writes name its folder: its writer thread's OSError (a
    full disk, a file-size limit), raised at the next call, names no file."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        with naming(folder):
            self.writer = SummaryWriter(str(folder))

    def add_scalar(self, *args) -> None:
        with naming(self.folder):
            self.writer.add_scalar(*args)

    def close(self) -> None:
        with naming(self.folder):
            self.writer.close()


def _train(cfg: TrainConfig, world, device: torch.device, config_yaml: str, distill=None) -> Path:
    share = world.share(cfg.batch_size)
    train_set, val_set, normalizer, meta = load_data(cfg)
    run = _Run(cfg, world, device, config_yaml, train_set, normalizer, meta, distill)
    run.resume()
    if world.main:
        remove_stale_partials(run.out / "checkpoints")  # what a killed run of this `out` left half-written
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
    writer = _Logs(run.out / "tensorboard") if world.main else None
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"train {cfg.task.name}", unit="step",
               disable=not cfg.progress or not world.main)
    run.policy.train()
    try:
        while run.step < end:
            loss = run.train_step(train_set, share)
            bar.update(1)
            step = run.step
            if world.main and (step % cfg.log_every == 0 or step == end):
                run.log(bar, writer, loss)
            if world.main and val_set is not None and (step % cfg.val_every == 0 or step == end):
                run.validate(writer, val_set)
            if step % cfg.checkpoint_every == 0 or step == end:
                if world.main:
                    run.checkpoint()
                world.barrier()  # no process runs ahead of a checkpoint it may resume from
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        leave(world)
    ckpt = latest(run.out)
    if not world.main:
        return ckpt
    print(run.summary(ckpt))
    return ckpt


@command("train", TrainConfig)
def main(typed: TrainConfig) -> None:
    if typed.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from common.cli import HYDRA_QUIET
        from policy.distributed import launch

        args = [a for a in sys.argv[1:] if a not in HYDRA_QUIET and not a.startswith("nproc=")]
        # a global batch that does not split: refused here, once
        World(0, typed.nproc).share(typed.batch_size)
        sys.exit(launch(typed.nproc, ["-m", "policy.train", *args], "dp-train"))
    train(typed)


if __name__ == "__main__":
    main()
