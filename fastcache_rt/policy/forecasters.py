"""Forecasters: what a skipped step gets. Each is a validated config dataclass (deriving from ``Forecaster``,
registered by name with ``@register_forecaster``) with ``make_state(spec: StreamSpec)`` returning its device state
(``spec.shape``: the cached site tensor, this rank's tokens under context parallelism; ``spec.grid``: the whole token
grid; ``spec.shard``: a ``fastcache_rt.parallel.Shard`` or None), which implements:

    record(st, value, compute)  after the branch: remember this step's site value; ``compute`` is a host True
                                (eager: called only on computed steps) or a device bool (compiled: the write is
                                masked by it, touching only the rows it would change)
    predict(st) -> tensor       the site value for the current step (``st.step`` / ``st.last_full`` on the device)
    uses_step                   reads ``st.step`` / ``st.last_full`` (else eager mode need not advance them)
    reset()                     a new generation
    tensors()                   device memory held (for ``cache_bytes``)
    track_error()               from now on ``record`` also measures, on each computed step, the error the forecast
                                of that step from the history before it would have had: ``error`` (float32
                                (B, 2) on the device: per sample, the sum of squared differences and the sum of
                                squares of the computed value), fused into the update (no extra pass)

The math runs in the fused ops (``chebyshev_forecast``, ``taylor_update`` / ``taylor_forecast``,
``hermite_forecast``). A new forecaster is one class (and its test)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import typing

from .. import ops
from ..ops import _reference as _ref
from ._validate import check, is_int, is_number
from .spec import Registry, StreamSpec
from .spec import masked as _masked
from .spec import masked_write_

FORECASTERS = Registry("forecaster")
register_forecaster = FORECASTERS.register


class Forecaster:
    """Base of the forecasters: ``name`` (its key in policy files, ``@register_forecaster``) and
    ``make_state(spec)``."""

    name: typing.ClassVar[str] = ""
    uses_grid: typing.ClassVar[bool] = False  # its state depends on the token grid (a new grid: a new stream)

    def make_state(self, spec: StreamSpec):
        raise NotImplementedError

    def error_order(self) -> int:
        """``p``: the error of a forecast over a gap of ``h`` steps grows about as ``h^(p + 1)`` (the exponent of
        the error controller, ``ErrorControl``)."""
        return 1


@register_forecaster
@dataclass(frozen=True)
class Reuse(Forecaster):
    """Reuse the value cached at the last full step (TeaCache, FORA, FBCache, MagCache)."""

    name = "reuse"

    def error_order(self) -> int:
        return 0

    def make_state(self, spec: StreamSpec):
        return ReuseState(spec.shape, spec.dtype, spec.device)


@register_forecaster
@dataclass(frozen=True)
class Taylor(Forecaster):
    """TaylorSeer: finite differences D^0..D^order over the full steps, forecast ``sum_i D^i x^i / i!`` at
    ``x`` steps since the last full step."""

    order: int = 1
    name = "taylor"

    def __post_init__(self):
        check(self, "order", is_int(self.order) and 0 <= self.order <= 8, "an int in [0, 8]")

    def make_state(self, spec: StreamSpec):
        return TaylorState(self.order, spec.shape, spec.dtype, spec.device)

    def error_order(self) -> int:
        return self.order


@register_forecaster
@dataclass(frozen=True)
class Chebyshev(Forecaster):
    """Spectrum: ridge regression on a Chebyshev basis of the run's time projected onto [-1, 1], over the last
    ``history`` full steps; ``blend`` < 1 mixes in a linear extrapolation of the last two (``(1 - blend)``)."""

    degree: int = 4
    lam: float = 0.1
    blend: float = 1.0
    history: int = 16
    name = "chebyshev"

    def __post_init__(self):
        check(self, "degree", is_int(self.degree) and 0 <= self.degree <= 16, "an int in [0, 16]")
        check(self, "lam", is_number(self.lam) and self.lam >= 0, "a finite number >= 0")
        check(self, "blend", is_number(self.blend) and 0 <= self.blend <= 1, "a number in [0, 1]")
        check(self, "history", is_int(self.history) and 1 <= self.history <= 128, "an int in [1, 128]")

    def make_state(self, spec: StreamSpec):
        return ChebyshevState(self, spec.shape, spec.dtype, spec.device, spec.num_steps)


@register_forecaster
@dataclass(frozen=True)
class FreqCa(Forecaster):
    """FreqCa: split the cached tensor over the token grid with an orthonormal DCT (2-D over height x width for
    images, 3-D over frames x height x width for video); the low band (radial index <= ``cutoff`` of the largest)
    is reused, the high band forecast with Hermite-weighted finite differences up to ``order`` (scale 0.71)."""

    cutoff: float = 0.1
    order: int = 2
    scale: float = 0.71
    name = "freqca"
    uses_grid = True

    def __post_init__(self):
        check(self, "cutoff", is_number(self.cutoff) and 0 <= self.cutoff <= 1, "a fraction in [0, 1]")
        check(self, "order", is_int(self.order) and 0 <= self.order <= 8, "an int in [0, 8]")
        check(self, "scale", is_number(self.scale) and self.scale > 0, "a finite number > 0")

    def make_state(self, spec: StreamSpec):
        return FreqCaState(self, spec.shape, spec.dtype, spec.device, spec.grid, spec.shard)

    def error_order(self) -> int:
        return self.order


# ---------------------------------------------------------------------------------------------------------------
# states
# ---------------------------------------------------------------------------------------------------------------


def _samples(shape) -> int:
    return int(shape[0]) if len(shape) > 1 else 1


class _Tracked:
    """The error measurement every forecaster state shares (``track_error`` / ``error``)."""

    error: torch.Tensor | None = None

    def track_error(self) -> None:
        if self.error is None:
            t = self.tensors()[0]
            self.error = torch.zeros((_samples(self.shape), 2), dtype=torch.float32, device=t.device)


class ReuseState(_Tracked):
    uses_step = False

    def __init__(self, shape, dtype, device):
        self.shape = tuple(shape)
        self.buf = torch.zeros(shape, dtype=dtype, device=device)

    def record(self, st, v, compute) -> None:
        if self.error is None:
            masked_write_(self.buf, v, compute)
        else:  # the write and the error of reusing the old value, in one pass
            ops.history_update(self.buf.unsqueeze(0), _masked(compute, v, self.buf), 0, weights=self.one,
                               error=self.error)

    def track_error(self) -> None:
        super().track_error()
        self.one = torch.ones(1, dtype=torch.float32, device=self.buf.device)

    def predict(self, st) -> torch.Tensor:
        return self.buf

    def reset(self) -> None:
        pass

    def tensors(self):
        return [self.buf]


class TaylorState(_Tracked):
    uses_step = True
    weights = staticmethod(lambda K, x, fc: _ref.taylor_weights(K, x, x.device))

    def __init__(self, order: int, shape, dtype, device):
        self.shape = tuple(shape)
        self.fc = None
        self.K = order + 1
        self.diffs = torch.zeros((self.K, *shape), dtype=dtype, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def _update(self, diffs, v, st, compute) -> None:
        gap = (st.step - st.last_full).clamp(min=1).float()
        # with the error tracked, the same pass measures the forecast of this step from the differences before it
        err = {} if self.error is None else {"error": self.error, "error_weights": self.weights(self.K, gap, self.fc)}
        if compute is True:
            ops.taylor_update(diffs, v, gap, count=self.count, **err)
        else:  # masked: the K difference rows are the whole state (K = order + 1, small)
            new = diffs.clone()
            ops.taylor_update(new, v, gap, count=self.count, **err)
            masked_write_(diffs, new, compute)
        self.count.copy_(_masked(compute, (self.count + 1).clamp(max=self.K), self.count))

    def record(self, st, v, compute) -> None:
        self._update(self.diffs, v, st, compute)

    def predict(self, st) -> torch.Tensor:
        return ops.taylor_forecast(self.diffs, (st.step - st.last_full).float())

    def reset(self) -> None:
        self.count.zero_()

    def tensors(self):
        return [self.diffs, self.count]


class ChebyshevState(_Tracked):
    """A ring buffer of the last ``history`` full steps' values and their times; the forecast is one fused op."""

    uses_step = True

    def __init__(self, fc: Chebyshev, shape, dtype, device, num_steps: int):
        self.fc = fc
        self.shape = tuple(shape)
        self.cap = min(fc.history, num_steps)
        self.hist = torch.zeros((self.cap, *shape), dtype=dtype, device=device)
        self.taus = torch.zeros(self.cap, dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        # the map of the run's step range onto [-1, 1], as device scalars: a Python float that changes with the step
        # count would reach torch.compile as a SymFloat, which a torch.cond operand cannot be
        scale = 2.0 / (num_steps - 1) if num_steps > 1 else 0.0
        self.scale = torch.tensor(scale, dtype=torch.float32, device=device)
        self.shift = torch.tensor(1.0 if scale else 0.0, dtype=torch.float32, device=device)

    def tau(self, step: torch.Tensor) -> torch.Tensor:
        # the run's own step range mapped onto [-1, 1]
        return step.float() * self.scale - self.shift

    def record(self, st, v, compute) -> None:
        row = (self.count % self.cap).view(1)
        # masked by the decision: one row is written (with itself when not computing), never the whole history
        new = _masked(compute, v, self.hist.index_select(0, row)[0])
        if self.error is None:
            self.hist.index_copy_(0, row, new.unsqueeze(0))
        else:  # the write and the error of this step's forecast from the history before it, in one pass
            fc = self.fc
            w = ops.chebyshev_weights(self.taus, self.tau(st.step), fc.degree, fc.lam, count=self.count.clamp(min=1),
                                      blend=fc.blend, validate=False)
            ops.history_update(self.hist, new, row.view(()), weights=w, count=self.count.clamp(max=self.cap),
                               error=self.error)
        self.taus.index_copy_(0, row, _masked(compute, self.tau(st.step), self.taus.index_select(0, row)[0]).view(1))
        self.count.add_(1 if compute is True else compute.long())

    def predict(self, st) -> torch.Tensor:
        fc = self.fc
        cnt = self.count.clamp(min=1)  # before the first record the prediction is unused (and finite)
        return ops.chebyshev_forecast(self.hist, self.taus, self.tau(st.step), fc.degree, fc.lam, count=cnt,
                                      blend=fc.blend, validate=False)

    def reset(self) -> None:
        self.count.zero_()

    def tensors(self):
        return [self.hist, self.taus, self.count, self.scale, self.shift]


def dct_matrix(n: int, device, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix C (n x n): X = C x."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(device=device, dtype=dtype)


class FreqCaState(_Tracked):
    """Low band of the token grid's orthonormal DCT (radial index <= cutoff * max over (frames, height, width))
    reused; high band forecast with Hermite-weighted differences. The DCT is separable: one small matrix per grid
    axis, applied along that axis (a 2-D image grid is the case frames = 1)."""

    uses_step = True

    def __init__(self, fc: FreqCa, shape, dtype, device, grid, shard=None):
        # under context parallelism this rank holds a contiguous 1/N of the tokens; the DCT runs over the whole grid
        # for 1/N of the channels (one all-to-all each way): exactly the single-process low band
        N = shape[-2] * (shard.size if shard is not None else 1)
        if grid is None:
            side = int(round(math.sqrt(N)))
            if side * side != N:
                raise ValueError(f"FreqCa needs the token grid for {N} tokens; pass grid=(H, W) or (F, H, W) to "
                                 "enable()")
            grid = (1, side, side)
        grid = tuple(int(g) for g in grid)
        if len(grid) == 2:
            grid = (1, *grid)
        if math.prod(grid) != N:
            raise ValueError(f"grid: {' x '.join(map(str, grid))} != {N} tokens")
        self.fc, self.grid, self.shard = fc, grid, shard
        self.shape = tuple(shape)
        self.K = fc.order + 1
        self.low = torch.zeros(shape, dtype=dtype, device=device)
        self.diffs = torch.zeros((self.K, *shape), dtype=dtype, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.mats = [dct_matrix(n, device) for n in grid]
        axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij")
        radius = torch.sqrt(sum(a * a for a in axes))
        self.mask = (radius <= fc.cutoff * radius.max()).to(torch.float32).to(device)

    def lowpass(self, v: torch.Tensor) -> torch.Tensor:
        sh = self.shard
        if sh is None:
            return self._lowpass(v)
        lead = v.shape[:-2]
        x = v.reshape(-1, *v.shape[-2:])
        if x.shape[-1] % sh.size == 0:  # the whole grid for this rank's slice of the channels
            lo = sh.channels_to_tokens(self._lowpass(sh.tokens_to_channels(x)))
        else:  # channels that do not split evenly: every rank filters the whole tensor and keeps its tokens
            lo = sh.own_tokens(self._lowpass(sh.gather_tokens(x)))
        return lo.reshape(*lead, *lo.shape[-2:])

    def _lowpass(self, v: torch.Tensor) -> torch.Tensor:
        F, H, W = self.grid
        lead = v.shape[:-2]
        x = v.float().reshape(-1, F, H, W, v.shape[-1])
        x = self._along(x, False) * self.mask[None, ..., None]  # the spectrum, low band kept
        return self._along(x, True).reshape(*lead, F * H * W, v.shape[-1]).to(v.dtype)

    def _along(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """The separable DCT (or its inverse), one grid axis at a time; axes of length 1 are the identity."""
        for axis, c in zip((1, 2, 3), self.mats):
            if c.shape[0] == 1:
                continue
            x = torch.tensordot(c.t() if inverse else c, x.movedim(axis, 0), dims=1).movedim(0, axis)
        return x

    weights = staticmethod(lambda K, x, fc: _ref.hermite_weights(K, x, fc.scale, x.device))

    def record(self, st, v, compute) -> None:
        lo = self.lowpass(v)
        if self.error is not None:
            # the low and high bands are orthogonal (an orthonormal DCT's complementary bands), so the squared
            # error of the whole forecast is the reused low band's change plus the high band's forecast error
            B = self.error.shape[0]
            drift, mag = (self.low - lo).float().reshape(B, -1), lo.float().reshape(B, -1)
            low_sums = torch.stack(((drift * drift).sum(1), (mag * mag).sum(1)), dim=1)
        masked_write_(self.low, lo, compute)
        TaylorState._update(self, self.diffs, v - lo, st, compute)  # (the high band's sums, fused)
        if self.error is not None:
            self.error.add_(low_sums)

    def predict(self, st) -> torch.Tensor:
        x = (st.step - st.last_full).float()
        return self.low + ops.hermite_forecast(self.diffs, x, scale=self.fc.scale)

    def reset(self) -> None:
        self.count.zero_()

    def tensors(self):
        return [self.low, self.diffs, self.count, self.mask, *self.mats]
