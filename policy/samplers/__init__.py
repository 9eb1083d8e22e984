"""Action samplers. Every sampler is one function

    sampler(denoiser, cond, scheduler, noise, generator, **options) -> SampleResult

over the denoiser contract `eps = denoiser(x, t, cond)`; all of them report the same stats, so
callers never special-case one. `get_sampler(name)` looks one up by its config name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from envs.errors import UserError


@dataclass
class SampleResult:
    x: torch.Tensor  # [B, horizon, action_dim], normalized actions
    model_evals: int  # denoiser evaluations per sample
    parallel_iters: int  # sequential rounds of (batched) denoiser calls
    converged: bool


def _registry() -> dict[str, Callable[..., SampleResult]]:
    from policy.samplers.ddpm import ddpm

    return {"ddpm": ddpm}


def get_sampler(name: str) -> Callable[..., SampleResult]:
    samplers = _registry()
    try:
        return samplers[name]
    except KeyError:
        raise UserError(f"sampler.name: unknown sampler {name!r}; known: {', '.join(sorted(samplers))}") from None
