"""`dp-distill checkpoint=<teacher> out=<dir>`: distill a trained diffusion policy into a consistency
student (`policy.consistency`) that plans with `consistency1`..`consistency3`.

The run is a dp-train run in every other way (`policy.train`): the teacher's network, task,
observations and demonstration store; resumable from `latest` by the same command, progress,
TensorBoard logs, validation (the distillation loss of the EMA weights on the teacher's held-out
episodes) and atomic checkpoints, which every command loads as it loads a trained policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.cli import command
from common.errors import UserError


@dataclass
class DistillConfig:
    checkpoint: str = "???"  # the teacher: a run, a checkpoint or a zoo/ policy
    out: str = "???"
    data: str | None = None  # default: the demonstration store the teacher was trained on
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 100
    skip: int = 5  # training steps the teacher's DDIM step spans
    target_decay: float = 0.95  # the target network's EMA decay (0: the student, without gradient)
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    val_fraction: float = 0.05
    val_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25
    seed: int = 0
    threads: int = 2
    device: str = "auto"
    stop_at: int | None = None
    progress: bool = True


def run_config(cfg: DistillConfig):
    """The dp-train run that distills `cfg.checkpoint` (its network, task, observations and store,
    starting from its EMA weights), and the distillation's spec."""
    from dataclasses import fields

    from policy.checkpoint import build_policy, load_meta, load_normalizer, resolve
    from policy.consistency import ConsistencySpec
    from policy.train import TrainConfig

    ckpt = resolve(cfg.checkpoint)
    meta = load_meta(ckpt)
    saved = meta.get("meta") or {}
    if saved.get("distilled"):
        raise UserError(f"checkpoint: {ckpt} is a consistency student already (distilled from "
                        f"{saved['distilled'].get('teacher')}); distill its teacher")
    teacher = build_policy(meta, load_normalizer(ckpt))
    if teacher.encoder is not None:
        raise UserError(f"checkpoint: {ckpt} is an image policy; dp-distill distills state policies "
                        "(the student's encoder would need a target of its own)")
    data = cfg.data or saved.get("data")
    if not data or not Path(data).exists():
        raise UserError(f"data: {data or 'none recorded'} (the teacher's demonstrations) is not here; "
                        f"collect them as the teacher's were, or name a store of task {saved.get('task')} "
                        "with data=")
    spec = ConsistencySpec(teacher=str(ckpt), skip=cfg.skip, target_decay=cfg.target_decay)
    spec.check(teacher.cfg.schedule.num_train_timesteps)
    shared = {f.name: getattr(cfg, f.name) for f in fields(DistillConfig)
              if f.name not in ("checkpoint", "data", "skip", "target_decay")}
    train_cfg = TrainConfig(**shared, data=str(data), init=str(ckpt), policy=teacher.cfg,
                            episodes=saved.get("episodes", "all"))
    train_cfg.task.name = saved.get("task", train_cfg.task.name)
    if saved.get("obs"):
        from envs.tasks import ObsConfig

        train_cfg.obs = ObsConfig.from_dict(saved["obs"])
    return train_cfg, spec


@command("distill", DistillConfig)
def main(cfg: DistillConfig) -> None:
    from policy.train import train

    train_cfg, spec = run_config(cfg)
    train(train_cfg, distill=spec, command="dp-distill")


if __name__ == "__main__":
    main()
