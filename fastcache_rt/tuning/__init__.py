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

import statistics
import time

from ..policy import policy_to_dict
from ..policy.gates import GATES
from .evaluate import Evaluator, _calibration
from .report import front_png, markdown
from .search import METRICS, Point, Target, Tuner, _by_speed, _hashable, _plain, check_targets, front
from .space import Arm, _schedule_arm, arms  # noqa: F401 (_schedule_arm: tests build arms with it)


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
        call_kwargs: further pipeline arguments (height, width, guidance_scale, ...; true CFG: ``true_cfg_scale``
            with ``negative_prompt``, one str for every image or a list).
        profile: a calibration profile (``fastcache_rt.calibrate``): its MagCache ratios and TeaCache polynomial
            add arms; without one, the MagCache arm is calibrated by one uncached generation here.
        mag_ratios: MagCache's ratios, if known already.
        budget_minutes: stop searching after this long (the best found so far is verified).
        verify: held-out generations at most per target (the closest candidate at each step count, fastest
            first).

    Returns a dict: per target the chosen policy (``policy``: a Policy; ``policy_dict``: its JSON form), its NFE,
    quality on both sets, measured speedup; the Pareto front; generations spent; the setting (steps, true CFG).
    NFE is in computed steps; with true CFG the mean over the cond and uncond branches (possibly a half).
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
        from .._targets import split as _split
        from ..profiles import calibrated_fields, for_model, load_profile

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
        # a setting that computes every step caches nothing: it is not an answer to "the fastest caching policy"
        caching = [p for p in _by_speed(candidates[t.value]) if p.nfe < steps]
        for p in caching[:verify]:
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
            entry["reason"] = ("not met on held-out data" if caching else
                               "no caching policy meets it (only computing every step does)")
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
    kw = dict(call_kwargs or {})
    cfg = kw.get("true_cfg_scale")
    cfg = cfg if cfg is not None and cfg > 1 and kw.get("negative_prompt") is not None else None
    setting = {"steps": steps, "true_cfg_scale": cfg, "negative_prompt": kw.get("negative_prompt") if cfg else None,
               "guidance_scale": kw.get("guidance_scale")}
    return {
        "metric": metric, "steps": steps, "setting": setting, "targets": results,
        "front": [p.row() for p in front(pts, metric)],
        "points": [p.row() for p in pts],
        "search": {"prompts": list(prompts), "seeds": list(seeds), "generations": search_generations,
                   "settings_in_grid": grid, "arms": [a.name for a in tuner.arms],
                   "stopped_by_budget": tuner.out_of_budget()},
        "holdout": {"prompts": holdout_prompts, "seeds": list(holdout_seeds), "generations": held.generations},
        "seconds": time.perf_counter() - t0,
        "uncached_seconds": statistics.median(unc),
    }


__all__ = ["METRICS", "Arm", "Evaluator", "Point", "Target", "Tuner", "arms", "check_targets", "front", "front_png",
           "markdown", "tune"]
