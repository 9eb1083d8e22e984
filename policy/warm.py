"""Warm starts across control steps: consecutive plans of one episode share their noise and the
next plan's Picard iteration starts from the previous plan's chain.

A plan's action chunk covers control steps `k - n_obs + 1 .. k - n_obs + horizon`; the next plan,
`advance` steps later, covers the same steps shifted by `advance`. So the initial noise x_T
[B, horizon, A] and the pre-drawn step noises [n, B, horizon, A] are kept on that action-time
axis: on a new plan they shift left by `advance` and only the new tail (the last `advance`
positions) is drawn fresh. The previous plan's converged chain [B, n + 1, horizon, A], shifted the
same way, is the new plan's starting guess. Its tail has no previous guess; it is filled with the
previous plan's last action, noised to each point's level with the new tail of x_T:

    x_i[tail] = sqrt(abar_i) * a_last + sqrt(1 - abar_i) * x_T[tail]

(the shape a deterministic chain has when its data estimate holds still; at point 0 it is x_T
itself). Picard iteration converges to the same fixed point from any guess, so the guess changes
the number of iterations, not the answer (tested at tol = 0).

Cold plans (the first of an episode, after `reset`, or when the chain changes) draw exactly what
a plan without warm start draws, in the same order, so a warm sampler's first plan equals the
plain sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def shift(x: torch.Tensor, advance: int, fresh: torch.Tensor, axis: int) -> torch.Tensor:
    """`x` moved `advance` positions left along `axis`, with `fresh` (its last `advance`
    positions' worth) appended."""
    kept = x.narrow(axis, advance, x.shape[axis] - advance)
    return torch.cat([kept, fresh], axis)


class WarmStart:
    """The noise and chain one episode's plans carry from one to the next."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.key = None  # the chain (sampler plan) the state belongs to
        self.noise = self.step_noise = self.chain = None

    def prepare(self, plan, shape: tuple[int, ...], generator, device, dtype, advance: int | None):
        """(x_T, step noise, chain guess or None) for the next plan `advance` steps after the last."""
        key = (id(plan), tuple(shape))
        horizon = shape[1]
        if self.key != key or self.chain is None or advance is None or not 0 <= advance < horizon:
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            step_noise = plan.draw_noise(shape, generator, device, dtype)
            init = None
        else:
            tail = (shape[0], advance, *shape[2:])
            fresh = torch.randn(tail, generator=generator, device=device, dtype=dtype)
            noise = shift(self.noise, advance, fresh, 1)
            step_noise = shift(self.step_noise, advance, plan.draw_noise(tail, generator, device, dtype), 2)
            last = self.chain[:, -1, -1:]  # [B, 1, A]: the previous plan's last action
            level = torch.cat([plan.sqrt_a, plan.sqrt_a.new_ones(1)])  # sqrt(abar) at points 0..n
            level = level.reshape(1, -1, 1, *([1] * (len(shape) - 2)))
            filled = level * last[:, None] + (1 - level**2).sqrt() * fresh[:, None]  # [B, n + 1, advance, A]
            init = shift(self.chain, advance, filled, 2)
            init[:, 0] = noise
        self.key, self.noise, self.step_noise = key, noise, step_noise
        return noise, step_noise, init

    def keep(self, chain: torch.Tensor | None) -> None:
        """The chain the plan converged to (None: a sampler without one; the next plan is cold)."""
        self.chain = chain


@dataclass
class PlanSession:
    """What one caller's plans carry from one to the next: an episode, a dp-serve connection, a
    dp-bench stream. The policy holds none of it: a caller makes its own and passes it to
    `DiffusionPolicy.plan`/`sample`; the policy's default one (`DiffusionPolicy.session`) serves
    its one-caller API (`seed`, then `plan`)."""

    generator: torch.Generator | None = None  # the plans' noise (None: torch's global generator)
    warm: WarmStart = field(default_factory=WarmStart)  # sampler.warm: the previous plan's noise and chain
    encode_ms: float = 0.0  # the last plan's observation encoding (an image policy's cameras)

    def reseed(self, seed: int, device) -> None:
        """Seed the noise of the plans to come; the next plan starts cold (a new episode)."""
        self.generator = torch.Generator(device).manual_seed(seed)
        self.warm.reset()
