"""Gates: when to run the transformer. Each gate is a validated config dataclass deriving from ``Gate`` with
``make_state(spec: StreamSpec)`` returning its state object, which implements the protocol below; the controller
knows nothing else of a gate. A gate also declares what the rest of the library asks of it (``Gate``): its name
(``@register_gate``), the probe it reads, the blocks it always runs, what it reads from a calibration profile and
its speed knob for the tuner. A new gate is one class (here or in any module) and its test.

Schedule gates (every step, fixed interval, Spectrum's adaptive interval, MagCache with calibrated ratios) depend
only on the step index: their compute mask is known before the run, so in eager mode they decide on the host with
no device op and no read. Signal gates (TeaCache, SpectralCache, FBCache) decide on the device in one fused
``gate_step`` launch.
"""

from __future__ import annotations

import logging
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from ..ops import layout as L
from ._validate import check, check_coeffs, is_int, is_number
from .forecasters import FreqCa, Reuse, Taylor
from .spec import Registry, StreamSpec, masked, masked_write_

FLUX_TEACACHE_COEFFS = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)

GATES = Registry("gate")
register_gate = GATES.register


@dataclass(frozen=True)
class SearchSpace:
    """One family of the tuner's arms: ``make(knob) -> gate`` over ``knobs`` (slow to fast), each paired with every
    ``(forecaster, site, label)`` of ``forecasters``; ``schedule``: the gate's computed steps are known before the
    run (``gate.schedule(S)``), so the tuner skips settings no faster than its best."""

    label: str
    make: Callable
    knobs: tuple
    forecasters: tuple
    schedule: bool = False


def _geometric(lo: float, hi: float, n: int) -> tuple[float, ...]:
    return tuple(float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n))


# what the tuner pairs the gates with: reuse at the residual, and one forecaster of order 1
_REUSE_OR_TAYLOR = ((Reuse(), "residual", "reuse"), (Taylor(order=1), "residual", "taylor1"))


class Gate:
    """What the library asks of a gate (class attributes and methods a gate overrides where they apply):

    name           its key in policy files and ``GATES`` (``@register_gate`` registers it)
    probe          None, "modulated" (the family's probe) or "first_blocks" (the first blocks' residual): what its
                   decision reads; a gate reading several lists them in ``probes``
    first_blocks() blocks of the first list that run on every step before the decision (FBCache)
    profile        {field: (fit entry, key)}: what ``enable(..., profile=)`` sets from a calibration profile
    family_coeffs  True: ``coeffs=None`` takes the model family's published TeaCache polynomial
    knob           the field the tuner and the benchmark sweep (larger is faster)
    search(fit)    the tuner's arms (``SearchSpace``), given the calibrated fields it has (``fit``)
    needs_calibration  fields without which ``search`` returns nothing and ``make_state`` cannot run
    make_state(spec) -> its device state (the protocol below)
    """

    name: typing.ClassVar[str] = ""
    probe: typing.ClassVar[str | None] = None
    profile: typing.ClassVar[dict] = {}
    family_coeffs: typing.ClassVar[bool] = False
    knob: typing.ClassVar[str | None] = None
    needs_calibration: typing.ClassVar[tuple] = ()

    def first_blocks(self) -> int:
        return 0

    def from_profile(self, fit: dict) -> dict:
        """The field changes a calibration profile's fitted entry (``fit``: {"teacache": ..., "magcache": ...})
        gives this gate; ValueError / KeyError where it has nothing for it."""
        out = {}
        for field, (entry, key) in self.profile.items():
            if entry not in fit:
                raise KeyError(entry)
            out[field] = tuple(fit[entry][key])
        return out

    @classmethod
    def search(cls, fit: dict) -> list[SearchSpace]:
        """The tuner's search space (``fit``: calibrated field values, e.g. {"coeffs": ..., "ratios": ...})."""
        return []

    def check_ready(self) -> None:
        """What can only be checked when the policy is about to run."""

    def make_state(self, spec: StreamSpec):
        raise NotImplementedError


class _Schedule(Gate):
    """A gate whose compute mask is a function of the step count alone (``schedule``)."""

    def schedule(self, num_steps: int) -> list[bool]:
        raise NotImplementedError

    def mask(self, spec: StreamSpec) -> list[bool]:
        """The compute mask of the stream's generation."""
        return self.schedule(spec.num_steps)

    def make_state(self, spec: StreamSpec):
        return ScheduleState(self.mask(spec), spec.device)


@register_gate
@dataclass(frozen=True)
class EveryStep(_Schedule):
    """Run the transformer at every step (no caching): the baseline."""

    name = "every"

    def schedule(self, num_steps: int) -> list[bool]:
        return [True] * num_steps


@register_gate
@dataclass(frozen=True)
class FixedInterval(_Schedule):
    """Run the first ``warmup`` steps, then one step in every ``interval`` (FORA; TaylorSeer and FreqCa with
    warm-up 3): full iff ``s < warmup or (s - warmup + 1) % interval == 0``."""

    interval: int = 3
    warmup: int = 1
    name = "interval"
    knob = "interval"

    def __post_init__(self):
        check(self, "interval", is_int(self.interval) and self.interval >= 1, "an int >= 1")
        check(self, "warmup", is_int(self.warmup) and self.warmup >= 1, "an int >= 1 (step 0 must run)")

    def schedule(self, num_steps: int) -> list[bool]:
        return [s < self.warmup or (s - self.warmup + 1) % self.interval == 0 for s in range(num_steps)]

    @classmethod
    def search(cls, fit: dict) -> list[SearchSpace]:
        # the warm-up is a knob of another kind: one space each, so two settings at one step count are both reached
        pairs = ((Reuse(), "residual", "reuse"), (Taylor(order=1), "hidden", "taylor1"),
                 (Taylor(order=2), "hidden", "taylor2"), (Taylor(order=1), "output", "taylor1@output"),
                 (FreqCa(), "hidden", "freqca"))
        return [SearchSpace(f"interval(w{w})", lambda k, w=w: cls(interval=k, warmup=w), (2, 3, 4, 5, 6, 7, 8, 10),
                            pairs, schedule=True) for w in (3, 1)]


@register_gate
@dataclass(frozen=True)
class SpectrumSchedule(_Schedule):
    """Spectrum's adaptive interval: ``warmup`` full steps, then gaps ``floor(interval + j * alpha)``, j = 0, 1, ...
    50 steps, interval 2, alpha 0.75, warm-up 5 -> 14 full steps; alpha 3.0 -> 10."""

    interval: float = 2.0
    alpha: float = 0.75
    warmup: int = 5
    name = "spectrum"
    knob = "alpha"

    def __post_init__(self):
        check(self, "interval", is_number(self.interval) and self.interval >= 1, "a finite number >= 1")
        check(self, "alpha", is_number(self.alpha) and self.alpha >= 0, "a finite number >= 0")
        check(self, "warmup", is_int(self.warmup) and self.warmup >= 1, "an int >= 1")

    def schedule(self, num_steps: int) -> list[bool]:
        out = [False] * num_steps
        for s in range(min(self.warmup, num_steps)):
            out[s] = True
        s, j = self.warmup - 1, 0
        while True:
            s += int(math.floor(self.interval + j * self.alpha))
            j += 1
            if s >= num_steps:
                break
            out[s] = True
        return out

    @classmethod
    def search(cls, fit: dict) -> list[SearchSpace]:
        from .forecasters import Chebyshev

        pairs = ((Chebyshev(blend=0.5), "hidden", "chebyshev"), (Taylor(order=1), "hidden", "taylor1"),
                 (Taylor(order=2), "hidden", "taylor2"))
        alphas = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
        return [SearchSpace(f"spectrum(i{first:g})", lambda a, f=first: cls(interval=f, alpha=a), alphas, pairs,
                            schedule=True) for first in (2.0, 1.5)]


@register_gate
@dataclass(frozen=True)
class TeaCacheGate(Gate):
    """TeaCache: relative L1 change of the modulated input (first block's norm1), rescaled by a per-model polynomial
    (highest power first) and accumulated; compute when the sum reaches ``threshold``. First and last steps run.
    ``coeffs=None``: the model family's published coefficients (identity where none are published)."""

    threshold: float = 0.6
    coeffs: tuple[float, ...] | None = None
    name = "teacache"
    probe = "modulated"
    profile = {"coeffs": ("teacache", "coeffs")}
    family_coeffs = True
    knob = "threshold"

    def __post_init__(self):
        check(self, "threshold", _pos(self.threshold), "a finite number > 0")
        if self.coeffs is not None:
            object.__setattr__(self, "coeffs", check_coeffs(self, "coeffs", self.coeffs))

    @classmethod
    def search(cls, fit: dict) -> list[SearchSpace]:
        coeffs = fit.get("coeffs")
        # a calibrated polynomial predicts the output's own change: smaller thresholds
        grid = _geometric(0.05, 3.0, 12) if coeffs is None else _geometric(0.005, 1.0, 12)
        return [SearchSpace(cls.name, lambda t: cls(threshold=t, coeffs=coeffs), grid, _REUSE_OR_TAYLOR)]

    def make_state(self, spec: StreamSpec):
        return SignalState("modulated", self.threshold, spec.num_steps, spec.device,
                           coeffs=self.coeffs or spec.coeffs or (1.0, 0.0), shard=spec.shard)


@register_gate
@dataclass(frozen=True)
class SpectralCacheGate(Gate):
    """SpectralCache: the TeaCache gate plus TADS (cosine-bell threshold scale ``tads`` = (s_min, s_max)),
    CEB (at most ``max_cached`` consecutive cached steps) and FDC (channel split at ``split`` * D with per-band
    threshold multipliers ``gammas``)."""

    threshold: float = 0.6
    coeffs: tuple[float, ...] | None = None
    tads: tuple[float, float] = (0.5, 1.5)
    max_cached: int = 2
    split: float = 0.5
    gammas: tuple[float, float] = (0.8, 1.5)
    name = "spectralcache"
    probe = "modulated"
    profile = TeaCacheGate.profile
    family_coeffs = True
    knob = "threshold"
    search = classmethod(TeaCacheGate.search.__func__)

    def __post_init__(self):
        check(self, "threshold", _pos(self.threshold), "a finite number > 0")
        if self.coeffs is not None:
            object.__setattr__(self, "coeffs", check_coeffs(self, "coeffs", self.coeffs))
        t = _pair(self, "tads")
        check(self, "tads", t is not None and all(_pos(v) for v in t) and t[0] <= t[1],
              "(s_min, s_max) with 0 < s_min <= s_max")
        object.__setattr__(self, "tads", t)
        check(self, "max_cached", is_int(self.max_cached) and self.max_cached >= 1, "an int >= 1")
        check(self, "split", is_number(self.split) and 0 < self.split < 1, "a fraction in (0, 1)")
        g = _pair(self, "gammas")
        check(self, "gammas", g is not None and all(_pos(v) for v in g), "two finite numbers > 0")
        object.__setattr__(self, "gammas", g)

    def make_state(self, spec: StreamSpec):
        return SignalState("modulated", self.threshold, spec.num_steps, spec.device,
                           coeffs=self.coeffs or spec.coeffs or (1.0, 0.0), tads=self.tads, max_cached=self.max_cached,
                           split=self.split, gammas=self.gammas, shard=spec.shard)


@register_gate
@dataclass(frozen=True)
class FBCacheGate(Gate):
    """First-block cache (FBCache / DBCache F1B0): run the first ``blocks`` blocks every step; skip the rest when the
    relative L1 change of their residual against the last computed step is below ``threshold``."""

    threshold: float = 0.05
    blocks: int = 1
    name = "fbcache"
    probe = "first_blocks"
    knob = "threshold"

    def __post_init__(self):
        check(self, "threshold", _pos(self.threshold), "a finite number > 0")
        check(self, "blocks", is_int(self.blocks) and self.blocks >= 1, "an int >= 1")

    def first_blocks(self) -> int:
        return self.blocks

    @classmethod
    def search(cls, fit: dict) -> list[SearchSpace]:
        return [SearchSpace(cls.name, lambda t: cls(threshold=t), _geometric(0.01, 0.5, 12), _REUSE_OR_TAYLOR)]

    def make_state(self, spec: StreamSpec):
        return SignalState("first_blocks", self.threshold, spec.num_steps, spec.device, coeffs=(1.0, 0.0),
                           accumulate=False, against_last_computed=True, shard=spec.shard)


@register_gate
@dataclass(frozen=True)
class MagCacheGate(_Schedule):
    """MagCache: calibrated per-step magnitude ratios of the residual; ``ratio *= gamma_s``, ``err += |1 - ratio|``;
    skip while ``err <= threshold`` and at most ``max_skip`` steps since the last full one; the first
    ``round(retention * S)`` steps run. ``ratios`` come from a calibration run (``calibrate=True`` computes every
    step and leaves the measured ratios in ``fastcache_rt.stats(target)["mag_ratios"]``) and are interpolated
    (nearest) to the run's step count. The rule reads only the step index, so the whole schedule is computed once
    per generation on the host."""

    threshold: float = 0.24
    max_skip: int = 5
    retention: float = 0.1
    ratios: tuple[float, ...] | None = None
    calibrate: bool = False
    name = "magcache"
    profile = {"ratios": ("magcache", "ratios")}
    knob = "threshold"
    needs_calibration = ("ratios",)

    def __post_init__(self):
        check(self, "threshold", _pos(self.threshold), "a finite number > 0")
        check(self, "max_skip", is_int(self.max_skip) and self.max_skip >= 1, "an int >= 1")
        check(self, "retention", is_number(self.retention) and 0 <= self.retention < 1, "a fraction in [0, 1)")
        check(self, "calibrate", isinstance(self.calibrate, bool), "a bool")
        if self.ratios is not None:
            try:
                r = tuple(_num(v) for v in self.ratios)
            except (TypeError, ValueError):
                r = ()
            check(self, "ratios", len(r) >= 1 and all(math.isfinite(v) and v > 0 for v in r),
                  "a non-empty sequence of finite numbers > 0 (from a calibrate=True run)")
            object.__setattr__(self, "ratios", r)

    def check_ready(self) -> None:
        """Called by ``enable``: MagCache cannot run without ratios (the preset has none)."""
        if self.ratios is None and not self.calibrate:
            raise ValueError("MagCacheGate.ratios: MagCache needs calibrated ratios; run one generation with "
                             "fastcache_rt.enable(target, 'magcache', calibrate=True), then pass "
                             "fastcache_rt.stats(target)['mag_ratios'] as ratios=...")

    def table(self, num_steps: int) -> list[float]:
        src = self.ratios
        if len(src) == num_steps:
            return list(src)
        if num_steps == 1:
            return [src[-1]]
        scale = (len(src) - 1) / (num_steps - 1)
        return [src[int(math.floor(i * scale + 0.5))] for i in range(num_steps)]

    def mask(self, spec: StreamSpec) -> list[bool]:
        total = spec.offset + spec.num_steps
        if self.ratios is not None and len(self.ratios) != total:
            _warn_once(("magcache-steps", len(self.ratios), total),
                       "fastcache_rt: MagCache ratios calibrated over %d steps are interpolated to a %d-step schedule "
                       "(nearest); calibrate at this step count for its own ratios", len(self.ratios), total)
        return self.schedule(spec.num_steps, spec.offset)

    def schedule(self, num_steps: int, offset: int = 0) -> list[bool]:
        """The compute mask of ``num_steps`` steps starting at step ``offset`` of the schedule (img2img): the
        ratios are those of the schedule's positions ``offset ..``, interpolated over its whole length."""
        table = self.table(offset + num_steps)[offset:]
        keep = int(math.floor(self.retention * num_steps + 0.5))
        ratio, err, since, has = 1.0, 0.0, 0, False
        out = []
        for s in range(num_steps):
            compute = True
            if s >= keep:
                ratio *= table[s]
                since += 1
                err += abs(1.0 - ratio)
                if has and err <= self.threshold and since <= self.max_skip:
                    compute = False
                else:
                    ratio, err, since = 1.0, 0.0, 0
            has = has or compute
            out.append(compute)
        return out

    def from_profile(self, fit: dict) -> dict:
        return {} if self.calibrate else super().from_profile(fit)

    @classmethod
    def search(cls, fit: dict) -> list[SearchSpace]:
        ratios = fit.get("ratios")
        if ratios is None:
            return []
        ratios = tuple(ratios)
        return [SearchSpace(cls.name, lambda t: cls(threshold=t, ratios=ratios), _geometric(0.005, 1.0, 14),
                            _REUSE_OR_TAYLOR, schedule=True)]

    def make_state(self, spec: StreamSpec):
        self.check_ready()
        if self.calibrate:
            return CalibrationState(spec)
        return super().make_state(spec)


@register_gate
@dataclass(frozen=True)
class ErrorControl(Gate):
    """Error-controlled caching: a tolerance instead of a schedule. On every computed step the forecaster also
    measures the error its forecast of that step (from the history before it) would have had,
    ``err = max over samples of ||forecast - computed|| / ||computed||`` (fused into its update; summed over a
    context-parallel group), and the next gap is chosen as an ODE solver chooses its step size. For a forecaster
    of order ``p`` the error over a gap of ``h`` steps grows about as ``h^(p+1)``, so after a gap ``h``::

        fac    = safety * (tol / err)^(k_i / (p + 1)) * (err_prev / tol)^(k_p / (p + 1))
        h_next = clip(h * clip(fac, shrink, grow), 1, max_gap)      (the next gap: floor(h_next) steps)

    (``h`` is kept real between computed steps, so a gap of 1 can grow without a factor of 2)

    (a PI controller, as in Gustafsson's and Soederlind's step-size control: ``pi = (k_i, k_p)``, ``(1, 0)`` is
    the elementary controller; ``err_prev`` is the previous computed step's estimate). The first ``warmup`` steps
    compute; a non-finite value computes the next step; with ``last`` the last step computes. ``order`` overrides
    the forecaster's ``p``. Eager mode reads the chosen step back once per computed step (a signal gate reads one
    value every step); under torch.compile everything stays on the device."""

    tol: float = 0.3
    order: int | None = None
    safety: float = 0.9
    shrink: float = 0.2
    grow: float = 2.0
    pi: tuple[float, float] = (0.7, 0.4)
    warmup: int = 3
    max_gap: int = 10
    last: bool = True
    name = "adaptive"
    knob = "tol"

    def __post_init__(self):
        check(self, "tol", _pos(self.tol), "a finite number > 0 (the relative error of a forecast, e.g. 0.05)")
        check(self, "order", self.order is None or (is_int(self.order) and 0 <= self.order <= 8),
              "None (the forecaster's) or an int in [0, 8]")
        check(self, "safety", is_number(self.safety) and 0 < self.safety <= 1, "a number in (0, 1]")
        check(self, "shrink", is_number(self.shrink) and 0 < self.shrink <= 1, "a number in (0, 1]")
        check(self, "grow", is_number(self.grow) and self.grow >= 1, "a finite number >= 1")
        k = _pair(self, "pi")
        check(self, "pi", k is not None and k[0] > 0 and k[1] >= 0, "(k_i, k_p) with k_i > 0, k_p >= 0")
        object.__setattr__(self, "pi", k)
        check(self, "warmup", is_int(self.warmup) and self.warmup >= 1, "an int >= 1 (step 0 must run)")
        check(self, "max_gap", is_int(self.max_gap) and self.max_gap >= 1, "an int >= 1")
        check(self, "last", isinstance(self.last, bool), "a bool")

    @classmethod
    def search(cls, fit: dict) -> list[SearchSpace]:
        from .forecasters import Chebyshev

        pairs = ((Taylor(order=1), "hidden", "taylor1"), (Taylor(order=2), "hidden", "taylor2"),
                 (Chebyshev(blend=0.5), "hidden", "chebyshev"))
        return [SearchSpace(cls.name, lambda t: cls(tol=t), _geometric(0.005, 0.5, 14), pairs)]

    def make_state(self, spec: StreamSpec):
        return ErrorControlState(self, spec)


@register_gate
@dataclass(frozen=True)
class Calibrate(Gate):
    """Not a caching gate: every step computes, and the signals every gate reads are measured per step (the
    relative L1 change of the probe, of the first ``blocks`` blocks' residual and of the model's output, and
    MagCache's residual-norm ratio; ``CalibrationState``). ``fastcache_rt.calibrate`` runs it over prompts and seeds
    and fits a profile from the measurements (``stats(target)["per_stream"][i]["calibration"]``)."""

    blocks: int = 1
    name = "calibrate"
    probe = "modulated"
    probes = ("modulated", "first_blocks")

    def __post_init__(self):
        check(self, "blocks", is_int(self.blocks) and self.blocks >= 1, "an int >= 1")

    def first_blocks(self) -> int:
        return self.blocks

    def make_state(self, spec: StreamSpec):
        return CalibrationState(spec, signals=("input", "output", "first_block", "mag"))


_WARNED: set = set()


def _warn_once(key, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logging.getLogger("fastcache_rt").warning(msg, *args)


def probes(gate) -> tuple[str, ...]:
    """Every probe a gate reads: its ``probes``, else its one ``probe`` (the one its decision reads)."""
    found = getattr(gate, "probes", None)
    if found is None:
        probe = getattr(gate, "probe", None)
        found = () if probe is None else (probe,)
    return tuple(found)


def first_blocks(gate) -> int:
    """Blocks of the first list the gate runs every step before deciding (0 for a gate not deriving from Gate)."""
    fn = getattr(gate, "first_blocks", None)
    return int(fn()) if callable(fn) else 0


def _pos(v) -> bool:
    return is_number(v) and v > 0


def _num(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError
    return float(v)


def _pair(obj, name: str):
    try:
        t = tuple(_num(v) for v in getattr(obj, name))
    except (TypeError, ValueError):
        return None
    return t if len(t) == 2 else None


# ---------------------------------------------------------------------------------------------------------------
# Device state of each gate, made by ``make_state(spec)`` (``spec.shape``: the image tokens the stream caches, this
# rank's under context parallelism; ``spec.shard``: a ``fastcache_rt.parallel.Shard`` when the tokens are split over
# a context-parallel group, else None: what a gate measures over the tokens is reduced over it, so every rank
# decides alike) and behind one protocol (the controller calls only these methods):
#   probe                      None, "modulated" (the family's probe) or "first_blocks" (FBCache's residual): the
#                              probe its decision reads (``step.probe``); a gate reading several names them in
#                              ``probes`` (``step.probes``: name -> tensor)
#   decide(step) -> compute    a host bool (eager, decided from the host step index) or a 0-dim device bool
#   after(step, compute, residual) after the branch: update state (``residual()``: this step's residual)
#   output(step, out)          optional: the model's output of the call (a gate measuring it: calibration)
#   reset()                    a new generation (host side, between generations)
#   start_at(index)            the stream's first call comes at step ``index`` of the generation (a second expert)
#   uses_step                  reads the device step counter (else eager mode need not advance it)
#   tensors()                  device memory held (for ``cache_bytes``)
# ``step`` is a ``fastcache_rt.stream.Step``: host index (None under torch.compile), device index, probe (and
# whether the probe is whole on every rank, e.g. a timestep embedding: then nothing is reduced).
# ---------------------------------------------------------------------------------------------------------------


class ScheduleState:
    """A compute mask over the run's steps, known before the run: decided on the host in eager mode (no device op,
    no read), by one gather under torch.compile. Steps past the mask's end compute."""

    probe = None
    uses_step = False

    def __init__(self, mask: list[bool], device):
        self.mask = list(mask)
        self.device_mask = torch.tensor(self.mask + [True], dtype=torch.bool, device=device)

    def decide(self, step) -> bool | torch.Tensor:
        if step.index is not None:
            return step.index >= len(self.mask) or self.mask[step.index]
        idx = step.tensor.clamp(max=len(self.mask)).view(1)
        return self.device_mask.gather(0, idx).reshape(())

    def after(self, step, compute, residual) -> None:
        pass

    def reset(self) -> None:
        pass

    def start_at(self, index: int) -> None:
        pass

    def tensors(self):
        return [self.device_mask]


class CalibrationState(ScheduleState):
    """A calibration run: every step computes, and what the gates would see is measured at every step into one
    device table (the same code eager and compiled for ``mag``; the probe signals need eager mode):

    - ``mag``: MagCache's ratio, the mean over tokens of ||r_s|| / ||r_{s-1}|| of the whole-stack residual (1 at
      the first step);
    - ``input``: the relative L1 change of the family's probe (TeaCache's modulated input) from the previous step;
    - ``first_block``: the same of the first blocks' residual (FBCache's signal; every step computes, so the
      previous step is the last computed one);
    - ``output``: the same of the model's output (what TeaCache's polynomial predicts).

    The relative changes are ``ops.band_l1`` sums, reduced over a context-parallel group (they add up across
    ranks), so every rank measures the whole sequence's."""

    uses_step = True
    PROBE_SIGNALS: typing.ClassVar[dict] = {"modulated": "input", "first_blocks": "first_block"}

    def __init__(self, spec: StreamSpec, signals=("mag",)):
        num_steps, device = spec.num_steps, spec.device
        super().__init__([True] * num_steps, device)
        self.shard = spec.shard
        self.signals = tuple(signals)
        self.measured = torch.full((len(self.signals), num_steps + 1), float("nan"), device=device)
        # every buffer the compiled path uses is made here: under torch.compile a stream is created inside the
        # first traced call, and an attribute set later on an object made in the trace does not survive it
        self.prev_norm = torch.ones(tuple(spec.shape)[:-1], device=device)
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self.prev: dict[str, torch.Tensor] = {}  # the previous step's probes and output (eager)
        self.fresh: set[str] = set()  # signals whose previous value is from this generation

    def _put(self, step, signal: str, value: torch.Tensor) -> None:
        """Row: the host step index where there is one (``output`` comes after the device counter advanced)."""
        if signal in self.signals:
            last = self.measured.shape[1] - 1
            if step.index is not None:
                row = torch.full((1,), min(step.index, last), dtype=torch.int64, device=self.measured.device)
            else:
                row = step.tensor.clamp(max=last).view(1)
            self.measured[self.signals.index(signal)].index_copy_(0, row, value.reshape(1).to(self.measured.dtype))

    def _change(self, step, name: str, signal: str, value: torch.Tensor, replicated: bool) -> None:
        """The relative L1 change of ``value`` from the previous step's (nothing at the first step)."""
        if signal not in self.signals:
            return
        if torch.compiler.is_compiling():
            raise RuntimeError("fastcache_rt calibration: the probe and output signals are measured in eager mode; "
                               "calibrate the uncompiled model (the measured values do not depend on it)")
        prev = self.prev.get(name)
        if prev is not None and prev.shape == value.shape and name in self.fresh:
            sums = ops.band_l1(value, prev)
            if self.shard is not None and not replicated:
                sums = self.shard.sum(sums)
            self._put(step, signal, sums[0, 0] / sums[0, 1])
            prev.copy_(value)
        else:
            self.prev[name] = value.detach().clone()
        self.fresh.add(name)

    def decide(self, step) -> bool | torch.Tensor:
        for name, value in step.probes.items():
            self._change(step, name, self.PROBE_SIGNALS[name], value, step.replicated and name == "modulated")
        return super().decide(step)

    def after(self, step, compute, residual) -> None:
        if "mag" not in self.signals:
            return
        norm = torch.linalg.vector_norm(residual().float(), dim=-1)
        per_token = norm / (self.prev_norm + 1e-8)
        if self.shard is None:
            mean = per_token.mean()
        else:  # the mean over every rank's tokens: one all-reduce of (sum, count)
            total = self.shard.sum(torch.stack([per_token.sum(), per_token.new_tensor(float(per_token.numel()))]))
            mean = total[0] / total[1]
        ratio = torch.where(self.seen, mean, torch.ones((), device=norm.device))
        self.prev_norm.copy_(norm)
        self.seen.fill_(True)
        self._put(step, "mag", ratio)

    def output(self, step, out: torch.Tensor) -> None:
        """The model's output of this step (whole on every rank: nothing to reduce); a model returning one tensor
        per sample (Z-Image) counts them together."""
        if isinstance(out, (list, tuple)):
            out = torch.cat([t.reshape(-1) for t in out])
        self._change(step, "output", "output", out, True)

    def reset(self) -> None:
        self.seen.fill_(False)
        self.measured.fill_(float("nan"))
        self.fresh.clear()

    def measurements(self, n: int) -> dict[str, list]:
        """Each signal's values at steps 0..n-1 of the generation (None where nothing was measured)."""
        table = self.measured[:, :n].tolist()
        return {name: [None if math.isnan(v) else v for v in table[k]] for k, name in enumerate(self.signals)}

    def tensors(self):
        return super().tensors() + [self.measured, self.seen, self.prev_norm, *self.prev.values()]


class ErrorControlState:
    """``ErrorControl``'s device state: the next step to compute, the previous error, and what it measured and
    chose at each step (for ``stats()``). The same tensor arithmetic eager and compiled (eager reads the next step
    back once per computed step), so both take the same decisions."""

    probe = None
    uses_step = True

    def __init__(self, gate: ErrorControl, spec: StreamSpec):
        device = spec.device
        self.gate, self.num_steps, self.p = gate, spec.num_steps, 1
        f32 = dict(dtype=torch.float32, device=device)
        self.next = torch.zeros((), dtype=torch.int64, device=device)  # the next step to compute
        self.prev = torch.full((), float("nan"), **f32)  # the previous computed step's error estimate
        self.h = torch.ones((), **f32)  # the step size, real: the gap is its floor (growth from 1 needs no jump)
        self.errors = torch.full((spec.num_steps + 1,), float("nan"), **f32)  # per step (computed steps only)
        self.gaps = torch.zeros(spec.num_steps + 1, dtype=torch.int64, device=device)  # the gap chosen there
        self.host_next = 0

    def bind(self, order: int) -> None:
        """The forecaster's order ``p`` (unless the gate sets one)."""
        self.p = int(order if self.gate.order is None else self.gate.order)

    def decide(self, step) -> bool | torch.Tensor:
        if step.index is not None:
            return step.index >= self.host_next
        return step.tensor >= self.next

    def measured(self, st, sums: torch.Tensor, compute, keep) -> None:
        """After a computed step's record: ``sums`` (B, 2) = per sample (sum of squared forecast errors, sum of
        squares of the computed value); ``keep``: the value was finite (it entered the history)."""
        g = self.gate
        k_i, k_p = g.pi
        e = torch.sqrt((sums[:, 0] / sums[:, 1].clamp(min=1e-30)).amax())
        e = torch.nan_to_num(e, nan=math.inf, posinf=math.inf)
        p1 = self.p + 1.0
        fac = g.safety * (g.tol / e.clamp(min=1e-12)) ** (k_i / p1)
        fac = fac * torch.where(torch.isnan(self.prev), torch.ones_like(fac), (self.prev / g.tol) ** (k_p / p1))
        fac = torch.nan_to_num(fac, nan=g.shrink).clamp(g.shrink, g.grow)
        warm = st.step < g.warmup - 1
        ok = keep & ~warm if isinstance(keep, torch.Tensor) else torch.logical_and(torch.as_tensor(keep), ~warm)
        h = torch.where(ok, (self.h * fac).clamp(1.0, float(g.max_gap)), torch.ones_like(self.h))
        nxt = st.step + h.floor().long()
        if g.last:  # the last step computes
            nxt = torch.where(st.step < self.num_steps - 1, nxt.clamp(max=self.num_steps - 1), nxt)
        row = st.step.clamp(max=self.num_steps).view(1)
        masked_write_(self.next, nxt, compute)
        masked_write_(self.h, h, compute)
        masked_write_(self.prev, torch.where(ok, e, self.prev), compute)
        self.errors.index_copy_(0, row, masked(compute, e, self.errors.index_select(0, row)[0]).view(1))
        self.gaps.index_copy_(0, row, masked(compute, nxt - st.step, self.gaps.index_select(0, row)[0]).view(1))
        if compute is True:  # eager: the one read back of a computed step
            self.host_next = int(self.next)

    def after(self, step, compute, residual) -> None:
        pass

    def reset(self) -> None:
        self.next.zero_()
        self.h.fill_(1.0)
        self.prev.fill_(float("nan"))
        self.errors.fill_(float("nan"))
        self.gaps.zero_()
        self.host_next = 0

    def start_at(self, index: int) -> None:
        self.next.fill_(index)
        self.host_next = index

    def report(self, log: list) -> dict:
        """For ``stats()``: the error estimate of every computed step (None before the history can forecast) and
        the gap chosen after it."""
        computed = [i for i, c in enumerate(log) if c is True]
        errs, gaps = self.errors.tolist(), self.gaps.tolist()
        warm = self.gate.warmup - 1
        return {"error_estimates": [None if i < warm or math.isnan(errs[i]) else errs[i] for i in computed],
                "gaps": [int(gaps[i]) for i in computed]}

    def tensors(self):
        return [self.next, self.h, self.prev, self.errors, self.gaps]


class SignalState:
    """TeaCache / SpectralCache / FBCache: the fused ``gate_step`` op (band sums + decision in one launch), its
    state on the device (with its own step counter)."""

    uses_step = False

    def __init__(self, probe: str, threshold: float, num_steps: int, device, *, coeffs, tads=(1.0, 1.0),
                 max_cached=math.inf, split=None, gammas=None, accumulate=True, against_last_computed=False,
                 shard=None):
        self.probe = probe
        self.shard = shard
        self.split, self.accumulate, self.against_last = split, accumulate, against_last_computed
        self.params = ops.gate_params(threshold, num_steps, tads=tads, max_cached=max_cached,
                                      force_last=not against_last_computed, device=device)
        self.coeffs = torch.tensor(coeffs, dtype=torch.float32, device=device)
        self.gammas = None if gammas is None else torch.tensor(gammas, dtype=torch.float32, device=device)
        self.state = ops.gate_state(device)
        # FBCache has no accumulator: the new state's accumulator is zeroed by one multiply
        self.keep = None
        if not accumulate:
            self.keep = torch.ones(L.STATE_LEN, device=device)
            self.keep[L.S_ACC] = 0.0
        self.prev: torch.Tensor | None = None
        self.bounds: list[int] | None = None
        self.fresh = True  # a new generation (eager: a host flag)
        # the same flag on the device for torch.compile: a Python flag that flips at each generation would be a
        # guard, and each generation's first call a graph of its own
        self.fresh_t = torch.ones((), dtype=torch.bool, device=device)

    def decide(self, step) -> torch.Tensor:
        probe = step.probe
        if self.prev is None or self.prev.shape != probe.shape:
            self.prev = probe.detach().clone()
            D = probe.shape[-1]
            self.bounds = [0, D] if self.split is None else [0, max(1, min(D - 1, round(self.split * D))), D]
        elif step.index is None:  # compiled: a new generation's first probe is its own predecessor, on the device
            self.prev.copy_(torch.where(self.fresh_t, probe, self.prev))
        elif self.fresh:  # a new generation: the first probe is its own predecessor (d = 0; step 0 computes)
            self.prev.copy_(probe)
        if step.index is None:
            self.fresh_t.fill_(False)
        else:
            self.fresh = False
        if self.shard is None or step.replicated:  # one fused launch: band sums and decision
            compute, new_state, _ = ops.gate_step(probe, self.prev, self.state, self.params, self.coeffs,
                                                  bounds=self.bounds, gammas=self.gammas)
        else:  # the sums of the whole sequence (they add up across ranks), then the same epilogue on every rank
            sums = self.shard.sum(ops.band_l1(probe, self.prev, self.bounds))
            compute, new_state = ops.gate_decide(sums, self.state, self.params, self.coeffs, gammas=self.gammas)
        if self.keep is not None:  # FBCache: a plain relative change each step, nothing accumulated
            new_state = new_state * self.keep
        if step.index is not None:  # eager: the op's fresh output becomes the state (no copy)
            self.state = new_state
        else:  # compiled: the state buffer keeps its address (CUDA graphs)
            self.state.copy_(new_state)
        if not self.against_last:  # TeaCache compares with the previous step, cached or not
            self.prev.copy_(probe)
        return compute

    def after(self, step, compute, residual) -> None:
        if self.against_last:  # FBCache compares with the last *computed* step
            masked_write_(self.prev, step.probe, compute)

    def forced(self, forced) -> None:
        """A step the policy's caps made compute where this gate had cached (a host True, or a device bool): the
        state as if the gate had computed (accumulator and run of cached steps back to 0, a cache held, one more
        computed step), so the gate counts from the real computed step."""
        st = self.state
        f = forced if isinstance(forced, torch.Tensor) else torch.ones((), dtype=torch.bool, device=st.device)
        zero, one = st.new_zeros(()), st.new_ones(())
        new = st.clone()
        new[L.S_ACC] = torch.where(f, zero, st[L.S_ACC])
        new[L.S_CONSEC] = torch.where(f, zero, st[L.S_CONSEC])
        new[L.S_HAS_CACHE] = torch.where(f, one, st[L.S_HAS_CACHE])
        new[L.S_LAST_COMPUTE] = torch.where(f, one, st[L.S_LAST_COMPUTE])
        new[L.S_COMPUTED] = st[L.S_COMPUTED] + f.float()
        st.copy_(new)

    def reset(self) -> None:
        self.state.zero_()
        self.fresh = True
        self.fresh_t.fill_(True)

    def start_at(self, index: int) -> None:
        self.state[L.S_STEP] = float(index)

    def tensors(self):
        return [t for t in (self.params, self.coeffs, self.state, self.prev, self.gammas, self.keep, self.fresh_t)
                if t is not None]
