"""The safety rule where plans leave the policy: no action a robot was not trained for reaches it.

`DiffusionPolicy.plan` checks every chunk it returns with `check_actions`; what consumes plans
(the closed-loop runner, the real-time loop, `dp-serve` and its clients) relies on it instead of
checking again. A chunk is refused (`UnsafeActions`) when it holds NaN or inf
(`NonFiniteActions`) or leaves the range of actions the policy was trained on by more than
`MARGIN` of that range on either side (`ActionsOutOfRange`). Their messages start with
`PREFIX` or `RANGE_PREFIX`, so that a client can tell a refused plan from other refusals when it
arrives over the wire as text (`refusal`). Imports no torch: robot-side clients use it too.
"""

from __future__ import annotations

import numpy as np

PREFIX = "actions: non-finite"
RANGE_PREFIX = "actions: outside the trained range"
# How far beyond the trained range (per dimension, as a fraction of its width) an action may go.
# Converged samplers stay within it (DDPM/DDIM/DPM-Solver clip the data estimate); a ParaDiGMS plan
# stopped at a loose tolerance reached 25 % of the half-width past it in process (tol=1: 1.25 in
# normalized units, where the range is [-1, 1]), and warm-started ParaDDPM-100 in the 20 Hz loop
# on zoo/square 1.555 (2 plans of ~1500, 2026-12-04) when this margin was 0.25. 0.5 allows 2.0.
MARGIN = 0.5


class UnsafeActions(ValueError):
    """A plan refused by the safety rule: nothing of it may be executed."""


class NonFiniteActions(UnsafeActions):
    """A plan whose actions hold NaN or inf."""


class ActionsOutOfRange(UnsafeActions):
    """A plan whose actions leave the trained range by more than the margin."""


def refusal(text: str) -> UnsafeActions | None:
    """The refusal a server's error text reports, or None if it is another error."""
    if text.startswith(PREFIX):
        return NonFiniteActions(text)
    if text.startswith(RANGE_PREFIX):
        return ActionsOutOfRange(text)
    return None


def check_actions(actions: np.ndarray, low: np.ndarray | None = None,
                  high: np.ndarray | None = None) -> np.ndarray:
    """`actions` [n, action_dim] unchanged if all finite and, per dimension, within [low, high]
    (the trained range widened by `MARGIN`); otherwise the refusal naming the first bad step."""
    bad = ~np.isfinite(actions).reshape(len(actions), -1).all(axis=1)
    if bad.any():
        steps = np.flatnonzero(bad)
        raise NonFiniteActions(f"{PREFIX} values in {len(steps)} of the plan's {len(actions)} actions "
                               f"(first at chunk step {steps[0]}); the plan was refused and nothing was sent")
    if low is not None and high is not None:
        out = (actions < low) | (actions > high)
        if out.any():
            step, dim = (int(v[0]) for v in np.nonzero(out))
            raise ActionsOutOfRange(
                f"{RANGE_PREFIX} in {int(out.any(axis=1).sum())} of the plan's {len(actions)} actions (first "
                f"at chunk step {step}: dimension {dim} is {actions[step, dim]:.4g}, allowed {low[dim]:.4g}.."
                f"{high[dim]:.4g}); the plan was refused and nothing was sent")
    return actions


def check_observation(obs: np.ndarray, field: str) -> np.ndarray:
    """`obs` as float32, refused (ValueError naming `field`) if it holds NaN or inf after the
    cast: a float64 1e300 becomes inf in float32, and a finite but huge value overflows the
    normalizer, so the policy is only ever conditioned on what float32 holds."""
    with np.errstate(over="ignore"):  # the overflow is what is being checked for
        x = np.array(obs, dtype=np.float32)  # a copy: a request's array may be read-only wire bytes
    if not np.isfinite(x).all():
        raise ValueError(f"{field}: contains NaN or inf (as float32; float32 holds magnitudes up to 3.4e38)")
    return x
