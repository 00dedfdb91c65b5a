"""Field validation for the policy dataclasses: a bad field raises ValueError naming it."""

from __future__ import annotations

import math


def is_int(v) -> bool:
    """An int that is not a bool (``True`` is not a step count)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check(obj, name: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{type(obj).__name__}.{name}: must be {what}, got {getattr(obj, name)!r}")


def check_coeffs(obj, name: str, value) -> tuple[float, ...]:
    bad = ValueError(f"{type(obj).__name__}.{name}: must be a non-empty sequence of finite numbers, got {value!r}")
    if isinstance(value, (str, bytes)):
        raise bad
    try:
        vals = tuple(value)
    except TypeError:
        raise bad from None
    if not vals or not all(is_number(v) for v in vals):
        raise bad
    return tuple(float(v) for v in vals)
