"""The backend table of docs/samplers.md from one dp-bench run whose rows are `<preset>:backend=torch`
and `<preset>:backend=auto` (measurement script, not product code):

    uv run python experiments/backend_table.py outputs/bench-backends-lift
"""

import json
import sys
from pathlib import Path


def main(out: str) -> None:
    rows = {r["name"]: r for r in json.loads((Path(out) / "results.json").read_text())}
    presets = [n.split(":")[0] for n in rows if n.endswith(":backend=torch") and rows[n]["requested"]]
    print("| preset | torch p50 / p95 ms | auto p50 / p95 ms (chose) | auto over torch | rounds | over its "
          "sequential twin, torch / auto |")
    print("|---|---|---|---|---|---|")
    for p in presets:
        t, a = rows[f"{p}:backend=torch"], rows[f"{p}:backend=auto"]
        print(f"| `{p}` | {t['latency_ms_p50']:.1f} / {t['latency_ms_p95']:.1f} | "
              f"{a['latency_ms_p50']:.1f} / {a['latency_ms_p95']:.1f} ({a['backend']}) | "
              f"**{t['latency_ms_p50'] / a['latency_ms_p50']:.2f}x** | "
              f"{a['parallel_iters_mean']:.1f} | {t['speedup']:.2f}x / {a['speedup']:.2f}x |")
    ctx = json.loads((Path(out) / "context.json").read_text())
    for backend, curve in ctx["batch_scaling_by_backend"].items():
        print(f"\n{backend}: " + ", ".join(f"{c['batch']}: {c['ms']:.2f} ms ({c['ratio']:.2f})"
                                           for c in curve))


if __name__ == "__main__":
    main(sys.argv[1])
