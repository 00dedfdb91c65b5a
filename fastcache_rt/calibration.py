"""``fastcache_rt.calibrate``: uncached generations that measure, at every step and for every CFG branch, what each
gate reads (``policy.gates.Calibrate``); the profile is fitted from them (``fastcache_rt.profiles``: the TeaCache
polynomial, MagCache's ratios, FBCache's changes; ``enable(pipe, "teacache" | "spectralcache" | "magcache",
profile=...)`` uses it).

A two-transformer pipeline (Wan 2.2 A14B) gets one entry per transformer (per expert). The profile keeps every
run's raw measurements, so a run interrupted is resumed where it stopped, prompts can be split over machines
(``shard=(i, n)``) and the partial profiles merged (``merge_profiles``): the fit is always recomputed from the runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .profiles import (  # noqa: F401 (the profile API, also reached from here)
    ProfileError,
    check_compatible,
    config_hash,
    fit_plot_png,
    for_model,
    identity,
    load_profile,
    merge_profiles,
    new_profile,
    refit,
    save_profile,
)


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def calibrate(pipe, prompts, *, steps: int = 50, seeds=(0,), call_kwargs: dict | None = None, out=None,
              resume: bool = False, overwrite: bool = False, shard: tuple[int, int] | None = None,
              progress: bool = True) -> dict:
    """Run ``pipe`` uncached once per (prompt, seed), measuring every step, and return the fitted profile.

    Args:
        pipe: a diffusers pipeline of a supported family (``pipe.transformer`` and ``pipe.transformer_2``).
        prompts: the calibration prompts (a list of str).
        steps: denoising steps per run (the step count the profile is made for; MagCache's ratios are
            interpolated to other counts).
        seeds: noise seeds; every prompt runs with every seed.
        call_kwargs: further arguments of each pipeline call (height, width, guidance_scale, num_frames, ...).
        out: the JSON file of the finished profile. While the runs go on, the profile so far is written after
            every run to ``<out>.partial`` (atomically); ``out`` is written, and the partial file removed, only
            when every run is done, so an interrupted calibration never destroys a finished profile.
        resume: continue the profile in ``<out>.partial`` (an interrupted run) or ``out``: runs already there are
            not repeated (it must be for this model).
        overwrite: replace an existing ``out`` with a new calibration (without it, an existing ``out`` is refused
            unless ``resume``). The old file stays in place until the new profile is complete.
        shard: ``(i, n)``: only every n-th run, starting at the i-th (split the runs over processes; merge the
            parts with ``merge_profiles``).
        progress: a progress bar over the runs.
    """
    import fastcache_rt

    from .policy import Policy
    from .policy.gates import Calibrate

    prompts = _check_prompts(prompts)
    seeds = _check_seeds(seeds)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps: must be an int >= 2, got {steps!r}")
    kwargs = dict(call_kwargs or {})
    for k in ("prompt", "num_inference_steps", "generator", "output_type"):
        if k in kwargs:
            raise ValueError(f"call_kwargs: {k!r} is set by calibrate")
    runs = [(p, s) for p in prompts for s in seeds]
    if shard is not None:
        i, n = _check_shard(shard)
        runs = runs[i::n]
    ident = identity(pipe)
    profile = new_profile(ident, steps, kwargs)
    partial = None
    if out is not None:
        out = Path(out)
        partial = partial_path(out)
        if out.exists() and not (resume or overwrite):
            raise ProfileError(f"out: {out} exists; pass resume=True to continue it (--resume) or overwrite=True to "
                               f"replace it once the new calibration is complete (--overwrite)")
        source = partial if resume and partial.is_file() else out if resume and out.is_file() else None
        if source is not None:
            profile = load_profile(source)
            check_compatible(profile, new_profile(ident, steps, kwargs), f"resume: {source}")
    done = {(r["prompt"], r["seed"]) for r in profile["runs"]}
    todo = [r for r in runs if r not in done]
    bar = _tqdm(total=len(runs), initial=len(runs) - len(todo), desc="calibrate", disable=not progress)
    handle = fastcache_rt.enable(pipe, Policy(Calibrate(), name="calibrate"))
    try:
        for prompt, seed in todo:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            with torch.no_grad():
                pipe(prompt=prompt, num_inference_steps=steps, generator=gen, output_type="latent", **kwargs)
            profile["runs"].append({"prompt": prompt, "seed": int(seed), "models": _measured(handle)})
            refit(profile)
            if partial is not None:
                save_profile(profile, partial)
            bar.update()
    finally:
        handle.disable()
        bar.close()
    refit(profile)
    if out is not None:  # complete: the profile replaces ``out`` in one rename, the partial file goes
        save_profile(profile, out)
        partial.unlink(missing_ok=True)
    return profile


def partial_path(out) -> Path:
    """Where ``calibrate`` keeps the profile of an unfinished calibration to ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _measured(handle) -> dict:
    """{transformer name: {branch: {signal: per-step values}}} of the generation that just ended."""
    out = {}
    for name, ctl in handle.controllers.items():
        per = ctl.stats()["per_stream"]
        out[name] = {str(row["branch"]): row["calibration"] for row in per if "calibration" in row}
    return out


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if isinstance(prompts, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty strings")
    return prompts


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds) if isinstance(seeds, (list, tuple, range)) else None
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError("seeds: expected a non-empty list of ints >= 0")
    return seeds


def _check_shard(shard) -> tuple[int, int]:
    ok = isinstance(shard, (tuple, list)) and len(shard) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in shard)
    if not ok or not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard: expected (i, n) with 0 <= i < n, got {shard!r}")
    return int(shard[0]), int(shard[1])


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(**kw)


__all__ = ["calibrate"]
