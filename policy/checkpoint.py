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

import errno
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.files import building, replace_symlink
from policy.device import resolve_device
from policy.diffusion import DiffusionPolicy, PolicyConfig
from policy.network import UNetConfig
from policy.transformer import TransformerConfig
from policy.normalizer import Normalizer
from policy.schedule import ScheduleConfig
from policy.vision import VisionConfig

LATEST = "latest"
DESCRIPTION = "parapolicy.policy"  # the weights files' record of their network (safetensors metadata)
T = TypeVar("T")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def weights_metadata(policy: DiffusionPolicy) -> dict[str, str]:
    """What a weights file records of the network it holds (safetensors metadata), so that a
    policy.json edited after the fact is caught at load (`check_description`)."""
    return {DESCRIPTION: json.dumps(_description(policy), sort_keys=True)}


def _description(policy: DiffusionPolicy) -> dict:
    return {"config": asdict(policy.cfg), "obs_dim": policy.obs_dim, "action_dim": policy.action_dim}


def save_checkpoint(run_dir: str | Path, step: int, policy: DiffusionPolicy, ema_net: torch.nn.Module,
                    trainer_state: dict, config_yaml: str, keep: int = 2) -> Path:
    """Write checkpoint `step` under `run_dir/checkpoints`, point `latest` at it, and keep the
    newest `keep` checkpoints. Nothing is visible until the directory is complete."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    meta = {"step": step, "obs_dim": policy.obs_dim, "action_dim": policy.action_dim,
            "config": asdict(policy.cfg), "meta": policy.meta,
            "n_params": sum(p.numel() for p in policy.trainable.parameters())}
    with building(final) as tmp:
        described = weights_metadata(policy)
        for name, write in (
                ("weights.safetensors", lambda f: save_file(_state(policy.trainable), f, described)),
                ("weights_ema.safetensors", lambda f: save_file(_state(ema_net), f, described)),
                ("normalizer.safetensors", lambda f: save_file(policy.normalizer.state_dict(), f)),
                ("policy.json", lambda f: f.write_text(json.dumps(meta, indent=1))),
                ("config.yaml", lambda f: f.write_text(config_yaml)),
                ("trainer.pt", lambda f: torch.save(trainer_state, f))):
            _write(tmp / name, final / name, write)
    replace_symlink(root / LATEST, final.name)  # atomic: `latest` is always a complete checkpoint
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp: Path, final: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)`; a failure to write, as an OSError naming `final` (printed in one line; the
    partial checkpoint is removed). safetensors raises SafetensorError and torch.save a RuntimeError
    (`unexpected pos 576 vs 534`) on a full disk, and a failed write of an open file names no file."""
    try:
        write(tmp)
    except OSError as err:
        raise OSError(err.errno or errno.EIO, err.strerror or str(err), str(final)) from err
    except Exception as err:  # noqa: BLE001  (SafetensorError, RuntimeError: the write failed)
        code = re.search(r"os error (\d+)", str(err))
        why = (os.strerror(int(code.group(1))) if code else
               f"the write failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
               "the disk may be full or a file-size limit reached")
        raise OSError(int(code.group(1)) if code else errno.EIO, why, str(final)) from err


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


def saved_config(meta: dict) -> dict:
    """The policy config `meta` (a policy.json) records, with the keys PolicyConfig gained since it
    was written set to what that policy was: policies before `net` were all UNets."""
    return {"net": "unet", "transformer": asdict(TransformerConfig()), **meta["config"]}


def build_policy(meta: dict, normalizer: Normalizer) -> DiffusionPolicy:
    cfg = saved_config(meta)
    cfg = PolicyConfig(**{**cfg, "unet": UNetConfig(**cfg["unet"]),
                          "transformer": TransformerConfig(**cfg["transformer"]),
                          "schedule": ScheduleConfig(**cfg["schedule"]),
                          "vision": VisionConfig(**cfg.get("vision", {}))})
    return DiffusionPolicy(cfg, meta["obs_dim"], meta["action_dim"], normalizer, meta.get("meta"))


def read_file(path: Path, load: Callable[[Path], T]) -> T:
    """`load(path)`, or UserError naming the file when it is missing or damaged. A truncated
    safetensors file raises SafetensorError, a truncated trainer.pt RuntimeError, EOFError or an
    unpickling error, a cut JSON file ValueError: whatever a loader raises on bad bytes is a
    damaged file here, not a bug."""
    if not path.is_file():
        raise UserError(f"{path}: missing from the checkpoint")
    try:
        return load(path)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"{path}: unreadable ({type(err).__name__}: {first}); the file is damaged or "
                        f"incomplete") from err


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file into `module`; UserError naming the file if it is damaged, holds
    NaN or inf, or its tensors do not fit the architecture."""
    state = read_file(path, load_file)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad} holds NaN or inf; the weights are damaged")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: does not fit the network of {path.parent / 'policy.json'} "
                        f"({str(err).splitlines()[0]})") from None


def check_description(policy: DiffusionPolicy, path: Path) -> None:
    """Refuse a policy.json that describes another network than the weights file at `path` was
    saved with (where the file says: files written before the record are taken as they are)."""
    recorded = read_file(path, lambda p: safe_open(p, "pt").metadata() or {}).get(DESCRIPTION)
    if recorded is None:
        return
    diff = saved_difference(json.loads(recorded), _description(policy))
    if diff is not None:
        key, saved, now = diff
        raise UserError(f"{path.parent / 'policy.json'}: {key} is {now!r}, but the weights were saved with "
                        f"{saved!r}; the file was edited or belongs to other weights")


def saved_difference(saved, now, where: str = "") -> tuple[str, object, object] | None:
    """(dotted key, saved value, current value) of the first key of `saved` that `now` differs in."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for k, v in saved.items():
            d = saved_difference(v, now.get(k), f"{where}.{k}" if where else k)
            if d is not None:
                return d
        return None
    return None if saved == now else (where, saved, now)


def load_meta(ckpt: Path) -> dict:
    return read_file(ckpt / "policy.json", lambda p: json.loads(p.read_text()))


def load_normalizer(ckpt: Path) -> Normalizer:
    return read_file(ckpt / "normalizer.safetensors", lambda p: Normalizer.from_state_dict(load_file(p)))


def load_policy(path: str | Path, device: str = "cpu", ema: bool = True) -> DiffusionPolicy:
    ckpt = resolve(path)
    meta = load_meta(ckpt)
    normalizer = load_normalizer(ckpt)
    try:
        policy = build_policy(meta, normalizer)
    except UserError as err:
        raise UserError(f"{ckpt / 'policy.json'}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{ckpt / 'policy.json'}: not a policy description "
                        f"({type(err).__name__}: {err})") from None
    check_normalizer_fits(policy, ckpt)
    weights = ckpt / ("weights_ema.safetensors" if ema else "weights.safetensors")
    check_description(policy, weights)
    load_weights(policy.trainable, weights)
    policy.meta["checkpoint"] = str(ckpt)
    policy.meta["step"] = meta["step"]
    return policy.to(resolve_device(device)).eval()


def check_normalizer_fits(policy: DiffusionPolicy, ckpt: Path) -> None:
    """Refuse a normalizer whose fields have other dimensions than policy.json's network."""
    low_dim = policy.obs_dim if policy.encoder is None else policy.encoder.low_dim
    for key, dim in (("obs", low_dim), ("action", policy.action_dim)):
        if key not in policy.normalizer.stats:
            raise UserError(f"{ckpt / 'normalizer.safetensors'}: has no {key} field")
        have = len(policy.normalizer.stats[key]["scale"])
        if have != dim:
            raise UserError(f"{ckpt / 'normalizer.safetensors'}: {key} has {have} dimensions, policy.json's "
                            f"network {dim}; the two files belong to different policies")


def check_matches(policy: DiffusionPolicy, task: str, obs_layout: dict) -> None:
    """Refuse a policy trained for another task or observation layout (an env built with
    `obs=policy.obs_config` has the policy's layout)."""
    ckpt = policy.meta.get("checkpoint", "checkpoint")
    if policy.meta.get("task") != task:
        raise UserError(f"{ckpt}: policy was trained on task {policy.meta.get('task')!r}, not {task!r}")
    want = {k: list(v) for k, v in obs_layout.items()}
    if policy.meta.get("obs_layout") != want:
        raise UserError(f"{ckpt}: observation layout {policy.meta.get('obs_layout')} does not "
                        f"match the env's {want}")
