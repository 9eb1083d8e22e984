"""Shipped reference policies: a checkpoint reduced to what planning needs, with 16-bit weights.

    zoo/<task>/
        weights_ema.safetensors  EMA weights in float16 (loaded into the float32 network)
        normalizer.safetensors   as trained (float32; a few hundred numbers)
        policy.json              the checkpoint's: architecture, dims, task, observation layout,
                                 step; plus `seeds_used` (the demonstrations' seeds, so an
                                 evaluation refuses them without the store), `demos: mh` for a
                                 mixed-proficiency store's, and `zoo`: where it
                                 came from, how it was trained, and what the shipped weights measured
        aligner/                 DPM-Aligner timesteps, where the checkpoint had them
        histories.npz            closed-loop observation histories of held-out episodes, so that
                                 dp-bench plans on the policy without its training store
        decisions.npz            a mixed-proficiency store's held-out decision states (where its
                                 strategies diverge), for dp-bench's fidelity table

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

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.cli import command
from common.errors import UserError
from common.files import atomic_path, building, remove_stale_partials, write_json
from common.lock import NAME as LOCK
from policy.checkpoint import load_meta, load_policy, read_file, resolve, weights_metadata

WEIGHTS = "weights_ema.safetensors"
HISTORIES = "histories.npz"  # closed-loop observation histories: dp-bench plans on them without a store
DECISIONS = "decisions.npz"  # held-out decision states of an mh store: the fidelity table's
MAX_MB = 20.0  # what one task's shipped policy may take in the repository
# Histories shipped: 200 is dp-bench's default plan count; an image policy's histories hold camera
# frames (~170 kB each at 84x84), so it ships a few episodes' worth, which dp-bench replays in order.
N_HISTORIES, N_IMAGE_HISTORIES = 200, 24


def export(checkpoint: str | Path, out: str | Path, command: str = "",
           dtype: torch.dtype = torch.float16) -> Path:
    """Write the planning part of `checkpoint` to `out` (replacing a zoo policy there, nothing
    else) with its EMA weights cast to `dtype`; returns `out`."""
    ckpt, out = resolve(checkpoint), Path(out)
    check_out(out, ckpt)
    meta = load_meta(ckpt)
    pol = load_policy(ckpt)  # every part checked before anything is written
    store = meta.get("meta", {}).get("data")
    weights = read_file(ckpt / WEIGHTS, load_file)
    meta["meta"] = {**meta.get("meta", {}), **_store_facts(meta.get("meta", {}).get("data"))}
    distilled = meta["meta"].get("distilled")
    teacher = Path(distilled["teacher"]) if distilled else None
    if teacher is not None and teacher.is_relative_to(Path.cwd()):
        # a teacher in this tree (zoo/square) named from its root, as zoo/ policies are run: a
        # clone anywhere else finds it (`teacher:` rows)
        meta["meta"]["distilled"] = {**distilled, "teacher": str(teacher.relative_to(Path.cwd()))}
    meta["zoo"] = {"source": str(ckpt), "weights_dtype": str(dtype).removeprefix("torch."),
                   "command": command, "training_s": _training_seconds(ckpt)}
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent, out.name)
    with building(out) as tmp:
        save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, tmp / WEIGHTS,
                  weights_metadata(pol))
        if store and Path(store).exists():
            write_histories(pol, store, tmp / HISTORIES)
            write_decisions(pol, store, tmp / DECISIONS)
        shutil.copy2(ckpt / "normalizer.safetensors", tmp / "normalizer.safetensors")
        if (ckpt / "aligner").is_dir():
            # not dp-align's lock file: it describes a process on this machine, not the policy
            shutil.copytree(ckpt / "aligner", tmp / "aligner", ignore=shutil.ignore_patterns(LOCK))
        (tmp / "policy.json").write_text(json.dumps(meta, indent=1))
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 2**20
        if size > MAX_MB:
            raise UserError(f"{out}: {size:.1f} MB is more than a shipped policy may take ({MAX_MB:g} MB)")
    return out


def write_histories(policy, store: str | Path, dest: Path, split: str = "val") -> Path:
    """`dest` (.npz): the closed-loop observation histories of the store's `split` episodes
    (`policy.windows.episode_sequences`; "val": the policy's validation episodes), as
    `rollouts.bench.saved_histories` reads them, compressed."""
    from policy.windows import episode_sequences

    n = N_IMAGE_HISTORIES if policy.encoder is not None else N_HISTORIES
    obs, first = episode_sequences(policy, str(store), split, n)
    with atomic_path(dest) as tmp:
        np.savez_compressed(tmp, obs=obs, first=first)
    return dest


def write_decisions(policy, store: str | Path, dest: Path) -> Path | None:
    """`dest` (.npz, `obs`): the decision states of the store's validation episodes, where it
    records them (`policy.windows.decision_histories`); nothing otherwise."""
    from policy.windows import decision_histories

    obs = decision_histories(policy, str(store), "val")
    if not len(obs):
        return None
    with atomic_path(dest) as tmp:
        np.savez_compressed(tmp, obs=obs)
    return dest


def check_out(out: Path, ckpt: Path) -> None:
    """Refuse an `out=` that export would damage: anything but a zoo policy (a training
    checkpoint or run included), a link, or a folder the checkpoint is in or that is in it."""
    if out.is_symlink():
        raise UserError(f"{out}: is a link (to {os.readlink(out)}); give a zoo directory, e.g. zoo/<task>")
    where = out.resolve()
    if where == ckpt or where in ckpt.parents or ckpt in where.parents:
        raise UserError(f"{out}: is {'the checkpoint' if where == ckpt else 'a folder of the checkpoint'} "
                        f"{ckpt} being exported; give a zoo directory, e.g. zoo/<task>")
    if not out.exists():
        return
    if not (out / "policy.json").is_file():
        raise UserError(f"{out}: exists and is not a zoo policy (no policy.json); choose another out=")
    training = [n for n in ("trainer.pt", "weights.safetensors", "checkpoints") if (out / n).exists()]
    if training:
        raise UserError(f"{out}: is a training checkpoint or run (holds {training[0]}), not a zoo policy; "
                        "choose another out=")


def record(zoo: str | Path, evaluation: str | Path) -> dict:
    """Add an evaluation of the zoo policy at `zoo` (a dp-eval directory of it) to its
    policy.json under zoo.measured; returns what was recorded."""
    zoo, evaluation = Path(zoo), Path(evaluation)
    meta = load_meta(zoo)
    results = read_results(evaluation)
    mine = {str(zoo.resolve()), str(resolve(zoo))}
    if not results or any(r.get("checkpoint") not in mine for r in results):
        raise UserError(f"{evaluation}: not an evaluation of {zoo} (its checkpoint is "
                        f"{results[0].get('checkpoint')})"
                        if results else f"{evaluation}: results.json is empty")
    keep = ("sampler", "episodes", "success_rate", "success_ci95", "latency_ms", "model_evals_per_plan",
            "parallel_iters_per_plan", "threads", "workers", "device")
    run = read_file(evaluation / "run.json", lambda p: json.loads(p.read_text()))
    if run.get("horizon") is not None:  # a shipped figure is one of whole episodes
        raise UserError(f"{evaluation}: its episodes were cut at horizon={run['horizon']}, not the task's; "
                        "evaluate without horizon=")
    measured = {"seed": run.get("seed"), "results": [{k: r.get(k) for k in keep} for r in results]}
    meta.setdefault("zoo", {})["measured"] = measured
    write_json(zoo / "policy.json", meta, indent=1)
    return measured


def read_results(evaluation: Path) -> list[dict]:
    """The rows of a dp-eval directory's results.json; UserError naming the file unless it is a
    list of rows that each name their sampler, checkpoint, episodes and success rate."""
    path = Path(evaluation) / "results.json"
    results = read_file(path, lambda p: json.loads(p.read_text()))
    if isinstance(results, dict):  # {"samplers": rows, "reference", "recommendation"}; older runs: the rows
        results = results.get("samplers")
    need = ("sampler", "checkpoint", "episodes", "success_rate")
    if not isinstance(results, list) or not all(isinstance(r, dict) and all(k in r for k in need)
                                                for r in results):
        raise UserError(f"{path}: not dp-eval results (a list of rows with {', '.join(need)})")
    return results


def _store_facts(data: str | None) -> dict:
    """What a zoo user, who lacks the training store, needs to know of it: the seeds its
    demonstrations used (an evaluation refuses them) and whether they are mixed-proficiency."""
    if not data or not Path(data).exists():
        return {}
    from envs.store import open_store

    with open_store(data) as store:
        seeds, demos = store.seeds_used, store.attrs.get("demos")
    return {**({"seeds_used": seeds} if seeds else {}), **({"demos": demos} if demos == "mh" else {})}


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


def _require_source(cfg) -> None:
    """Before the config is built (which would name a missing out= first): something to do."""
    if cfg.checkpoint is None and cfg.measured is None:
        raise UserError("checkpoint: required (or measured=<dp-eval dir> to record an evaluation of out=)")


def _run(cfg: ExportConfig) -> None:
    if cfg.measured is not None:
        read_results(Path(cfg.measured))  # a bad evaluation is refused before anything is exported
    if cfg.checkpoint is not None:
        out = export(cfg.checkpoint, cfg.out, cfg.command)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
        print(f"wrote {out}: {size:.1f} MB")
    if cfg.measured is not None:
        m = record(cfg.out, cfg.measured)
        print(f"{cfg.out}: recorded " + ", ".join(f"{r['sampler']} {r['success_rate']:.0%} of {r['episodes']}"
                                                   for r in m["results"]))


main = command("export", ExportConfig, before=_require_source)(_run)


if __name__ == "__main__":
    main()
