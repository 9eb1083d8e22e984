"""Evaluation reports: per-sampler summary (success with its Wilson interval, reward, latency,
evaluations, iterations), the printed table, CSVs, and the success-vs-latency Pareto plot.
`dp-report inputs=[dirA,dirB] out=DIR` merges several evaluations into one table and plot."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.cli import command
from common.errors import UserError
from common.files import save_figure, write_text
from rollouts.stats import paired, recommend, row_outcomes, wilson


def summarize(records: list[dict], labels: list[str], reference: str | None = None, **context) -> list[dict]:
    """One entry per sampler (in `labels` order) from its finished episodes, each compared with
    the `reference` sampler (default the first) on the seeds both ran (`paired`; None for the
    reference itself)."""
    out = []
    for label in labels:
        eps = sorted((r for r in records if r["sampler"] == label), key=lambda r: r["seed"])
        plans = [p for r in eps for p in r["plans"]]
        lat = np.array([p["latency_ms"] for p in plans]) if plans else np.array([np.nan])
        wins = sum(bool(r["success"]) for r in eps)
        out.append({
            "sampler": label,
            "episodes": len(eps),
            "success_rate": wins / len(eps) if eps else 0.0,
            "success_ci95": list(wilson(wins, len(eps))),
            # per-episode max reward
            "reward_mean": float(np.mean([r["max_reward"] for r in eps])) if eps else 0.0,
            "return_mean": float(np.mean([r["return_"] for r in eps])) if eps else 0.0,
            "length_mean": float(np.mean([r["length"] for r in eps])) if eps else 0.0,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                           "mean": float(np.mean(lat))},
            "model_evals_per_plan": float(np.mean([p["model_evals"] for p in plans])) if plans else 0.0,
            # of latency_ms: an image policy's observation encoder (0 for state policies)
            "encode_ms_p50": float(np.percentile([p.get("encode_ms", 0.0)
                                                  for p in plans], 50)) if plans else 0.0,
            "parallel_iters_per_plan": float(np.mean([p["parallel_iters"] for p in plans])) if plans else 0.0,
            "converged_rate": float(np.mean([p["converged"] for p in plans])) if plans else 0.0,
            "plans": len(plans),
            # where the denoiser's calls ran (backend=auto resolved); older records did not say
            "backend": "+".join(sorted({r.get("backend") or "?" for r in eps})) if eps else "?",
            "errors": [{"seed": r["seed"], "error": r["error"]} for r in eps if r.get("error")],
            **({"realtime": realtime_summary(eps)} if any("realtime" in r for r in eps) else {}),
            "outcomes": {"seeds": [int(r["seed"]) for r in eps],
                         "success": [int(bool(r["success"])) for r in eps]},
            **context,
        })
    return compare(out, reference)


def compare(rows: list[dict], reference: str | None = None) -> list[dict]:
    """Each row's `paired` comparison with the `reference` row (default the first) over the seeds
    both ran; the reference's own is None."""
    if not rows:
        return rows
    reference = rows[0]["sampler"] if reference is None else reference  # '' names no sampler: refused
    ref = next((r for r in rows if r["sampler"] == reference), None)
    if ref is None:
        raise UserError(f"reference: {reference!r} is not one of the samplers "
                        f"({', '.join(r['sampler'] for r in rows)})")
    for r in rows:
        r["paired"] = None if r is ref else paired(row_outcomes(r), row_outcomes(ref), reference)
    return rows


def realtime_summary(episodes: list[dict]) -> dict:
    """What the real-time loop cost a sampler's episodes: staleness of executed actions, steps
    with no fresh action, skipped actions, wake-up jitter and deadline overruns."""
    # an episode that crashed before its loop has none
    loops = [r["realtime"] for r in episodes if "realtime" in r]
    plans = [p for r in episodes for p in r["plans"]]

    def pct(values: list[float], *qs: int) -> dict:
        v = np.asarray(values) if values else np.array([np.nan])
        return {f"p{q}": float(np.percentile(v, q)) for q in qs} | {"mean": float(np.mean(v))}

    steps = sum(x["steps"] for x in loops)
    return {"rate_hz": 1e3 / loops[0]["period_ms"] if loops else None, "steps": steps,
            "staleness_ms": pct([v for x in loops for v in x["staleness_ms"]], 50, 95),
            "no_fresh_rate": sum(x["no_fresh"] for x in loops) / steps if steps else 0.0,
            "overrun_rate": sum(x["overruns"] for x in loops) / steps if steps else 0.0,
            "skipped_per_plan": sum(x["skipped"] for x in loops) / len(plans) if plans else 0.0,
            "jitter_ms": pct([v for x in loops for v in x["jitter_ms"]], 50, 99) | {
                "max": max([v for x in loops for v in x["jitter_ms"]], default=0.0)},
            "server_plan_ms": pct([p["plan_ms"] for p in plans], 50)}


def episode_rows(records: list[dict]) -> list[dict]:
    keys = ("sampler", "seed", "episode", "success", "max_reward", "return_", "length", "error")
    return [{k: r.get(k) for k in keys} | {"plans": len(r["plans"])} for r in records]


def plan_rows(records: list[dict]) -> list[dict]:
    return [{"sampler": r["sampler"], "seed": r["seed"], **p} for r in records for p in r["plans"]]


def table(summary: list[dict]) -> str:
    """The printed table; real-time runs add staleness (p50/p95 ms), steps with no fresh action,
    skipped actions per plan and jitter p99 (p50/p95 ms are then round trips, what the robot waits)."""
    w = max([24, *(len(s["sampler"]) + 1 for s in summary)])
    rt = all("realtime" in s for s in summary)
    head = (f"{'sampler':<{w}}{'episodes':>9}{'success':>9}{'95% CI':>14}{'vs ref':>8}{'p':>8}{'reward':>8}"
            f"{'p50 ms':>9}{'p95 ms':>9}{'evals':>8}{'iters':>8}{'errors':>7}{'backend':>10}")
    if rt:
        head += f"{'stale p50':>10}{'stale p95':>10}{'no act':>8}{'skip/plan':>10}{'jitter p99':>11}"
    lines = [head, "-" * len(head)]
    for s in summary:
        lo, hi = s["success_ci95"]
        pair = s.get("paired")
        versus = "ref" if pair is None else f"{100 * pair['diff']:+.0f} pt"
        pval = "" if pair is None else f"{pair['p_value']:.2g}"
        line = (f"{s['sampler']:<{w}}{s['episodes']:>9}{s['success_rate']:>8.0%} {f'{lo:.0%}-{hi:.0%}':>13}"
                f"{versus:>8}{pval:>8}{s['reward_mean']:>8.2f}"
                f"{s['latency_ms']['p50']:>9.1f}{s['latency_ms']['p95']:>9.1f}"
                f"{s['model_evals_per_plan']:>8.1f}{s['parallel_iters_per_plan']:>8.1f}{len(s['errors']):>7}"
                f"{s.get('backend', '?'):>10}")
        if rt:
            r = s["realtime"]
            line += (f"{r['staleness_ms']['p50']:>10.0f}{r['staleness_ms']['p95']:>10.0f}"
                     f"{r['no_fresh_rate']:>8.1%}{r['skipped_per_plan']:>10.1f}"
                     f"{r['jitter_ms']['p99']:>11.1f}")
        lines.append(line)
    return "\n".join(lines)


def pareto_front(summary: list[dict]) -> list[dict]:
    """The samplers no other beats on both success and p50 latency, fastest first."""
    pts = sorted(summary, key=lambda s: (s["latency_ms"]["p50"], -s["success_rate"]))
    front, best = [], -1.0
    for s in pts:
        if s["success_rate"] > best:
            front.append(s)
            best = s["success_rate"]
    return front


def plot_pareto(path: Path, summary: list[dict], title: str, recommendation: dict | None = None) -> None:
    """Success against p50 latency, non-dominated samplers joined; with a `recommendation`, its
    deadline as a vertical line (against which the samplers' p95 was held) and its pick ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 5))
    # a sampler whose episodes all crashed has no plans
    summary = [s for s in summary if math.isfinite(s["latency_ms"]["p50"])]
    front = pareto_front(summary)
    ax.plot([s["latency_ms"]["p50"] for s in front], [100 * s["success_rate"] for s in front], "-",
            color="#9ecae1", lw=2, zorder=1, label="non-dominated")
    placed: list[tuple[float, float, int]] = []
    xs = [s["latency_ms"]["p50"] for s in summary] or [1.0]
    mid = (math.log10(min(xs)) + math.log10(max(xs))) / 2 if len(xs) > 1 else math.inf
    for s in sorted(summary, key=lambda e: e["latency_ms"]["p50"]):
        x, y = s["latency_ms"]["p50"], 100 * s["success_rate"]
        lo, hi = s["success_ci95"]
        ax.errorbar([x], [y], yerr=[[y - 100 * lo], [100 * hi - y]], fmt="o", capsize=3, zorder=2,
                    color="#08519c" if s in front else "#6b6b6b")
        # Samplers often tie on success: stack the labels of nearby points in a column, away
        # from the plot's edge (below points near 100 %, above the others).
        taken = {pk for px, py, pk in placed if abs(math.log10(x / px)) < 0.4 and abs(y - py) < 8}
        k = next(i for i in range(len(placed) + 1) if i not in taken)
        placed.append((x, y, k))
        dy = -(16 + 11 * k) if y > 60 else 10 + 11 * k
        right = math.log10(x) > mid  # labels of the slower half go left of their point, inside the axes
        ax.annotate(f"{s['sampler']} ({s['parallel_iters_per_plan']:.0f} it)", (x, y),
                    textcoords="offset points", xytext=(-8 if right else 8, dy),
                    ha="right" if right else "left", fontsize=7.5,
                    arrowprops={"arrowstyle": "-", "color": "#bbbbbb", "lw": 0.6})
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 1.6, max(xs) * 1.8)  # room for the labels right of each point
    if recommendation is not None:
        _draw_deadline(ax, summary, recommendation)
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("p50 planning latency per plan (ms, log scale)")
    ax.set_ylabel("task success (%), 95 % Wilson interval")
    ax.set_ylim(-5, 112)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def _draw_deadline(ax, summary: list[dict], rec: dict) -> None:
    d = rec["deadline_ms"]
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, d / 1.3), max(hi, d * 1.3))
    ax.axvline(d, color="#d62728", ls="--", lw=1.2, zorder=0, label=f"deadline {d:g} ms (held against p95)")
    pick = next((s for s in summary if s["sampler"] == rec["sampler"]), None)
    if pick is not None:
        ax.plot([pick["latency_ms"]["p50"]], [100 * pick["success_rate"]], "o", ms=14, mfc="none",
                mec="#d62728", mew=1.5, zorder=3, label=f"recommended: {pick['sampler']}")


def plot_realtime(path: Path, summary: list[dict], title: str) -> None:
    """Success against the staleness of executed actions (p50, bar to p95), and the share of
    control steps each sampler left without a fresh action."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for s in summary:
        r, y = s["realtime"], 100 * s["success_rate"]
        lo, hi = s["success_ci95"]
        x, x95 = r["staleness_ms"]["p50"], r["staleness_ms"]["p95"]
        # a legend, not labels at the points: samplers often sit on top of each other here
        ax.errorbar([x], [y], yerr=[[y - 100 * lo], [100 * hi - y]], xerr=[[0], [max(x95 - x, 0)]], fmt="o",
                    capsize=3, label=s["sampler"])
    ax.set_xlabel("staleness of executed actions (ms): p50, bar to p95")
    ax.set_ylabel("task success (%), 95 % Wilson interval")
    ax.set_ylim(-5, 112)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=7.5)
    names = [s["sampler"] for s in summary]
    rates = [100 * s["realtime"]["no_fresh_rate"] for s in summary]
    bars = bx.barh(names, rates, color="#fd8d3c")
    bx.bar_label(bars, [f"{v:.1f} %" for v in rates], fontsize=7.5, padding=2)
    bx.set_xlim(0, max([5.0, *rates]) * 1.25)
    bx.invert_yaxis()
    bx.set_xlabel("control steps with no fresh action (%)")
    bx.tick_params(axis="y", labelsize=7.5)
    bx.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def _values(summary: list[dict], key: str) -> str:
    """The values rows give `key`, each once, in order ("2 or 1" for a report merged from runs
    with different settings)."""
    return " or ".join(str(v) for v in dict.fromkeys(s.get(key, "?") for s in summary))


def _title(summary: list[dict]) -> str:
    s = summary[0]
    loop, r = s.get("loop") or {}, s.get("realtime") or {}
    rt = (f"\nreal time at {r['rate_hz']:g} Hz, {loop.get('transport', '?')} planner, merge "
          f"{loop.get('merge', '?')}"
          if r.get("rate_hz") else "")
    return (f"{_values(summary, 'task')}: {_values(summary, 'episodes')} episodes per sampler; "
            f"{_values(summary, 'workers')} workers x {_values(summary, 'threads')} torch threads, "
            f"{_values(summary, 'device')}{rt}")


def write_report(out: Path, summary: list[dict], episodes: list[dict] | None = None,
                 plans: list[dict] | None = None, recommendation: dict | None = None) -> None:
    """results.json ({"samplers": rows, "reference", "recommendation"}), the CSVs and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    reference = next((s["sampler"] for s in summary if s.get("paired") is None), None)
    doc = {"samplers": summary, "reference": reference, "recommendation": recommendation}
    write_text(out / "results.json", json.dumps(doc, indent=2))
    if episodes is not None:
        write_text(out / "episodes.csv", _csv(episodes))
    if plans is not None:
        write_text(out / "plans.csv", _csv(plans))
    plot_pareto(out / "pareto.png", summary, _title(summary), recommendation)
    if all("realtime" in s for s in summary):
        plot_realtime(out / "realtime.png", summary, _title(summary))


def read_rows(path: Path) -> list[dict]:
    """The sampler rows of a dp-eval results.json (the current {"samplers": [...]} or an older
    list of rows); UserError naming the file otherwise."""
    try:
        doc = json.loads(path.read_text())
        rows = doc["samplers"] if isinstance(doc, dict) else doc
        assert isinstance(rows, list) and all(isinstance(e, dict) and "sampler" in e for e in rows)
        if any("latency_ms_p50" in e and "success_rate" not in e for e in rows):
            raise UserError(f"{path}: a dp-bench results.json (planning latency, no episodes), not a dp-eval "
                            "one; dp-report merges dp-eval folders")
        assert all(isinstance(e["sampler"], str) for e in rows)
    except (json.JSONDecodeError, KeyError, AssertionError):
        raise UserError(f"{path}: not a dp-eval results.json") from None
    except OSError as err:
        raise UserError(f"{path}: {err.strerror}") from None
    return rows


def recommendation_line(rec: dict) -> str:
    if rec["sampler"] is None:
        return f"deadline {rec['deadline_ms']:g} ms: no recommendation: {rec['reason']}"
    return (f"deadline {rec['deadline_ms']:g} ms: use {rec['sampler']} ({rec['success_rate']:.0%} success, "
            f"p95 {rec['latency_p95_ms']:.0f} ms): {rec['reason']}")


def seed_note(rows: list[dict]) -> str | None:
    """A line saying that the rows were not all run on the same seeds (None if they were)."""
    sets = {r["sampler"]: frozenset(row_outcomes(r)) for r in rows}
    if len(set(sets.values())) <= 1:
        return None
    shared = frozenset.intersection(*sets.values())
    counts = ", ".join(f"{k} {len(v)}" for k, v in sets.items())
    return (f"seeds differ between runs ({counts}); each comparison is over the seeds both ran "
            f"({len(shared)} shared by all)")


@dataclass
class ReportConfig:
    inputs: list[str] = field(default_factory=list)  # evaluation directories (or their results.json)
    out: str = "outputs/report"
    reference: str | None = None  # the sampler every row is compared with (default: the first)
    # recommend the fastest sampler whose p95 fits, as good as the best that fits
    deadline_ms: float | None = None


def merge(inputs: list[str]) -> list[dict]:
    """The rows of several results.json files; a sampler label that repeats gets its run's
    directory name appended."""
    if not inputs:
        raise UserError("inputs: empty list; give evaluation directories, e.g. "
                        "inputs=[outputs/eval-a,outputs/eval-b]")
    merged, seen = [], set()
    for item in inputs:
        path = Path(item)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"{path}: no such file (not an evaluation directory?)")
        for e in read_rows(path):
            if e["sampler"] in seen:
                e = {**e, "sampler": f"{e['sampler']} ({path.parent.name})"}
            seen.add(e["sampler"])
            merged.append(e)
    return merged


def check_deadline(deadline_ms) -> None:
    if deadline_ms is not None and (isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float))
                                    or not math.isfinite(deadline_ms) or deadline_ms <= 0):
        raise UserError(f"deadline_ms: {deadline_ms!r} must be a positive number of milliseconds")


@command("report", ReportConfig)
def main(cfg: ReportConfig) -> None:
    check_deadline(cfg.deadline_ms)
    summary = compare(merge(list(cfg.inputs)), cfg.reference)
    note = seed_note(summary)
    rec = recommend(summary, cfg.deadline_ms) if cfg.deadline_ms is not None else None
    out = Path(cfg.out)
    write_report(out, summary, recommendation=rec)
    print(table(summary))
    if note:
        print(f"dp-report: {note}")
    if rec is not None:
        print(recommendation_line(rec))
    print(f"wrote {out}/results.json, pareto.png")


if __name__ == "__main__":
    main()
