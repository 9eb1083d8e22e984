"""Sequential DDPM (ancestral sampling), stepped by diffusers' own scheduler."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from policy.samplers import SampleResult


def ddpm(denoiser, cond: torch.Tensor, scheduler: DDPMScheduler, noise: torch.Tensor,
         generator: torch.Generator | None = None, steps: int | None = None, callback=None) -> SampleResult:
    """Denoise `noise` in `steps` ancestral steps (default: every training step)."""
    sched = DDPMScheduler.from_config(scheduler.config)  # set_timesteps mutates: keep ours private
    sched.set_timesteps(steps or sched.config.num_train_timesteps, device=noise.device)
    x = noise
    for i, t in enumerate(sched.timesteps):
        eps = denoiser(x, t.to(x.dtype).expand(x.shape[0]), cond)
        x = sched.step(eps, t, x, generator=generator).prev_sample
        if callback is not None:
            callback(i, t, x)
    n = len(sched.timesteps)
    return SampleResult(x=x, model_evals=n, parallel_iters=n, converged=True)
