"""Shipped reference policies: a checkpoint reduced to what planning needs, with 16-bit weights.

    zoo/<task>/
        weights_ema.safetensors  EMA weights in float16 (loaded into the float32 network)
        normalizer.safetensors   as trained (float32; a few hundred numbers)
        policy.json              the checkpoint's: architecture, dims, task, observation layout,
                                 step; plus `seeds_used` (the demonstrations' seeds, so an
                                 evaluation refuses them without the store) and `zoo`: where it
                                 came from, how it was trained, and what the shipped weights measured
        aligner/                 DPM-Aligner timesteps, where the checkpoint had them

`policy.load("zoo/lift")` and every command's `checkpoint=zoo/lift` read it like a checkpoint.
`dp-export checkpoint=outputs/lift out=zoo/lift command="..."` writes one (atomically);
`dp-export out=zoo/lift measured=outputs/eval-zoo-lift` records an evaluation of it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from envs.cli import command
from envs.errors import UserError
from envs.partial import building, remove_stale_partials
from policy.checkpoint import load_meta, read_file, resolve

WEIGHTS = "weights_ema.safetensors"
MAX_MB = 20.0  # what one task's shipped policy may take in the repository


def export(checkpoint: str | Path, out: str | Path, command: str = "", dtype: torch.dtype = torch.float16) -> Path:
    """Write the planning part of `checkpoint` to `out` (replacing a zoo policy there, nothing
    else) with its EMA weights cast to `dtype`; returns `out`."""
    ckpt, out = resolve(checkpoint), Path(out)
    meta = load_meta(ckpt)
    weights = read_file(ckpt / WEIGHTS, load_file)
    if out.exists() and not (out / "policy.json").is_file():
        raise UserError(f"{out}: exists and is not a zoo policy (no policy.json); choose another out=")
    seeds = _seeds_used(meta.get("meta", {}).get("data"))
    meta["meta"] = {**meta.get("meta", {}), **({"seeds_used": seeds} if seeds is not None else {})}
    meta["zoo"] = {"source": str(ckpt), "weights_dtype": str(dtype).removeprefix("torch."), "command": command,
                   "training_s": _training_seconds(ckpt)}
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent, out.name)
    with building(out) as tmp:
        save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
        shutil.copy2(ckpt / "normalizer.safetensors", tmp / "normalizer.safetensors")
        if (ckpt / "aligner").is_dir():
            shutil.copytree(ckpt / "aligner", tmp / "aligner")
        (tmp / "policy.json").write_text(json.dumps(meta, indent=1))
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 2**20
        if size > MAX_MB:
            raise UserError(f"{out}: {size:.1f} MB is more than a shipped policy may take ({MAX_MB:g} MB)")
    return out


def record(zoo: str | Path, evaluation: str | Path) -> dict:
    """Add an evaluation of the zoo policy at `zoo` (a dp-eval directory of it) to its
    policy.json under zoo.measured; returns what was recorded."""
    zoo, evaluation = Path(zoo), Path(evaluation)
    meta = load_meta(zoo)
    results = read_file(evaluation / "results.json", lambda p: json.loads(p.read_text()))
    mine = {str(zoo.resolve()), str(resolve(zoo))}
    if not results or any(r.get("checkpoint") not in mine for r in results):
        raise UserError(f"{evaluation}: not an evaluation of {zoo} (its checkpoint is {results[0].get('checkpoint')})"
                        if results else f"{evaluation}: results.json is empty")
    keep = ("sampler", "episodes", "success_rate", "success_ci95", "latency_ms", "model_evals_per_plan",
            "parallel_iters_per_plan", "threads", "workers", "device")
    run = read_file(evaluation / "run.json", lambda p: json.loads(p.read_text()))
    measured = {"seed": run.get("seed"), "results": [{k: r.get(k) for k in keep} for r in results]}
    meta.setdefault("zoo", {})["measured"] = measured
    tmp = zoo / ".policy.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, zoo / "policy.json")
    return measured


def _seeds_used(data: str | None) -> list[int] | None:
    if not data or not Path(data).exists():
        return None
    from envs.store import open_store

    with open_store(data) as store:
        return store.seeds_used or None


def _training_seconds(ckpt: Path) -> float | None:
    if not (ckpt / "trainer.pt").is_file():
        return None
    state = read_file(ckpt / "trainer.pt", lambda p: torch.load(p, map_location="cpu", weights_only=False))
    return float(state.get("elapsed_s", 0.0))


@dataclass
class ExportConfig:
    checkpoint: str | None = None  # a training run or checkpoint to export
    out: str = "???"  # the zoo directory, e.g. zoo/lift
    command: str = ""  # how the checkpoint was made, recorded in policy.json
    measured: str | None = None  # a dp-eval directory of `out` to record in its policy.json


def _run(cfg) -> None:
    if cfg.checkpoint is None and cfg.measured is None:
        raise UserError("checkpoint: required (or measured=<dp-eval dir> to record an evaluation of out=)")
    if cfg.checkpoint is not None:
        out = export(cfg.checkpoint, cfg.out, cfg.command)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
        print(f"wrote {out}: {size:.1f} MB")
    if cfg.measured is not None:
        m = record(cfg.out, cfg.measured)
        print(f"{cfg.out}: recorded " + ", ".join(f"{r['sampler']} {r['success_rate']:.0%} of {r['episodes']}"
                                                   for r in m["results"]))


main = command("export", ExportConfig)(_run)


if __name__ == "__main__":
    main()
