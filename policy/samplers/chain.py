"""What a sampler walks, built before it starts: the step table of its chain (`solvers.Plan`), the
chain's start x_T, every step's noise (drawn up front, so a stochastic chain is a deterministic
map of its start), an optional guess of the whole chain (a warm start) and the pull toward
committed actions (`inpaint`; a do-nothing one without them).

Like k-diffusion's samplers, which take a prebuilt `sigmas` schedule, the samplers here take a
`Chain` and only their own options; `build_chain` is the one place the pieces are put together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policy.samplers.inpaint import NO_INPAINT, BoundInpaint, NoInpaint
from policy.samplers.solvers import Plan, get_plan


@dataclass(frozen=True)
class Chain:
    plan: Plan
    noise: torch.Tensor  # [B, horizon, A] x_T
    step_noise: torch.Tensor  # [n, B, horizon, A] each step's scaled noise
    init: torch.Tensor | None  # [B, n + 1, horizon, A] a guess of the whole chain, or None
    pull: BoundInpaint | NoInpaint  # toward committed actions (NO_INPAINT: none)
    samples: torch.Tensor  # [B] 0..B-1, each sample's row index (made once, not once a step)

    @property
    def n(self) -> int:
        return self.plan.n

    @property
    def batch(self) -> int:
        return self.noise.shape[0]

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [M] reshaped to broadcast over the rows' trailing action dimensions."""
        return x.reshape(-1, *([1] * (self.noise.dim() - 1)))


def build_chain(scheduler, noise: torch.Tensor, generator: torch.Generator | None = None, *, solver: str,
                steps: int | None = None, spacing: str = "trailing", taus: tuple[float, ...] | None = None,
                step_noise: torch.Tensor | None = None, init: torch.Tensor | None = None,
                inpaint=None) -> Chain:
    """The `solver` chain of `steps` steps (default: every training step) from `noise`, its step
    noise drawn from `generator` unless given, with the DPM-Aligner's `taus` as the denoiser's input
    times, a chain guess `init` and committed actions `inpaint` (`inpaint.Inpaint`)."""
    plan = get_plan(scheduler, solver, steps, spacing, noise.device, noise.dtype, taus)
    if step_noise is None:
        step_noise = plan.draw_noise(noise.shape, generator, noise.device, noise.dtype)
    expected = (noise.shape[0], plan.n + 1, *noise.shape[1:])
    if init is not None and init.shape != expected:
        raise ValueError(f"init: shape {tuple(init.shape)}, expected {expected}")
    pull = NO_INPAINT if inpaint is None else inpaint.bind(plan, noise)
    return Chain(plan, noise, step_noise, init, pull, torch.arange(noise.shape[0], device=noise.device))
