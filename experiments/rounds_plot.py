"""Square success against rounds per plan (denoiser calls in sequence: Picard rounds or sequential
steps), the device-independent cost, for the presets and their peers. Reads dp-eval results.json
files; writes one PNG. The latencies of those evaluations came from runs that shared the cores,
so the x axis is the count that decides latency on every device (docs/rounds.md).

    uv run python experiments/rounds_plot.py outputs/eval-rules-square outputs/eval-peers-square \
        outputs/eval-w16-square --out experiments/results/pareto-rules-square.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.files import save_figure
from rollouts.report import read_rows

LABELS = {  # dp-eval label -> short name on the plot
    "ddpm100": "DDPM-100",
    "paraddpm100:window=100,anderson=4,tol=1.0,floor=0.03,warm=true": "ParaDDPM-100, new, window 100",
    "paraddpm100:window=16,anderson=4,tol=1.0,floor=0.03,warm=true": "ParaDDPM-100, new, "
                                                                     "window 16 (preset here)",
    "paraddpm100:window=100,anderson=4,rule=x0,tol=0.02,warm=true": "ParaDDPM-100, x0 rule",
    "falcon100:start=70": "Falcon, start 70",
    "falcon100": "Falcon, start 50",
    "ddim10": "DDIM-10",
    "ddim10+aligner": "DDIM-10 + aligner",
    "dpmsolver15": "DPM-Solver-15",
    "paraddim15:anderson=4,tol=0.5,floor=0.01,warm=true": "ParaDDIM-15 (preset)",
    "paradpmsolver15:anderson=4,tol=0.5,floor=0.01,warm=true": "ParaDPMSolver-15 (preset)",
}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser()
    parser.add_argument("evals", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = {}
    for d in args.evals:
        for r in read_rows(Path(d) / "results.json"):
            if r["sampler"] in LABELS and LABELS[r["sampler"]] not in rows:
                rows[LABELS[r["sampler"]]] = r
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, r in rows.items():
        x, y = r["parallel_iters_per_plan"], 100 * r["success_rate"]
        lo, hi = (100 * v for v in r["success_ci95"])
        para = name.startswith("Para")
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=4,
                    color="#2171b5" if para else "#636363")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("denoiser calls in sequence per plan (Picard rounds, or steps), log scale")
    ax.set_ylabel("square success (%), 95 % Wilson interval")
    ax.set_ylim(0, 105)
    ax.set_title("square (zoo/square), 50 episodes per sampler, seeds 100000-100049; blue: ParaDiGMS")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(args.out)
    save_figure(fig, out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
