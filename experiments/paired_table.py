"""The paired table of docs/evaluation.md from one dp-eval run (measurement script, not product code):
each sampler against the run's reference on the seeds both ran, McNemar's exact p and the paired
95 % interval, and whether the difference is real (p < 0.05).

    uv run python experiments/paired_table.py outputs/sweep32-square
"""

import sys
from pathlib import Path

from rollouts.report import compare, read_rows


def main(out: str) -> None:
    rows = compare(read_rows(Path(out) / "results.json"))
    print("| sampler | success (95 % CI) | p50 / p95 ms | vs reference (paired 95 % CI) | only this / only "
          "ref | McNemar p | real? |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["success_ci95"]
        head = (f"| `{r['sampler']}` | {r['success_rate']:.1%} ({lo:.0%}–{hi:.0%}) | "
                f"{r['latency_ms']['p50']:.0f} / {r['latency_ms']['p95']:.0f} | ")
        p = r["paired"]
        if p is None:
            print(head + "reference | | | |")
            continue
        dlo, dhi = p["diff_ci95"]
        real = "yes" if p["p_value"] < 0.05 else "no"
        print(head + f"{100 * p['diff']:+.1f} pt ({100 * dlo:+.1f} to {100 * dhi:+.1f}) | "
              f"{p['only_this']} / {p['only_reference']} | {p['p_value']:.2g} | {real} |")


if __name__ == "__main__":
    main(sys.argv[1])
