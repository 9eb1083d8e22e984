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
from policy.samplers.result import SampleResult
from policy.samplers.solvers import get_plan, new_history, step_rows


def sequential(denoiser, cond: torch.Tensor, scheduler, noise: torch.Tensor, generator: torch.Generator | None = None,
               *, solver: str, steps: int | None = None, spacing: str = "trailing", start: int = 0,
               taus: tuple[float, ...] | None = None, step_noise: torch.Tensor | None = None,
               init: torch.Tensor | None = None, inpaint=None, callback=None) -> SampleResult:
    """Denoise `noise` [B, horizon, A] in `steps` steps of `solver` (default: every training step);
    `step_noise` [n, B, horizon, A] is the steps' scaled noise (default: drawn from `generator`).
    With a chain guess `init` [B, n + 1, ...] (a warm start) and `start` > 0, begin at step
    `start` from the guess of the chain's end noised to that level. `inpaint` (`samplers.inpaint.Inpaint`)
    pulls every point (or guides every step) toward a committed prefix."""
    plan = get_plan(scheduler, solver, steps, spacing, noise.device, noise.dtype, taus)
    if not 0 <= start < plan.n:
        raise UserError(f"sampler.start: {start} is not a step of the {plan.n}-step chain (0..{plan.n - 1})")
    if start and plan.multistep:
        raise UserError("sampler.start: a warm start part-way down the chain needs a one-step solver (ddpm, ddim); "
                        "DPM-Solver++(2M) would lack the previous step's data estimate")
    z = plan.draw_noise(noise.shape, generator, noise.device, noise.dtype) if step_noise is None else step_noise
    history = new_history(plan, noise)
    rows = torch.arange(noise.shape[0], device=noise.device)
    pull = None if inpaint is None else inpaint.bind(plan, noise)
    guide = None if pull is None else pull.guide
    start_point = noise if pull is None else pull(noise, 0, rows)
    chain = start_point[:, None].repeat(1, plan.n + 1, *([1] * (noise.dim() - 1)))
    first = 0
    if init is not None and start:
        a = plan.sqrt_a[start]
        chain[:, : start + 1] = init[:, : start + 1]
        chain[:, start] = a * init[:, plan.n] + (1 - a * a).sqrt() * noise
        if pull is not None:
            chain[:, start] = pull(chain[:, start], start, rows)
        first = start
    x = chain[:, first]
    for i in range(first, plan.n):
        k = torch.full_like(rows, i)
        x = step_rows(plan, denoiser, cond, x, k, rows, history, guide=guide) + z[i]
        if pull is not None:
            x = pull(x, i + 1, rows)
        chain[:, i + 1] = x
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x})
    evals = plan.n - first
    return SampleResult(x=x, model_evals=evals, parallel_iters=evals, converged=True, chain=chain)
