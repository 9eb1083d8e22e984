"""Acceptance rules of ParaDiGMS: when a point of the Picard window counts as converged, so the
window may slide past it. Every rule compares a point's new value with its guess of the round
before, as a squared norm over the chunk (`dim` numbers, normalized action units):

- `paper`: a point x_i is accepted when `|dx_i|^2 <= tol^2 dim max(var_i, floor)`, relative to the
  noise of the step that made it; the run stops when the window reaches the chain's end.
- `x0`: when `|dx_i|^2 <= tol^2 dim max(abar_i, floor)`: the change of the data estimate it
  implies, `dx_i / sqrt(abar_i)` with the noise estimate held, is at most `tol` per number; stops
  the same way.
- `chunk`: only when it did not change at all; the run stops as soon as the chain's end moved by at
  most `tol` per number in a round.

`paper` with `floor = 0` is Shih et al.'s rule (ParaDiGMS, eq. 6). Its scale `var_i` vanishes
towards the end of a DDPM chain, so the last points are asked for a precision far below what an
action needs; `floor` caps that. `x0` asks every point for the same precision of what it says
about the action. `chunk` needs a whole-chain window: every round then ends with a whole action
chunk (an anytime sampler that `max_iters` can cut), and the rule asks that chunk, not the chain,
to stop changing.

At `tol = 0` every rule accepts only points that stopped changing, so the sampler reproduces its
sequential twin (tested for all three).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import UserError

RULES = ("paper", "x0", "chunk")


@dataclass(frozen=True)
class Acceptance:
    point_bound: torch.Tensor  # [n + 1] bound on each point's squared change
    final_bound: float | None  # chunk: the run ends when the last point's squared change is at most this


@dataclass(frozen=True)
class Rule:
    """An acceptance rule and its settings, as a sampler option (`paradigms(rule=...)`)."""

    name: str = "paper"
    tol: float = 0.1
    floor: float = 0.0

    def bounds(self, plan, dim: int, window: int) -> Acceptance:
        return acceptance(plan, self.name, self.tol, self.floor, dim, window)


def acceptance(plan, rule: str, tol: float, floor: float, dim: int, window: int) -> Acceptance:
    """The bounds of `rule` for the chain of `plan`, chunks of `dim` numbers."""
    if rule not in RULES:
        raise UserError(f"sampler.rule: {rule!r} is not an acceptance rule; known: {', '.join(RULES)}")
    if floor < 0:
        raise UserError(f"sampler.floor: {floor!r} must be >= 0")
    if rule == "chunk":
        if window < plan.n:
            raise UserError(f"sampler.window: {window} is shorter than the chain ({plan.n} steps); the chunk "
                            "rule stops on the chain's end, which needs a whole-chain window")
        # no per-point scale, so nothing to floor: a preset's floor does not stop a switch to this rule
        return Acceptance(torch.zeros_like(plan.var), tol**2 * dim)
    if rule == "paper":
        scale = plan.var
    else:  # points 0..n-1 sit at the noise level of their step's timestep, point n is clean data
        scale = plan.point_sqrt_a.square()
    return Acceptance(tol**2 * dim * scale.clamp(min=floor), None)
