"""Checks of a user's numbers, one line each when they fail (the config key and what is wrong)."""

from __future__ import annotations

import math
import numbers

from common.errors import UserError


def check_number(name: str, value, low: float, high: float = math.inf, *, integer: bool = False,
                 low_open: bool = False) -> None:
    """`value` a number of its kind (an int with `integer`), finite, in [low, high] ((low, high]
    with `low_open`), or a `UserError` naming `name`. Finiteness is checked first: `nan` passes
    every `<` test."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"{name}: {value!r} is not {'an integer' if integer else 'a number'}")
    if not math.isfinite(value):
        raise UserError(f"{name}: {value!r} is not a finite number")
    if value < low or (low_open and value == low):
        why = "must be positive" if low_open else "must be at least 1" if low == 1 else f"must be >= {low:g}"
        raise UserError(f"{name}: {value!r} {why}")
    if value > high:
        raise UserError(f"{name}: {value!r} must be <= {high:g}")
