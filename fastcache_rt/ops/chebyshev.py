"""Chebyshev ridge-regression forecast (Spectrum): basis, Gram, Cholesky solve and weighted sum in one launch; and
the ring buffer's write (``history_update``) with the error the forecast of the written step would have made."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _backend
from ._common import (
    backend_name,
    check_error,
    check_float,
    check_out,
    check_same,
    check_weights,
    const_tensor,
    internal_overlap,
    rows_view,
    scalar_arg,
    scalar_value,
    update_rows,
)


def _out_like(history: torch.Tensor) -> torch.Tensor:
    return torch.empty(history.shape[1:], dtype=history.dtype, device=history.device)


@torch.library.custom_op("fastcache_rt::chebyshev_forecast", mutates_args=())
def _chebyshev_forecast_op(
    history: torch.Tensor,
    taus: torch.Tensor,
    tau_query: torch.Tensor | None,
    tau_query_value: float,
    count: torch.Tensor | None,
    count_value: int | None,
    degree: int,
    lam: float,
    blend: float,
    backend: str,
) -> torch.Tensor:
    n = history.shape[0]
    out = _out_like(history)
    _backend.get(backend).chebyshev_forecast(
        rows_view(history, n), taus, scalar_value(tau_query, tau_query_value), scalar_value(count, count_value),
        degree, lam, blend, out.view(-1),
    )
    return out


@_chebyshev_forecast_op.register_fake
def _(history, taus, tau_query, tau_query_value, count, count_value, degree, lam, blend, backend):
    return history.new_empty(history.shape[1:])


@torch.library.custom_op("fastcache_rt::chebyshev_forecast_out", mutates_args=("out",))
def _chebyshev_forecast_out_op(
    history: torch.Tensor,
    taus: torch.Tensor,
    tau_query: torch.Tensor | None,
    tau_query_value: float,
    count: torch.Tensor | None,
    count_value: int | None,
    degree: int,
    lam: float,
    blend: float,
    backend: str,
    out: torch.Tensor,
) -> None:
    _backend.get(backend).chebyshev_forecast(
        rows_view(history, history.shape[0]), taus, scalar_value(tau_query, tau_query_value),
        scalar_value(count, count_value), degree, lam, blend, out.view(-1),
    )


@_chebyshev_forecast_out_op.register_fake
def _(history, taus, tau_query, tau_query_value, count, count_value, degree, lam, blend, backend, out):
    return None


@torch.library.custom_op("fastcache_rt::chebyshev_weights", mutates_args=())
def _chebyshev_weights_op(
    taus: torch.Tensor,
    tau_query: torch.Tensor | None,
    tau_query_value: float,
    count: torch.Tensor | None,
    count_value: int | None,
    degree: int,
    lam: float,
    blend: float,
    backend: str,
) -> torch.Tensor:
    out = torch.empty(taus.shape[0], dtype=torch.float32, device=taus.device)
    _backend.get(backend).chebyshev_weights(
        taus, scalar_value(tau_query, tau_query_value), scalar_value(count, count_value), degree, lam, blend, out
    )
    return out


@_chebyshev_weights_op.register_fake
def _(taus, tau_query, tau_query_value, count, count_value, degree, lam, blend, backend):
    return taus.new_empty((taus.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastcache_rt::history_update", mutates_args=("history", "error"))
def _history_update_op(
    history: torch.Tensor,
    value: torch.Tensor,
    row: torch.Tensor | None,
    row_value: int | None,
    weights: torch.Tensor,
    count: torch.Tensor | None,
    count_value: int | None,
    backend: str,
    error: torch.Tensor | None,
) -> None:
    h2, direct = update_rows(history)
    _backend.get(backend).history_update(
        h2, value.reshape(h2.shape[1]), scalar_value(row, row_value), weights, scalar_value(count, count_value),
        error,
    )
    if not direct:
        history.copy_(h2.view(history.shape))


@_history_update_op.register_fake
def _(history, value, row, row_value, weights, count, count_value, backend, error):
    return None


# The largest degree taken: the ridge solve is (degree + 1)^2 per call and Spectrum uses 4; beyond this the basis
# is ill-conditioned in float64 anyway.
MAX_DEGREE = 64
# Projected time: a run spans [-1, 1]; |T_m(tau)| grows as (2 |tau|)^m outside it, so a query far outside overflows
# float32 (a forecast of non-finite values). Queries are refused beyond this.
MAX_ABS_TAU = 1e3


def _check_common(taus, tau_query, count, degree, lam, blend, n, device, validate):
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise TypeError(f"degree: expected an int, got {type(degree).__name__}")
    if not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"degree: must be in [0, {MAX_DEGREE}], got {degree}")
    for name, v in (("lam", lam), ("blend", blend)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name}: must be finite, got {v}")
    if lam < 0:
        raise ValueError(f"lam: must be >= 0, got {lam}")
    if isinstance(taus, torch.Tensor):
        if not taus.dtype.is_floating_point:
            raise TypeError(f"taus: expected a float tensor, got {taus.dtype}")
        if taus.device != device:
            raise ValueError(f"taus: on {taus.device}, but the data is on {device}")
        if taus.dim() != 1:
            raise ValueError(f"taus: expected shape (n,), got {tuple(taus.shape)}")
        taus_t = taus.to(torch.float32).contiguous()
    else:
        if isinstance(taus, (str, bytes)):
            raise TypeError("taus: expected a tensor or a sequence of numbers")
        try:
            vals = tuple(float(t) for t in taus)
        except (TypeError, ValueError):
            raise TypeError("taus: expected a tensor or a sequence of numbers") from None
        if not vals:
            raise ValueError("taus: n = 0, need at least one history row")
        if any(math.isnan(v) for v in vals):
            raise ValueError("taus: contains NaN")
        taus_t = const_tensor("taus", vals, torch.float32, device)
    if taus_t.shape[0] == 0:
        raise ValueError("taus: n = 0, need at least one history row")
    if n is not None and taus_t.shape[0] != n:
        raise ValueError(f"taus: has {taus_t.shape[0]} entries, history has {n} rows")
    q = scalar_arg("tau_query", tau_query, device, torch.float32)
    if q[0] is None and abs(q[1]) > MAX_ABS_TAU:
        raise ValueError(f"tau_query: must be within [-{MAX_ABS_TAU:g}, {MAX_ABS_TAU:g}] (projected time: the run spans "
                         f"[-1, 1]), got {tau_query!r}")
    cnt = (None, None)
    if count is not None:
        if isinstance(count, int) and not isinstance(count, bool) and count < 1:
            raise ValueError(f"count: must be >= 1 (valid history rows), got {count}")
        cnt = scalar_arg("count", count, device, torch.int64)
    # Value checks read device data; run them where that costs no sync (CPU) or when asked (validate=True).
    if validate and not torch.compiler.is_compiling():
        n_rows = taus_t.shape[0]
        c = n_rows if count is None else int(count)
        if c < 1:
            raise ValueError(f"count: must be >= 1 (valid history rows), got {c}")
        n_valid = min(c, n_rows)
        if not bool(torch.isfinite(taus_t[:n_valid]).all()):
            raise ValueError("taus: contains NaN or Inf among the valid rows")
        if q[0] is not None and not bool(q[0].abs() <= MAX_ABS_TAU):
            raise ValueError(f"tau_query: must be finite and within [-{MAX_ABS_TAU:g}, {MAX_ABS_TAU:g}]")
    return taus_t, q, cnt


def chebyshev_forecast(
    history: torch.Tensor,
    taus: torch.Tensor | Sequence[float],
    tau_query: float | torch.Tensor,
    degree: int = 4,
    lam: float = 0.1,
    *,
    count: int | torch.Tensor | None = None,
    blend: float = 1.0,
    validate: bool | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Ridge-regression Chebyshev forecast of a feature trajectory (Spectrum).

    With ``Phi[j, m] = T_m(taus[j])`` (m = 0..degree) over the valid rows, ``w = Phi (Phi^T Phi + lam I)^-1
    phi(tau_query)`` and the result is ``sum_j w_j history[j]`` (fp32 accumulation, history's dtype); with ``blend``
    < 1 the result is ``blend * that + (1 - blend) * linear`` (see below). Basis, Gram matrix, Cholesky solve and
    the weighted sum run in one launch.

    Args:
        history: ``(n, ...)`` features at times ``taus``, float32/float16/bfloat16, any strides; may be a
            preallocated ring buffer.
        taus: ``(n,)`` times projected onto [-1, 1]: a float tensor on history's device or a sequence of numbers
            (uploaded once per value and stream, then cached).
        tau_query: the time to forecast: a number (a kernel argument, never uploaded) or a one-element tensor on
            the device (read by the kernel).
        degree: highest Chebyshev degree M (may exceed n - 1: the ridge keeps the system solvable).
        lam: ridge strength >= 0 (0 falls back to a 1e-6 * mean(diag) jitter when the Gram matrix is singular).
        count: valid rows = rows ``j < min(count, n)`` (int or int64 device tensor; None = all n). Other rows are
            not read.
        blend: 1.0 = pure Chebyshev; w < 1 mixes in ``(1 - w)`` of the linear extrapolation from the two valid rows
            with the largest tau (Spectrum's blend).
        validate: check NaN taus / count range on the data (one host read if on an accelerator). Default: only when
            the data is on the CPU.
        out: write the result here (shape ``history.shape[1:]``, same dtype and device, not overlapping
            ``history``) and return it; saves allocating a feature-sized tensor per call.
        backend: as ``band_l1``.

    Returns:
        ``history.shape[1:]`` in history's dtype (``out`` when given).

    Reduction: a weighted sum over dim 0 (the valid rows) for every element of a row, in fp32 (run to run bitwise;
    ``cuda`` adds the rows in order, ``triton`` sums a tile's rows in a tree its compiler picks); elementwise along
    the feature, so a shard of the feature (a rank's tokens) forecasts its own shard.

    Capture / compile: registered as ``torch.ops.fastcache_rt.chebyshev_forecast`` (and
    ``chebyshev_forecast_out``, which mutates ``out``, when ``out=`` is given), with fake kernels:
    ``torch.compile(fullgraph=True)`` traces it as one node. No host sync unless ``validate`` reads an accelerator
    tensor (off by default there); capturable in a CUDA graph with ``tau_query`` / ``count`` as numbers or device
    tensors.

    Example::

        >>> history = torch.stack([1 + 2 * t * torch.ones(3) for t in (-1.0, -0.5, 0.0)])   # f(t) = 1 + 2t
        >>> ops.chebyshev_forecast(history, [-1.0, -0.5, 0.0], 0.5, degree=1, lam=0.0)      # f(0.5)
        tensor([2., 2., 2.])
    """
    check_float("history", history)
    if history.dim() < 1 or history.shape[0] == 0:
        raise ValueError("history: expected shape (n, ...) with n >= 1")
    dev = history.device
    if validate is None:
        validate = dev.type == "cpu"
    taus_t, q, cnt = _check_common(taus, tau_query, count, degree, lam, blend, history.shape[0], dev, validate)
    if out is not None:
        if check_out(out, "history", history):
            _chebyshev_forecast_out_op(history, taus_t, *q, *cnt, degree, float(lam), float(blend),
                                       backend_name(dev, backend), out)
            return out
        return out.copy_(_chebyshev_forecast_op(history, taus_t, *q, *cnt, degree, float(lam), float(blend),
                                                backend_name(dev, backend)))
    return _chebyshev_forecast_op(
        history, taus_t, *q, *cnt, degree, float(lam), float(blend), backend_name(dev, backend)
    )


def chebyshev_weights(
    taus: torch.Tensor | Sequence[float],
    tau_query: float | torch.Tensor,
    degree: int = 4,
    lam: float = 0.1,
    *,
    count: int | torch.Tensor | None = None,
    blend: float = 1.0,
    validate: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The weights ``w`` (float32, ``(n,)``) of ``chebyshev_forecast``: the forecast is ``sum_j w_j history[j]``.

    ``w = Phi (Phi^T Phi + lam I)^-1 phi(tau_query)`` with ``Phi[j, m] = T_m(taus[j])`` over the valid rows, blended
    with the linear extrapolation's weights when ``blend`` < 1. Zero for rows beyond ``count``; NaN if no row is
    valid. Arguments as ``chebyshev_forecast``; result of shape ``(n,)`` on ``taus``' device (the CPU for a
    sequence, unless ``tau_query`` is a device tensor).

    Reduction: none across data (it reads only ``taus``): a small solve of size ``degree + 1`` in float32.

    Capture / compile: registered as ``torch.ops.fastcache_rt.chebyshev_weights`` with a fake kernel; traced by
    ``torch.compile(fullgraph=True)``; no host sync (unless ``validate`` on an accelerator); capturable.

    Example::

        >>> ops.chebyshev_weights([-1.0, 0.0, 1.0], 0.5, degree=1, lam=0.0)   # least-squares line at 0.5
        tensor([0.0833, 0.3333, 0.5833])
    """
    dev = taus.device if isinstance(taus, torch.Tensor) else (
        tau_query.device if isinstance(tau_query, torch.Tensor) else torch.device("cpu")
    )
    if validate is None:
        validate = dev.type == "cpu"
    taus_t, q, cnt = _check_common(taus, tau_query, count, degree, lam, blend, None, dev, validate)
    return _chebyshev_weights_op(taus_t, *q, *cnt, degree, float(lam), float(blend), backend_name(dev, backend))


def history_update(
    history: torch.Tensor,
    value: torch.Tensor,
    row: int | torch.Tensor,
    *,
    weights: torch.Tensor,
    count: int | torch.Tensor | None = None,
    error: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Write a computed step into a ring-buffer history, ``history[row] = value``, and, with ``error=``, in the same
    pass the error the forecast of this step from the history before the write would have made (Spectrum's
    error control).

    Args:
        history: ``(n, ...)`` ring buffer, float32/float16/bfloat16, any strides, modified in place (row ``row``).
        value: the computed step, shape ``history.shape[1:]``, same dtype and device, any strides; copied bit for
            bit.
        row: the slot to write, ``0 <= row < n``: an int or an int64 one-element tensor on the device (a device
            tensor is not range-checked on an accelerator, that would be a sync: out of range, no row is written).
        weights: float32 ``(n,)`` on the device: the forecast of this step from the old rows, e.g.
            ``ops.chebyshev_weights(taus_old, tau_new, ...)``; read only for rows ``k < count``.
        count: valid rows before this call (rows ``k >= count`` are never read; they may hold garbage): an int
            >= 0 or an int64 device tensor; None = all n.
        error: float32 ``(B, 2)``, contiguous, on the device (B = ``value.shape[0]``; 1 for a 1-D value), written:
            ``error[b, 0] = sum (pred - value)^2`` and ``error[b, 1] = sum value^2`` over sample b's elements, with
            ``pred = sum_{k < min(count, n)} weights[k] * history[k]`` read before the write (0 when count is 0).
        backend: as ``band_l1``.

    Returns None (``history`` holds the new row; ``error`` the sums).

    Reduction (``error=`` only): ``pred`` in fp32 with the rows added in order (bitwise the same on every backend),
    each term in fp32, summed in float64 over a partition of each sample fixed by the size (never the thread or SM
    count), the chunks added in order, rounded once to float32: bitwise run to run and across thread counts;
    backends agree with the reference to about one float32 ulp (tested at rtol 1e-6). NaN / Inf propagate into the
    sums. A rank's shard gives its shard's sums.

    Capture / compile: registered as ``torch.ops.fastcache_rt.history_update`` (``mutates_args=("history",
    "error")``) with a fake kernel; traced by ``torch.compile(fullgraph=True)`` (functionalized); no host sync;
    capturable in a CUDA graph (one launch; with ``error`` the partial sums go to a per-stream workspace that the
    launch's last program reduces).

    Example::

        >>> history = torch.tensor([[1., 1.], [2., 2.], [9., 9.]])    # rows 0, 1 valid; row 2 is free
        >>> err = torch.empty(1, 2)
        >>> w = torch.tensor([-1.0, 2.0, 0.0])                        # linear extrapolation: 2 * 2 - 1 = 3
        >>> ops.history_update(history, torch.tensor([3., 4.]), 2, weights=w, count=2, error=err)
        >>> history[2], err                                           # ((3 - 3)^2 + (3 - 4)^2, 3^2 + 4^2)
        (tensor([3., 4.]), tensor([[ 1., 25.]]))
    """
    check_float("history", history)
    if history.dim() < 1 or history.shape[0] == 0:
        raise ValueError("history: expected shape (n, ...) with n >= 1")
    check_float("value", value)
    check_same("history", history, "value", value, shape=False)
    if tuple(value.shape) != tuple(history.shape[1:]):
        raise ValueError(f"value: shape {tuple(value.shape)} does not match history's rows {tuple(history.shape[1:])}")
    if not torch.compiler.is_compiling() and internal_overlap(history):
        raise ValueError("history: its elements overlap in memory (an expanded or stride-0 view); pass a buffer "
                         "that owns its memory (e.g. history.contiguous())")
    n = history.shape[0]
    dev = history.device
    if isinstance(row, torch.Tensor):
        r = scalar_arg("row", row, dev, torch.int64)
        if dev.type == "cpu" and not torch.compiler.is_compiling() and not 0 <= int(r[0]) < n:
            raise ValueError(f"row: must be in [0, {n}), got {int(r[0])}")
    else:
        if isinstance(row, bool) or not isinstance(row, int):
            raise TypeError(f"row: expected an int or an int64 tensor, got {type(row).__name__}")
        if not 0 <= row < n:
            raise ValueError(f"row: must be in [0, {n}), got {row}")
        r = (None, int(row))
    w = check_weights("weights", weights, n, "history", dev)
    cnt = (None, None)
    if count is not None:
        if isinstance(count, int) and not isinstance(count, bool) and count < 0:
            raise ValueError(f"count: must be >= 0, got {count}")
        cnt = scalar_arg("count", count, dev, torch.int64)
    if error is not None:
        check_error(error, "value", value, (("history", history), ("value", value), ("weights", w)))
    _history_update_op(history, value, *r, w, *cnt, backend_name(dev, backend), error)
