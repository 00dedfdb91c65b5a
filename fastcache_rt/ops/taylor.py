"""Taylor (TaylorSeer) and Hermite (FreqCa high band) forecasts from finite differences, and their update (with the
error the forecast of the new step would have made, ``error=``)."""

from __future__ import annotations

import math

import torch

from . import _backend
from ._common import (
    backend_name,
    check_error,
    check_float,
    check_out,
    check_same,
    check_weights,
    internal_overlap,
    rows_view,
    scalar_arg,
    scalar_value,
    update_rows,
)


@torch.library.custom_op("fastcache_rt::taylor_forecast", mutates_args=())
def _taylor_forecast_op(
    diffs: torch.Tensor, distance: torch.Tensor | None, distance_value: float, backend: str
) -> torch.Tensor:
    out = torch.empty(diffs.shape[1:], dtype=diffs.dtype, device=diffs.device)
    _backend.get(backend).taylor_forecast(
        rows_view(diffs, diffs.shape[0]), scalar_value(distance, distance_value), out.view(-1)
    )
    return out


@_taylor_forecast_op.register_fake
def _(diffs, distance, distance_value, backend):
    return diffs.new_empty(diffs.shape[1:])


@torch.library.custom_op("fastcache_rt::hermite_forecast", mutates_args=())
def _hermite_forecast_op(
    diffs: torch.Tensor, distance: torch.Tensor | None, distance_value: float, scale: float, backend: str
) -> torch.Tensor:
    out = torch.empty(diffs.shape[1:], dtype=diffs.dtype, device=diffs.device)
    _backend.get(backend).hermite_forecast(
        rows_view(diffs, diffs.shape[0]), scalar_value(distance, distance_value), scale, out.view(-1)
    )
    return out


@_hermite_forecast_op.register_fake
def _(diffs, distance, distance_value, scale, backend):
    return diffs.new_empty(diffs.shape[1:])


@torch.library.custom_op("fastcache_rt::taylor_forecast_out", mutates_args=("out",))
def _taylor_forecast_out_op(
    diffs: torch.Tensor, distance: torch.Tensor | None, distance_value: float, backend: str, out: torch.Tensor
) -> None:
    _backend.get(backend).taylor_forecast(
        rows_view(diffs, diffs.shape[0]), scalar_value(distance, distance_value), out.view(-1)
    )


@_taylor_forecast_out_op.register_fake
def _(diffs, distance, distance_value, backend, out):
    return None


@torch.library.custom_op("fastcache_rt::hermite_forecast_out", mutates_args=("out",))
def _hermite_forecast_out_op(
    diffs: torch.Tensor,
    distance: torch.Tensor | None,
    distance_value: float,
    scale: float,
    backend: str,
    out: torch.Tensor,
) -> None:
    _backend.get(backend).hermite_forecast(
        rows_view(diffs, diffs.shape[0]), scalar_value(distance, distance_value), scale, out.view(-1)
    )


@_hermite_forecast_out_op.register_fake
def _(diffs, distance, distance_value, scale, backend, out):
    return None


@torch.library.custom_op("fastcache_rt::taylor_update", mutates_args=("diffs",))
def _taylor_update_op(
    diffs: torch.Tensor,
    feature: torch.Tensor,
    gap: torch.Tensor | None,
    gap_value: float,
    count: torch.Tensor | None,
    count_value: int | None,
    backend: str,
) -> None:
    K = diffs.shape[0]
    N = feature.numel()
    try:
        d2 = diffs.view(K, N)
        direct = True
    except RuntimeError:  # trailing dims do not collapse: work on a copy, write back
        d2 = diffs.reshape(K, N).clone()
        direct = False
    f1 = feature.reshape(N)
    _backend.get(backend).taylor_update(d2, f1, scalar_value(gap, gap_value), scalar_value(count, count_value))
    if not direct:
        diffs.copy_(d2.view(diffs.shape))


@torch.library.custom_op("fastcache_rt::taylor_update_error", mutates_args=("diffs", "error"))
def _taylor_update_error_op(
    diffs: torch.Tensor,
    feature: torch.Tensor,
    gap: torch.Tensor | None,
    gap_value: float,
    count: torch.Tensor | None,
    count_value: int | None,
    error_weights: torch.Tensor,
    backend: str,
    error: torch.Tensor,
) -> None:
    d2, direct = update_rows(diffs)
    _backend.get(backend).taylor_update_error(
        d2, feature.reshape(d2.shape[1]), scalar_value(gap, gap_value), scalar_value(count, count_value),
        error_weights, error,
    )
    if not direct:
        diffs.copy_(d2.view(diffs.shape))


@_taylor_update_error_op.register_fake
def _(diffs, feature, gap, gap_value, count, count_value, error_weights, backend, error):
    return None


def _check_diffs(diffs):
    check_float("diffs", diffs)
    if diffs.dim() < 1 or diffs.shape[0] == 0:
        raise ValueError("diffs: expected shape (order + 1, ...) with at least one row")


def taylor_forecast(
    diffs: torch.Tensor,
    distance: float | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """TaylorSeer's forecast ``sum_i diffs[i] * distance^i / i!`` from finite differences
    ``diffs = (D^0, ..., D^O)`` of shape ``(O + 1, ...)``; ``distance`` in steps since the last full step.

    Args:
        diffs: ``(O + 1, ...)``, float32/float16/bfloat16, any strides (kept by ``taylor_update``).
        distance: a number (a kernel argument, never uploaded) or a one-element tensor on the device.
        out: write the result here (shape ``diffs.shape[1:]``, same dtype and device, not overlapping ``diffs``).
        backend: as ``band_l1``.

    Returns:
        ``diffs.shape[1:]`` in diffs' dtype (``out`` when given).

    Reduction: a weighted sum over dim 0 (the orders) for every element, fp32, orders added in order (bitwise
    reproducible); elementwise along the feature, so a rank's shard forecasts its own shard.

    Capture / compile: registered as ``torch.ops.fastcache_rt.taylor_forecast`` (``taylor_forecast_out`` with
    ``out=``) with fake kernels; traced by ``torch.compile(fullgraph=True)``; no host sync; capturable in a CUDA
    graph.

    Example::

        >>> diffs = torch.tensor([[3., 3.], [1., 1.], [0., 0.]])   # D^0 = 3, D^1 = 1, D^2 = 0
        >>> ops.taylor_forecast(diffs, 2.0)                         # 3 + 1 * 2
        tensor([5., 5.])
    """
    _check_diffs(diffs)
    x = scalar_arg("distance", distance, diffs.device, torch.float32)
    if out is not None:
        if check_out(out, "diffs", diffs):
            _taylor_forecast_out_op(diffs, *x, backend_name(diffs.device, backend), out)
            return out
        return out.copy_(_taylor_forecast_op(diffs, *x, backend_name(diffs.device, backend)))
    return _taylor_forecast_op(diffs, *x, backend_name(diffs.device, backend))


def hermite_forecast(
    diffs: torch.Tensor,
    distance: float | torch.Tensor,
    *,
    scale: float = 0.71,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """FreqCa's high-band forecast ``D^0 + sum_{k>=1} D^k H_k(scale * x) scale^k / k!`` (physicists' Hermite H_k,
    scale 0.71 as in the authors' code): about ``D^0 + x D^1 + (x^2 - 1)/2 D^2``, ``x`` = ``distance``.

    Arguments, result (shape ``diffs.shape[1:]``, diffs' dtype: float32/float16/bfloat16, fp32 arithmetic),
    reduction (a weighted sum over the orders) and ``out`` as ``taylor_forecast``; ``scale`` a finite number.

    Capture / compile: registered as ``torch.ops.fastcache_rt.hermite_forecast`` (``hermite_forecast_out`` with
    ``out=``) with fake kernels; traced by ``torch.compile(fullgraph=True)``; no host sync; capturable.

    Example::

        >>> diffs = torch.tensor([[3., 3.], [1., 1.], [0., 0.]])
        >>> ops.hermite_forecast(diffs, 1.0)                  # 3 + 1 * H_1(0.71) * 0.71 = 3 + 2 * 0.71^2
        tensor([4.0082, 4.0082])
    """
    _check_diffs(diffs)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: must be a finite number, got {scale!r}")
    x = scalar_arg("distance", distance, diffs.device, torch.float32)
    if out is not None:
        if check_out(out, "diffs", diffs):
            _hermite_forecast_out_op(diffs, *x, float(scale), backend_name(diffs.device, backend), out)
            return out
        return out.copy_(_hermite_forecast_op(diffs, *x, float(scale), backend_name(diffs.device, backend)))
    return _hermite_forecast_op(diffs, *x, float(scale), backend_name(diffs.device, backend))


def taylor_update(
    diffs: torch.Tensor,
    feature: torch.Tensor,
    gap: float | torch.Tensor,
    *,
    count: int | torch.Tensor | None = None,
    backend: str | None = None,
    error: torch.Tensor | None = None,
    error_weights: torch.Tensor | None = None,
) -> None:
    """In-place finite-difference update after a full step: ``new D^0 = feature``,
    ``new D^{i+1} = (new D^i - old D^i) / gap`` for the orders that existed (i < count), 0 beyond; with
    ``error=``, in the same pass, the error the forecast of this step from the old differences would have made.

    Args:
        diffs: ``(O + 1, ...)`` buffer, float32/float16/bfloat16, any strides, modified in place.
        feature: the new feature, shape ``diffs.shape[1:]``, same dtype and device, any strides.
        gap: steps between this full step and the previous one (> 0): a number (a kernel argument) or a
            one-element tensor on the device.
        count: number of valid orders held before this call (0 for a fresh buffer; None = all O + 1): an int or an
            int64 device tensor. After the call ``min(count + 1, O + 1)`` orders are valid.
        backend: as ``band_l1``.
        error: float32 ``(B, 2)``, contiguous, on the device (B = ``feature.shape[0]``; 1 for a 1-D feature),
            written (not accumulated): ``error[b, 0] = sum (pred - feature)^2`` and ``error[b, 1] = sum feature^2``
            over sample b's elements, where ``pred = sum_{i < min(count, O + 1)} error_weights[i] * old D^i`` is the
            forecast of this step from the differences before the call (0 when count is 0). Rows ``i >= count``
            are never read. Give both ``error`` and ``error_weights`` or neither.
        error_weights: float32 ``(O + 1,)`` on the device: the forecast's weights, computed by the caller (Taylor:
            ``gap^i / i!``; FreqCa: its Hermite weights).

    Returns None (``diffs`` holds the result; ``error`` the sums). Arithmetic in fp32, elementwise along the
    feature (a rank's shard updates its own shard).

    Reduction (``error=`` only): per sample, each term in fp32 (``pred`` with the orders added in order, as every
    backend does, so the terms are bitwise the same everywhere), summed in float64 over a partition fixed by the
    size (chunks of the sample's elements, never the thread or SM count), the chunks added in order, rounded once
    to float32: bitwise run to run and across thread counts; backends agree with the reference to about one
    float32 ulp (tested at rtol 1e-6). NaN / Inf propagate into the sums. A rank's shard gives its shard's sums
    (add them across ranks).

    Capture / compile: registered as ``torch.ops.fastcache_rt.taylor_update`` (``mutates_args=("diffs",)``), and
    ``torch.ops.fastcache_rt.taylor_update_error`` (``mutates_args=("diffs", "error")``) with ``error=``, with fake
    kernels; traced by ``torch.compile(fullgraph=True)`` (functionalized); no host sync; capturable in a CUDA graph
    (one launch, the error's partial sums in a per-stream workspace reduced by the launch's last program).

    Example::

        >>> diffs = torch.zeros(3, 2)                                       # orders 0..2, empty
        >>> ops.taylor_update(diffs, torch.full((2,), 1.0), 1.0, count=0)   # first full step
        >>> ops.taylor_update(diffs, torch.full((2,), 3.0), 2.0, count=1)   # two steps later
        >>> diffs[:, 0]                                                     # D^0 = 3, D^1 = (3 - 1) / 2
        tensor([3., 1., 0.])
        >>> err = torch.empty(1, 2)                                         # forecast 2 steps on: 3 + 2 * 1 = 5
        >>> ops.taylor_update(diffs, torch.full((2,), 6.0), 2.0, count=2, error=err,
        ...                   error_weights=torch.tensor([1.0, 2.0, 2.0]))
        >>> err                                                             # ((5 - 6)^2 * 2, 6^2 * 2)
        tensor([[ 2., 72.]])
    """
    _check_diffs(diffs)
    check_float("feature", feature)
    check_same("diffs", diffs, "feature", feature, shape=False)
    # a host check on the strides (not traced by torch.compile): expanded / stride-0 views are refused
    if not torch.compiler.is_compiling() and internal_overlap(diffs):
        raise ValueError("diffs: its elements overlap in memory (an expanded or stride-0 view); the update writes "
                         "every element, so pass a buffer that owns its memory (e.g. diffs.contiguous())")
    if tuple(feature.shape) != tuple(diffs.shape[1:]):
        raise ValueError(f"feature: shape {tuple(feature.shape)} does not match diffs' rows {tuple(diffs.shape[1:])}")
    if not isinstance(gap, torch.Tensor) and not (isinstance(gap, (int, float)) and gap > 0):
        raise ValueError(f"gap: must be > 0, got {gap!r}")
    g = scalar_arg("gap", gap, diffs.device, torch.float32)
    cnt = (None, None)
    if count is not None:
        if isinstance(count, int) and not isinstance(count, bool) and count < 0:
            raise ValueError(f"count: must be >= 0, got {count}")
        cnt = scalar_arg("count", count, diffs.device, torch.int64)
    if error is None and error_weights is None:
        _taylor_update_op(diffs, feature, *g, *cnt, backend_name(diffs.device, backend))
        return
    if error is None or error_weights is None:
        raise ValueError(f"{'error' if error is None else 'error_weights'}: pass error and error_weights together "
                         "(the error sums and the weights of the forecast they measure), or neither")
    w = check_weights("error_weights", error_weights, diffs.shape[0], "diffs", diffs.device)
    check_error(error, "feature", feature, (("diffs", diffs), ("feature", feature), ("error_weights", w)))
    _taylor_update_error_op(diffs, feature, *g, *cnt, w, backend_name(diffs.device, backend), error)
