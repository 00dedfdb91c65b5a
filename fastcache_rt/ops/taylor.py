"""Taylor (TaylorSeer) and Hermite (FreqCa high band) forecasts from finite differences, and their update."""

from __future__ import annotations

import math

import torch

from . import _backend
from ._common import backend_name, check_float, check_out, check_same, rows_view, scalar_arg, scalar_value


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
) -> None:
    """In-place finite-difference update after a full step: ``new D^0 = feature``,
    ``new D^{i+1} = (new D^i - old D^i) / gap`` for the orders that existed (i < count), 0 beyond.

    Args:
        diffs: ``(O + 1, ...)`` buffer, float32/float16/bfloat16, any strides, modified in place.
        feature: the new feature, shape ``diffs.shape[1:]``, same dtype and device, any strides.
        gap: steps between this full step and the previous one (> 0): a number (a kernel argument) or a
            one-element tensor on the device.
        count: number of valid orders held before this call (0 for a fresh buffer; None = all O + 1): an int or an
            int64 device tensor. After the call ``min(count + 1, O + 1)`` orders are valid.
        backend: as ``band_l1``.

    Returns None (``diffs`` holds the result). Arithmetic in fp32, elementwise along the feature (no reduction:
    a rank's shard updates its own shard).

    Capture / compile: registered as ``torch.ops.fastcache_rt.taylor_update`` (``mutates_args=("diffs",)``) with a
    fake kernel; traced by ``torch.compile(fullgraph=True)`` (functionalized); no host sync; capturable in a CUDA
    graph.

    Example::

        >>> diffs = torch.zeros(3, 2)                                       # orders 0..2, empty
        >>> ops.taylor_update(diffs, torch.full((2,), 1.0), 1.0, count=0)   # first full step
        >>> ops.taylor_update(diffs, torch.full((2,), 3.0), 2.0, count=1)   # two steps later
        >>> diffs[:, 0]                                                     # D^0 = 3, D^1 = (3 - 1) / 2
        tensor([3., 1., 0.])
    """
    _check_diffs(diffs)
    check_float("feature", feature)
    check_same("diffs", diffs, "feature", feature, shape=False)
    # 0: no overlap; 1: overlap; 2: too complex to tell (a host check on strides, not traced by torch.compile)
    if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(diffs) != 0:
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
    _taylor_update_op(diffs, feature, *g, *cnt, backend_name(diffs.device, backend))
