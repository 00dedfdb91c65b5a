"""The CUDA C++ backend: kernels of ``csrc/cuda`` in the extension ``fastcache_rt._C_cuda``, one launch per op.

Every function hands the kernels raw device pointers (``data_ptr()``), sizes and element strides plus the current
stream of the tensors' device; no device value is read back on the host. The reductions (band_l1, gate_step) keep
their per-block partials in a workspace cached per (device, stream), and each such pair owns one of the module's
self-resetting block counters (zero at module load, put back to zero by the last block of every launch): no memset
per call, and safe inside CUDA graphs. Canonical signatures and semantics: ``_backend.py``; the spec:
``_reference.py``.
"""

from __future__ import annotations

import contextlib
import threading

import torch

DEVICE_TYPES = ("cuda",)

try:
    from fastcache_rt import _C_cuda as _C
except (ImportError, OSError) as exc:  # not built, or a shared library it needs is missing: keep the text
    _C = None
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> str | None:
    if _C is None:
        return (
            f"fastcache_rt._C_cuda cannot be imported ({_IMPORT_ERROR}); build it with "
            "FASTCACHE_RT_CUDA=1 pip install --no-build-isolation -e ."
        )
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return "no CUDA device: torch.cuda.is_available() is False (this torch is a CPU-only build)"
        return "no CUDA device: torch.cuda.is_available() is False"
    device = torch.cuda.current_device()
    err = _C.probe_device(device)
    if err is not None:
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return f"the CUDA kernels cannot run on {torch.cuda.get_device_name(device)} (sm {cap}): {err}"
    return None


# ---- device, stream, workspaces ---------------------------------------------------------------------------------

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device: torch.device) -> int:
    """The current stream of ``device`` as an integer handle."""
    if _raw_stream is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _on(device: torch.device):
    """Make ``device`` current for the launch (the launchers size grids for, and launch on, the current device)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


_lock = threading.Lock()
# (device index, stream) -> (float64 partials buffer, counter slot)
_workspaces: dict[tuple[int | None, int], tuple[torch.Tensor, int]] = {}
_slots_used: dict[int | None, int] = {}


def _workspace(device: torch.device, stream: int, num_slots: int) -> tuple[torch.Tensor, int]:
    need = _C.reduction_workspace_doubles(num_slots)
    key = (device.index, stream)
    ws = _workspaces.get(key)
    if ws is not None and ws[0].numel() >= need:
        return ws
    with _lock:
        ws = _workspaces.get(key)
        if ws is not None and ws[0].numel() >= need:
            return ws
        if ws is None:
            # A new stream gets the next counter slot; slots are only reused after COUNTER_SLOTS streams.
            n = _slots_used.get(device.index, 0)
            _slots_used[device.index] = n + 1
            slot = n % _C.COUNTER_SLOTS
            size = need
        else:
            slot = ws[1]
            size = max(need, 2 * ws[0].numel())
        # Uninitialised is fine: every block writes its partials before the last block reads them. Allocated on
        # the stream that uses it, so the caching allocator orders any later reuse after the pending kernels.
        ws = (torch.empty(size, dtype=torch.float64, device=device), slot)
        _workspaces[key] = ws
        return ws


# ---- argument helpers -------------------------------------------------------------------------------------------


def _code(t: torch.Tensor) -> int:
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"cuda backend: dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    return code


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _opt_ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _count(count: torch.Tensor | None) -> torch.Tensor | None:
    return None if count is None else _as(count, torch.int64)


def _scalar_f32(t: torch.Tensor) -> torch.Tensor:
    return _as(t, torch.float32)


def _stride0(t: torch.Tensor) -> int:
    return t.stride(0) if t.dim() > 0 else 1


def _dense_out(out: torch.Tensor) -> torch.Tensor:
    """``out`` itself if contiguous, else a contiguous scratch tensor to copy back from."""
    return out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)


def _gate_tuple(state, params, coeffs, gammas, decision_out, state_out, keep) -> tuple[int, ...]:
    state = _as(state, torch.float32)
    params = _as(params, torch.float32)
    coeffs = _as(coeffs, torch.float32)
    if gammas is not None:
        gammas = _as(gammas, torch.float32)
    keep.extend((state, params, coeffs, gammas))
    return (
        state.data_ptr(), _stride0(state),
        params.data_ptr(), _stride0(params),
        coeffs.data_ptr(), _stride0(coeffs), coeffs.numel(),
        _opt_ptr(gammas), 0 if gammas is None else _stride0(gammas),
        decision_out.data_ptr(),
        state_out.data_ptr(), _stride0(state_out),
    )  # fmt: skip


def _check_decision(decision_out: torch.Tensor) -> None:
    if decision_out.dtype != torch.bool or decision_out.numel() != 1:
        raise TypeError("cuda backend: decision_out must be a one-element torch.bool tensor")


# ---- ops --------------------------------------------------------------------------------------------------------


def band_l1(
    cur: torch.Tensor, prev: torch.Tensor, bounds: torch.Tensor, per_sample: bool, out: torch.Tensor
) -> None:
    B, R, D = cur.shape
    nb = bounds.shape[0] - 1
    dev = cur.device
    bounds = _as(bounds, torch.int64).contiguous()
    with _on(dev):
        stream = _stream(dev)
        dst = _dense_out(out)
        buf, slot = _workspace(dev, stream, (B if per_sample else 1) * nb)
        _C.band_l1(
            _code(cur), cur.data_ptr(), cur.stride(), prev.data_ptr(), prev.stride(), B, R, D,
            bounds.data_ptr(), nb, bool(per_sample), dst.data_ptr(), buf.data_ptr(), buf.numel(), slot, stream,
        )  # fmt: skip
        if dst is not out:
            out.copy_(dst)


def gate_step(
    cur: torch.Tensor,
    prev: torch.Tensor,
    bounds: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: torch.Tensor,
    gammas: torch.Tensor | None,
    decision_out: torch.Tensor,
    state_out: torch.Tensor,
    sums_out: torch.Tensor,
) -> None:
    B, R, D = cur.shape
    nb = bounds.shape[0] - 1
    dev = cur.device
    _check_decision(decision_out)
    bounds = _as(bounds, torch.int64).contiguous()
    keep: list = []
    with _on(dev):
        stream = _stream(dev)
        sums = _dense_out(sums_out)
        gate = _gate_tuple(state, params, coeffs, gammas, decision_out, state_out, keep)
        buf, slot = _workspace(dev, stream, nb)
        _C.gate_step(
            _code(cur), cur.data_ptr(), cur.stride(), prev.data_ptr(), prev.stride(), B, R, D,
            bounds.data_ptr(), nb, gate, sums.data_ptr(), buf.data_ptr(), buf.numel(), slot, stream,
        )  # fmt: skip
        if sums is not sums_out:
            sums_out.copy_(sums)


def gate_decide(
    sums: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: torch.Tensor,
    gammas: torch.Tensor | None,
    decision_out: torch.Tensor,
    state_out: torch.Tensor,
) -> None:
    dev = sums.device
    _check_decision(decision_out)
    sums = _as(sums, torch.float32)
    keep: list = []
    with _on(dev):
        gate = _gate_tuple(state, params, coeffs, gammas, decision_out, state_out, keep)
        _C.gate_decide(sums.data_ptr(), sums.stride(0), sums.stride(1), sums.shape[0], gate, _stream(dev))


def chebyshev_weights(
    taus: torch.Tensor,
    tau_query: torch.Tensor,
    count: torch.Tensor | None,
    degree: int,
    lam: float,
    blend: float,
    out: torch.Tensor,
) -> None:
    dev = taus.device
    taus = _as(taus, torch.float32).contiguous()
    q = _scalar_f32(tau_query)
    cnt = _count(count)
    with _on(dev):
        dst = _dense_out(out)
        _C.chebyshev_weights(
            taus.data_ptr(), taus.shape[0], q.data_ptr(), _opt_ptr(cnt), int(degree), float(lam), float(blend),
            dst.data_ptr(), _stream(dev),
        )  # fmt: skip
        if dst is not out:
            out.copy_(dst)


def chebyshev_forecast(
    history: torch.Tensor,
    taus: torch.Tensor,
    tau_query: torch.Tensor,
    count: torch.Tensor | None,
    degree: int,
    lam: float,
    blend: float,
    out: torch.Tensor,
) -> None:
    n, N = history.shape
    dev = history.device
    taus = _as(taus, torch.float32).contiguous()
    q = _scalar_f32(tau_query)
    cnt = _count(count)
    with _on(dev):
        dst = _dense_out(out)
        _C.chebyshev_forecast(
            _code(history), history.data_ptr(), n, N, history.stride(0), history.stride(1), taus.data_ptr(),
            q.data_ptr(), _opt_ptr(cnt), int(degree), float(lam), float(blend), dst.data_ptr(), _stream(dev),
        )  # fmt: skip
        if dst is not out:
            out.copy_(dst)


def taylor_forecast(diffs: torch.Tensor, distance: torch.Tensor, out: torch.Tensor) -> None:
    K, N = diffs.shape
    dev = diffs.device
    x = _scalar_f32(distance)
    with _on(dev):
        dst = _dense_out(out)
        _C.taylor_forecast(
            _code(diffs), diffs.data_ptr(), K, N, diffs.stride(0), diffs.stride(1), x.data_ptr(), dst.data_ptr(),
            _stream(dev),
        )  # fmt: skip
        if dst is not out:
            out.copy_(dst)


def hermite_forecast(diffs: torch.Tensor, distance: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    K, N = diffs.shape
    dev = diffs.device
    x = _scalar_f32(distance)
    with _on(dev):
        dst = _dense_out(out)
        _C.hermite_forecast(
            _code(diffs), diffs.data_ptr(), K, N, diffs.stride(0), diffs.stride(1), x.data_ptr(), float(scale),
            dst.data_ptr(), _stream(dev),
        )  # fmt: skip
        if dst is not out:
            out.copy_(dst)


def taylor_update(
    diffs: torch.Tensor, feature: torch.Tensor, gap: torch.Tensor, count: torch.Tensor | None
) -> None:
    K, N = diffs.shape
    dev = diffs.device
    g = _scalar_f32(gap)
    cnt = _count(count)
    if feature.dtype != diffs.dtype:
        raise TypeError(f"cuda backend: feature dtype {feature.dtype} differs from diffs' {diffs.dtype}")
    with _on(dev):
        _C.taylor_update(
            _code(diffs), diffs.data_ptr(), K, N, diffs.stride(0), diffs.stride(1), feature.data_ptr(),
            _stride0(feature), g.data_ptr(), _opt_ptr(cnt), _stream(dev),
        )  # fmt: skip
