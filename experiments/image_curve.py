"""Success against training time for an image policy run: each kept checkpoint of `run`
evaluated by dp-eval on the same seeds, its training time read from its trainer state.

    uv run python experiments/image_curve.py outputs/lift_image 20 ddim10 [step ...]

Writes experiments/results/image-curve-<task>.csv and .png (the results are dp-eval's own, under
outputs/curve-<task>/step-N/).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from rollouts.report import read_rows  # noqa: E402

run, episodes, sampler = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
wanted = {int(s) for s in sys.argv[4:]}
ckpts = sorted(run.glob("checkpoints/step-*"))
if wanted:
    ckpts = [c for c in ckpts if int(c.name.split("-")[1]) in wanted]
task = json.loads((ckpts[0] / "policy.json").read_text())["meta"]["task"]
rows = []
for ckpt in ckpts:
    step = int(ckpt.name.split("-")[1])
    minutes = torch.load(ckpt / "trainer.pt", weights_only=False)["elapsed_s"] / 60
    out = Path(f"outputs/curve-{task}/{ckpt.name}")
    subprocess.run([str(Path(sys.executable).with_name("dp-eval")), f"checkpoint={ckpt}",
                    f"samplers=[{sampler}]", f"episodes={episodes}",
                    "seed=100000", f"out={out}", "workers=2", "threads=1"], check=True)
    (res,) = read_rows(out / "results.json")
    rows.append((step, minutes, res["success_rate"], *res["success_ci95"], res["episodes"]))
    print(f"step {step}: {minutes:.1f} min, success {res['success_rate']:.0%}", flush=True)
dest = Path(f"experiments/results/image-curve-{task}")
dest.with_suffix(".csv").write_text("step,training_min,success,ci_lo,ci_hi,episodes\n"
                                    + "".join(",".join(f"{v:.4g}" for v in r) + "\n" for r in rows))
fig, ax = plt.subplots(figsize=(5, 3.2))
x = [r[1] for r in rows]
ax.errorbar(x, [100 * r[2] for r in rows],
            yerr=[[100 * (r[2] - r[3]) for r in rows], [100 * (r[4] - r[2]) for r in rows]],
            marker="o", capsize=3)
for r in rows:
    ax.annotate(f"{r[0]}", (r[1], 100 * r[2]), textcoords="offset points", xytext=(0, -12), fontsize=7,
                ha="center")
ax.set_xlabel("training time, 2-core CPU (min)")
ax.set_ylabel(f"success, {sampler} (%)")
ax.set_ylim(0, 105)
ax.set_title(f"image {task}: success against training time ({rows[0][5]} episodes, 95% CI)", fontsize=9)
fig.tight_layout()
fig.savefig(dest.with_suffix(".png"), dpi=120)
print(f"wrote {dest}.csv and .png")
