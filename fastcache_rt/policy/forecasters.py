"""Forecasters: what a skipped step gets. Validated dataclasses; the runtime keeps their buffers on the device and
computes through the fused ops (``chebyshev_forecast``, ``taylor_update`` / ``taylor_forecast``,
``hermite_forecast``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._validate import check


@dataclass(frozen=True)
class Reuse:
    """Reuse the value cached at the last full step (TeaCache, FORA, FBCache, MagCache)."""

    def rows(self) -> int:
        return 1


@dataclass(frozen=True)
class Taylor:
    """TaylorSeer: finite differences D^0..D^order over the full steps, forecast ``sum_i D^i x^i / i!`` at
    ``x`` steps since the last full step."""

    order: int = 1

    def __post_init__(self):
        check(self, "order", isinstance(self.order, int) and 0 <= self.order <= 8, "an int in [0, 8]")

    def rows(self) -> int:
        return self.order + 1


@dataclass(frozen=True)
class Chebyshev:
    """Spectrum: ridge regression on a Chebyshev basis of the run's time projected onto [-1, 1], over the last
    ``history`` full steps; ``blend`` < 1 mixes in a linear extrapolation of the last two (``(1 - blend)``)."""

    degree: int = 4
    lam: float = 0.1
    blend: float = 1.0
    history: int = 16

    def __post_init__(self):
        check(self, "degree", isinstance(self.degree, int) and 0 <= self.degree <= 16, "an int in [0, 16]")
        check(self, "lam", isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0,
              "a finite number >= 0")
        check(self, "blend", isinstance(self.blend, (int, float)) and 0 <= self.blend <= 1, "a number in [0, 1]")
        check(self, "history", isinstance(self.history, int) and 1 <= self.history <= 128, "an int in [1, 128]")

    def rows(self) -> int:
        return self.history


@dataclass(frozen=True)
class FreqCa:
    """FreqCa: split the cached tensor over the token grid with an orthonormal 2-D DCT; the low band (radial index
    <= ``cutoff`` of the largest) is reused, the high band forecast with Hermite-weighted finite differences up to
    ``order`` (scale 0.71). Any H x W grid."""

    cutoff: float = 0.1
    order: int = 2
    scale: float = 0.71

    def __post_init__(self):
        check(self, "cutoff", isinstance(self.cutoff, (int, float)) and 0 <= self.cutoff <= 1, "a fraction in [0, 1]")
        check(self, "order", isinstance(self.order, int) and 0 <= self.order <= 8, "an int in [0, 8]")
        check(self, "scale", isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0,
              "a finite number > 0")

    def rows(self) -> int:
        return self.order + 2  # high-band differences + the low band


FORECASTERS = {"reuse": Reuse, "taylor": Taylor, "chebyshev": Chebyshev, "freqca": FreqCa}
