"""Sequential DDPM (ancestral sampling), stepped by diffusers' own scheduler."""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from diffusers import DDPMScheduler

from policy.samplers import SampleResult


@lru_cache(maxsize=16)
def _stepper(config_json: str, steps: int, device: str) -> DDPMScheduler:
    # Building a scheduler and its timesteps costs ~15 ms, once per plan in the control loop
    # otherwise; DDPMScheduler.step keeps no state between calls, so one per setting is reused.
    sched = DDPMScheduler.from_config(json.loads(config_json))
    sched.set_timesteps(steps, device=device)
    return sched


def ddpm(denoiser, cond: torch.Tensor, scheduler: DDPMScheduler, noise: torch.Tensor,
         generator: torch.Generator | None = None, steps: int | None = None, callback=None) -> SampleResult:
    """Denoise `noise` in `steps` ancestral steps (default: every training step)."""
    config = json.dumps(dict(scheduler.config), sort_keys=True, default=list)
    sched = _stepper(config, steps or scheduler.config.num_train_timesteps, str(noise.device))
    x = noise
    for i, t in enumerate(sched.timesteps):
        eps = denoiser(x, t.to(x.dtype).expand(x.shape[0]), cond)
        x = sched.step(eps, t, x, generator=generator).prev_sample
        if callback is not None:
            callback(i, t, x)
    n = len(sched.timesteps)
    return SampleResult(x=x, model_evals=n, parallel_iters=n, converged=True)
