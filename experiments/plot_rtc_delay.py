"""Draws rtc-delay-lift.png from rtc-delay-lift.csv (docs/realtime.md, success against added delay).
Run from the repository root: uv run python experiments/plot_rtc_delay.py"""
import csv, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
rows = list(csv.DictReader(open("experiments/results/rtc-delay-lift.csv")))
fig, ax = plt.subplots(figsize=(5, 3.4))
for merge, mk in (("latest", "o"), ("act", "s"), ("rtc", "^"), ("rtc-guide", "v")):
    r = [x for x in rows if x["merge"] == merge]
    ax.plot([float(x["extra_delay_ms"]) for x in r],
            [100 * int(x["successes"]) / int(x["episodes"]) for x in r], marker=mk,
            ls=":" if merge == "rtc-guide" else "-",
            label={"rtc": "rtc (replace)", "rtc-guide": "rtc (guide)"}.get(merge, merge))
ax.set_xlabel("latency added to every plan (ms)"); ax.set_ylabel("success (%), 30 episodes")
ax.set_ylim(-3, 103)
ax.set_title("lift, DDIM-10 via dp-serve at 20 Hz, 2-core CPU", fontsize=9); ax.legend(); ax.grid(alpha=.3)
fig.tight_layout(); fig.savefig("experiments/results/rtc-delay-lift.png", dpi=120)
