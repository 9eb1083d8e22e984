"""`sampler.window=auto`: the ParaDiGMS window chosen per device from what it costs there.

A window of p rows costs one denoiser call of batch p per round. On a GPU that call costs about
what one row costs, so the widest window (fewest rounds) wins; on two CPU cores a 16-row call
costs several one-row calls, and a narrow window can be faster despite its extra rounds. So the
choice is measured, not assumed:

1. the device's batch-scaling curve cost(p) / cost(1) of this checkpoint's denoiser;
2. the rounds and rows per round of each candidate window on a real observation (the first one
   the policy plans for, or the ones `dp-bench` passes), a few noise draws each;
3. the predicted cost of a plan, rounds x cost(mean rows per round), in sequential-call units
   (sequential DDPM-100 costs 100). The cheapest candidate is the window.

The result is cached per device (its name and torch threads), checkpoint weights (a hash) and
sampler setting, in the policy and in `$PARAPOLICY_CACHE` (default `~/.cache/parapolicy/window-auto.json`),
so a process pays the measurement (seconds on a CPU) once per device and checkpoint. The rounds
are those of cold plans; a warm sampler's first plan is cold too.

The cache file is a convenience, not an input: anyone can edit it, and an older version may have
written it. An entry is used only if it holds what a fresh measurement would (`valid_window`,
`policy.backends.valid_choice`); any other entry, and a file that is not a JSON object, is
ignored, measured again and written over (a window of 0 once reached OpenVINO as a zero-row call
and corrupted its heap).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.files import write_json
from policy.device import machine, sync

CANDIDATES = (4, 8, 16, 32, 64)  # plus the whole chain; capped at the chain's length


def cache_path() -> Path:
    return Path(os.environ.get("PARAPOLICY_CACHE")
                or Path.home() / ".cache" / "parapolicy" / "window-auto.json")


def batch_scaling(policy, batch_sizes, reps: int = 20) -> list[dict]:
    """Median time of one denoiser call at each batch size, and its ratio to batch 1."""
    dev = policy.device
    g = torch.Generator(dev).manual_seed(0)
    out = []
    for p in sorted(set([1, *batch_sizes])):
        x = torch.randn((p, policy.cfg.horizon, policy.action_dim), generator=g, device=dev)
        cond = torch.randn((p, policy.cond_dim), generator=g, device=dev)
        t = torch.linspace(0, policy.cfg.schedule.num_train_timesteps - 1, p, device=dev)
        times = []
        with torch.no_grad():
            for i in range(reps + 3):
                sync(dev)
                start = time.perf_counter()
                policy.denoiser(x, t, cond)  # as the samplers call it: its precision, captured or eager
                sync(dev)
                if i >= 3:
                    times.append(time.perf_counter() - start)
        out.append({"batch": p, "ms": 1e3 * float(np.median(times))})
    for row in out:
        row["ratio"] = row["ms"] / out[0]["ms"]
    return out


def cost_ratio(curve: list[dict], batch: float) -> float:
    """cost(batch) / cost(1) from the measured curve: linear between measured sizes, proportional
    to the batch beyond the largest."""
    sizes = [c["batch"] for c in curve]
    ratios = [c["ratio"] for c in curve]
    if batch > sizes[-1]:
        return ratios[-1] * batch / sizes[-1]
    return float(np.interp(batch, sizes, ratios))


def candidates(n: int, rule: str | None) -> list[int]:
    """The windows tried for an n-step chain (the chunk rule takes only the whole chain)."""
    if rule == "chunk":
        return [n]
    return sorted({min(w, n) for w in CANDIDATES} | {n})


def weights_hash(policy) -> str:
    """A short hash of the denoiser's weights: a cached measurement belongs to one checkpoint."""
    weights = hashlib.sha1()
    for name, tensor in sorted(policy.net.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return weights.hexdigest()[:16]


def key(policy, cfg) -> str:
    """Device, threads, weights, the backend the calls run on and every sampler setting but the window."""
    setting = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in ("window", "warm") and v is not None}
    setting["backend"] = policy.backend  # auto resolved: the curve is the chosen backend's
    return json.dumps({"device": machine(policy.device), "threads": torch.get_num_threads(),
                       "weights": weights_hash(policy), "sampler": setting}, sort_keys=True)


def _table() -> dict:
    """The cache file's entries; {} when it is missing, unreadable, not JSON or not a JSON object."""
    try:
        table = json.loads(cache_path().read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return table if isinstance(table, dict) else {}


def lookup(k: str, valid: Callable[[object], bool] | None = None) -> dict | None:
    """The cached entry under `k`, or None if there is none or it is not one `valid` accepts (a
    damaged or hand-edited entry is measured again, never trusted)."""
    entry = _table().get(k)
    if entry is None or (valid is not None and not valid(entry)):
        return None
    return entry


def store(k: str, entry: dict) -> None:
    """Into the cache file (atomically: a temporary file, then a rename); a cache that cannot be
    written only costs the next process the measurement again."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = _table()
        table[k] = entry
        write_json(path, table, indent=1)
    except OSError:
        pass


def is_count(v, low: int = 1) -> bool:
    """`v` an integer (not a bool) of at least `low`."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def is_number(v) -> bool:
    """`v` a finite number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rows_of(v, fields: tuple[str, ...]) -> bool:
    return (isinstance(v, list) and len(v) > 0
            and all(isinstance(r, dict) and all(is_number(r.get(f)) for f in fields) for r in v))


def valid_window(entry, windows: list[int]) -> bool:
    """`entry` is what `measure` returns when it tries `windows`: one of them (an integer), each
    candidate's finite figures, the batch curve, the machine and its threads."""
    return (isinstance(entry, dict) and is_count(entry.get("window")) and entry["window"] in windows
            and _rows_of(entry.get("rows"), ("window", "rounds", "evals", "rows_per_round", "cost"))
            and _rows_of(entry.get("curve"), ("batch", "ms", "ratio"))
            and isinstance(entry.get("machine"), str) and is_count(entry.get("threads")))


def measure(policy, cfg, cond: torch.Tensor, plans: int = 3, curve: list[dict] | None = None) -> dict:
    """Rounds, rows per round and predicted cost of each candidate window for sampler `cfg`
    (window auto) on condition `cond` [1, C]; `curve` (default: measured now) is the batch curve.
    Returns {"window": best, "rows": [...], "curve": curve}."""
    from policy.samplers import chain_of

    fn = policy._sampling.fn
    opts = {k: v for k, v in policy.sample_options().items() if k != "window"}
    n = chain_of(cfg, policy.cfg.schedule.num_train_timesteps)[1]
    windows = candidates(n, cfg.rule)
    if curve is None:
        curve = batch_scaling(policy, windows, reps=10)
    shape = (1, policy.cfg.horizon, policy.action_dim)
    rows = []
    with torch.no_grad():
        for w in windows:
            iters, evals = [], []
            for s in range(plans):
                g = torch.Generator(policy.device).manual_seed(s)
                noise = torch.randn(shape, generator=g, device=policy.device)
                res = fn(policy.denoiser, cond, policy.scheduler, noise, g, **{**opts, "window": w})
                iters.append(res.parallel_iters)
                evals.append(res.model_evals)
            r, e = float(np.mean(iters)), float(np.mean(evals))
            computed = min(w, n) if opts.get("pad") else e / r  # a padded round computes the whole window
            rows.append({"window": w, "rounds": r, "evals": e, "rows_per_round": e / r,
                         "cost": r * cost_ratio(curve, computed)})
    best = min(rows, key=lambda row: (row["cost"], row["window"]))
    return {"window": best["window"], "rows": rows, "curve": curve, "machine": machine(policy.device),
            "threads": torch.get_num_threads()}


def choose(policy, cfg, cond: torch.Tensor) -> dict:
    """The cached choice for this device, checkpoint and setting, measured on `cond` if none."""
    from policy.samplers import chain_of

    k = key(policy, cfg)
    n = chain_of(cfg, policy.cfg.schedule.num_train_timesteps)[1]
    entry = lookup(k, lambda e: valid_window(e, candidates(n, cfg.rule)))
    if entry is None:
        entry = measure(policy, cfg, cond)
        store(k, entry)
    return entry
