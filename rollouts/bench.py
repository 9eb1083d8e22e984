"""`dp-bench`: planning latency of samplers on one checkpoint, without a simulator.

Observation histories come from the demonstration store (the policy's validation episodes when
it has them). Every plan draws one noise, and every sampler denoises that same noise, so each
parallel sampler's actions can be compared with its sequential twin's. Samplers run
interleaved (the order rotates every plan) in one process, so slow drifts of the machine hit all
of them alike; speedups are ratios of medians measured in this one run.

Also measured: the device's batch-scaling curve cost(batch p) / cost(batch 1) of the denoiser,
which bounds what any parallel sampler can win (a window of p steps costs that ratio per
iteration), and the share of each sampler's time spent outside the denoiser.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.cli import command
from common.errors import UserError
from common.files import save_figure, write_text
from policy.autowindow import batch_scaling, cost_ratio
from policy.device import machine, sync
from policy.samplers import aligner_choice, chain_of
from rollouts.presets import baseline_of, sampler_preset

DEFAULT_SAMPLERS = ["ddpm100", "paraddpm100", "ddim15", "paraddim15", "dpmsolver15", "paradpmsolver15", "piadm15"]


@dataclass
class BenchConfig:
    checkpoint: str = "???"
    samplers: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLERS))
    plans: int = 200
    data: str | None = None  # default: the store the policy was trained on
    out: str | None = None  # default: outputs/bench/<task>
    seed: int = 0
    threads: int = 2
    device: str = "auto"
    warmup: int = 3  # untimed plans per sampler first
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    overhead_plans: int = 20  # plans re-run with the denoiser timed, for the outside-model share
    closed_loop: bool = False  # plans along demonstration episodes, every n_action_steps: warm samplers carry over
    time_limit_s: float | None = None  # stop timing new plans after this long (at least 2 plans; the device check)


def saved_histories(policy, path: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` observation histories [n, n_obs, obs_dim] of an .npz file (`obs`, and `first`:
    where an episode starts), as `policy.zoo` and `rollouts.devicecheck` save them."""
    if not Path(path).is_file():
        raise UserError(f"data: {path}: no such file")
    with np.load(path) as f:
        if "obs" not in f or "first" not in f:
            raise UserError(f"data: {path}: needs arrays obs and first (has {', '.join(f.files) or 'none'})")
        obs, first = np.asarray(f["obs"], np.float32), np.asarray(f["first"], bool)
    want = (policy.cfg.n_obs_steps, policy.obs_dim)
    if obs.ndim != 3 or obs.shape[1:] != want or len(first) != len(obs):
        raise UserError(f"data: {path}: obs {obs.shape} and first {first.shape} do not fit [N, *{want}] and [N]")
    if not len(obs) or not first[0]:
        raise UserError(f"data: {path}: must start with an episode's first history (first[0] true)")
    reps = -(-n // len(obs))  # fewer histories than plans: the episodes again, from the first
    return np.concatenate([obs] * reps)[:n], np.concatenate([first] * reps)[:n]


def default_data(policy) -> str:
    """Where dp-bench takes observation histories from without `data=`: the store the policy was
    trained on, or else the histories a shipped policy carries (`policy.zoo.HISTORIES`)."""
    from policy.zoo import HISTORIES

    store = policy.meta.get("data") or f"data/{policy.meta.get('task')}.zarr"
    shipped = Path(policy.meta["checkpoint"]) / HISTORIES
    if Path(store).exists() or not shipped.is_file():
        return store
    return str(shipped)


def observation_histories(policy, data: str, n: int, seed: int) -> np.ndarray:
    """`n` observation histories [n, n_obs, obs_dim] at random steps of the store's validation episodes."""
    from policy.windows import sample_windows

    return sample_windows(policy, data, "val", n, seed)[0]


def run_bench(cfg: BenchConfig) -> tuple[list[dict], dict]:
    import policy as policy_pkg

    torch.set_num_threads(cfg.threads)
    pol = policy_pkg.load(cfg.checkpoint, device=cfg.device)
    dev = pol.device
    for key in ("plans", "overhead_plans"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}: {getattr(cfg, key)} must be at least 1")
    if not cfg.samplers:
        raise UserError("samplers: empty list")
    data = cfg.data or default_data(pol)
    if str(data).endswith(".npz"):  # histories saved with a shipped policy or by `dp-devicecheck prepare`
        obs_all, first = saved_histories(pol, data, cfg.plans)
    elif cfg.closed_loop:
        from policy.windows import episode_sequences

        obs_all, first = episode_sequences(pol, data, "val", cfg.plans)
    else:
        obs_all, first = observation_histories(pol, data, cfg.plans, cfg.seed), np.ones(cfg.plans, bool)

    # The samplers asked for, plus the sequential baseline of each (timed too, listed after).
    specs: dict[str, object] = {}
    for spec in cfg.samplers:
        specs[spec] = sampler_preset(spec)
        pol.sampler = specs[spec]  # a missing aligner fails here, before anything is timed
    baselines: dict[str, str] = {}
    for spec, sc in list(specs.items()):
        base = baseline_of(sc)
        # a warm sequential sampler (Falcon) walks part of the chain: it is nobody's twin
        match = next((s for s, c in specs.items()
                      if c.name == base.name and not c.warm and _same_chain(c, base, pol)), None)
        if match is None:
            match = f"{base.name}{base.steps or pol.cfg.schedule.num_train_timesteps}"
            extra = [f"{k}={getattr(base, k)}" for k in ("capture", "backend") if getattr(base, k)]
            if aligner_choice(base) == "default":
                match += "+aligner"
            elif aligner_choice(base) is not None:
                extra.insert(0, f"aligner={base.aligner}")
            match += f":{','.join(extra)}" if extra else ""
            specs[match] = base
        baselines[spec] = match

    names = list(specs)
    shape = (1, pol.cfg.horizon, pol.action_dim)

    from policy.warm import WarmStart

    warm = {n: WarmStart() for n in names}  # each warm sampler's own state along the episodes
    scratch = WarmStart()
    warm_gen: dict[str, torch.Generator] = {}

    encode_ms: dict[str, float] = {}

    def run(name: str, i: int, obs: torch.Tensor, twin: bool = True):
        """(ms, normalized actions, result, normalized actions of the baseline on the same noise or None)."""
        pol.warm = scratch  # setting the sampler resets the policy's state: keep each sampler's own out of reach
        pol.sampler = specs[name]
        if specs[name].warm and i >= 0:  # a closed loop's noise: shifted from plan to plan, a stream per episode
            if first[i]:
                warm[name].reset()
                warm_gen[name] = torch.Generator(dev).manual_seed(cfg.seed * 1_000_003 + i)
            pol.warm = warm[name]
            noise, gen, advance = None, warm_gen[name], None if first[i] else pol.cfg.n_action_steps
        else:
            noise = torch.randn(shape, generator=torch.Generator(dev).manual_seed(cfg.seed * 1_000_003 + i), device=dev)
            gen, advance = torch.Generator(dev).manual_seed(cfg.seed * 1_000_003 + i + 7_777_777), None
        sync(dev)
        start = time.perf_counter()
        x, res = pol.sample(obs, noise=noise, generator=gen, advance=advance)
        sync(dev)
        ms = (time.perf_counter() - start) * 1e3
        encode_ms[name] = pol.last_encode_ms  # of ms: the observation encoder (an image policy's cameras)
        if noise is None and twin:  # the baseline's answer from this plan's (shifted) noise, untimed
            w = pol.warm
            pol.warm = scratch
            pol.sampler = specs[baselines[name]]
            return ms, pol.normalizer.normalize("action", x), res, pol.normalizer.normalize(
                "action", pol.sample(obs, noise=w.noise, step_noise=w.step_noise)[0])
        return ms, pol.normalizer.normalize("action", x), res, None

    obs_t = torch.as_tensor(obs_all, device=dev)
    windows = {}  # window=auto: measured (or read from the cache), runtime calls compiled, before anything is timed
    for name in names:
        pol.sampler = specs[name]
        entry = pol.prepare(obs_t[:1])
        if entry is not None:
            windows[name] = entry
    for name in names:  # warm-up: allocator, caches, plan tables
        for i in range(cfg.warmup):
            run(name, -1 - i, obs_t[i % len(obs_t)][None])
    rec = {n: {"lat": [], "enc": [], "evals": [], "iters": [], "conv": [], "x": [], "twin": []} for n in names}
    began, timed = time.perf_counter(), cfg.plans
    for i in tqdm(range(cfg.plans), desc="dp-bench", unit="plan"):
        if cfg.time_limit_s is not None and i >= 2 and time.perf_counter() - began > cfg.time_limit_s:
            timed = i
            tqdm.write(f"dp-bench: time_limit_s={cfg.time_limit_s} reached: {i} of {cfg.plans} plans timed")
            break
        obs = obs_t[i][None]
        k = i % len(names)
        for name in names[k:] + names[:k]:
            lat, x, res, twin = run(name, i, obs)
            r = rec[name]
            r["twin"].append(None if twin is None else twin.cpu())
            r["lat"].append(lat)
            r["enc"].append(encode_ms[name])
            r["evals"].append(res.model_evals)
            r["iters"].append(res.parallel_iters)
            r["conv"].append(res.converged)
            r["x"].append(x.cpu())
    # Share of time outside the denoiser, on a few plans re-run with the denoiser timed.
    outside = {}
    for name in names:
        total, inside = 0.0, 0.0
        for i in range(min(cfg.overhead_plans, timed)):
            pol.sampler = specs[name]
            den = pol.denoiser
            den.timed = 0.0  # each call timed, waiting for the device (so only here, not in the timed plans)
            total += run(name, i, obs_t[i][None], twin=False)[0] / 1e3  # the twin's calls would count as the model's
            inside, den.timed = inside + den.timed, None
        outside[name] = 100.0 * max(0.0, 1 - inside / total)

    p50 = {n: float(np.percentile(rec[n]["lat"], 50)) for n in names}
    results = []
    for name in names:
        r, base = rec[name], baselines.get(name, name)
        refs = [t if t is not None else b for t, b in zip(r["twin"], rec[base]["x"])]
        diff = max(float((a - b).abs().max()) for a, b in zip(r["x"], refs))
        mean_diff = float(np.mean([float((a - b).abs().mean()) for a, b in zip(r["x"], refs)]))
        results.append({
            "name": name,
            "sampler": {k: v for k, v in dataclasses.asdict(specs[name]).items() if v is not None},
            "latency_ms_p50": p50[name],
            "latency_ms_p90": float(np.percentile(r["lat"], 90)),
            "latency_ms_p95": float(np.percentile(r["lat"], 95)),
            "encode_ms_p50": float(np.percentile(r["enc"], 50)),
            "model_evals_mean": float(np.mean(r["evals"])),
            "parallel_iters_mean": float(np.mean(r["iters"])),
            "converged_rate": float(np.mean(r["conv"])),
            "speedup": p50[base] / p50[name],
            "baseline": base,
            "action_max_abs_diff": diff,  # vs the baseline, normalized action units ([-1, 1])
            "action_mean_abs_diff": mean_diff,
            "outside_model_pct": outside[name],
            "requested": name in cfg.samplers,
            **({"window": windows[name]["window"]} if name in windows else {}),
        })
    context = {
        "checkpoint": pol.meta.get("checkpoint"), "step": pol.meta.get("step"), "task": pol.meta.get("task"),
        "data": str(data), "plans": timed, "closed_loop": cfg.closed_loop, "device": str(dev), "threads": torch.get_num_threads(),
        "machine": machine(dev), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "window_auto": windows,
    }
    # one batch-scaling curve per backend the rows ran on: each row's bound, and window=auto, use its own
    curves = {}
    for r in results:
        pol.sampler = specs[r["name"]]
        r["backend"] = pol.backend
        if r["backend"] not in curves:
            curves[r["backend"]] = batch_scaling(pol, cfg.batch_sizes)
    context["batch_scaling"] = next(iter(curves.values()))  # the first row's backend (the table's first curve)
    context["batch_scaling_by_backend"] = curves
    add_speedup_bounds(results, curves)
    return results, context


def add_speedup_bounds(results: list[dict], curves: dict[str, list[dict]]) -> None:
    """`speedup_bound`: the speedup the batch-scaling curve of a row's backend allows it, with
    each of its iterations costing one denoiser call at its mean rows per iteration (evaluations
    / iterations) and the same for its baseline (on the same backend). Where the curve is flat (a
    GPU) this approaches baseline iterations / iterations; on a CPU whose cost grows with the batch
    it falls to ~1."""
    by = {r["name"]: r for r in results}
    for r in results:
        base, curve = by[r["baseline"]], curves[r["backend"]]

        def cost(e):
            return e["parallel_iters_mean"] * cost_ratio(curve, e["model_evals_mean"] / e["parallel_iters_mean"])

        r["speedup_bound"] = cost(base) / cost(r)


def _same_chain(a, b, pol) -> bool:
    """Same solver chain with the same denoiser inputs (aligned or not, by the same strategy),
    called the same way (capture, precision, backend)."""
    T = pol.cfg.schedule.num_train_timesteps
    return (chain_of(a, T) == chain_of(b, T) and aligner_choice(a) == aligner_choice(b)
            and (a.capture or "auto") == (b.capture or "auto") and (a.precision or "fp32") == (b.precision or "fp32")
            and (a.backend or "torch") == (b.backend or "torch"))


def table(results: list[dict]) -> str:
    w = max([22, *(len(r["name"]) + 2 for r in results)])
    v = max([12, *(len(r["baseline"]) for r in results)])
    head = f"{'sampler':<{w}}{'p50 ms':>9}{'p90 ms':>9}{'evals':>8}{'iters':>8}{'speedup':>9}{'bound':>8}  {'vs':<{v}}{'max|da|':>9}{'outside':>9}{'encode':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['name']:<{w}}{r['latency_ms_p50']:>9.1f}{r['latency_ms_p90']:>9.1f}{r['model_evals_mean']:>8.1f}"
                     f"{r['parallel_iters_mean']:>8.1f}{r['speedup']:>8.2f}x{r['speedup_bound']:>7.2f}x  {r['baseline']:<{v}}"
                     f"{r['action_max_abs_diff']:>9.1e}{r['outside_model_pct']:>8.1f}%{r['encode_ms_p50']:>7.1f}ms")
    return "\n".join(lines)


def write_outputs(out: Path, results: list[dict], context: dict) -> None:
    """results.json (one entry per sampler), context.json (machine, batch scaling), results.csv, bench.png."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(results, indent=2))
    write_text(out / "context.json", json.dumps(context, indent=2))
    cols = ["name", "backend", "latency_ms_p50", "latency_ms_p90", "latency_ms_p95", "encode_ms_p50", "model_evals_mean",
            "parallel_iters_mean", "speedup", "speedup_bound", "baseline", "action_max_abs_diff", "action_mean_abs_diff",
            "converged_rate", "outside_model_pct"]
    rows = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in results]
    write_text(out / "results.csv", "\n".join(rows) + "\n")
    plot(out / "bench.png", results, context)


def plot(path: Path, results: list[dict], context: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in results]
    p50 = [r["latency_ms_p50"] for r in results]
    p90 = [r["latency_ms_p90"] for r in results]
    y = np.arange(len(names))
    ax1.barh(y, p90, color="#c6dbef", label="p90")
    ax1.barh(y, p50, color="#2171b5", label="p50")
    for yi, r in zip(y, results):
        ax1.text(r["latency_ms_p90"], yi, f"  {r['parallel_iters_mean']:.0f} it, {r['speedup']:.2f}x", va="center", fontsize=8)
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 1.3 * max(p90))
    ax1.set_xlabel("plan latency (ms); labels: parallel iterations, speedup over the sequential twin")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    ax1.set_title(f"{context['task']}: {context['plans']} plans, {context['device']}, {context['threads']} threads")
    bs = context["batch_scaling"]
    ax2.plot([b["batch"] for b in bs], [b["ratio"] for b in bs], "o-", label="measured")
    ax2.plot([b["batch"] for b in bs], [b["batch"] for b in bs], "--", color="grey", label="linear (no parallel gain)")
    ax2.axhline(1.0, color="green", ls=":", label="ideal (free parallelism)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log", base=2)
    ax2.set_xlabel("denoiser batch p")
    ax2.set_ylabel("cost(batch p) / cost(batch 1)")
    ax2.set_title("batch scaling: bounds any parallel speedup")
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, path)


@command("bench", BenchConfig)
def main(cfg: BenchConfig) -> None:
    results, context = run_bench(cfg)
    out = Path(cfg.out or f"outputs/bench/{context['task']}")
    write_outputs(out, results, context)
    print(table(results))
    for backend, bs in context["batch_scaling_by_backend"].items():
        curve = ", ".join(f"{b['batch']}: {b['ratio']:.2f} ({b['ms']:.2f} ms)" for b in bs)
        print(f"batch scaling cost(p)/cost(1) of {backend} on {context['machine']} ({context['device']}, "
              f"{context['threads']} threads): {curve}")
    for name, entry in context["window_auto"].items():
        tried = ", ".join(f"{r['window']}: {r['rounds']:.1f} rounds x {r['rows_per_round']:.1f} rows = {r['cost']:.0f}"
                          for r in entry["rows"])
        print(f"{name}: window=auto chose {entry['window']} on {entry['machine']}, {entry['threads']} threads "
              f"(predicted cost in one-row calls; {tried})")
    print(f"wrote {out}/results.json, results.csv, context.json, bench.png")


if __name__ == "__main__":
    main()
