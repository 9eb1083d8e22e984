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
from common.files import check_writable, save_figure, write_text
from policy.autowindow import batch_scaling, cost_ratio
from policy.device import machine, sync
from policy.samplers import SamplerConfig, aligner_choice, chain_of
from policy.samplers.spec import on_command_backend
from policy.warm import PlanSession
from rollouts.teacher import row_policy, split

DEFAULT_SAMPLERS = ["ddpm100", "paraddpm100", "ddim15", "paraddim15", "dpmsolver15",
                    "paradpmsolver15", "piadm15"]


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
    # plans along demonstration episodes, every n_action_steps: warm samplers carry over
    closed_loop: bool = False
    # stop timing new plans after this long (at least 2 plans; the device check)
    time_limit_s: float | None = None
    # the offline fidelity table instead of timing (rollouts.fidelity): each sampler's plans against
    # DDPM-100's, `draws` per held-out history, on `states` histories (+ as many decision states)
    fidelity: bool = False
    draws: int = 64
    states: int = 32

    # A denoiser call of more rows than the longest chain a schedule may have (a window is never
    # longer than its chain) only measures the machine's memory.
    MAX_BATCH = 10_000

    def __post_init__(self):
        """Every number checked at start-up, before the policy loads: one line naming the key."""
        from common.checks import check_number

        for key, low in (("plans", 1), ("overhead_plans", 1), ("warmup", 0), ("threads", 1), ("seed", 0),
                         ("draws", 2), ("states", 1)):
            check_number(key, getattr(self, key), low, integer=True)
        for i, b in enumerate(self.batch_sizes):
            check_number(f"batch_sizes[{i}]", b, 1, self.MAX_BATCH, integer=True)
        if self.time_limit_s is not None:
            check_number("time_limit_s", self.time_limit_s, 0, low_open=True)
        if not self.samplers:
            raise UserError("samplers: empty list")


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
        raise UserError(f"data: {path}: obs {obs.shape} and first {first.shape} do not "
                        f"fit [N, *{want}] and [N]")
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
    """Time every sampler of `cfg` (and the sequential twin of each) on the same observation
    histories, interleaved plan by plan; rows of results and the run's context."""
    pol = _load(cfg)
    check_writable(out_dir(cfg, pol.meta.get("task")))  # now, not after minutes of timing
    data, obs_all, first = _histories(pol, cfg)
    specs, pols, baselines = _rows(pol, cfg.samplers)
    trials = Trials(pols, specs, baselines, first, cfg.seed)
    obs = torch.as_tensor(obs_all, device=pol.device)
    windows = trials.prepare(obs[:1])
    trials.warm_up(obs, cfg.warmup)
    rec, timed = _time_plans(trials, obs, cfg)
    outside = {n: trials.outside_share(n, obs, min(cfg.overhead_plans, timed)) for n in trials.names}
    results = [_result(name, rec, trials, outside[name], windows, cfg.samplers) for name in trials.names]
    context = {
        "checkpoint": pol.meta.get("checkpoint"), "step": pol.meta.get("step"), "task": pol.meta.get("task"),
        "data": str(data), "plans": timed, "closed_loop": cfg.closed_loop, "device": str(pol.device),
        "threads": torch.get_num_threads(), "machine": machine(pol.device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "window_auto": windows,
        **({"teacher": pol.distilled["teacher"]} if any(split(n)[0] for n in specs) else {}),
    }
    curves = trials.curves(results, cfg.batch_sizes)
    # the first row's backend (the table's first curve)
    context["batch_scaling"] = next(iter(curves.values()))
    context["batch_scaling_by_backend"] = curves
    add_speedup_bounds(results, curves)
    return results, context


def out_dir(cfg: BenchConfig, task: str | None) -> Path:
    return Path(cfg.out or f"outputs/bench/{task}")


def _load(cfg: BenchConfig):
    import policy as policy_pkg

    torch.set_num_threads(cfg.threads)
    return policy_pkg.load(cfg.checkpoint, device=cfg.device)  # its numbers: checked in BenchConfig


def _histories(pol, cfg: BenchConfig) -> tuple[str, np.ndarray, np.ndarray]:
    """(where from, observation histories [plans, n_obs, D], where an episode starts [plans])."""
    data = cfg.data or default_data(pol)
    if str(data).endswith(".npz"):  # histories saved with a shipped policy or by `dp-devicecheck prepare`
        return (data, *saved_histories(pol, data, cfg.plans))
    if cfg.closed_loop:
        from policy.windows import episode_sequences

        return (data, *episode_sequences(pol, data, "val", cfg.plans))
    return data, observation_histories(pol, data, cfg.plans, cfg.seed), np.ones(cfg.plans, bool)


def _rows(pol, samplers: list[str]) -> tuple[dict[str, SamplerConfig], dict, dict[str, str]]:
    """The samplers asked for, plus the sequential baseline of each (timed too, listed after), the
    policy each row samples (a student's `teacher:` rows its teacher's, `rollouts.teacher`), and
    each row's baseline label."""
    specs, pols = {}, {}
    for spec in samplers:
        pols[spec], bare = row_policy(pol, spec)
        specs[spec] = on_command_backend(SamplerConfig.parse(bare))
        pols[spec].sampling(specs[spec])  # a missing aligner, or the wrong kind, fails here, before timing
    baselines: dict[str, str] = {}
    for spec, sc in list(specs.items()):
        base, own = sc.baseline(), pols[spec]
        # a warm sequential sampler (Falcon) walks part of the chain: it is nobody's twin
        match = next((s for s, c in specs.items() if pols[s] is own and c.name == base.name and not c.warm
                      and _same_chain(c, base, own)), None)
        if match is None:
            match = split(spec)[0] + base.label(own.cfg.schedule.num_train_timesteps)
            specs[match], pols[match] = base, own
        baselines[spec] = match
    return specs, pols, baselines


class Trials:
    """Plans of every row (each on its own policy: the checkpoint's, or a student's teacher): a warm
    sampler's along the episodes from its own session (its noise shifted from plan to plan, a
    stream per episode), the others from each plan's own noise."""

    def __init__(self, pols: dict, specs: dict, baselines: dict[str, str], first: np.ndarray, seed: int):
        self.pols, self.specs, self.baselines, self.first, self.seed = pols, specs, baselines, first, seed
        self.names = list(specs)
        self.samplings = {n: pols[n].sampling(s) for n, s in specs.items()}  # set up once
        self.sessions = {n: PlanSession() for n in self.names}  # each warm sampler's own state
        self.scratch = PlanSession()  # the cold plans'

    def run(self, name: str, i: int, obs: torch.Tensor, twin: bool = True):
        """(ms, normalized actions, result, normalized actions of the baseline on the same noise or
        None, encode ms)."""
        pol, key = self.pols[name], self.seed * 1_000_003 + i
        dev = pol.device
        pol.use(self.samplings[name])
        session, noise, gen, advance = self.scratch, None, None, None
        if self.specs[name].warm and i >= 0:
            session = self.sessions[name]
            if self.first[i]:
                session.reseed(key, dev)
            else:
                advance = pol.cfg.n_action_steps
        else:
            shape = (1, pol.cfg.horizon, pol.action_dim)
            noise = torch.randn(shape, generator=torch.Generator(dev).manual_seed(key), device=dev)
            gen = torch.Generator(dev).manual_seed(key + 7_777_777)
        sync(dev)
        start = time.perf_counter()
        x, res = pol.sample(obs, noise=noise, generator=gen, advance=advance, session=session)
        sync(dev)
        ms, norm = (time.perf_counter() - start) * 1e3, pol.normalizer.normalize("action", x)
        ref = None
        if noise is None and twin:  # the baseline's answer from this plan's (shifted) noise, untimed
            pol.use(self.samplings[self.baselines[name]])
            w = session.warm
            ref = pol.normalizer.normalize("action", pol.sample(obs, noise=w.noise, step_noise=w.step_noise,
                                                                session=self.scratch)[0])
        return ms, norm, res, ref, session.encode_ms

    def prepare(self, obs: torch.Tensor) -> dict:
        """window=auto measured (or read from the cache), runtime calls compiled, before anything is
        timed; the chosen windows."""
        windows = {}
        for name in self.names:
            self.pols[name].use(self.samplings[name])
            entry = self.pols[name].prepare(obs)
            if entry is not None:
                windows[name] = entry
        return windows

    def warm_up(self, obs: torch.Tensor, plans: int) -> None:
        """Untimed plans of every row first: allocator, caches, plan tables."""
        for name in self.names:
            for i in range(plans):
                self.run(name, -1 - i, obs[i % len(obs)][None])

    def outside_share(self, name: str, obs: torch.Tensor, plans: int) -> float:
        """Percent of a plan's time outside the denoiser, on `plans` plans re-run with the denoiser
        timed (waiting for the device at each call, so only here, not in the timed plans)."""
        total, inside = 0.0, 0.0
        for i in range(plans):
            self.pols[name].use(self.samplings[name])
            den = self.pols[name].denoiser
            den.timed = 0.0
            # a twin's calls would count as the model's
            total += self.run(name, i, obs[i][None], twin=False)[0] / 1e3
            inside, den.timed = inside + den.timed, None
        return 100.0 * max(0.0, 1 - inside / total)

    def curves(self, results: list[dict], batch_sizes: list[int]) -> dict[str, list[dict]]:
        """One batch-scaling curve per backend the rows ran on (each row's bound, and window=auto,
        use its own); each row's `backend` set."""
        curves = {}
        for r in results:
            pol = self.pols[r["name"]]
            pol.use(self.samplings[r["name"]])
            r["backend"] = pol.backend
            if r["backend"] not in curves:  # a student's network is its teacher's: one curve a backend
                curves[r["backend"]] = batch_scaling(pol, batch_sizes)
        return curves


def _time_plans(trials: Trials, obs: torch.Tensor, cfg: BenchConfig) -> tuple[dict, int]:
    """Every row's timed plans, interleaved (each plan's rows in a rotating order), until
    `cfg.plans` or the time limit; the records and how many plans were timed."""
    names = trials.names
    rec = {n: {"lat": [], "enc": [], "evals": [], "iters": [], "conv": [], "x": [], "twin": []}
           for n in names}
    began = time.perf_counter()
    for i in tqdm(range(cfg.plans), desc="dp-bench", unit="plan"):
        if cfg.time_limit_s is not None and i >= 2 and time.perf_counter() - began > cfg.time_limit_s:
            tqdm.write(f"dp-bench: time_limit_s={cfg.time_limit_s} reached: {i} of {cfg.plans} plans timed")
            return rec, i
        k = i % len(names)
        for name in names[k:] + names[:k]:
            lat, x, res, twin, enc = trials.run(name, i, obs[i][None])
            r = rec[name]
            for key, value in (("twin", None if twin is None else twin.cpu()), ("lat", lat), ("enc", enc),
                               ("evals", res.model_evals), ("iters", res.parallel_iters),
                               ("conv", res.converged), ("x", x.cpu())):
                r[key].append(value)
    return rec, cfg.plans


def _result(name: str, rec: dict, trials: Trials, outside: float, windows: dict,
            requested: list[str]) -> dict:
    """A row of results: latency percentiles, counts, speedup and action difference against its baseline."""
    r, base = rec[name], trials.baselines.get(name, name)
    refs = [t if t is not None else b for t, b in zip(r["twin"], rec[base]["x"])]
    p50 = float(np.percentile(r["lat"], 50))
    return {
        "name": name,
        "sampler": {k: v for k, v in dataclasses.asdict(trials.specs[name]).items() if v is not None},
        "latency_ms_p50": p50,
        "latency_ms_p90": float(np.percentile(r["lat"], 90)),
        "latency_ms_p95": float(np.percentile(r["lat"], 95)),
        "encode_ms_p50": float(np.percentile(r["enc"], 50)),
        "model_evals_mean": float(np.mean(r["evals"])),
        "parallel_iters_mean": float(np.mean(r["iters"])),
        "converged_rate": float(np.mean(r["conv"])),
        "speedup": float(np.percentile(rec[base]["lat"], 50)) / p50,
        "baseline": base,
        # normalized units
        "action_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(r["x"], refs)),
        "action_mean_abs_diff": float(np.mean([float((a - b).abs().mean()) for a, b in zip(r["x"], refs)])),
        "outside_model_pct": outside,
        "requested": name in requested,
        **({"window": windows[name]["window"]} if name in windows else {}),
    }


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
            return e["parallel_iters_mean"] * cost_ratio(curve,
                                                         e["model_evals_mean"] / e["parallel_iters_mean"])

        r["speedup_bound"] = cost(base) / cost(r)


def _same_chain(a, b, pol) -> bool:
    """Same solver chain with the same denoiser inputs (aligned or not, by the same strategy),
    called the same way (capture, precision, backend)."""
    T = pol.cfg.schedule.num_train_timesteps
    return (chain_of(a, T) == chain_of(b, T) and aligner_choice(a) == aligner_choice(b)
            and (a.capture or "auto") == (b.capture or "auto")
            and (a.precision or "fp32") == (b.precision or "fp32")
            and (a.backend or "torch") == (b.backend or "torch"))


def table(results: list[dict]) -> str:
    w = max([22, *(len(r["name"]) + 2 for r in results)])
    v = max([12, *(len(r["baseline"]) for r in results)])
    head = (f"{'sampler':<{w}}{'p50 ms':>9}{'p90 ms':>9}{'evals':>8}{'iters':>8}{'speedup':>9}{'bound':>8}  "
            f"{'vs':<{v}}{'max|da|':>9}{'outside':>9}{'encode':>9}{'backend':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['name']:<{w}}{r['latency_ms_p50']:>9.1f}{r['latency_ms_p90']:>9.1f}"
                     f"{r['model_evals_mean']:>8.1f}{r['parallel_iters_mean']:>8.1f}{r['speedup']:>8.2f}x"
                     f"{r['speedup_bound']:>7.2f}x  {r['baseline']:<{v}}{r['action_max_abs_diff']:>9.1e}"
                     f"{r['outside_model_pct']:>8.1f}%{r['encode_ms_p50']:>7.1f}ms{r['backend']:>10}")
    return "\n".join(lines)


def write_outputs(out: Path, results: list[dict], context: dict) -> None:
    """results.json (one entry per sampler), context.json (machine, batch scaling), results.csv, bench.png."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(results, indent=2))
    write_text(out / "context.json", json.dumps(context, indent=2))
    cols = ["name", "backend", "latency_ms_p50", "latency_ms_p90", "latency_ms_p95", "encode_ms_p50",
            "model_evals_mean", "parallel_iters_mean", "speedup", "speedup_bound", "baseline",
            "action_max_abs_diff", "action_mean_abs_diff", "converged_rate", "outside_model_pct"]
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
        ax1.text(r["latency_ms_p90"], yi, f"  {r['parallel_iters_mean']:.0f} it, {r['speedup']:.2f}x",
                 va="center", fontsize=8)
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 1.3 * max(p90))
    ax1.set_xlabel("plan latency (ms); labels: parallel iterations, speedup over the sequential twin")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    ax1.set_title(f"{context['task']}: {context['plans']} plans, {context['device']}, "
                  f"{context['threads']} threads")
    bs = context["batch_scaling"]
    ax2.plot([b["batch"] for b in bs], [b["ratio"] for b in bs], "o-", label="measured")
    ax2.plot([b["batch"] for b in bs], [b["batch"] for b in bs], "--", color="grey",
             label="linear (no parallel gain)")
    ax2.axhline(1.0, color="green", ls=":", label="ideal (free parallelism)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log", base=2)
    ax2.set_xlabel("denoiser batch p")
    ax2.set_ylabel("cost(batch p) / cost(batch 1)")
    ax2.set_title("batch scaling: bounds any parallel speedup")
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main_fidelity(cfg: BenchConfig) -> None:
    from rollouts import fidelity

    pol = _load(cfg)
    out = out_dir(cfg, pol.meta.get("task"))
    check_writable(out)
    results, context = fidelity.run_fidelity(pol, cfg)
    fidelity.write_outputs(out, results, context)
    print(fidelity.table(results, context))
    print(f"wrote {out}/results.json, results.csv, context.json, fidelity.png")


@command("bench", BenchConfig)
def main(cfg: BenchConfig) -> None:
    if cfg.fidelity:
        return main_fidelity(cfg)
    results, context = run_bench(cfg)
    out = out_dir(cfg, context["task"])
    write_outputs(out, results, context)
    print(table(results))
    for backend, bs in context["batch_scaling_by_backend"].items():
        curve = ", ".join(f"{b['batch']}: {b['ratio']:.2f} ({b['ms']:.2f} ms)" for b in bs)
        print(f"batch scaling cost(p)/cost(1) of {backend} on {context['machine']} ({context['device']}, "
              f"{context['threads']} threads): {curve}")
    for name, entry in context["window_auto"].items():
        tried = ", ".join(f"{r['window']}: {r['rounds']:.1f} rounds x {r['rows_per_round']:.1f} "
                          f"rows = {r['cost']:.0f}"
                          for r in entry["rows"])
        print(f"{name}: window=auto chose {entry['window']} on {entry['machine']}, {entry['threads']} "
              f"threads (predicted cost in one-row calls; {tried})")
    print(f"wrote {out}/results.json, results.csv, context.json, bench.png")


if __name__ == "__main__":
    main()
