"""Checkpoints: one directory per saved step, written atomically, with `latest` pointing at the
newest complete one.

    <run>/checkpoints/step-0001000/
        weights.safetensors      raw weights
        weights_ema.safetensors  EMA weights (what `policy.load` plans with by default)
        normalizer.safetensors   fitted on the training split
        policy.json              architecture, dims, task and observation layout, step
        config.yaml              the resolved training config
        trainer.pt               optimizer, LR schedule, EMA state, RNG states (to resume)
    <run>/checkpoints/latest     symlink to the newest step directory
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from envs.errors import UserError
from policy.diffusion import DiffusionPolicy, PolicyConfig
from policy.network import UNetConfig
from policy.normalizer import Normalizer
from policy.schedule import ScheduleConfig

LATEST = "latest"


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: str | Path, step: int, policy: DiffusionPolicy, ema_net: torch.nn.Module,
                    trainer_state: dict, config_yaml: str, keep: int = 2) -> Path:
    """Write checkpoint `step` under `run_dir/checkpoints`, point `latest` at it, and keep the
    newest `keep` checkpoints. Nothing is visible until the directory is complete."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=root))
    try:
        save_file(_state(policy.net), tmp / "weights.safetensors")
        save_file(_state(ema_net), tmp / "weights_ema.safetensors")
        save_file(policy.normalizer.state_dict(), tmp / "normalizer.safetensors")
        meta = {"step": step, "obs_dim": policy.obs_dim, "action_dim": policy.action_dim,
                "config": asdict(policy.cfg), "meta": policy.meta,
                "n_params": sum(p.numel() for p in policy.net.parameters())}
        (tmp / "policy.json").write_text(json.dumps(meta, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        torch.save(trainer_state, tmp / "trainer.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link = root / f".{LATEST}.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, root / LATEST)  # atomic: `latest` is always a complete checkpoint
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """The checkpoint directory that `path` names: itself, or a run's / checkpoints dir's latest."""
    p = Path(path)
    for candidate in (p, p / LATEST, p / "checkpoints" / LATEST):
        if (candidate / "policy.json").is_file():
            return candidate.resolve()
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint")
    raise UserError(f"{p}: not a checkpoint (no policy.json here, nor a checkpoints/latest)")


def latest(run_dir: str | Path) -> Path | None:
    link = Path(run_dir) / "checkpoints" / LATEST
    return link.resolve() if (link / "policy.json").is_file() else None


def build_policy(meta: dict, normalizer: Normalizer) -> DiffusionPolicy:
    cfg = dict(meta["config"])
    cfg = PolicyConfig(**{**cfg, "unet": UNetConfig(**cfg["unet"]), "schedule": ScheduleConfig(**cfg["schedule"])})
    return DiffusionPolicy(cfg, meta["obs_dim"], meta["action_dim"], normalizer, meta.get("meta"))


def load_policy(path: str | Path, device: str = "cpu", ema: bool = True) -> DiffusionPolicy:
    ckpt = resolve(path)
    try:
        meta = json.loads((ckpt / "policy.json").read_text())
        normalizer = Normalizer.from_state_dict(load_file(ckpt / "normalizer.safetensors"))
        policy = build_policy(meta, normalizer)
        policy.net.load_state_dict(load_file(ckpt / ("weights_ema.safetensors" if ema else "weights.safetensors")))
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise UserError(f"{ckpt}: unreadable checkpoint ({err.__class__.__name__}: {str(err).splitlines()[0]})") from err
    policy.meta["checkpoint"] = str(ckpt)
    policy.meta["step"] = meta["step"]
    return policy.to(device).eval()


def check_matches(policy: DiffusionPolicy, task: str, obs_layout: dict) -> None:
    """Refuse a policy trained for another task or observation layout."""
    ckpt = policy.meta.get("checkpoint", "checkpoint")
    if policy.meta.get("task") != task:
        raise UserError(f"{ckpt}: policy was trained on task {policy.meta.get('task')!r}, not {task!r}")
    want = {k: list(v) for k, v in obs_layout.items()}
    if policy.meta.get("obs_layout") != want:
        raise UserError(f"{ckpt}: observation layout {policy.meta.get('obs_layout')} does not match the env's {want}")
