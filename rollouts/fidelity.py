"""`dp-bench ... fidelity=true`: how far each sampler's plans are from DDPM-100's, offline.

For held-out observation histories (random steps of the policy's validation episodes, and the
decision states of a mixed-proficiency store, where its strategies diverge) every sampler draws
`draws` plans per history, and so does DDPM-100, the reference, from other noise. The table gives
each sampler's energy distance from the reference's plans (normalized action chunks, averaged
over the histories) next to the floor: DDPM-100 itself, drawn from the same noise as the
samplers (a consistency student's reference: its teacher's DDPM-100, `rollouts.teacher`). A
sampler that reproduces DDPM-100 sits at the floor (a parallel one at tolerance 0
exactly on it); one that loses a mode or averages two rises above it. Where the task defines
strategies (`envs.modes`), each row also gives the fraction of decision-state plans taking each
one and the fraction between them. No simulator: minutes, where a success sweep takes hours.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError
from common.files import save_figure, write_text
from envs.modes import BETWEEN, task_modes
from policy.device import machine
from policy.samplers import SamplerConfig
from policy.samplers.spec import on_command_backend
from policy.warm import PlanSession
from rollouts.teacher import PREFIX, row_policy

REFERENCE = "ddpm100"
REFERENCE_STREAM, SAMPLER_STREAM = 0, 1  # the reference's noise, and everyone else's (the floor's too)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| between the rows of x [n, d] and
    y [m, d] (zero in expectation for one distribution; it can fall below zero by chance)."""
    n, m = len(x), len(y)
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * torch.cdist(x, y).mean() - xx - yy)


def histories(pol, cfg) -> tuple[str, np.ndarray, np.ndarray]:
    """(where from, held-out observation histories [n, n_obs, D], which of them are decision states [n])."""
    from policy.zoo import DECISIONS
    from rollouts.bench import default_data, saved_histories

    data = cfg.data or default_data(pol)
    if str(data).endswith(".npz"):  # a shipped policy: its histories, and its decision states if any
        with np.load(data) as f:
            n = len(f["obs"]) if "obs" in f else 1
        obs, _ = saved_histories(pol, data, n)
        obs = obs[np.random.default_rng(cfg.seed).permutation(n)[:cfg.states]]
        decisions_file = Path(data).with_name(DECISIONS)
        decisions = _saved_decisions(decisions_file) if decisions_file.is_file() else obs[:0]
    else:
        from policy.windows import decision_histories, sample_windows

        obs = sample_windows(pol, data, "val", cfg.states, cfg.seed)[0]
        decisions = decision_histories(pol, data, "val")
    modes = task_modes(pol.meta.get("task"))
    if modes is not None and len(decisions):
        layout = pol.meta["obs_layout"]
        decisions = decisions[np.asarray([modes.decisive(h, layout) for h in decisions], bool)]
    decisions = decisions[:cfg.states]
    decision = np.r_[np.zeros(len(obs), bool), np.ones(len(decisions), bool)]
    return str(data), np.concatenate([obs, decisions]), decision


def _saved_decisions(path: Path) -> np.ndarray:
    with np.load(path) as f:
        if "obs" not in f:
            raise UserError(f"{path}: needs an array obs (has {', '.join(f.files) or 'none'})")
        return np.asarray(f["obs"], np.float32)


def _draw(pol, sampling, obs: np.ndarray, draws: int, key: int) -> tuple[torch.Tensor, object]:
    """`draws` plans for one history (one batched call), from noise of seed `key`: raw chunks."""
    dev = pol.device
    pol.use(sampling)
    shape = (draws, pol.cfg.horizon, pol.action_dim)
    noise = torch.randn(shape, generator=torch.Generator(dev).manual_seed(key), device=dev)
    gen = torch.Generator(dev).manual_seed(key + 7_777_777)
    history = torch.as_tensor(obs, device=dev)[None].expand(draws, *obs.shape)
    x, res = pol.sample(history, noise=noise, generator=gen, session=PlanSession())
    return x, res


def run_fidelity(pol, cfg) -> tuple[list[dict], dict]:
    """Every sampler of `cfg` against DDPM-100's plans on the same held-out histories; the rows
    (`distance`, `floor`, their standard errors, mode fractions) and the run's context."""
    data, obs, decision = histories(pol, cfg)
    if len(obs) < 2:
        raise UserError(f"data: {data}: fewer than 2 held-out observation histories")
    # a student's reference is its teacher's DDPM-100 (`rollouts.teacher`): what distilling kept
    reference = PREFIX + REFERENCE if pol.distilled else REFERENCE
    specs, pols = {}, {}
    for label in [reference, *(s for s in cfg.samplers if s != reference)]:
        pols[label], bare = row_policy(pol, label)
        specs[label] = on_command_backend(SamplerConfig.parse(bare))
    # A warm-started sampler's plan depends on the previous plan: here every plan is drawn cold,
    # as the first plan of an episode is (ParaDiGMS' warm starts only save rounds).
    cold = [name for name, spec in specs.items() if spec.warm]
    specs = {name: dataclasses.replace(spec, warm=False, start=None) for name, spec in specs.items()}
    samplings = {n: pols[n].sampling(s) for n, s in specs.items()}  # a missing aligner fails here
    norm = pol.normalizer.normalize
    modes = task_modes(pol.meta.get("task"))
    ref, rows = [], {n: {"dist": [], "evals": [], "iters": [], "modes": []} for n in specs}
    for k in tqdm(range(len(obs)), desc="dp-bench fidelity", unit="history"):
        key = cfg.seed * 1_000_003 + 2 * k
        ref_x, _ = _draw(pols[reference], samplings[reference], obs[k], cfg.draws, key + REFERENCE_STREAM)
        ref_flat = norm("action", ref_x).flatten(1)
        ref.append(ref_x)
        for name, sampling in samplings.items():
            x, res = _draw(pols[name], sampling, obs[k], cfg.draws, key + SAMPLER_STREAM)
            r = rows[name]
            r["dist"].append(energy_distance(norm("action", x).flatten(1), ref_flat))
            r["evals"].append(res.model_evals)  # per chunk: a batch of draws counts as one plan
            r["iters"].append(res.parallel_iters)
            if modes is not None and decision[k]:
                r["modes"].append(modes.classify(x.cpu().numpy(), obs[k], pol.meta["obs_layout"]))
    floor = rows[reference]["dist"]
    results = [_row(name, specs[name], r, floor, modes, decision, pols[name]) for name, r in rows.items()]
    context = {"checkpoint": pol.meta.get("checkpoint"), "task": pol.meta.get("task"), "data": data,
               "fidelity": True, "reference": reference, "draws": cfg.draws, "drawn_cold": cold,
               "histories": int((~decision).sum()), "decision_states": int(decision.sum()),
               "device": str(pol.device), "threads": torch.get_num_threads(), "machine": machine(pol.device),
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if modes is not None and decision.any():
        ref_modes = [modes.classify(x.cpu().numpy(), h, pol.meta["obs_layout"])
                     for x, h, d in zip(ref, obs, decision) if d]
        context["reference_modes"] = _fractions(ref_modes, modes.names)
        context["multimodal_states"] = _multimodal(ref_modes, len(modes.names))
    return results, context


def _row(name: str, spec, r: dict, floor: list[float], modes, decision: np.ndarray, pol) -> dict:
    d, f = np.asarray(r["dist"]), np.asarray(floor)
    se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
    row = {
        "name": name,
        "sampler": {k: v for k, v in dataclasses.asdict(spec).items() if v is not None},
        "backend": pol.backend,
        "distance": float(d.mean()),
        "distance_se": se,
        "floor": float(f.mean()),
        "floor_se": float(np.std(f, ddof=1) / np.sqrt(len(f))),
        # the mean over histories of (distance - floor), and its standard error: paired by history
        "above_floor": float((d - f).mean()),
        "above_floor_se": float(np.std(d - f, ddof=1) / np.sqrt(len(d))),
        "distance_decisions": float(d[decision].mean()) if decision.any() else None,
        "model_evals_per_plan": float(np.mean(r["evals"])),
        "parallel_iters_mean": float(np.mean(r["iters"])),
    }
    if modes is not None and r["modes"]:
        row["modes"] = _fractions(r["modes"], modes.names)
    return row


def _fractions(labels: list[np.ndarray], names: tuple[str, ...]) -> dict[str, float]:
    """The fraction of plans taking each strategy, and `between` (neither), over decision states."""
    flat = np.concatenate(labels)
    return {**{n: float(np.mean(flat == i)) for i, n in enumerate(names)},
            "between": float(np.mean(flat == BETWEEN))}


def _multimodal(labels: list[np.ndarray], n_modes: int, share: float = 0.2) -> dict:
    """How many decision states have DDPM-100 plans going each way in at least `share` of draws."""
    each = [all(np.mean(lab == i) >= share for i in range(n_modes)) for lab in labels]
    return {"share": share, "states": len(each), "multimodal": int(sum(each)),
            "fraction": float(np.mean(each)) if each else 0.0}


def table(results: list[dict], context: dict) -> str:
    w = max([22, *(len(r["name"]) + 2 for r in results)])
    names = list(results[0].get("modes", {}))
    head = (f"{'sampler':<{w}}{'distance':>10}{'± se':>8}{'floor':>9}{'above':>9}{'± se':>8}{'evals':>8}"
            f"{'iters':>7}" + "".join(f"{n[:9]:>10}" for n in names))
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['name']:<{w}}{r['distance']:>10.4f}{r['distance_se']:>8.4f}{r['floor']:>9.4f}"
                     f"{r['above_floor']:>9.4f}{r['above_floor_se']:>8.4f}{r['model_evals_per_plan']:>8.1f}"
                     f"{r['parallel_iters_mean']:>7.1f}"
                     + "".join(f"{r['modes'][n]:>10.0%}" for n in names if "modes" in r))
    lines.append(f"energy distance to {context['reference']}'s plans (normalized chunks), {context['draws']} "
                 f"draws per history, {context['histories']} held-out histories + "
                 f"{context['decision_states']} decision states; floor: {context['reference']} from the "
                 "samplers' noise")
    if "multimodal_states" in context:
        m = context["multimodal_states"]
        lines.append(f"{context['reference']} plans go each way in >= {m['share']:.0%} of draws at "
                     f"{m['multimodal']} of {m['states']} decision states")
    return "\n".join(lines)


def write_outputs(out: Path, results: list[dict], context: dict) -> None:
    """results.json (one row per sampler: distance, floor, modes), context.json, results.csv, fidelity.png."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(results, indent=2))
    write_text(out / "context.json", json.dumps(context, indent=2))
    names = list(results[0].get("modes", {}))
    cols = ["name", "backend", "distance", "distance_se", "floor", "floor_se", "above_floor",
            "above_floor_se", "model_evals_per_plan", "parallel_iters_mean"]
    lines = [",".join(cols + [f"mode_{n}" for n in names])]
    lines += [",".join([str(r[c]) for c in cols] + [str(r.get("modes", {}).get(n, "")) for n in names])
              for r in results]
    write_text(out / "results.csv", "\n".join(lines) + "\n")
    plot(out / "fidelity.png", results, context)


def plot(path: Path, results: list[dict], context: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results[0].get("modes", {}))
    fig, axes = plt.subplots(1, 2 if names else 1, figsize=(12 if names else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    y = np.arange(len(results))
    ax.barh(y, [r["distance"] for r in results], xerr=[2 * r["distance_se"] for r in results],
            color="#2171b5")
    ax.axvline(results[0]["floor"], color="grey", ls="--", label="floor (DDPM-100 against itself)")
    ax.set_yticks(y, [r["name"] for r in results])
    ax.invert_yaxis()
    ax.set_xlabel(f"energy distance to {context['reference']}'s plans (error bars: 2 se)")
    ax.set_title(f"{context['task']}: {context['histories'] + context['decision_states']} held-out states, "
                 f"{context['draws']} draws each")
    ax.legend(loc="lower right")
    if names:
        ax = axes[0, 1]
        left = np.zeros(len(results))
        palette = iter(["#6baed6", "#fd8d3c", "#74c476"])
        for n in names:  # the strategies, then `between`
            colour = "#969696" if n == "between" else next(palette)
            share = np.asarray([r["modes"].get(n, 0.0) for r in results])
            ax.barh(y, share, left=left, color=colour, label=n)
            left += share
        ax.set_yticks(y, [r["name"] for r in results])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of plans at decision states")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
        ax.set_title("which strategy the plans take")
    fig.tight_layout()
    save_figure(fig, path)
