"""The search: each arm's fastest setting meeting a target, by bisection over its knob; the Pareto front."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ..policy import Policy, policy_to_dict
from .evaluate import Evaluator
from .space import Arm

METRICS = {"psnr": "dB, higher is closer", "ssim": "higher is closer", "rel_l2": "of the final latents, lower is closer"}


@dataclass
class Point:
    arm: str
    knob: object
    policy: Policy
    nfe: int
    quality: dict
    seconds: float

    def row(self) -> dict:
        return {"arm": self.arm, "knob": _plain(self.knob), "nfe": self.nfe, **self.quality,
                "policy": policy_to_dict(self.policy)}


@dataclass
class Target:
    metric: str
    value: float

    def met(self, quality: dict) -> bool:
        v = quality[self.metric]
        return v <= self.value if self.metric == "rel_l2" else v >= self.value

    def label(self) -> str:
        return f"{self.metric} {'<=' if self.metric == 'rel_l2' else '>='} {self.value:g}"


@dataclass
class Tuner:
    evaluator: Evaluator
    arms: list
    budget_seconds: float | None = None
    progress: bool = True
    points: dict = field(default_factory=dict)  # (arm, knob) -> Point
    started: float = field(default_factory=time.perf_counter)

    def out_of_budget(self) -> bool:
        return self.budget_seconds is not None and time.perf_counter() - self.started > self.budget_seconds

    def evaluate(self, arm: Arm, i: int) -> Point | None:
        key = (arm.name, _hashable(arm.knobs[i]))
        if key not in self.points:
            if self.out_of_budget():
                return None
            pol = arm.make(arm.knobs[i])
            images, latents, seconds, nfe = self.evaluator.run(pol)
            self.points[key] = Point(arm.name, arm.knobs[i], pol, nfe, self.evaluator.quality(images, latents),
                                     seconds)
            if self.bar is not None:
                self.bar.update()
                self.bar.set_postfix_str(f"{arm.name} {_plain(arm.knobs[i])}")
        return self.points[key]

    bar = None

    def search(self, target: Target) -> list[Point]:
        """Every arm's fastest setting meeting ``target`` on the evaluator's batch (bisection over its knob),
        skipping schedule settings no faster than the best found; the passing points, fastest first."""
        best = math.inf
        for arm in self.arms:
            idx = list(range(len(arm.knobs)))
            if arm.nfe is not None:  # only settings that could beat (or tie) the best so far
                idx = [i for i in idx if arm.nfe(arm.knobs[i], self.evaluator.steps) <= best]
            if not idx:
                continue
            lo, hi = -1, len(idx)  # idx[lo] passes (-1: nothing known), idx[hi] fails
            while hi - lo > 1:
                mid = (lo + hi) // 2
                p = self.evaluate(arm, idx[mid])
                if p is None:
                    break
                if target.met(p.quality):
                    lo = mid
                else:
                    hi = mid
            if lo >= 0:
                best = min(best, self.points[(arm.name, _hashable(arm.knobs[idx[lo]]))].nfe)
        passing = [p for p in self.points.values() if target.met(p.quality)]
        return sorted(passing, key=lambda p: (p.nfe, -_closeness(target.metric, p.quality)))


def _by_speed(passing: list[Point]) -> list[Point]:
    """The candidates to verify, fastest first: at each step count the closest one only (a failure on held-out data
    at one step count moves on to the next, rather than trying its near-equals)."""
    out, seen = [], set()
    for p in passing:  # sorted by (nfe, closeness descending)
        if p.nfe not in seen:
            seen.add(p.nfe)
            out.append(p)
    return out


def _closeness(metric: str, q: dict) -> float:
    return -q[metric] if metric == "rel_l2" else q[metric]


def _hashable(k):
    return tuple(k) if isinstance(k, list) else k


def _plain(k):
    return list(k) if isinstance(k, tuple) else k


def front(points, metric: str) -> list[Point]:
    """The Pareto front: no other point has fewer computed steps and at least the same closeness."""
    out, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p.nfe, -_closeness(metric, p.quality))):
        c = _closeness(metric, p.quality)
        if c > best:
            out.append(p)
            best = c
    return out


def check_targets(metric: str, targets) -> list[float]:
    """The targets as a list of floats, checked for the metric (ValueError otherwise)."""
    if metric not in METRICS:
        raise ValueError(f"metric: one of {', '.join(METRICS)}, got {metric!r}")
    values = [targets] if isinstance(targets, (int, float)) and not isinstance(targets, bool) else list(targets)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             for v in values):
        raise ValueError(f"targets: expected one or more finite numbers, got {targets!r}")
    if metric == "psnr" and not all(0 < v < 100 for v in values):
        raise ValueError("a PSNR target is in dB, between 0 and 100")
    if metric == "ssim" and not all(0 < v <= 1 for v in values):
        raise ValueError("an SSIM target is in (0, 1]")
    if metric == "rel_l2" and not all(v > 0 for v in values):
        raise ValueError("a relative L2 target is > 0")
    return [float(v) for v in values]
