"""Sequential samplers: DDPM (ancestral), DDIM (eta = 0) and DPM-Solver++(2M), one denoiser call
per step. They are the reference every parallel sampler must reproduce."""

from __future__ import annotations

import torch

from policy.samplers.result import SampleResult
from policy.samplers.solvers import get_plan, new_history, step_rows


def sequential(denoiser, cond: torch.Tensor, scheduler, noise: torch.Tensor, generator: torch.Generator | None = None,
               *, solver: str, steps: int | None = None, spacing: str = "trailing",
               taus: tuple[float, ...] | None = None, step_noise: torch.Tensor | None = None,
               callback=None) -> SampleResult:
    """Denoise `noise` [B, horizon, A] in `steps` steps of `solver` (default: every training step);
    `step_noise` [n, B, horizon, A] is the steps' scaled noise (default: drawn from `generator`)."""
    plan = get_plan(scheduler, solver, steps, spacing, noise.device, noise.dtype, taus)
    z = plan.draw_noise(noise.shape, generator, noise.device, noise.dtype) if step_noise is None else step_noise
    history = new_history(plan, noise)
    rows = torch.arange(noise.shape[0], device=noise.device)
    x = noise
    for i in range(plan.n):
        k = torch.full_like(rows, i)
        x = step_rows(plan, denoiser, cond, x, k, rows, history) + z[i]
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x})
    return SampleResult(x=x, model_evals=plan.n, parallel_iters=plan.n, converged=True)
