"""`dp-eval`: closed-loop success against planning latency, for many samplers on the same
initial states.

Every sampler runs episodes on seeds `seed .. seed + episodes - 1` (refused if the
demonstration store used any of them). Episodes run in worker processes, one torch thread each
by default, so a plan's latency is measured on a known amount of compute. Each finished episode
is appended to `out/episodes.jsonl` at once: an interrupted run keeps what it finished, and the
same command continues where it stopped. The report (`results.json`, `episodes.csv`,
`plans.csv`, `pareto.png`) is rebuilt from that log at the end.

`stop=sequential` runs the seeds in blocks of `block` and stops each sampler as soon as an
anytime-valid paired test decides whether it differs from the reference (`rollouts.stats`,
`sequential_decision`); `episodes` is then the most a sampler may run. The report says how many
each one used and what was decided.

`realtime=true` runs each episode on the wall clock instead (`rollouts.realtime`): a `SimRobot`
driven at the task's 20 Hz by the asynchronous loop, planning through a `dp-serve` process of the
worker's own (`loop.transport=local`: a thread in the worker). One worker by default, as such an
episode keeps two cores busy; the report adds staleness, steps without a fresh action, skipped
actions and jitter, and `realtime.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from common.cli import command, fail, workers_ignore_ctrl_c
from common.errors import UserError
from common.files import naming, write_json, write_text
from common.lock import exclusive
from policy.samplers import SamplerConfig
from rollouts.realtime import LoopConfig
from rollouts.report import (check_deadline, episode_rows, plan_rows, recommendation_line, summarize, table,
                             write_report)
from rollouts.stats import loop_deadline_ms, recommend
from rollouts.runner import check_simulated
from rollouts.worker import WorkerInit, close_server, init_worker, run_job

LOG = "episodes.jsonl"


def _overrides_type() -> type:
    """SamplerConfig's options, all optional: `options.tol=0.05` sets tol on every sampler that
    takes it (a Hydra multirun sweeps it: `-m options.tol=0.02,0.05,0.1`)."""
    hints = typing.get_type_hints(SamplerConfig)
    return dataclasses.make_dataclass(
        "SamplerOptions", [(f.name, hints[f.name], field(default=None))
                           for f in dataclasses.fields(SamplerConfig) if f.name != "name"])


SamplerOptions = _overrides_type()


@dataclass
class EvalConfig:
    checkpoint: str = "???"
    samplers: list[str] = field(default_factory=lambda: ["ddpm100", "paraddpm100", "ddim10", "paraddim15"])
    options: SamplerOptions = field(default_factory=SamplerOptions)  # type: ignore[valid-type]
    episodes: int = 50
    seed: int = 100000
    out: str | None = None  # default: outputs/eval-<task>
    workers: int | None = None  # default: one per core (realtime: 1, as each episode keeps two cores busy)
    threads: int = 1  # torch threads per worker
    videos: int = 0  # render the first k episodes of each sampler to mp4
    horizon: int | None = None  # end each episode after this many control steps (default: the task's own)
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else the CPU
    data: str | None = None  # the demonstration store whose seeds must not be reused (default: the policy's)
    restart: bool = False  # discard a previous run in `out` instead of continuing it
    progress: bool = True
    realtime: bool = False  # run episodes on the wall clock through the asynchronous loop (rollouts.realtime)
    loop: LoopConfig = field(default_factory=LoopConfig)  # the loop's rate, merge rule, transport
    launcher: str = "pool"  # pool: worker processes here; ray: one Ray task an episode (rollouts.cluster)
    ray_address: str | None = None  # launcher=ray: a cluster's head (host:port); default a local Ray
    # the sampler every row is compared with on shared seeds (default: the first)
    reference: str | None = None
    # recommend a sampler for this planning deadline (realtime: what the loop allows)
    deadline_ms: float | None = None
    # fixed: every sampler runs `episodes`; sequential: blocks of `block` seeds, each sampler stopped
    # once a paired anytime-valid test decides it (`episodes` the most it may run)
    stop: str = "fixed"
    block: int = 10


# How the policy runs the network: taken by every sampler (`options.backend=auto` sets them all).
EVERY_SAMPLER = {"backend", "capture", "precision"}


def sampler_specs(samplers: list[str], options: dict) -> dict[str, SamplerConfig]:
    """Label -> checked config for each requested sampler, with `options` applied where taken."""
    from policy.samplers.spec import on_command_backend, options_of, with_options
    from rollouts.teacher import PREFIX as TEACHER

    options = {k: v for k, v in options.items() if v is not None}
    if not samplers:
        raise UserError("samplers: empty list")
    specs, used = {}, set()
    for spec in samplers:
        if spec.startswith(TEACHER):  # dp-bench's: a worker loads one policy
            raise UserError(f"samplers: {spec}: dp-eval runs one policy; evaluate the teacher with dp-eval "
                            "checkpoint=<teacher> on the same seeds and merge both runs with dp-report")
        allowed = options_of(SamplerConfig.parse(spec).name) | EVERY_SAMPLER
        extra = {k: v for k, v in options.items() if k in allowed}
        used |= set(extra)
        label = with_options(spec, extra)
        specs[label] = on_command_backend(SamplerConfig.parse(label))
    unused = set(options) - used
    if unused:
        raise UserError(f"options.{sorted(unused)[0]}: taken by none of the samplers {samplers}")
    return specs


def check_seeds(data: str | None, seeds: range, recorded: list[int] | None = None) -> None:
    """Refuse evaluation seeds that the demonstration store used (kept or failed), as the store
    says or, without it, as the policy recorded (a shipped policy, `policy.zoo`)."""
    used = set(recorded or [])
    if data and Path(data).exists():
        from envs.store import open_store

        with open_store(data) as store:
            used |= set(store.seeds_used)
    if not used:
        return
    overlap = sorted(used & set(seeds))
    if overlap:
        source = data if data and Path(data).exists() else "the policy's training store"
        raise UserError(f"seed: evaluation seeds {overlap[0]}.. overlap the {len(overlap)} seeds {source} "
                        f"used for demonstrations; choose seed >= {max(used) + 1}")


def _run_info(cfg: EvalConfig, pol, specs: dict[str, SamplerConfig]) -> dict:
    return {"checkpoint": pol.meta["checkpoint"], "step": pol.meta["step"], "task": pol.meta["task"],
            "seed": cfg.seed, "threads": cfg.threads, "device": str(pol.device), "horizon": cfg.horizon,
            "realtime": dataclasses.asdict(cfg.loop) if cfg.realtime else None,
            "samplers": {k: dataclasses.asdict(v) for k, v in specs.items()}}


def read_log(path: Path) -> list[dict]:
    """The finished episodes of a run; a line cut short by a kill is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def prepare_out(out: Path, info: dict, restart: bool) -> list[dict]:
    """The episodes a previous run of the same evaluation finished in `out` (none on restart)."""
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if restart:
        for name in (LOG, "run.json"):
            (out / name).unlink(missing_ok=True)
    elif run_file.exists():
        before = json.loads(run_file.read_text())
        for key in ("checkpoint", "seed", "threads", "device", "horizon", "realtime"):
            if before.get(key) != info[key]:
                raise UserError(f"{out}: holds an evaluation with {key}={before.get(key)!r}, "
                                f"not {info[key]!r}; pass restart=true to discard it, or another out=")
        for label, cfg in info["samplers"].items():
            if label in before.get("samplers", {}) and before["samplers"][label] != cfg:
                raise UserError(f"{out}: sampler {label!r} was evaluated with other options; "
                                "pass restart=true")
        info = {**info, "samplers": {**before.get("samplers", {}), **info["samplers"]}}
    write_json(run_file, info, indent=2)
    done = read_log(out / LOG)
    if (out / LOG).exists():  # drop a line a kill cut short, so appends start on a fresh line
        write_text(out / LOG, "".join(json.dumps(r) + "\n" for r in done))
    return done


def evaluate(cfg: EvalConfig) -> Path:
    import policy

    for name, low in (("episodes", 1), ("threads", 1), ("workers", 1), ("videos", 0), ("block", 1),
                      ("horizon", 1)):
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise UserError(f"{name}: {value} must be at least {low}")
    if cfg.stop not in ("fixed", "sequential"):
        raise UserError(f"stop: {cfg.stop!r} is not one of fixed, sequential")
    if cfg.launcher not in ("pool", "ray"):
        raise UserError(f"launcher: {cfg.launcher!r} is not one of pool, ray")
    if cfg.launcher == "ray":
        from rollouts.cluster import check_address, check_installed

        # syntax, and a head that answers: seconds, not Ray's minutes of retries
        check_address(cfg.ray_address)
        check_installed()
    cfg.loop.check()
    if cfg.realtime and cfg.videos:
        raise UserError("videos: not recorded with realtime=true (rendering would take the loop's time)")
    from policy.device import resolve_device

    # The device every worker is given and run.json records: resolved once, here, before anything
    # is written (`auto` on this machine; a device torch cannot reach is refused in one line).
    cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))
    pol = policy.load(cfg.checkpoint, device=cfg.device)  # fail early on a bad checkpoint, in this process
    check_simulated(pol)  # task=external: no simulator, no episodes; refused before out/ is written
    task = pol.meta["task"]
    specs = sampler_specs(cfg.samplers, dataclasses.asdict(cfg.options))
    reference_label(cfg, specs)  # a reference that names no sampler: one line, before any episode
    check_deadline(cfg.deadline_ms)
    for sc in specs.values():
        pol.sampler = sc  # a missing aligner fails here, in one line, before any worker starts
    seeds = range(cfg.seed, cfg.seed + cfg.episodes)
    check_seeds(cfg.data or pol.meta.get("data"), seeds, pol.meta.get("seeds_used"))
    out = Path(cfg.out or f"outputs/eval-{task}")
    with exclusive(out, "dp-eval"):  # a second run on `out` would replace the log this one appends to
        return _evaluate_into(out, cfg, pol, specs, seeds)


def _evaluate_into(out: Path, cfg: EvalConfig, pol, specs: dict[str, SamplerConfig], seeds: range) -> Path:
    """The episodes of `seeds` that `out` lacks, run and logged (block by block, stopping decided
    samplers, with stop=sequential); then the report from the log."""
    task = pol.meta["task"]
    done = prepare_out(out, _run_info(cfg, pol, specs), cfg.restart)
    reference = reference_label(cfg, specs)
    if cfg.stop == "sequential":
        decided, workers = _run_sequential(out, cfg, pol, specs, seeds, done, reference)
        records = [r for r in read_log(out / LOG) if r["sampler"] in specs and r["seed"] in seeds
                   and r["seed"] < seeds.start + decided[r["sampler"]]["episodes"]]
    else:
        workers = _run_seeds(out, cfg, pol, specs, seeds, done, specs)
        records = [r for r in read_log(out / LOG) if r["sampler"] in specs and r["seed"] in seeds]
        decided = {}
    summary = summarize(records, list(specs), reference, workers=workers,
                        threads=cfg.threads, device=str(pol.device), checkpoint=pol.meta["checkpoint"],
                        step=pol.meta["step"], task=task,
                        **({"loop": dataclasses.asdict(cfg.loop)} if cfg.realtime else {}))
    for row in summary:
        if row["sampler"] in decided:
            row["sequential"] = decided[row["sampler"]]
    deadline = cfg.deadline_ms
    if deadline is None and cfg.realtime:
        deadline = loop_deadline(cfg, pol)
    rec = recommend(summary, deadline) if deadline is not None else None
    write_report(out, summary, episode_rows(records), plan_rows(records), rec)
    print(table(summary))
    if decided:
        print(sequential_lines(decided, len(seeds), reference))
    if rec is not None:
        print(recommendation_line(rec))
    print(f"wrote {out}/results.json, episodes.csv, plans.csv, pareto.png")
    return out


def _run_sequential(out: Path, cfg: EvalConfig, pol, specs: dict, seeds: range, done: list[dict],
                    reference: str) -> tuple[dict[str, dict], int]:
    """Blocks of seeds until every sampler is decided or `seeds` run out; each sampler's decision
    (with the episodes it used) and the workers used."""
    from rollouts.stats import row_outcomes, sequential_decision

    active, decided, workers = [label for label in specs if label != reference], {}, 1
    for start in range(0, len(seeds), cfg.block):
        if not active:
            break
        block = seeds[:start + cfg.block]
        running = {label: specs[label] for label in (reference, *active)}
        workers = max(workers, _run_seeds(out, cfg, pol, running, block, done, specs, announce=start == 0))
        done = read_log(out / LOG)
        outcomes = {label: row_outcomes({"outcomes": _outcomes(done, label, block)}) for label in running}
        for label in list(active):
            d = sequential_decision(outcomes[label], outcomes[reference], len(seeds) - len(block))
            if d["decision"] is not None:
                decided[label] = d | {"episodes": len(block)}
                active.remove(label)
    n_ref = max([d["episodes"] for d in decided.values()] + [len(block) if active else 0])
    decided[reference] = {"decision": "reference", "episodes": n_ref}
    return decided, workers


def _outcomes(records: list[dict], label: str, seeds: range) -> dict:
    eps = [r for r in records if r["sampler"] == label and r["seed"] in seeds]
    return {"seeds": [r["seed"] for r in eps], "success": [int(bool(r["success"])) for r in eps]}


def sequential_lines(decided: dict[str, dict], most: int, reference: str) -> str:
    """What a sequential evaluation decided, and the episodes it used against a fixed-size run."""
    lines = []
    for label, d in decided.items():
        if label == reference:
            continue
        lines.append(f"{label}: {d['decision']} from {reference} after {d['episodes']} episodes "
                     f"({d['discordant']} discordant, e-value {d['e_value']:.1f}; {d['reason']})")
    used, fixed = sum(d["episodes"] for d in decided.values()), most * len(decided)
    lines.append(f"sequential: {used} episodes of the {fixed} a fixed-size run takes "
                 f"({1 - used / fixed:.0%} fewer)")
    return "\n".join(lines)


def _run_seeds(out: Path, cfg: EvalConfig, pol, specs: dict[str, SamplerConfig], seeds: range,
               done: list[dict], every: dict[str, SamplerConfig], announce: bool = True) -> int:
    """Run the episodes of `specs` on `seeds` that `done` lacks (videos of the first `cfg.videos`
    seeds; `every`: all the run's samplers, whose order a realtime server follows); the workers."""
    finished = {(r["sampler"], r["seed"]) for r in done}
    jobs = []
    for i, seed in enumerate(seeds):  # episode-major: an interrupted run has every sampler about as far
        for label, sc in specs.items():
            if (label, seed) not in finished:
                video = str(out / "videos" / f"{_slug(label)}-{seed}.mp4") if i < cfg.videos else None
                jobs.append({"label": label, "config": dataclasses.asdict(sc), "seed": seed, "episode": i,
                             "video": video})
    # sampler-major: a worker's server changes once per sampler
    if cfg.realtime and cfg.loop.transport == "server":
        jobs.sort(key=lambda j: list(every).index(j["label"]))
    workers = max(1, min(cfg.workers or (1 if cfg.realtime else os.cpu_count()) or 1, len(jobs) or 1))
    if done and announce:
        print(f"dp-eval: continuing {out}: {len(finished & {(l, s) for l in specs for s in seeds})} episodes "
              f"done, {len(jobs)} to run", file=sys.stderr)
    if jobs:
        _run_jobs(jobs, out / LOG, cfg, workers, pol.meta["checkpoint"])
    return workers


def reference_label(cfg: EvalConfig, specs: dict[str, SamplerConfig]) -> str:
    """The label of the sampler rows are compared with: `reference` as a label or as one of
    `samplers` (the first by default)."""
    labels = list(specs)
    if cfg.reference is None:
        return labels[0]
    if cfg.reference in specs:
        return cfg.reference
    if cfg.reference in cfg.samplers:  # the spec as given; its label may carry `options`
        return labels[list(cfg.samplers).index(cfg.reference)]
    raise UserError(f"reference: {cfg.reference!r} is not one of the samplers ({', '.join(cfg.samplers)})")


def loop_deadline(cfg: EvalConfig, pol) -> float:
    """What the real-time loop allows a plan: the time the current chunk still covers when the
    next plan is requested (`rollouts.stats.loop_deadline_ms`), at the loop's settings."""
    from envs.tasks import get_task

    rate = cfg.loop.rate_hz or get_task(pol.meta["task"]).control_freq
    return loop_deadline_ms(*cfg.loop.plan_sizes(pol.max_actions, pol.cfg.n_action_steps), rate)


def _run_jobs(jobs: list[dict], log: Path, cfg: EvalConfig, workers: int, checkpoint: str) -> None:
    bar = tqdm(total=len(jobs), desc=f"dp-eval ({workers} workers x {cfg.threads} threads)", unit="episode",
               disable=not cfg.progress)
    # unbuffered: a write that fails (a full disk) leaves nothing for close() to retry; it names the log
    with naming(log), open(log, "ab", buffering=0) as f:

        def keep(record: dict) -> None:
            data, end = (json.dumps(record) + "\n").encode(), f.seek(0, os.SEEK_END)
            try:
                while data:
                    data = data[f.write(data):]
                os.fsync(f.fileno())
            except OSError:
                f.truncate(end)  # the log keeps whole lines only
                raise
            bar.update()
            if record.get("error"):
                tqdm.write(f"{record['sampler']} seed {record['seed']}: {record['error']}")

        loop = dataclasses.asdict(cfg.loop) if cfg.realtime else None
        init = WorkerInit(checkpoint, cfg.device, cfg.threads, loop, horizon=cfg.horizon)
        try:
            if cfg.launcher == "ray":
                from rollouts.cluster import run_on_ray

                run_on_ray(jobs, keep, init, workers, cfg.ray_address)
            elif workers == 1:
                init_worker(init)
                try:
                    for job in jobs:
                        keep(run_job(job))
                finally:
                    close_server()
            else:
                import multiprocessing as mp

                ctx = mp.get_context("spawn")  # MuJoCo/EGL and torch threads do not survive fork
                pool = None
                try:
                    with workers_ignore_ctrl_c():  # a Ctrl-C meanwhile is raised once `pool` is set
                        pool = ctx.Pool(workers, initializer=init_worker,
                                        initargs=(dataclasses.replace(init, pooled=True),))
                    for record in pool.imap_unordered(run_job, jobs):
                        keep(record)
                finally:
                    if pool is not None:
                        pool.terminate()
        except KeyboardInterrupt:
            bar.close()
            fail("dp-eval", f"interrupted: the finished episodes are in {log}; the same command continues",
                 130)
    bar.close()


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


@command("eval", EvalConfig)
def main(cfg: EvalConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
