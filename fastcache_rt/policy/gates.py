"""Gates: when to run the transformer. Validated dataclasses; the runtime turns each into device-side logic.

Every gate decides on the device and keeps its state on the device. Schedule gates (every step, fixed interval,
Spectrum's adaptive interval) are a precomputed boolean mask over the run's steps; signal gates (TeaCache,
SpectralCache, FBCache) go through the fused ``gate_step`` op; MagCache through its calibrated ratio table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._validate import check, check_coeffs

FLUX_TEACACHE_COEFFS = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)


@dataclass(frozen=True)
class EveryStep:
    """Run the transformer at every step (no caching): the baseline."""

    kind = "schedule"

    def schedule(self, num_steps: int) -> list[bool]:
        return [True] * num_steps


@dataclass(frozen=True)
class FixedInterval:
    """Run the first ``warmup`` steps, then one step in every ``interval`` (FORA; TaylorSeer and FreqCa with
    warm-up 3): full iff ``s < warmup or (s - warmup + 1) % interval == 0``."""

    interval: int = 3
    warmup: int = 1
    kind = "schedule"

    def __post_init__(self):
        check(self, "interval", isinstance(self.interval, int) and self.interval >= 1, "an int >= 1")
        check(self, "warmup", isinstance(self.warmup, int) and self.warmup >= 1, "an int >= 1 (step 0 must run)")

    def schedule(self, num_steps: int) -> list[bool]:
        return [s < self.warmup or (s - self.warmup + 1) % self.interval == 0 for s in range(num_steps)]


@dataclass(frozen=True)
class SpectrumSchedule:
    """Spectrum's adaptive interval: ``warmup`` full steps, then gaps ``floor(interval + j * alpha)``, j = 0, 1, ...
    50 steps, interval 2, alpha 0.75, warm-up 5 -> 14 full steps; alpha 3.0 -> 10."""

    interval: float = 2.0
    alpha: float = 0.75
    warmup: int = 5
    kind = "schedule"

    def __post_init__(self):
        check(self, "interval", isinstance(self.interval, (int, float)) and self.interval >= 1, "a number >= 1")
        check(self, "alpha", isinstance(self.alpha, (int, float)) and self.alpha >= 0 and math.isfinite(self.alpha),
              "a finite number >= 0")
        check(self, "warmup", isinstance(self.warmup, int) and self.warmup >= 1, "an int >= 1")

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


@dataclass(frozen=True)
class TeaCacheGate:
    """TeaCache: relative L1 change of the modulated input (first block's norm1), rescaled by a per-model polynomial
    (highest power first) and accumulated; compute when the sum reaches ``threshold``. First and last steps run."""

    threshold: float = 0.6
    coeffs: tuple[float, ...] = FLUX_TEACACHE_COEFFS
    kind = "signal"
    probe = "modulated"

    def __post_init__(self):
        check(self, "threshold", _pos(self.threshold), "a finite number > 0")
        object.__setattr__(self, "coeffs", check_coeffs(self, "coeffs", self.coeffs))


@dataclass(frozen=True)
class SpectralCacheGate:
    """SpectralCache: the TeaCache gate plus TADS (cosine-bell threshold scale ``tads`` = (s_min, s_max)),
    CEB (at most ``max_cached`` consecutive cached steps) and FDC (channel split at ``split`` * D with per-band
    threshold multipliers ``gammas``)."""

    threshold: float = 0.6
    coeffs: tuple[float, ...] = FLUX_TEACACHE_COEFFS
    tads: tuple[float, float] = (0.5, 1.5)
    max_cached: int = 2
    split: float = 0.5
    gammas: tuple[float, float] = (0.8, 1.5)
    kind = "signal"
    probe = "modulated"

    def __post_init__(self):
        check(self, "threshold", _pos(self.threshold), "a finite number > 0")
        object.__setattr__(self, "coeffs", check_coeffs(self, "coeffs", self.coeffs))
        t = tuple(self.tads)
        check(self, "tads", len(t) == 2 and all(_pos(v) for v in t) and t[0] <= t[1], "(s_min, s_max), 0 < s_min <= s_max")
        object.__setattr__(self, "tads", (float(t[0]), float(t[1])))
        check(self, "max_cached", isinstance(self.max_cached, int) and self.max_cached >= 1, "an int >= 1")
        check(self, "split", isinstance(self.split, (int, float)) and 0 < self.split < 1, "a fraction in (0, 1)")
        g = tuple(self.gammas)
        check(self, "gammas", len(g) == 2 and all(_pos(v) for v in g), "two finite numbers > 0")
        object.__setattr__(self, "gammas", (float(g[0]), float(g[1])))


@dataclass(frozen=True)
class FBCacheGate:
    """First-block cache (FBCache / DBCache F1B0): run the first ``blocks`` blocks every step; skip the rest when the
    relative L1 change of their residual against the last computed step is below ``threshold``."""

    threshold: float = 0.05
    blocks: int = 1
    kind = "signal"
    probe = "first_blocks"

    def __post_init__(self):
        check(self, "threshold", _pos(self.threshold), "a finite number > 0")
        check(self, "blocks", isinstance(self.blocks, int) and self.blocks >= 1, "an int >= 1")


@dataclass(frozen=True)
class MagCacheGate:
    """MagCache: calibrated per-step magnitude ratios of the residual; ``ratio *= gamma_s``, ``err += |1 - ratio|``;
    skip while ``err <= threshold`` and at most ``max_skip`` steps since the last full one; the first
    ``round(retention * S)`` steps run. ``ratios`` come from a calibration run (``calibrate=True`` computes every
    step and leaves the measured ratios in ``fastcache_rt.stats(target)["mag_ratios"]``) and are interpolated
    (nearest) to the run's step count."""

    threshold: float = 0.24
    max_skip: int = 5
    retention: float = 0.1
    ratios: tuple[float, ...] | None = None
    calibrate: bool = False
    kind = "magcache"

    def __post_init__(self):
        check(self, "threshold", _pos(self.threshold), "a finite number > 0")
        check(self, "max_skip", isinstance(self.max_skip, int) and self.max_skip >= 1, "an int >= 1")
        check(self, "retention", isinstance(self.retention, (int, float)) and 0 <= self.retention < 1,
              "a fraction in [0, 1)")
        if self.ratios is not None:
            r = tuple(float(v) for v in self.ratios)
            check(self, "ratios", len(r) >= 1 and all(math.isfinite(v) and v > 0 for v in r),
                  "a non-empty sequence of finite numbers > 0")
            object.__setattr__(self, "ratios", r)
        check(self, "calibrate", isinstance(self.calibrate, bool), "a bool")

    def table(self, num_steps: int) -> list[float]:
        if self.ratios is None:
            raise ValueError("MagCacheGate.ratios: MagCache needs calibrated ratios; run one generation with "
                             "calibrate=True and pass stats(target)['mag_ratios'] as ratios=...")
        src = self.ratios
        if len(src) == num_steps:
            return list(src)
        if num_steps == 1:
            return [src[-1]]
        scale = (len(src) - 1) / (num_steps - 1)
        return [src[int(math.floor(i * scale + 0.5))] for i in range(num_steps)]


def _pos(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


GATES = {
    "every": EveryStep,
    "interval": FixedInterval,
    "spectrum": SpectrumSchedule,
    "teacache": TeaCacheGate,
    "spectralcache": SpectralCacheGate,
    "fbcache": FBCacheGate,
    "magcache": MagCacheGate,
}
