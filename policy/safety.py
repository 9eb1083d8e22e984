"""The safety rule where plans leave the policy: no non-finite action ever reaches a robot.

`DiffusionPolicy.plan` checks every chunk it returns with `check_actions`; what consumes plans
(the closed-loop runner, the real-time loop, `dp-serve` and its clients) relies on it instead of
checking again. A refused chunk raises `NonFiniteActions`, whose message starts with `PREFIX`, so
that a client can tell it from other refusals when it arrives over the wire as text. Imports no
torch: robot-side clients use it too.
"""

from __future__ import annotations

import numpy as np

PREFIX = "actions: non-finite"


class NonFiniteActions(ValueError):
    """A plan whose actions hold NaN or inf: nothing of it may be executed."""


def check_actions(actions: np.ndarray) -> np.ndarray:
    """`actions` [n, action_dim] unchanged if all finite; otherwise NonFiniteActions naming the steps."""
    bad = ~np.isfinite(actions).reshape(len(actions), -1).all(axis=1)
    if bad.any():
        steps = np.flatnonzero(bad)
        raise NonFiniteActions(f"{PREFIX} values in {len(steps)} of the plan's {len(actions)} actions "
                               f"(first at chunk step {steps[0]}); the plan was refused and nothing was sent")
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
