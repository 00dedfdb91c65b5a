"""Field validation for the policy dataclasses: a bad field raises ValueError naming it."""

from __future__ import annotations

import math


def check(obj, name: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{type(obj).__name__}.{name}: must be {what}, got {getattr(obj, name)!r}")


def check_coeffs(obj, name: str, value) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{type(obj).__name__}.{name}: must be a sequence of numbers, got {value!r}") from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{type(obj).__name__}.{name}: must be a non-empty sequence of finite numbers, got {value!r}")
    return vals
