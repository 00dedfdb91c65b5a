"""fastcache_rt's forecasters as cache-dit calibrators.

    import cache_dit
    from cache_dit import DBCacheConfig
    from fastcache_rt.integrations.cache_dit import spectrum_calibrator_config

    cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(num_inference_steps=50),
                           calibrator_config=spectrum_calibrator_config())

cache-dit decides which steps to skip (DBCache's residual-difference gate); on a skipped step its calibrator supplies
the cached tensor (the Bn blocks' residual or hidden states, and the encoder's). The calibrators here answer with
fastcache_rt's own forecaster states (``fastcache_rt.policy.forecasters``: ``ChebyshevState`` for Spectrum,
``FreqCaState``, ``TaylorState``) on its fused ops, one state per named stream and tensor shape, allocated on the
first computed step of that shape.

cache-dit has no public way to add a calibrator: its factory (``Calibrator``) knows a fixed list of types, and a
calibrator is built from its config alone, without the run's step count (Spectrum maps the run's steps onto
[-1, 1]). This module therefore patches two cache-dit internals, once, on import: ``Calibrator.__new__`` builds the
configs defined here, and ``CachedContext.__post_init__`` hands the context's ``DBCacheConfig`` to the calibrators it
built. Everything that relies on cache-dit's internals is in this module, checked against :data:`TESTED_CACHE_DIT`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections import OrderedDict

import cache_dit
import torch

TESTED_CACHE_DIT = ">=1.5.3,<1.5.4"
"""The cache-dit versions this module was tested with; importing or using it under another raises RuntimeError."""


def cache_dit_version() -> str:
    v = getattr(cache_dit, "__version__", None)
    if v is None:
        from importlib.metadata import version

        v = version("cache_dit")
    return str(v)


def check_cache_dit_version() -> str:
    """The installed cache-dit version; RuntimeError naming it unless it is in :data:`TESTED_CACHE_DIT`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    v = cache_dit_version()
    try:
        ok = SpecifierSet(TESTED_CACHE_DIT).contains(Version(v), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise RuntimeError(
            f"fastcache_rt.integrations.cache_dit: the installed cache-dit is {v}, but this integration patches "
            f"cache-dit internals (Calibrator.__new__, CachedContext.__post_init__) and was tested with cache-dit "
            f"{TESTED_CACHE_DIT} only; install a tested version (pip install 'cache-dit{TESTED_CACHE_DIT}') or use "
            f"fastcache_rt.enable(pipe, ...) directly")
    return v


check_cache_dit_version()

# cache-dit internals (all non-public names used by fastcache_rt live here)
from cache_dit.caching.cache_contexts import cache_context as _cd_context
from cache_dit.caching.cache_contexts import calibrators as _cd_calibrators
from cache_dit.caching.cache_contexts.calibrators import CalibratorBase, CalibratorConfig

from ..policy.forecasters import FreqCa, Taylor
from ..policy.spec import StreamSpec
from ..policy.presets import PRESETS

__all__ = ["TESTED_CACHE_DIT", "ForecasterCalibrator", "FreqCaCalibrator", "FreqCaCalibratorConfig",
           "SpectrumCalibrator", "SpectrumCalibratorConfig", "TaylorCalibrator", "TaylorCalibratorConfig",
           "check_cache_dit_version", "freqca_calibrator_config", "spectrum_calibrator_config",
           "taylor_calibrator_config"]


# ---------------------------------------------------------------------------------------------------------------
# calibrators
# ---------------------------------------------------------------------------------------------------------------
class _Counters:
    """What a forecaster state reads of ``fastcache_rt.stream.StreamState``: the device step counters."""

    __slots__ = ("last_full", "num_steps", "step")

    def __init__(self, device, num_steps: int):
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.last_full = torch.zeros((), dtype=torch.int64, device=device)
        self.num_steps = num_steps


class _Stream:
    __slots__ = ("fc", "st")

    def __init__(self, st: _Counters, fc):
        self.st, self.fc = st, fc


class ForecasterCalibrator(CalibratorBase):
    """A cache-dit calibrator answering with a fastcache_rt forecaster (``Chebyshev``, ``FreqCa``, ``Taylor``,
    ``Reuse``). cache-dit calls, per transformer call of its branch: ``reset_cache()`` at the first step of a
    generation, ``mark_step_begin()``, then ``update(tensor, name=...)`` on a computed step (the forecaster's
    ``record``) or ``approximate(name=...)`` on a skipped one (its ``predict``).

    Args:
        forecaster: the fastcache_rt forecaster config.
        num_inference_steps: the run's step count (Spectrum's time axis); None takes cache-dit's
            ``DBCacheConfig.num_inference_steps``.
        grid: the token grid ``(H, W)`` or ``(F, H, W)`` (FreqCa; None: square image grids).
        max_shapes: forecaster states kept per stream name (one per tensor shape seen; least recently used dropped).
    """

    needs_num_steps = False

    def __init__(self, forecaster, num_inference_steps: int | None = None, grid=None, max_shapes: int = 4):
        check_cache_dit_version()
        if not hasattr(forecaster, "make_state"):
            raise TypeError(f"forecaster: expected a fastcache_rt forecaster (Chebyshev, FreqCa, Taylor, Reuse), got "
                            f"{forecaster!r}")
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or not isinstance(
                num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps: must be an int >= 1 or None, got {num_inference_steps!r}")
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise ValueError(f"max_shapes: must be an int >= 1, got {max_shapes!r}")
        self.forecaster = forecaster
        self.num_inference_steps = num_inference_steps
        self.grid = tuple(grid) if grid is not None else None
        self.max_shapes = max_shapes
        self.cache_config = None  # cache-dit's DBCacheConfig, bound by the context that built this calibrator
        self.streams: dict[str, OrderedDict] = {}  # name -> (shape, dtype, device, num_steps) -> _Stream
        self.current: dict[str, _Stream] = {}  # name -> the stream last updated in this generation
        self.step = -1
        self._warned_steps = False
        self.reset_cache()

    # -- cache-dit's interface -------------------------------------------------------------------------------------
    def reset_cache(self, *args, **kwargs) -> None:
        """A new generation: the states keep their buffers, their counts restart."""
        self.step = -1
        self.current.clear()
        for streams in self.streams.values():
            for s in streams.values():
                s.fc.reset()
                s.st.step.zero_()
                s.st.last_full.zero_()

    def mark_step_begin(self, *args, **kwargs) -> None:
        self.step += 1
        n = self.resolved_num_steps()
        if self.needs_num_steps and n is not None and self.step == n and not self._warned_steps:
            self._warned_steps = True
            logging.getLogger("fastcache_rt").warning(
                "fastcache_rt %s: the generation runs past the %d steps it was told (its time axis is mapped from "
                "them): pass the step count the pipeline runs (num_inference_steps=)", type(self).__name__, n)

    def update(self, Y: torch.Tensor, name: str = "default") -> None:
        """A computed step's tensor: the forecaster records it (``record(st, Y, True)``) at this step."""
        s = self._stream(name, Y)
        step = max(self.step, 0)
        s.st.step.fill_(step)
        s.fc.record(s.st, Y, True)
        s.st.last_full.fill_(step)
        self.current[name] = s

    def approximate(self, name: str = "default") -> torch.Tensor | None:
        """The forecast for this step (``predict(st)``); None before the stream's first computed step."""
        s = self.current.get(name)
        if s is None:
            return None
        s.st.step.fill_(max(self.step, 0))
        return s.fc.predict(s.st)

    # -- states ----------------------------------------------------------------------------------------------------
    def resolved_num_steps(self) -> int | None:
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        n = getattr(self.cache_config, "num_inference_steps", None)
        return int(n) if n is not None else None

    def check_ready(self) -> None:
        if self.needs_num_steps and self.resolved_num_steps() is None:
            raise ValueError(
                f"{type(self).__name__}: the forecaster maps the run's steps onto its time axis and needs the step "
                "count: pass DBCacheConfig(num_inference_steps=N) to cache_dit.enable_cache, or "
                f"num_inference_steps=N to the calibrator config")

    def _stream(self, name: str, Y: torch.Tensor) -> _Stream:
        self.check_ready()
        n = self.resolved_num_steps() or 1
        key = (tuple(Y.shape), Y.dtype, Y.device, n)
        streams = self.streams.setdefault(name, OrderedDict())
        s = streams.get(key)
        if s is None:
            try:
                fc = self.forecaster.make_state(StreamSpec(key[0], Y.dtype, Y.device, n, self.grid))
            except ValueError as e:
                raise ValueError(f"{type(self).__name__}, stream {name!r} of shape {key[0]}: {e} (here: the "
                                 "calibrator config's grid=)") from None
            s = streams[key] = _Stream(_Counters(Y.device, n), fc)
            while len(streams) > self.max_shapes:
                streams.popitem(last=False)
        else:
            streams.move_to_end(key)
        return s

    def tensors(self) -> list:
        """Device memory held by the forecaster states."""
        return [t for streams in self.streams.values() for s in streams.values()
                for t in [*s.fc.tensors(), s.st.step, s.st.last_full]]

    def __repr__(self):
        return f"{type(self).__name__}({self.forecaster!r})"


class SpectrumCalibrator(ForecasterCalibrator):
    """Spectrum (fastcache_rt's ``Chebyshev``): Chebyshev ridge regression over the last ``history`` computed steps;
    defaults are fastcache_rt's "spectrum" preset's forecaster."""

    needs_num_steps = True

    def __init__(self, degree: int | None = None, lam: float | None = None, blend: float | None = None,
                 history: int | None = None, num_inference_steps: int | None = None, **kwargs):
        base = PRESETS["spectrum"].forecaster
        given = dict(degree=degree, lam=lam, blend=blend, history=history)
        fc = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
        super().__init__(fc, num_inference_steps=num_inference_steps, **kwargs)


class FreqCaCalibrator(ForecasterCalibrator):
    """FreqCa (fastcache_rt's ``FreqCa``): the low band of the token grid's DCT reused, the high band forecast with
    Hermite-weighted differences. Tensors are ``(..., tokens, channels)``; ``grid`` gives the token grid."""

    def __init__(self, cutoff: float | None = None, order: int | None = None, scale: float | None = None, grid=None,
                 **kwargs):
        given = dict(cutoff=cutoff, order=order, scale=scale)  # None: fastcache_rt's FreqCa default
        super().__init__(dataclasses.replace(FreqCa(), **{k: v for k, v in given.items() if v is not None}), grid=grid,
                         **kwargs)


class TaylorCalibrator(ForecasterCalibrator):
    """TaylorSeer (fastcache_rt's ``Taylor``): finite differences up to ``order`` over the computed steps."""

    def __init__(self, order: int | None = None, **kwargs):
        super().__init__(Taylor() if order is None else Taylor(order=order), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# configs: what cache_dit.enable_cache(..., calibrator_config=...) takes
# ---------------------------------------------------------------------------------------------------------------
# what cache-dit's calibrators are applied to (its CachedContext reads calibrator_cache_type)
CACHE_TYPES = ("residual", "hidden_states")


@dataclasses.dataclass
class _FastcacheConfig(CalibratorConfig):
    enable_calibrator: bool = True
    enable_encoder_calibrator: bool = True
    calibrator_cache_type: str = "residual"
    # the run's step count; None: cache-dit's DBCacheConfig.num_inference_steps
    num_inference_steps: int | None = None

    calibrator_class = None  # the calibrator this config builds (class attributes, not dataclass fields)
    params = ()  # the fields passed to it

    def __post_init__(self):
        for name in ("enable_calibrator", "enable_encoder_calibrator"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        if self.calibrator_cache_type not in CACHE_TYPES:
            raise ValueError(f"calibrator_cache_type: one of {', '.join(CACHE_TYPES)}, got "
                             f"{self.calibrator_cache_type!r}")
        grid = getattr(self, "grid", None)
        if grid is not None:
            ok = isinstance(grid, (tuple, list)) and len(grid) in (2, 3) and all(
                isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
            if not ok:
                raise ValueError(f"grid: (H, W) or (F, H, W) of ints >= 1, got {grid!r}")

    def to_kwargs(self) -> dict:
        kw = dict(self.calibrator_kwargs or {})
        kw.update({p: getattr(self, p) for p in self.params})
        kw["num_inference_steps"] = self.num_inference_steps
        return kw

    def build(self) -> ForecasterCalibrator:
        check_cache_dit_version()
        return self.calibrator_class(**self.to_kwargs())

    def strify(self, **kwargs) -> str:
        vals = ", ".join(f"{p}={getattr(self, p)}" for p in self.params if getattr(self, p) is not None)
        return f"fastcache_rt.{self.calibrator_class.__name__}({vals})"


@dataclasses.dataclass
class SpectrumCalibratorConfig(_FastcacheConfig):
    calibrator_type: str = "fastcache_rt_spectrum"
    degree: int | None = None  # None: the "spectrum" preset's value
    lam: float | None = None
    blend: float | None = None
    history: int | None = None

    calibrator_class = SpectrumCalibrator
    params = ("degree", "lam", "blend", "history")


@dataclasses.dataclass
class FreqCaCalibratorConfig(_FastcacheConfig):
    calibrator_type: str = "fastcache_rt_freqca"
    # text tokens have no spatial grid: the encoder stream keeps cache-dit's plain reuse unless enabled
    enable_encoder_calibrator: bool = False
    cutoff: float | None = None  # None: fastcache_rt's FreqCa default
    order: int | None = None
    scale: float | None = None
    grid: tuple | None = None

    calibrator_class = FreqCaCalibrator
    params = ("cutoff", "order", "scale", "grid")


@dataclasses.dataclass
class TaylorCalibratorConfig(_FastcacheConfig):
    calibrator_type: str = "fastcache_rt_taylor"
    order: int | None = None  # None: fastcache_rt's Taylor default (1)

    calibrator_class = TaylorCalibrator
    params = ("order",)


def _config(cls, kw) -> CalibratorConfig:
    check_cache_dit_version()
    _install()
    cfg = cls(**kw)
    cfg.build()  # validate the fields now rather than on the first pipeline call
    return cfg


def spectrum_calibrator_config(**kw) -> SpectrumCalibratorConfig:
    """cache-dit ``calibrator_config`` for Spectrum. Fields: ``degree``, ``lam``, ``blend``, ``history`` (None: the
    "spectrum" preset's), ``num_inference_steps`` (None: the DBCacheConfig's), ``calibrator_cache_type``
    ("residual" / "hidden_states"), ``enable_calibrator``, ``enable_encoder_calibrator``."""
    return _config(SpectrumCalibratorConfig, kw)


def freqca_calibrator_config(**kw) -> FreqCaCalibratorConfig:
    """cache-dit ``calibrator_config`` for FreqCa: ``cutoff``, ``order``, ``scale``, ``grid`` ((H, W) tokens; None:
    square), and the common fields of :func:`spectrum_calibrator_config`. The encoder stream is off by default."""
    return _config(FreqCaCalibratorConfig, kw)


def taylor_calibrator_config(**kw) -> TaylorCalibratorConfig:
    """cache-dit ``calibrator_config`` for fastcache_rt's TaylorSeer: ``order``, and the common fields."""
    return _config(TaylorCalibratorConfig, kw)


# ---------------------------------------------------------------------------------------------------------------
# the patches (cache-dit offers no registry)
# ---------------------------------------------------------------------------------------------------------------
def _check_enable(pipe_or_adapter=None, cache_config=None, calibrator_config=None, **kwargs) -> None:
    """What ``cache_dit.enable_cache`` would otherwise find out only at the first generation, after it has replaced
    the pipeline class's ``__call__`` (for every pipeline of that class): checked before it patches anything."""
    if isinstance(calibrator_config, _FastcacheConfig):
        cal = calibrator_config.build()
        cal.cache_config = cache_config
        cal.check_ready()
    targets = [pipe_or_adapter, getattr(pipe_or_adapter, "transformer", None),
               getattr(pipe_or_adapter, "transformer_2", None)]
    if any(t is not None and getattr(t, "__dict__", {}).get("_fastcache_rt") is not None for t in targets):
        raise ValueError("cache_dit.enable_cache: fastcache_rt caching is enabled on this pipeline; two caching "
                         "libraries on one transformer would each skip what the other computes: call "
                         "fastcache_rt.disable(pipe) first")


def _install() -> None:
    enable = cache_dit.enable_cache
    if not getattr(enable, "_fastcache_rt", False):
        @functools.wraps(enable)
        def enable_cache(*args, **kwargs):
            bound = inspect.signature(enable).bind_partial(*args, **kwargs).arguments
            _check_enable(**{k: v for k, v in bound.items() if k in ("pipe_or_adapter", "cache_config",
                                                                    "calibrator_config")})
            return enable(*args, **kwargs)

        enable_cache._fastcache_rt = True
        cache_dit.enable_cache = enable_cache

    factory = _cd_calibrators.Calibrator
    if not getattr(factory, "_fastcache_rt", False):
        original_new = factory.__new__

        def __new__(cls, calibrator_config):
            if isinstance(calibrator_config, _FastcacheConfig):
                return calibrator_config.build()
            return original_new(cls, calibrator_config)

        factory.__new__ = staticmethod(__new__)
        factory._fastcache_rt = True

    ctx_cls = _cd_context.CachedContext
    if not getattr(ctx_cls, "_fastcache_rt", False):
        original_post_init = ctx_cls.__post_init__

        def __post_init__(self):
            original_post_init(self)
            for cal in (self.calibrator, self.encoder_calibrator, self.cfg_calibrator, self.cfg_encoder_calibrator):
                if isinstance(cal, ForecasterCalibrator):
                    cal.cache_config = self.cache_config
                    cal.check_ready()

        ctx_cls.__post_init__ = __post_init__
        ctx_cls._fastcache_rt = True


_install()
