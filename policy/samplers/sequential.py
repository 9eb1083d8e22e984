"""Sequential samplers: DDPM (ancestral), DDIM (eta = 0) and DPM-Solver++(2M), one denoiser call
per step. They are the reference every parallel sampler must reproduce.

Warm-started (`sampler.warm=true` with `sampler.start=s`), a plan begins part-way down its chain,
as Falcon does (Chen et al., ICML 2025, training-free): the previous plan's action chunk, shifted
to this plan's control steps (`policy.warm`), is noised to the level of step s with this plan's
initial noise,

    x_s = sqrt(abar_s) * previous_chunk + sqrt(1 - abar_s) * x_T,

and only steps s..n-1 are run: n - s denoiser calls instead of n. A cold plan (an episode's
first) runs the whole chain. (Falcon also keeps several partially denoised candidates and picks
one by a score; this is its single-candidate form.)
"""

from __future__ import annotations

import torch

from common.errors import UserError
from policy.samplers.chain import Chain
from policy.samplers.result import SampleResult
from policy.samplers.solvers import new_history, step_rows


def sequential(denoiser, cond: torch.Tensor, chain: Chain, *, start: int = 0, callback=None) -> SampleResult:
    """Walk `chain` one step at a time, one denoiser call per step. With a chain guess
    (`chain.init`, a warm start) and `start` > 0, begin at step `start` from the guess of the
    chain's end noised to that level; every point is pulled toward the committed actions, if any."""
    plan, pull, noise = chain.plan, chain.pull, chain.noise
    _check_start(plan, start)
    history = new_history(plan, noise)
    rows = chain.samples
    points = pull(noise, 0, rows)[:, None].repeat(1, plan.n + 1, *([1] * (noise.dim() - 1)))
    first = start if chain.init is not None else 0
    if first:
        _warm_point(chain, points, first, rows)
    x = points[:, first]
    for i in range(first, plan.n):
        k = torch.full_like(rows, i)
        x = pull(step_rows(plan, denoiser, cond, x, k, rows, history, guide=pull.guide) + chain.step_noise[i],
                 i + 1, rows)
        points[:, i + 1] = x
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x})
    evals = plan.n - first
    return SampleResult(x=x, model_evals=evals, parallel_iters=evals, converged=True, chain=points)


def _check_start(plan, start: int) -> None:
    if not 0 <= start < plan.n:
        raise UserError(f"sampler.start: {start} is not a step of the {plan.n}-step chain (0..{plan.n - 1})")
    if start and plan.multistep:
        raise UserError("sampler.start: a warm start part-way down the chain needs a one-step solver (ddpm, "
                        "ddim); DPM-Solver++(2M) would lack the previous step's data estimate")


def _warm_point(chain: Chain, points: torch.Tensor, start: int, rows: torch.Tensor) -> None:
    """Points 0..start from the guess, point `start` the guess's end noised to its level (Falcon)."""
    a = chain.plan.sqrt_a[start]
    points[:, : start + 1] = chain.init[:, : start + 1]
    points[:, start] = chain.pull(a * chain.init[:, chain.n] + (1 - a * a).sqrt() * chain.noise, start, rows)
