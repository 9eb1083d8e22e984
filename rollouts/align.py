"""`dp-align`: learn DPM-Aligner timesteps for one few-step chain of a checkpoint, and show what
they change.

    dp-align checkpoint=outputs/lift sampler=ddim steps=5 spacing=uniform strategy=sequential
    dp-align -m checkpoint=outputs/lift steps=2,3,5,10 strategy=sequential,parallel   # a sweep

Writes `<checkpoint>/aligner/<sampler>-<steps>-<spacing>.json` (taus, per-step loss before and
after, strategy, data used, time, the trajectory gap with and without), the loss curve next to
it, and rebuilds the directory's summary: `summary.csv`, `summary.json`, a printed table and
`aligner_gap.png` (per-step L2 distance to the full-step DDIM trajectory from the same x_T, the
paper's Fig. 2 for this policy). Use the taus with `sampler.aligner=true`, or `<preset>+aligner`
in the sampler lists of dp-eval and dp-bench.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from common.cli import command
from common.errors import UserError
from common.lock import exclusive
from policy.aligner import (STRATEGIES, AlignSettings, aligner_file, learn, reference_trajectory,
                            trajectory_gap)
from common.files import save_figure, write_text
from policy.samplers.solvers import SOLVERS, SPACINGS, canonical_spacing


@dataclass
class AlignConfig:
    checkpoint: str = "???"
    solver: str = "ddim"  # `sampler=` on the command line: ddim | ddpm | dpmsolver (ParaDiGMS/PIADM share it)
    steps: int = 5
    spacing: str = "trailing"  # uniform = trailing
    strategy: str = "sequential"  # sequential (Algorithm 1) | parallel (Eq. 8)
    data: str | None = None  # demonstration store (default: the one the policy was trained on)
    chunks: int = 1024  # training chunks drawn from the store's training episodes
    batch_size: int = 64
    max_iters: int = 300
    min_iters: int = 40
    lr: float = 0.5
    tol: float = 0.05
    eval_samples: int = 256  # validation chunks for the trajectory gap
    align_last: bool = False  # also align the step that lands on clean data (its loss is ill-posed)
    seed: int = 0
    threads: int = 2
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else the CPU
    progress: bool = True

    def __post_init__(self):
        """Every choice and number checked at start-up, before the policy loads: one line naming
        the key (`nan` passes every `<` test, so finiteness is checked first)."""
        from common.checks import check_number

        if self.solver not in SOLVERS:
            raise UserError(f"sampler: {self.solver!r} is not a solver; known: {', '.join(SOLVERS)} "
                            "(ParaDiGMS and PIADM samplers use their solver's taus)")
        if self.spacing not in SPACINGS:
            raise UserError(f"spacing: {self.spacing!r} is not a spacing; known: {', '.join(SPACINGS)}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        for key in ("steps", "chunks", "batch_size", "max_iters", "eval_samples", "threads"):
            check_number(key, getattr(self, key), 1, integer=True)
        check_number("min_iters", self.min_iters, 0, integer=True)
        if self.min_iters > self.max_iters:
            raise UserError(f"min_iters: {self.min_iters} is above max_iters {self.max_iters}: no tau "
                            "could stop early, each would run max_iters steps unconverged")
        check_number("seed", self.seed, 0, integer=True)
        check_number("lr", self.lr, 0, low_open=True)  # Adam's step, in timesteps
        # the convergence test: a tau moving less than tol timesteps (0: run every max_iters step)
        check_number("tol", self.tol, 0)


def run_align(cfg: AlignConfig) -> Path:
    from policy.checkpoint import load_policy
    from policy.windows import sample_windows

    torch.set_num_threads(cfg.threads)  # cfg's numbers: checked when it was made (AlignConfig)
    policy = load_policy(cfg.checkpoint, cfg.device)
    T = policy.cfg.schedule.num_train_timesteps
    if cfg.steps > T:
        raise UserError(f"steps: {cfg.steps} is more than the policy's {T} training steps")
    ckpt = Path(policy.meta["checkpoint"])
    data = cfg.data or policy.meta.get("data")
    if not data or not Path(data).exists():
        raise UserError(f"data: {data!r}: no such store (give data=<the store the policy was trained on>)")
    spacing = canonical_spacing(cfg.spacing)
    s = AlignSettings(solver=cfg.solver, steps=cfg.steps, spacing=spacing, strategy=cfg.strategy,
                      batch_size=cfg.batch_size, pool=cfg.chunks, max_iters=cfg.max_iters,
                      min_iters=cfg.min_iters, lr=cfg.lr, tol=cfg.tol, align_last=cfg.align_last,
                      seed=cfg.seed)
    print(f"dp-align: {cfg.solver}-{cfg.steps}-{spacing}, {cfg.strategy} strategy, "
          f"{cfg.chunks} chunks of {data}")
    obs, action = sample_windows(policy, data, "train", cfg.chunks, cfg.seed)
    result = learn(policy, obs, action, s, cfg.progress)

    # Evidence: distance to the full-step DDIM trajectory from the same x_T, with and without.
    e_obs, _ = sample_windows(policy, data, "val", cfg.eval_samples, cfg.seed + 1)
    gen = torch.Generator(policy.device).manual_seed(cfg.seed + 2)
    noise = torch.randn((cfg.eval_samples, policy.cfg.horizon, policy.action_dim), generator=gen,
                        device=policy.device)
    reference = reference_trajectory(policy, e_obs, noise)
    plain = trajectory_gap(policy, e_obs, s, None, reference, noise)
    aligned = trajectory_gap(policy, e_obs, s, tuple(result["taus"]), reference, noise)

    path = aligner_file(ckpt, cfg.solver, cfg.steps, spacing)
    with exclusive(path.parent, "dp-align"):  # read, add this strategy, write: one writer at a time
        _record(path, cfg, s, data, result, aligned, plain, str(policy.device))
    rows = summary(path.parent)
    print(table(rows))
    print(f"wrote {path} ({result['time_s']:.0f} s); summary and aligner_gap.png in {path.parent}")
    return path


def _record(path: Path, cfg: AlignConfig, s: AlignSettings, data: str, result: dict, aligned: list,
            plain: list, device: str) -> None:
    """Add the strategy just learned to the chain's aligner file (made if missing), with its loss plot."""
    spacing = canonical_spacing(cfg.spacing)
    aligned_steps = cfg.steps if cfg.align_last else max(cfg.steps - 1, 1)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    entry = {
        "taus": result["taus"], "loss_before": result["loss_before"], "loss_after": result["loss_after"],
        # totals over the steps that were aligned (the last one only with align_last)
        "loss_before_total": float(np.sum(result["loss_before"][:aligned_steps])),
        "loss_after_total": float(np.sum(result["loss_after"][:aligned_steps])),
        "iters": result["iters"], "converged": result["converged"], "time_s": round(result["time_s"], 2),
        "data": {"store": str(data), "episodes": "train", "chunks": cfg.chunks, "seed": cfg.seed},
        "settings": asdict(s), "threads": cfg.threads, "device": device,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gap": aligned, "final_error": aligned[-1], "loss_curve": result["loss_curve"],
    }
    strategies = {**doc.get("strategies", {}), cfg.strategy: entry}
    doc = {"sampler": cfg.solver, "steps": cfg.steps, "spacing": spacing, "timesteps": result["timesteps"],
           "strategy": cfg.strategy,  # the one `aligner=true` uses: the last learned
           **{k: entry[k] for k in ("taus", "loss_before_total", "loss_after_total", "data", "time_s")},
           "reference": "ddim, every training step, same x_T", "eval_samples": cfg.eval_samples,
           "gap_plain": plain, "final_error_plain": plain[-1], "strategies": strategies}
    write_text(path, json.dumps(doc, indent=1))
    plot_loss(path.with_name(f"{path.stem}-{cfg.strategy}-loss.png"), entry, path.stem)


def summary(directory: Path) -> list[dict]:
    """One row per (chain, strategy) in an aligner directory; writes summary.csv/json and the plot."""
    docs = []
    for p in sorted(directory.glob("*.json")):
        if p.name == "summary.json":
            continue
        try:
            docs.append(json.loads(p.read_text()))
        except ValueError:
            raise UserError(f"{p}: unreadable aligner file") from None
    docs.sort(key=lambda d: (d["sampler"], d["spacing"], d["steps"]))
    rows = []
    for d in docs:
        for name, e in d["strategies"].items():
            rows.append({
                "sampler": d["sampler"], "steps": d["steps"], "spacing": d["spacing"], "strategy": name,
                "loss_before": e["loss_before_total"], "loss_after": e["loss_after_total"],
                "final_error_plain": d["final_error_plain"], "final_error_aligned": e["final_error"],
                "error_reduction_pct": 100 * (1 - e["final_error"] / d["final_error_plain"]),
                "time_s": e["time_s"], "taus": " ".join(f"{v:.2f}" for v in e["taus"]),
                "timesteps": " ".join(f"{v:g}" for v in d["timesteps"]),
            })
    write_text(directory / "summary.json", json.dumps(rows, indent=1))
    keys = list(rows[0]) if rows else []
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
    write_text(directory / "summary.csv", "\n".join(lines) + "\n")
    if docs:
        plot_gaps(directory / "aligner_gap.png", docs)
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'chain':<22}{'strategy':<12}{'loss before':>12}{'after':>10}{'final err':>11}{'aligned':>9}"
            f"{'cut':>7}{'time s':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        chain = f"{r['sampler']}-{r['steps']}-{r['spacing']}"
        out.append(f"{chain:<22}{r['strategy']:<12}{r['loss_before']:>12.4f}{r['loss_after']:>10.4f}"
                   f"{r['final_error_plain']:>11.3f}{r['final_error_aligned']:>9.3f}"
                   f"{r['error_reduction_pct']:>6.0f}%{r['time_s']:>8.0f}")
    return "\n".join(out)


def plot_gaps(path: Path, docs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(docs))
    nrows = (len(docs) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(max(4 * cols, 6.5), 3.6 * nrows), squeeze=False)
    for ax, d in zip(axes.flat, docs):
        x = np.arange(1, d["steps"] + 1)
        ax.plot(x, d["gap_plain"], "o-", color="tab:red", label="plain")
        for name, color in zip(STRATEGIES, ("tab:green", "tab:blue")):
            if name in d["strategies"]:
                ax.plot(x, d["strategies"][name]["gap"], "s--" if name == "parallel" else "o-", color=color,
                        label=f"aligned ({name})")
        ax.set_title(f"{d['sampler']}, NFE {d['steps']}, {d['spacing']}", fontsize=10)
        ax.set_xlabel("step (point reached)")
        ax.set_ylabel("L2 to the 100-step DDIM trajectory")
        ax.set_xticks(x)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(docs):]:
        ax.set_visible(False)
    fig.suptitle("DPM-Aligner: distance of the few-step chain to the full-step DDIM\n"
                 "trajectory from the same x_T (mean L2, normalized action chunks)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_loss(path: Path, entry: dict, chain: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    curve = np.asarray(entry["loss_curve"])
    ax.plot(curve, lw=0.6, alpha=0.5, label="minibatch loss")
    if len(curve) >= 10:
        k = max(5, len(curve) // 50)
        ax.plot(np.arange(k - 1, len(curve)), np.convolve(curve, np.ones(k) / k, "valid"),
                label=f"mean of {k}")
    bounds = np.cumsum(entry["iters"])[:-1] if entry["settings"]["strategy"] == "sequential" else []
    for b in bounds:
        ax.axvline(b, color="grey", lw=0.5, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("gradient step" + (" (dotted: next tau)" if len(bounds) else ""))
    ax.set_ylabel("aligner loss (Eq. 5)")
    ax.set_title(f"{chain}, {entry['settings']['strategy']}: {entry['time_s']:.0f} s", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


@command("align", AlignConfig, aliases={"sampler": "solver"})
def main(cfg: AlignConfig) -> None:
    run_align(cfg)
