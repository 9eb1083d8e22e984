"""dp-devicecheck: the GPU measurement, prepared here, run once on a lent GPU machine.

The GPU machine has Python 3.12 and PyTorch but no network and none of diffusers, hydra,
omegaconf, zarr, gymnasium, mujoco or robosuite. The check plans on a shipped policy and needs
no simulator and no store:

    # here (network to the package registry), once: wheels for what the GPU machine lacks, and
    # closed-loop observation histories of the validation episodes (no zarr needed there)
    uv run dp-devicecheck prepare --checkpoint zoo/lift --data data/lift.zarr --out .device
    # there: a venv over the machine's own torch and numpy, the wheels, then the check
    bash rollouts/devicecheck.sh .device "$OUT"

`run` is one dp-bench process (so every ratio is inside one run): the batch-scaling curve up to
128 rows; DDPM-100; ParaDDPM-100 with the paper's rule and with the new rule (whole-chain
Anderson, floored tolerance, warm starts) at windows 16, 32 and 100; DDIM-10/15; ParaDDIM-15 with either rule;
each eager and captured (CUDA graphs over padded rounds; on a CPU, `pad`), and the fastest
rows again in bf16. It stops timing new plans at `--budget-s` and writes, under `--out`, the
bench's results.json/csv, context.json and bench.png, `summary.md` (the table and the targets
of issue 18) and `host_syncs.json` (host synchronisations per Picard round, counted by CUDA's
sync debug mode).

A CPU dry run with a tiny plan count is a test (`tests/test_devicecheck.py`).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

# What the GPU machine lacks, at the versions of uv.lock (pip resolves their dependencies
# against the machine's own packages, so numpy and torch stay the machine's).
NEEDED = ("diffusers==0.42.1", "hydra-core==1.3.8", "omegaconf==2.3.1")
ON_THE_MACHINE = ("numpy", "pillow", "safetensors", "tqdm", "torch", "matplotlib", "scipy", "msgpack")

PAPER_DDIM15 = "paraddim15:anderson=0,tol=0.1,floor=0,warm=false"  # the paper's rule on the 15-step chain


def samplers(device: torch.device) -> list[str]:
    """The rows of the check: each eager and captured, and the fastest again in bf16. The
    presets are the new rule (`paraddpm100`: window auto); `paraddpm100paper` is the paper's."""
    from policy.samplers.spec import with_options

    captured = "graph" if device.type == "cuda" else "pad"
    base = ["ddpm100", "paraddpm100paper", "paraddpm100paper:window=32", "paraddpm100paper:window=100"]
    base += ["paraddpm100"] + [f"paraddpm100:window={w}" for w in (16, 32, 100)]
    base += ["ddim10", "ddim15", PAPER_DDIM15, "paraddim15"]
    rows = []
    for spec in base:
        rows += [with_options(spec, {"capture": "none"}), with_options(spec, {"capture": captured})]
    for spec in ("ddpm100", "paraddpm100:window=100", "ddim10", "paraddim15"):
        rows.append(with_options(spec, {"capture": captured, "precision": "bf16"}))
    return rows


def prepare(checkpoint: str, data: str, out: Path, plans: int, wheels: bool) -> None:
    """`out`/obs.npz (closed-loop histories of the validation episodes) and `out`/wheels."""
    import policy
    from common.errors import UserError
    from common.files import atomic_path
    from policy.windows import episode_sequences

    out.mkdir(parents=True, exist_ok=True)
    pol = policy.load(checkpoint, device="cpu")
    obs, first = episode_sequences(pol, data, "val", plans)
    with atomic_path(out / "obs.npz") as tmp:
        np.savez(tmp, obs=obs, first=first)
    print(f"wrote {out / 'obs.npz'}: {len(obs)} histories of {int(first.sum())} "
          f"validation episodes of {data}")
    if not wheels:
        return
    dest = out / "wheels"
    dest.mkdir(exist_ok=True)
    pip = [_python_with_pip(), "-m", "pip"]
    # antlr4-python3-runtime 4.9.3 (omegaconf's) exists only as a source archive: build its wheel here.
    steps = [[*pip, "wheel", "--quiet", "--no-deps", "-w", str(dest), "antlr4-python3-runtime==4.9.3"],
             [*pip, "download", "--quiet", "--find-links", str(dest), "--only-binary=:all:",
              "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
              "--python-version", "3.12", "--implementation", "cp", "-d", str(dest), *NEEDED]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            last = [line for line in done.stderr.splitlines()
                    if line.startswith("ERROR")] or done.stderr.splitlines()[-1:]
            raise UserError(f"wheels: {' '.join(step[:4])} failed: {last[0] if last else done.returncode}")
    for wheel in dest.glob("*.whl"):
        if wheel.name.split("-")[0].lower() in ON_THE_MACHINE:
            wheel.unlink()  # the machine has its own: keep what travels small
    size = sum(w.stat().st_size for w in dest.glob("*.whl")) / 2**20
    print(f"wrote {dest}: {len(list(dest.glob('*.whl')))} wheels, {size:.1f} MB")


def _python_with_pip() -> str:
    """uv's environments have no pip; the interpreter they were made from has (a fresh machine has
    Python and pip)."""
    from common.errors import UserError

    for python in (sys.executable, getattr(sys, "_base_executable", None), shutil.which("python3")):
        if python and subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return python
    raise UserError("wheels: no Python with pip here (pip downloads the wheels for the GPU machine)")


def host_syncs(pol, specs: dict, obs: torch.Tensor) -> dict:
    """Host synchronisations per Picard round of one plan of each captured ParaDiGMS row, counted
    by CUDA's sync debug mode (it warns at each one). None on a CPU, which has none to count."""
    if pol.device.type != "cuda":
        return {}
    out = {}
    for name, cfg in specs.items():
        if not cfg.name.startswith("para") or (cfg.capture or "auto") == "none":
            continue
        pol.sampler = cfg
        pol.sample(obs)  # graphs captured before counting
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _, res = pol.sample(obs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
        out[name] = {"syncs": syncs, "rounds": res.parallel_iters,
                     "per_round": syncs / max(1, res.parallel_iters)}
    return out


def summary(results: list[dict], context: dict, syncs: dict) -> str:
    """The table, and issue 18's targets against what this run measured."""
    from rollouts.bench import table

    lines = [f"# Device check: {context['machine']} ({context['device']}), {context['date']}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}, "
             f"{context['plans']} closed-loop plans of {context['task']} ({context['checkpoint']}), "
             f"{context['threads']} threads", "", "```", table(results), "```", "",
             "Batch scaling cost(p)/cost(1): " + ", ".join(f"{b['batch']}: {b['ratio']:.2f}"
                                                          for b in context["batch_scaling"]), ""]
    seq = [r for r in results if r["sampler"].get("name") == "ddpm" and "precision" not in r["sampler"]]
    ddpm = min(seq, key=lambda r: r["latency_ms_p50"]) if seq else None
    para = [r for r in results if r["sampler"].get("name") == "paraddpm"]
    ddim10 = [r for r in results if r["name"].startswith("ddim10")]
    if ddpm and para:
        best = min(para, key=lambda r: r["latency_ms_p50"])
        lines.append(f"- ParaDDPM-100, fastest row `{best['name']}`: {best['latency_ms_p50']:.1f} ms p50, "
                     f"{ddpm['latency_ms_p50'] / best['latency_ms_p50']:.2f}x the fastest sequential "
                     f"DDPM-100 (`{ddpm['name']}`, {ddpm['latency_ms_p50']:.1f} ms); target >= 5x. "
                     f"Outside the denoiser: {best['outside_model_pct']:.1f} % of its time (target <= 10 %).")
        if ddim10:
            d = min(ddim10, key=lambda r: r["latency_ms_p50"])
            lines.append(f"- DDPM-100-quality at DDIM-10's latency: {best['latency_ms_p50']:.1f} ms against "
                         f"`{d['name']}` {d['latency_ms_p50']:.1f} ms: "
                         f"{'reached' if best['latency_ms_p50'] <= d['latency_ms_p50'] else 'not reached'}.")
    for name, s in syncs.items():
        lines.append(f"- `{name}`: {s['syncs']} host synchronisations in {s['rounds']} rounds "
                     f"({s['per_round']:.2f} a round)")
    return "\n".join(lines) + "\n"


def run(checkpoint: str, data: str, out: Path, plans: int, budget_s: float, warmup: int = 2,
        overhead_plans: int = 5, batch_sizes: list[int] | None = None, rows: list[str] | None = None) -> Path:
    from rollouts.bench import BenchConfig, run_bench, write_outputs
    from common.files import write_text
    from policy.samplers import SamplerConfig

    began = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = rows or samplers(torch.device(device))
    cfg = BenchConfig(checkpoint=checkpoint, samplers=rows, plans=plans, data=data, out=str(out),
                      device=device, threads=torch.get_num_threads() if device == "cuda" else 2,
                      warmup=warmup, batch_sizes=batch_sizes or [1, 2, 4, 8, 16, 32, 64, 100, 128],
                      overhead_plans=overhead_plans, time_limit_s=budget_s, closed_loop=True)
    results, context = run_bench(cfg)
    import policy

    pol = policy.load(checkpoint, device=device)
    obs = torch.as_tensor(np.load(data)["obs"][:1], device=pol.device) if data.endswith(".npz") else None
    syncs = host_syncs(pol, {r: SamplerConfig.parse(r) for r in rows}, obs) if obs is not None else {}
    context["wall_s"] = time.perf_counter() - began
    write_outputs(out, results, context)
    write_text(out / "host_syncs.json", json.dumps(syncs, indent=2))
    text = summary(results, context, syncs)
    write_text(out / "summary.md", text)
    print(text)
    print(f"wrote {out}/summary.md, results.json, results.csv, context.json, bench.png, host_syncs.json "
          f"({context['wall_s']:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> None:
    from common.errors import UserError

    parser = argparse.ArgumentParser(prog="dp-devicecheck", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare", help="here: observation histories and wheels for the GPU machine")
    p.add_argument("--checkpoint", default="zoo/lift")
    p.add_argument("--data", default="data/lift.zarr")
    p.add_argument("--out", default=".device")
    p.add_argument("--plans", type=int, default=60)
    p.add_argument("--no-wheels", action="store_true")
    r = sub.add_parser("run", help="there: the benchmark, its tables under --out")
    r.add_argument("--checkpoint", default="zoo/lift")
    r.add_argument("--data", default=".device/obs.npz")
    r.add_argument("--out", required=True)
    r.add_argument("--plans", type=int, default=40)
    r.add_argument("--budget-s", type=float, default=200.0, help="stop timing new plans after this long")
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--overhead-plans", type=int, default=5)
    r.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=None)
    r.add_argument("--rows", type=lambda s: s.split(";"), default=None, help="sampler specs, ';'-separated")
    args = parser.parse_args(argv)
    try:
        if args.what == "prepare":
            prepare(args.checkpoint, args.data, Path(args.out), args.plans, not args.no_wheels)
        else:
            run(args.checkpoint, args.data, Path(args.out), args.plans, args.budget_s, args.warmup,
                args.overhead_plans, args.batch_sizes, args.rows)
    except UserError as err:
        sys.exit(f"dp-devicecheck: {err}")


if __name__ == "__main__":
    main()
