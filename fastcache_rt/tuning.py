"""The policy tuner: the fastest policy (fewest computed steps) whose output stays within a quality target of the
uncached output, found on calibration prompts / seeds and verified on held-out ones.

The search. A policy is one of a few dozen *arms* (gate x forecaster x site: the presets, and the hybrids such as a
signal gate with a Taylor forecaster) times the arm's speed knob (an interval, Spectrum's alpha, a threshold),
ordered from slow to fast. Along an arm, quality falls as the knob speeds it up, so the fastest setting that meets
a target is found by bisection over the knob (about log2 of its settings generations, not all of them); a schedule
arm knows each setting's step count before running it, so settings no faster than the best policy found so far
are never run. Every generation is kept (a later target reuses it) and all of them make the Pareto front.
The best few candidates of each target are then run on the held-out prompts / seeds, fastest first, until one
meets the target there; its wall time is measured beside an uncached call.

Quality is measured against the uncached output of the same prompts and seeds: PSNR or SSIM of the decoded
images, or the relative L2 distance of the final latents.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .policy import Policy, policy_to_dict
from .policy.gates import GATES

METRICS = {"psnr": "dB, higher is closer", "ssim": "higher is closer", "rel_l2": "of the final latents, lower is closer"}


# ---------------------------------------------------------------------------------------------------------------
# what is searched
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# running one policy on a set of prompts and seeds
# ---------------------------------------------------------------------------------------------------------------
class Evaluator:
    """Generations of one (prompts x seeds) batch, in one pipeline call, with the images and final latents of the
    uncached run as the reference."""

    def __init__(self, pipe, prompts, seeds, steps: int, call_kwargs: dict | None = None):
        self.pipe = pipe
        self.batch = [(p, s) for p in prompts for s in seeds]
        self.steps = steps
        self.kw = dict(call_kwargs or {})
        self.generations = 0
        self.ref_images, self.ref_latents, self.ref_seconds, _ = self.run(None)

    def run(self, policy: Policy | None):
        """(images (N, C, H, W) in [0, 1], final latents, seconds, NFE) of one generation of the batch."""
        import fastcache_rt

        final = {}

        def keep(pipe, i, t, kwargs):
            final["latents"] = kwargs["latents"]
            return {}

        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for _, s in self.batch]
        handle = fastcache_rt.enable(self.pipe, policy) if policy is not None else None
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.pipe(prompt=[p for p, _ in self.batch], num_inference_steps=self.steps, generator=gens,
                                output_type="pt", callback_on_step_end=keep, **self.kw)
            seconds = time.perf_counter() - t0
            nfe = self.steps if handle is None else _nfe(handle, self.steps)
        finally:
            if handle is not None:
                handle.disable()
        self.generations += 1
        return _images(out), final["latents"].detach().float().clone(), seconds, nfe

    def quality(self, images, latents) -> dict:
        from .bench import metrics

        return {"psnr": metrics.psnr(images, self.ref_images), "ssim": metrics.ssim(images, self.ref_images),
                "rel_l2": metrics.rel_l2(latents, self.ref_latents)}


def _images(out) -> torch.Tensor:
    """A pipeline's ``output_type="pt"`` result as (N, C, H, W) float images (video frames flattened)."""
    x = getattr(out, "images", None)
    if x is None:
        x = getattr(out, "frames", None)
    if x is None:
        x = out[0]
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    x = x.float().cpu()
    if x.dim() == 5:  # (N, F, C, H, W) video frames
        x = x.flatten(0, 1)
    if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # channels last
        x = x.permute(0, 3, 1, 2)
    return x.clamp(0, 1)


def _nfe(handle, steps: int) -> int:
    """Steps at which any transformer of the pipeline ran (the union over its transformers' first streams)."""
    computed = set()
    for c in handle.controllers.values():
        computed.update(c.stats()["computed"])
    return len(computed)


# ---------------------------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------------------------
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


def tune(pipe, targets, *, metric: str = "psnr", prompts, seeds=(0,), holdout_prompts=None, holdout_seeds=(1,),
         steps: int = 50, call_kwargs: dict | None = None, profile=None, mag_ratios=None,
         budget_minutes: float | None = None, verify: int = 6, progress: bool = True) -> dict:
    """The fastest policy meeting each target on the held-out prompts / seeds.

    Args:
        pipe: a diffusers pipeline of a supported family.
        targets: one number or several (dB for ``psnr``; an SSIM; a relative L2 for ``rel_l2``).
        metric: ``psnr`` / ``ssim`` of the decoded images or ``rel_l2`` of the final latents, against uncached.
        prompts, seeds: where the search runs (one batched generation per setting).
        holdout_prompts, holdout_seeds: where the choice is verified (default: the same prompts, seeds 1).
        steps: denoising steps.
        call_kwargs: further pipeline arguments (height, width, guidance_scale, ...).
        profile: a calibration profile (``fastcache_rt.calibrate``): its MagCache ratios and TeaCache polynomial
            add arms; without one, the MagCache arm is calibrated by one uncached generation here.
        mag_ratios: MagCache's ratios, if known already.
        budget_minutes: stop searching after this long (the best found so far is verified).
        verify: held-out generations at most per target (the closest candidate at each step count, fastest
            first).

    Returns a dict: per target the chosen policy (``policy``: a Policy; ``policy_dict``: its JSON form), its NFE,
    quality on both sets, measured speedup; the Pareto front; generations spent.
    """
    values = check_targets(metric, targets)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps: must be an int >= 2, got {steps!r}")
    if budget_minutes is not None and not (isinstance(budget_minutes, (int, float)) and budget_minutes > 0):
        raise ValueError(f"budget_minutes: must be > 0, got {budget_minutes!r}")
    holdout_prompts = list(holdout_prompts or prompts)
    targets_ = [Target(metric, float(v)) for v in sorted(values, reverse=metric != "rel_l2")]

    fit = {}
    if profile is not None:
        from ._targets import split as _split
        from .profiles import calibrated_fields, for_model, load_profile

        prof = load_profile(profile)
        _, models = _split(pipe)
        name, model = next(iter(models.items()))
        fit = calibrated_fields(for_model(prof, name, model))
    if mag_ratios is not None:
        fit["ratios"] = tuple(mag_ratios)
    t0 = time.perf_counter()
    search = Evaluator(pipe, prompts, seeds, steps, call_kwargs)
    missing = {f for cls in GATES.values() for f in cls.needs_calibration if f not in fit}
    if missing:  # gates that cannot run uncalibrated (MagCache's ratios): one calibration generation
        fit.update({k: v for k, v in _calibration(search).items() if k in missing})
    tuner = Tuner(search, arms(steps, fit=fit), None if budget_minutes is None else 60.0 * budget_minutes, progress)
    tuner.started = t0
    grid = sum(len(a.knobs) for a in tuner.arms)
    from tqdm.auto import tqdm

    tuner.bar = tqdm(desc="tune: search", disable=not progress, unit="gen")
    try:
        candidates = {t.value: tuner.search(t) for t in targets_}
    finally:
        tuner.bar.close()
    search_generations = search.generations

    held = Evaluator(pipe, holdout_prompts, holdout_seeds, steps, call_kwargs)
    results = []
    bar = tqdm(total=len(targets_), desc="tune: verify", disable=not progress)
    verified: dict = {}
    for t in targets_:
        chosen = None
        tried = []
        for p in _by_speed(candidates[t.value])[:verify]:
            key = (p.arm, _hashable(p.knob))
            if key not in verified:
                images, latents, seconds, nfe = held.run(p.policy)
                verified[key] = (held.quality(images, latents), nfe, seconds)
            q, nfe, seconds = verified[key]
            tried.append({"arm": p.arm, "knob": _plain(p.knob), "nfe": nfe, **q})
            if t.met(q):
                chosen = (p, q, nfe, seconds)
                break
        entry = {"target": t.value, "metric": metric, "label": t.label(), "verified_tries": tried}
        if chosen is None:
            entry["met"] = False
        else:
            p, q, nfe, seconds = chosen
            entry.update(met=True, policy=p.policy, policy_dict=policy_to_dict(p.policy), arm=p.arm,
                         knob=_plain(p.knob), nfe=p.nfe, search_quality=p.quality, heldout_quality=q,
                         heldout_nfe=nfe, seconds=seconds)
        results.append(entry)
        bar.update()
    bar.close()
    # wall time: every chosen policy beside uncached calls of the held-out batch (median of two each)
    unc = [held.run(None)[2] for _ in range(2)]
    for e in results:
        if e.get("met"):
            again = held.run(e["policy"])[2]
            e["speedup"] = statistics.median(unc) / statistics.median([e["seconds"], again])
    pts = list(tuner.points.values())
    return {
        "metric": metric, "steps": steps, "targets": results,
        "front": [p.row() for p in front(pts, metric)],
        "points": [p.row() for p in pts],
        "search": {"prompts": list(prompts), "seeds": list(seeds), "generations": search_generations,
                   "settings_in_grid": grid, "arms": [a.name for a in tuner.arms],
                   "stopped_by_budget": tuner.out_of_budget()},
        "holdout": {"prompts": holdout_prompts, "seeds": list(holdout_seeds), "generations": held.generations},
        "seconds": time.perf_counter() - t0,
        "uncached_seconds": statistics.median(unc),
    }


def _calibration(ev: Evaluator) -> dict:
    """The calibrated fields (``profiles.calibrated_fields``) fitted from one generation of the search batch with
    the calibration gate (every step computed, every signal measured)."""
    import fastcache_rt

    from .policy.gates import Calibrate
    from .profiles import _fit_model, calibrated_fields

    handle = fastcache_rt.enable(ev.pipe, Policy(Calibrate(), name="calibrate"))
    try:
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for _, s in ev.batch]
        with torch.no_grad():
            ev.pipe(prompt=[p for p, _ in ev.batch], num_inference_steps=ev.steps, generator=gens,
                    output_type="latent", **ev.kw)
        series = [row["calibration"] for row in handle.controller.stats()["per_stream"] if "calibration" in row]
    finally:
        handle.disable()
    ev.generations += 1
    return calibrated_fields(_fit_model(series, ev.steps))


__all__ = ["METRICS", "Arm", "Evaluator", "arms", "check_targets", "front", "front_png", "markdown", "tune"]


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------
def front_png(result: dict) -> bytes:
    """Every setting the search ran (computed steps vs closeness), the Pareto front, each target and the policy
    chosen for it (its held-out quality)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    cached = [p for p in result["points"] if p["nfe"] < result["steps"]]  # settings that computed every step: off
    arms_ = sorted({p["arm"] for p in cached})
    palette = list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("Dark2").colors)
    for i, a in enumerate(arms_):
        pts = [p for p in cached if p["arm"] == a]
        ax.scatter([p["nfe"] for p in pts], [_capped(p[metric]) for p in pts], s=18, alpha=0.7,
                   color=palette[i % len(palette)], label=a)
    fr = [p for p in result["front"] if p["nfe"] < result["steps"]]
    ax.step([p["nfe"] for p in fr], [_capped(p[metric]) for p in fr], where="post", color="black", lw=1.5,
            label="Pareto front (search set)")
    for e in result["targets"]:
        ax.axhline(e["target"], color="grey", lw=0.8, ls=":")
        if e.get("met"):
            ax.scatter([e["heldout_nfe"]], [_capped(e["heldout_quality"][metric])], marker="*", s=220,
                       color="#cc3311", edgecolors="black", zorder=5)
            ax.annotate(f"{e['arm']} ({e['heldout_nfe']} steps)", (e["heldout_nfe"], e["heldout_quality"][metric]),
                        textcoords="offset points", xytext=(6, -12), fontsize=7)
    ax.scatter([], [], marker="*", s=120, color="#cc3311", edgecolors="black", label="chosen (held-out)")
    ax.set_xlabel(f"computed steps of {result['steps']} (NFE)")
    ax.set_ylabel(f"{metric} vs uncached ({METRICS[metric]})")
    if metric == "rel_l2":
        ax.set_yscale("log")
        ax.invert_yaxis()
    ax.set_title(f"fastcache-rt tune: {result['search']['generations']} search generations of "
                 f"{result['search']['settings_in_grid']} settings", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _capped(v: float) -> float:
    return min(v, 100.0)


def markdown(result: dict) -> str:
    m = result["metric"]
    lines = [f"| target | chosen policy | setting | NFE | {m} search | {m} held-out | speedup |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in result["targets"]:
        if not e.get("met"):
            lines.append(f"| {e['label']} | not met on held-out data | | | | | |")
            continue
        lines.append(f"| {e['label']} | {e['arm']} | {e['knob']} | {e['heldout_nfe']} | "
                     f"{e['search_quality'][m]:.4g} | {e['heldout_quality'][m]:.4g} | {e['speedup']:.2f}x |")
    s = result["search"]
    lines.append("")
    lines.append(f"Search: {s['generations']} generations of {len(s['prompts'])} prompts x {len(s['seeds'])} seeds "
                 f"({s['settings_in_grid']} settings in the grid, {len(s['arms'])} arms); held-out: "
                 f"{result['holdout']['generations']} generations; {result['seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"
