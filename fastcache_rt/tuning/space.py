"""What the tuner searches: arms (gate x forecaster x site with a speed knob), assembled from each registered gate's
search space (``Gate.search``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..policy import Policy
from ..policy.gates import GATES


@dataclass
class Arm:
    """One gate x forecaster x site with its speed knob: ``make(knob) -> Policy`` over ``knobs`` (slow to fast);
    ``nfe(knob, steps)``: the computed steps where they are known before the run (schedule gates), else None."""

    name: str
    make: Callable
    knobs: list
    nfe: Callable | None = None


def _schedule_arm(name, gate_of, knobs, forecaster, site, steps) -> Arm:
    def nfe(k, s):
        return sum(gate_of(k).schedule(s))

    # slow to fast by the known step count (settings giving the same count: the first one only)
    seen, ordered = set(), []
    for k in sorted(knobs, key=lambda k: -nfe(k, steps)):
        n = nfe(k, steps)
        if n not in seen:
            seen.add(n)
            ordered.append(k)
    return Arm(name, lambda k: Policy(gate_of(k), forecaster, site, name), ordered, nfe)


def arms(steps: int, *, fit: dict | None = None) -> list[Arm]:
    """Every arm searched: each registered gate's search space (``Gate.search``) x the forecasters it pairs with.
    ``fit``: calibrated fields the gates may use ({"coeffs": a calibrated TeaCache polynomial, "ratios": MagCache's
    ratios}); a gate whose ``needs_calibration`` fields are missing has no arm."""
    fit = dict(fit or {})
    out = []
    for cls in GATES.values():
        for space in cls.search(fit):
            for fc, site, label in space.forecasters:
                name = f"{space.label}+{label}"
                if space.schedule:
                    out.append(_schedule_arm(name, space.make, space.knobs, fc, site, steps))
                else:
                    out.append(Arm(name, lambda k, g=space.make, f=fc, s=site, n=name: Policy(g(k), f, s, n),
                                   list(space.knobs)))
    return out
