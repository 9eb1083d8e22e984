"""The safety rule where plans leave the policy: no action a robot was not trained for reaches it.

`DiffusionPolicy.plan` checks every chunk it returns with `check_actions`; what consumes plans
(the closed-loop runner, the real-time loop, `dp-serve` and its clients) relies on it instead of
checking again. A chunk is refused (`UnsafeActions`) when it holds NaN or inf
(`NonFiniteActions`) or leaves the range of actions the policy was trained on by more than
`MARGIN` of that dimension's scale on either side (`ActionsOutOfRange`). Before the network runs,
an observation far outside the range the policy was trained on (`OBS_MARGIN`) is refused the same
way (`ObservationOutOfRange`), on every backend alike. Their messages start with `PREFIX`,
`RANGE_PREFIX` or `OBS_PREFIX`, so that a client can tell a refused plan from other refusals when
it arrives over the wire as text (`refusal`). Imports no torch: robot-side clients use it too.
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
# The scale MARGIN is taken of: a dimension's trained width, but at least this much of its magnitude
# (and at least ACTION_FLOOR): a dimension trained on one value (a gripper that never moved) is held
# to that value (float32 rounding aside), where its normalized units (only centred) allowed +-2.
ACTION_RELATIVE, ACTION_FLOOR = 1e-6, 1e-6
# Observations: refused when further than OBS_MARGIN times the dimension's scale beyond its trained
# range, the scale being its width, its magnitude or 1, whichever is largest: generous, since a
# closed-loop rollout leaves the demonstrations' states (a cube tipped over moves a quaternion
# component trained within +-0.01 by up to 1), and what matters is what the backends do with it.
# At 1e20 torch overflows into NaN while OpenVINO returns a finite plan; both plan at 1e10. Refused
# here, every backend answers alike. Frames (0..255) get the same room.
OBS_MARGIN = 10.0
OBS_PREFIX = "obs_history: far outside the trained range"


class UnsafeActions(ValueError):
    """A plan refused by the safety rule: nothing of it may be executed."""


class NonFiniteActions(UnsafeActions):
    """A plan whose actions hold NaN or inf."""


class ActionsOutOfRange(UnsafeActions):
    """A plan whose actions leave the trained range by more than the margin."""


class ObservationOutOfRange(UnsafeActions):
    """A plan refused before it ran: its observation is far outside the trained range."""


def refusal(text: str) -> UnsafeActions | None:
    """The refusal a server's error text reports, or None if it is another error."""
    if text.startswith(PREFIX):
        return NonFiniteActions(text)
    if text.startswith(RANGE_PREFIX):
        return ActionsOutOfRange(text)
    if text.startswith(OBS_PREFIX):
        return ObservationOutOfRange(text)
    return None


def check_actions(actions: np.ndarray, low: np.ndarray | None = None,
                  high: np.ndarray | None = None) -> np.ndarray:
    """`actions` [n, action_dim] unchanged if all finite and, per dimension, within [low, high]
    (the trained range widened by `MARGIN` of the dimension's scale); otherwise the refusal naming
    the first bad step."""
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


def check_observation_range(obs: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """`obs` [n_obs, obs_dim] unchanged if every value is within [low, high] per dimension (the
    trained range widened by `OBS_MARGIN`); otherwise `ObservationOutOfRange` naming the first
    value outside, before anything is planned from it."""
    out = (obs < low) | (obs > high)
    if out.any():
        step, dim = (int(v[0]) for v in np.nonzero(out))
        raise ObservationOutOfRange(
            f"{OBS_PREFIX} (history step {step}: dimension {dim} is {obs[step, dim]:.4g}, allowed "
            f"{low[dim]:.4g}..{high[dim]:.4g}); the policy was not trained near it and nothing was planned")
    return obs
