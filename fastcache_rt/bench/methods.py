"""The configurations the benchmark runs: every fastcache_rt preset with a sweep of its speed knob, and the peers
(diffusers' cache hooks, cache-dit) on the same pipeline.

A configuration is switched on and off around each pipeline call; ``disable`` must leave the pipeline exactly as it
was (the harness checks this on the next uncached call).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fastcache_rt
from fastcache_rt.policy.presets import SWEEPS

OURS = "fastcache_rt"
DIFFUSERS = "diffusers"
CACHE_DIT = "cache-dit"

# fastcache_rt presets in table order: every preset that declares a benchmark sweep (fastcache_rt.policy.presets)
PRESET_ORDER = tuple(SWEEPS)

# The two budgets of the Spectrum paper at 50 steps: 14 and 10 full steps. Spectrum reaches them with alpha 0.75 and
# 3.0 (interval 2, warm-up 5); the fixed-interval methods with 3 warm-up steps and one full step in 4 or in 6.
BUDGET_STEPS = 50
BUDGETS = {14: dict(spectrum=dict(alpha=0.75), interval=dict(interval=4, warmup=3)),
           10: dict(spectrum=dict(alpha=3.0), interval=dict(interval=6, warmup=3))}


@dataclass
class Config:
    """One row of the table."""

    method: str  # e.g. "spectrum", "FirstBlockCache"
    library: str  # OURS, DIFFUSERS, CACHE_DIT or "-" for the uncached baseline
    config: str  # the knob settings, e.g. "alpha=0.75"
    enable: Callable  # enable(pipe, ctx) -> None
    disable: Callable  # disable(pipe) -> None
    default: bool = False  # the method's representative setting (the picture grid shows it)
    tags: tuple = ()  # e.g. ("budget14",)
    needs: str | None = None  # a calibration this config needs from the context ("ours_mag" / "diffusers_mag")
    note: str = ""
    settings: dict = field(default_factory=dict)  # a preset's overrides (the knob values, for plots by knob)

    @property
    def key(self) -> str:
        return f"{self.library}/{self.method}/{self.config}"


@dataclass
class Context:
    """What configurations need at enable time: the step count, transformer calls per step (2 with true CFG: cond
    then uncond) and calibrated ratios."""

    steps: int
    ratios: dict = field(default_factory=dict)
    calls_per_step: int = 1


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _label(overrides: dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in overrides.items()) or "default"


# ----------------------------------------------------------------------------------------------------------------
# fastcache_rt
# ----------------------------------------------------------------------------------------------------------------
def ours(preset: str, overrides: dict, *, default=False, tags=()) -> Config:
    from ..policy.gates import first_blocks

    gate = fastcache_rt.PRESETS[preset].gate
    # a gate that cannot run uncalibrated (MagCache's ratios) gets them from one calibration run of the harness
    needs = "ours_mag" if "ratios" in getattr(gate, "needs_calibration", ()) else None

    def enable(pipe, ctx: Context):
        kw = dict(overrides)
        if needs is not None:
            kw["ratios"] = ctx.ratios[needs]
        fastcache_rt.enable(pipe, preset, **kw)

    def disable(pipe):
        fastcache_rt.disable(pipe)

    k = first_blocks(gate)
    m = overrides.get("compute_last", 0)
    note = f"first block{'s' if k > 1 else ''} run{'' if k > 1 else 's'} every step" if k else ""
    if m:
        note += f"{', and ' if note else ''}the last {m} block{'s' if m > 1 else ''}"
    return Config(preset, OURS, _label(overrides), enable, disable, default=default, tags=tuple(tags), needs=needs,
                  note=note,
                  settings={k_: v for k_, v in overrides.items() if isinstance(v, (int, float, str, bool))})


def ours_applied(preset: str, overrides: dict) -> Config:
    """A preset through the diffusers-style entry point (``FastCacheConfig`` + ``apply_fastcache`` on
    ``pipe.transformer``, the step count given as diffusers' MagCache takes it): the same decisions and images as
    ``fastcache_rt.enable`` are expected."""

    def enable(pipe, ctx: Context):
        from ..integrations.diffusers import FastCacheConfig, apply_fastcache

        apply_fastcache(pipe.transformer, FastCacheConfig(preset, num_steps=ctx.steps, overrides=dict(overrides)))

    def disable(pipe):
        from ..integrations.diffusers import remove_fastcache

        remove_fastcache(pipe.transformer)

    return Config(preset, OURS, _label(overrides) + " via apply_fastcache", enable, disable,
                  note="diffusers-style entry point (FastCacheConfig + apply_fastcache)")


def policy_file(path) -> Config:
    """A policy file (``fastcache-rt tune``'s output) as one row: method "tuned", configuration the file's name and
    its arm."""
    from pathlib import Path

    from ..policy import load_policy

    pol = load_policy(path)

    def enable(pipe, ctx: Context):
        fastcache_rt.enable(pipe, pol)

    def disable(pipe):
        fastcache_rt.disable(pipe)

    return Config("tuned", OURS, f"{Path(path).stem} ({pol.name})", enable, disable,
                  note=f"{type(pol.gate).__name__} + {type(pol.forecaster).__name__} at {pol.site}")


def _budget_tags(steps: int, preset: str, overrides: dict) -> tuple:
    if steps != BUDGET_STEPS or "site" in overrides:  # the budget comparison uses each preset's own site
        return ()
    kind = fastcache_rt.PRESETS[preset].gate.name  # BUDGETS are keyed by gate: "spectrum" or "interval"
    return tuple(f"budget{n}" for n, b in BUDGETS.items()
                 if kind in b and all(overrides.get(k) == v for k, v in b[kind].items()))


def our_configs(steps: int, quick: bool, methods=None) -> list[Config]:
    out = []
    for preset in PRESET_ORDER:
        if methods is not None and preset not in methods:
            continue
        sweep = SWEEPS[preset]
        for ov in sweep.quick if quick else sweep.full:
            out.append(ours(preset, ov, default=ov == sweep.shown, tags=_budget_tags(steps, preset, ov)))
    if methods is None or "spectrum" in methods:  # the diffusers-style entry point, on the default setting
        out.append(ours_applied("spectrum", SWEEPS["spectrum"].shown))
    return out


# ----------------------------------------------------------------------------------------------------------------
# diffusers hooks
# ----------------------------------------------------------------------------------------------------------------
def _diffusers_disable(pipe):
    pipe.transformer.disable_cache()


def diffusers_fbcache(threshold: float, default=False) -> Config:
    def enable(pipe, ctx):
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))

    return Config("FirstBlockCache", DIFFUSERS, f"threshold={_fmt(threshold)}", enable, _diffusers_disable,
                  default=default, note="first block runs every step")


def diffusers_taylorseer(interval: int, lite: bool = False, default=False) -> Config:
    def enable(pipe, ctx):
        from diffusers.hooks import TaylorSeerCacheConfig

        # fp32 factors: the same precision as the model and as fastcache_rt's state
        pipe.transformer.enable_cache(TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=3, max_order=1, taylor_factors_dtype=torch.float32,
            use_lite_mode=lite))

    note = "blocks skipped, proj_out forecast" if lite else \
        "per-module caches of every attention; MLPs run every step"
    return Config("TaylorSeerCache" + (" lite" if lite else ""), DIFFUSERS,
                  f"interval={interval} warmup=3 order=1", enable, _diffusers_disable, default=default, note=note)


def diffusers_magcache(threshold: float, default=False) -> Config:
    def enable(pipe, ctx):
        from diffusers.hooks import MagCacheConfig

        pipe.transformer.enable_cache(MagCacheConfig(
            threshold=threshold, max_skip_steps=5, retention_ratio=0.1, num_inference_steps=ctx.steps,
            mag_ratios=list(ctx.ratios["diffusers_mag"])))

    return Config("MagCache", DIFFUSERS, f"threshold={_fmt(threshold)} K=5 retention=0.1", enable,
                  _diffusers_disable, default=default, needs="diffusers_mag")


def diffusers_magcache_calibration(pipe, run: Callable, steps: int) -> list[float]:
    """Run once in diffusers' MagCache calibration mode and return the ratios it reports (it prints them at the end
    of the run and then clears its state, so they are read from its printed output)."""
    from diffusers.hooks import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            run()
    finally:
        pipe.transformer.disable_cache()
    found = re.findall(r"\[([-+0-9.eE, ]+)\]", buf.getvalue())
    if not found:
        raise RuntimeError("diffusers MagCache calibration printed no ratios")
    ratios = [float(v) for v in found[-1].split(",") if v.strip()]
    if len(ratios) != steps:
        raise RuntimeError(f"diffusers MagCache calibration returned {len(ratios)} ratios for {steps} steps")
    return ratios


def seacache_available() -> tuple[bool, str]:
    """Whether the installed diffusers has SeaCache (diffusers >= 0.42)."""
    try:
        from diffusers.hooks import SeaCacheConfig, apply_sea_cache  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: not in this diffusers
        return False, f"{type(e).__name__}: {e}"
    import diffusers

    return True, diffusers.__version__


# SeaCache on FLUX. diffusers' SeaCache gates on an indicator computed from the raw visual latents (each (C, T, H, W),
# SEA-filtered over T, H, W at the current sigma) and reads the scheduler position from the cache context. Its built-in
# adapters only produce the latents for Cosmos 3 and Wan T2V, and FluxPipeline enters `cache_context("cond")` without
# step_index / sigma / num_inference_steps, so without both pieces below every step runs in full ("fail-open").
def flux_sea_raw_vision(module, args, kwargs) -> list[torch.Tensor] | None:
    """SeaCache ``raw_vision_callback`` for FLUX transformers: the packed latents ``hidden_states`` (B, (H/2)*(W/2),
    C*4) unpacked as ``FluxPipeline._unpack_latents`` does, one (C, 1, H, W) tensor per sample (a single frame). The
    token grid (H/2, W/2) is read from ``img_ids`` (its last row is (0, H/2 - 1, W/2 - 1)). ``None`` (SeaCache then
    runs the step in full) when the call does not look like that."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    ids = kwargs.get("img_ids")
    if not isinstance(hs, torch.Tensor) or hs.ndim != 3 or not isinstance(ids, torch.Tensor) or ids.ndim not in (2, 3):
        return None
    if ids.ndim == 3:  # the deprecated batched ids
        ids = ids[0]
    if ids.shape[-1] != 3 or ids.shape[0] != hs.shape[1]:
        return None
    h2, w2 = (int(v) + 1 for v in ids[-1, 1:].tolist())
    b, n, c4 = hs.shape
    if h2 * w2 != n or c4 % 4:
        return None
    c = c4 // 4
    lat = hs.view(b, h2, w2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 1, h2 * 2, w2 * 2)
    return list(lat.unbind(0))


def _install_step_context(pipe) -> None:
    """Make ``pipe.transformer.cache_context(name)`` also pass the scheduler position SeaCache needs: step_index (the
    scheduler's, or its begin index before the first ``step``), sigma (``scheduler.sigmas[step_index]``) and
    num_inference_steps (``len(scheduler.timesteps)``). An instance attribute over ``CacheMixin.cache_context``;
    ``_remove_step_context`` takes it away."""
    tr = pipe.transformer
    sch = pipe.scheduler
    inner = tr.__dict__.get("cache_context") or type(tr).cache_context.__get__(tr)

    def cache_context(name, **kw):
        i = getattr(sch, "step_index", None)
        if i is None:
            i = getattr(sch, "begin_index", None) or 0
        kw.setdefault("step_index", i)
        kw.setdefault("num_inference_steps", len(sch.timesteps))
        sigmas = getattr(sch, "sigmas", None)
        if "sigma" not in kw and sigmas is not None and 0 <= i < len(sigmas):
            kw["sigma"] = float(sigmas[i])
        return inner(name, **kw)

    cache_context._fastcache_rt_seacache = tr.__dict__.get("cache_context", _MISSING)
    tr.__dict__["cache_context"] = cache_context


def _remove_step_context(pipe) -> None:
    tr = pipe.transformer
    ours = tr.__dict__.get("cache_context")
    prev = getattr(ours, "_fastcache_rt_seacache", None)
    if prev is None:  # not installed by us
        return
    if prev is _MISSING:
        del tr.__dict__["cache_context"]
    else:
        tr.__dict__["cache_context"] = prev


def diffusers_seacache(threshold: float, default=False, *, max_consecutive: int = 2) -> Config:
    """diffusers' SeaCache with its defaults (linear residual forecast, first and last step in full) but
    ``threshold`` and ``max_consecutive`` (its ``max_consecutive_cached``, K in the label; 0: no limit). On FLUX
    through :func:`flux_sea_raw_vision` and the scheduler position added to the cache context."""

    def enable(pipe, ctx):
        from diffusers.hooks import SeaCacheConfig

        pipe.transformer.enable_cache(SeaCacheConfig(threshold=threshold, max_consecutive_cached=max_consecutive,
                                                     raw_vision_callback=flux_sea_raw_vision))
        _install_step_context(pipe)

    def disable(pipe):
        try:
            pipe.transformer.disable_cache()
        finally:
            _remove_step_context(pipe)

    k = max_consecutive if max_consecutive else "none"
    return Config("SeaCache", DIFFUSERS, f"threshold={_fmt(threshold)} K={k}", enable, disable, default=default,
                  note="all blocks skipped; the SEA indicator (an FFT of the latents) and its distance (read back to "
                       "the host) are computed on each step")


def diffusers_configs(quick: bool) -> list[Config]:
    # SeaCache: the library's defaults (threshold 0.25, at most 2 cached steps in a row) compute 20 of 50 steps on the
    # shipped model; with the cap at 2 no threshold goes below ~18, so the fastest setting lifts it (0.3 uncapped: 11);
    # 0.07 computes 29.
    sea = []
    if seacache_available()[0]:
        sea = [diffusers_seacache(0.25, default=True), diffusers_seacache(0.3, max_consecutive=0)]
        if not quick:
            sea.insert(0, diffusers_seacache(0.07))
    if quick:
        return [diffusers_fbcache(0.1, default=True), diffusers_fbcache(0.2),
                diffusers_taylorseer(4), diffusers_taylorseer(6, default=True),
                diffusers_magcache(0.06), diffusers_magcache(0.24, default=True)] + sea
    return [diffusers_fbcache(0.1, default=True), diffusers_fbcache(0.2), diffusers_fbcache(0.3),
            diffusers_taylorseer(3), diffusers_taylorseer(4), diffusers_taylorseer(6, default=True),
            diffusers_taylorseer(6, lite=True, default=True),
            diffusers_magcache(0.06), diffusers_magcache(0.12), diffusers_magcache(0.24, default=True)] + sea


# ----------------------------------------------------------------------------------------------------------------
# cache-dit
# ----------------------------------------------------------------------------------------------------------------
def cache_dit_available() -> tuple[bool, str]:
    try:
        with quiet_peers():
            import cache_dit
    except Exception as e:  # noqa: BLE001 - any import failure means: not installed / not usable here
        return False, f"{type(e).__name__}: {e}"
    return True, getattr(cache_dit, "__version__", "?")


@contextlib.contextmanager
def quiet_peers():
    """cache-dit logs a few lines on every enable/disable; keep the benchmark's output to its table."""
    names = ["cache_dit"] + [n for n in logging.root.manager.loggerDict if n.startswith("cache_dit")]
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, lv in old.items():
            logging.getLogger(n).setLevel(lv)


_MISSING = object()
_PATCHED_ATTRS = ("forward", "_is_patched")


def _instance_attrs(pipe) -> dict:
    """What cache-dit changes on the transformer and leaves behind: the instance attributes its FLUX patch functor
    sets on the transformer and its blocks, and the order of the transformer's child modules."""
    tr = pipe.transformer
    objs = [tr] + list(getattr(tr, "transformer_blocks", [])) + list(getattr(tr, "single_transformer_blocks", []))
    attrs = {id(o): (o, {a: o.__dict__.get(a, _MISSING) for a in _PATCHED_ATTRS}) for o in objs}
    return dict(attrs=attrs, model=tr, children=list(tr._modules.items()))


def _restore_instance_attrs(saved: dict) -> None:
    if not saved:
        return
    for obj, attrs in saved["attrs"].values():
        for a, v in attrs.items():
            if v is _MISSING:
                obj.__dict__.pop(a, None)
            else:
                obj.__dict__[a] = v
    tr = saved["model"]
    tr._modules.clear()
    tr._modules.update(saved["children"])


def cache_dit_dbcache(threshold: float, calibrator=None, default=False, last: int = 0) -> Config:
    """DBCache F1B<last> at ``threshold``; ``calibrator``: None / False (plain reuse), True / "taylorseer" (cache-dit's
    TaylorSeer, order 1) or "spectrum" (fastcache_rt's Spectrum forecaster as a cache-dit calibrator)."""
    calibrator = {False: None, True: "taylorseer"}.get(calibrator, calibrator)
    if calibrator not in (None, "taylorseer", "spectrum"):
        raise ValueError(f"calibrator: None, 'taylorseer' or 'spectrum', got {calibrator!r}")
    saved: dict = {}

    def enable(pipe, ctx):
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        # true CFG: FluxPipeline calls the transformer twice a step (cond, then uncond); cache-dit keeps one cache
        # per branch and counts steps right only when told (its auto setting assumes FLUX runs one call a step)
        cfg = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=last, residual_diff_threshold=threshold,
                            num_inference_steps=ctx.steps,
                            enable_separate_cfg=True if ctx.calls_per_step > 1 else None)
        cal = None
        if calibrator == "taylorseer":
            cal = TaylorSeerCalibratorConfig(taylorseer_order=1)
        elif calibrator == "spectrum":
            from fastcache_rt.integrations.cache_dit import spectrum_calibrator_config

            cal = spectrum_calibrator_config()
        saved.clear()
        saved.update(_instance_attrs(pipe))
        with quiet_peers():
            cache_dit.enable_cache(pipe, cache_config=cfg, calibrator_config=cal)

    def disable(pipe):
        import cache_dit

        with quiet_peers():
            cache_dit.disable_cache(pipe)
        # cache-dit 1.5.3's disable_cache leaves its patched transformer.forward (FluxPatchFunctor) in place and,
        # after a call, the transformer's children re-registered in another order (single_transformer_blocks before
        # transformer_blocks). Outputs stay the same, but diffusers' FirstBlockCache, enabled afterwards, takes
        # its "first" block from that order and fails. Put back exactly what was there.
        _restore_instance_attrs(saved)

    name, knobs, note = f"DBCache F1B{last}", "", "first block runs every step"
    if last:
        note += f", and the last {last} block{'s' if last > 1 else ''}"
    if calibrator == "taylorseer":
        name, knobs = name + " + TaylorSeer", " order=1"
    elif calibrator == "spectrum":
        fc = fastcache_rt.PRESETS["spectrum"].forecaster  # the calibrator's defaults
        name = name + " + Spectrum (fastcache_rt)"
        knobs = f" degree={fc.degree} lam={_fmt(fc.lam)} blend={_fmt(fc.blend)}"
        note += "; fastcache_rt's Chebyshev forecaster as a cache-dit calibrator"
    return Config(name, CACHE_DIT, f"threshold={_fmt(threshold)} warmup=8" + knobs, enable, disable, default=default,
                  note=note)


def cache_dit_configs(quick: bool) -> list[Config]:
    th = (0.1, 0.2) if quick else (0.1, 0.2, 0.3)
    out = [cache_dit_dbcache(t, None, default=t == 0.1) for t in th]
    out += [cache_dit_dbcache(t, None, last=1) for t in th[:1 if quick else None]]
    out += [cache_dit_dbcache(t, "taylorseer", default=t == 0.1) for t in th]
    out += [cache_dit_dbcache(t, "spectrum", default=t == 0.1) for t in th]
    return out


# ----------------------------------------------------------------------------------------------------------------
# choosing methods by name (the command line's --methods)
# ----------------------------------------------------------------------------------------------------------------
PEER_NAMES = ("diffusers-fbcache", "diffusers-taylorseer", "diffusers-magcache", "diffusers-seacache",
              "cache-dit-dbcache", "cache-dit-taylorseer", "cache-dit-spectrum")


def select_methods(names) -> tuple[set, set]:
    """The fastcache_rt presets and the peers' method names a ``--methods`` list picks (all where None)."""
    if names is None:
        return set(PRESET_ORDER), set(PEER_NAMES)
    ours, peers = set(), set()
    for n in names:
        k = n.strip().lower()
        if k in PRESET_ORDER:
            ours.add(k)
        elif k in PEER_NAMES:
            peers.add(k)
        elif k in ("diffusers", "cache-dit"):
            peers.update(p for p in PEER_NAMES if p.startswith(k + "-"))
        elif k == "none":
            continue
        else:
            raise ValueError(f"unknown method {n!r}; choose from {', '.join(PRESET_ORDER + PEER_NAMES)}, "
                             f"diffusers, cache-dit")
    return ours, peers


def peer_configs(peers: set, quick: bool, warn) -> list[Config]:
    """The peers' configurations of the picked method names (``warn``: told why a peer's rows are left out)."""
    out = []
    d = diffusers_configs(quick)
    picks = {"diffusers-fbcache": "FirstBlockCache", "diffusers-taylorseer": "TaylorSeerCache",
             "diffusers-magcache": "MagCache", "diffusers-seacache": "SeaCache"}
    for name, prefix in picks.items():
        if name in peers:
            out += [c for c in d if c.method.startswith(prefix)]
    if peers & {"cache-dit-dbcache", "cache-dit-taylorseer", "cache-dit-spectrum"}:
        ok, why = cache_dit_available()
        if not ok:
            warn(f"cache-dit not importable ({why}): its rows are left out")
        else:
            if "cache-dit-spectrum" in peers:
                import importlib

                try:  # fastcache_rt's calibrator plug-in checks the cache-dit version it was tested with
                    with quiet_peers():
                        importlib.import_module("fastcache_rt.integrations.cache_dit")
                except RuntimeError as e:
                    warn(f"{e}: the cache-dit Spectrum rows are left out")
                    peers = peers - {"cache-dit-spectrum"}
            for c in cache_dit_configs(quick):
                kind = "spectrum" if "Spectrum" in c.method else "taylorseer" if "TaylorSeer" in c.method else "dbcache"
                if f"cache-dit-{kind}" in peers:
                    out.append(c)
    return out
