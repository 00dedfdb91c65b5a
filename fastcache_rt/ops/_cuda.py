"""The CUDA C++ backend: kernels of ``csrc/cuda`` in the extension ``fastcache_rt._C_cuda``, one launch per op.

Every function hands the kernels raw device pointers (``data_ptr()``), sizes and element strides plus the current
stream of the tensors' device; no device value is read back on the host. Canonical signatures and semantics:
``_backend.py``; the spec: ``_reference.py``.

Scalars. tau_query / distance / gap are a float32 0-dim device tensor (its pointer goes to the kernel, which reads
it) or a Python float (passed by value in the kernel arguments, rounded to float32); count is an int64 0-dim device
tensor, a Python int (clamped to [0, rows] here, which the kernels do anyway) or None (= every row). No Python value
ever becomes a device tensor: that would be a host-to-device copy per call, and illegal in a CUDA-graph capture.

band_l1 / gate_step sum in the order of ``_reference.band_l1_gpu_order`` (tiles of 64 rows x 256 channels, exact
group sums; ``csrc/cuda/band_l1.cu``): bitwise the same on every GPU, and the same as the Triton backend. Their
float64 partials live in a workspace cached per (device index, stream), sized from the input's sizes only
(``_C.reduction_workspace_doubles(B, R, D, nb, per_sample)``, no device query); each (device, stream) pair also owns
one of the module's self-resetting ticket counters (a ``__device__`` array, zero at module load, put back to zero by
the last block of every launch). So there is no memset per call, nothing to initialise (every partial the last block
reads is written in the same launch), and launches on different streams never share scratch.

CUDA graphs. A workspace that must be allocated or grown while the stream is being captured
(``torch.cuda.is_current_stream_capturing()``) comes from the graph's private memory pool; it is cached like any
other (the graph's kernels point at it, and later launches on that stream reuse it: the pool keeps the memory while
the tensor lives). A workspace that is outgrown is retired, never freed, since a captured graph may still point at
it. Replay a graph on the stream it was captured on (or order it with that stream's other work): its launches use
that stream's counter and workspace.

taylor_update_error / history_update (with an error) reuse the (device, stream) workspace and slot for their float64
partials (``_C.error_workspace_doubles(N, B)``: two per block of the size-fixed partition, csrc/cuda/error_sums.cuh)
and their own translation units' ticket counters of that slot: one launch, no memset, the same capture rules.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from . import layout

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
    changed = layout.mismatch(getattr(_C, "GATE_LAYOUT", None))
    if changed:
        return f"fastcache_rt._C_cuda was built for another gate layout ({changed}); rebuild it"
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
# Outgrown workspaces: kept alive, since a captured CUDA graph may still point at them.
_retired: list[torch.Tensor] = []
_slots_used: dict[int | None, int] = {}
_MIN_WORKSPACE = 4096  # doubles (32 KiB): most calls never need to grow it


def _workspace(device: torch.device, stream: int, need: int) -> tuple[torch.Tensor, int]:
    """The (device, stream) partials buffer (at least ``need`` doubles, from ``reduction_workspace_doubles``) and the
    pair's counter slot. A buffer allocated during a stream capture comes from the graph's pool and stays cached."""
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
            size = max(need, _MIN_WORKSPACE)
        else:
            slot = ws[1]
            size = max(need, 2 * ws[0].numel())
            _retired.append(ws[0])
        # Uninitialised is fine: every partial the last block reads is written in the same launch. Allocated on the
        # stream that uses it, so the caching allocator orders any later reuse after the pending kernels.
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


def _f32(x: torch.Tensor | float, keep: list) -> tuple[int, float]:
    """(pointer, value) of a float32 scalar: a 0-dim device tensor's pointer, or 0 and the Python number."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cuda":  # a host tensor: its value (a host read, no device sync)
            return 0, float(x)
        t = _as(x, torch.float32)
        keep.append(t)
        return t.data_ptr(), 0.0
    return 0, float(x)


def _count(count: torch.Tensor | int | None, rows: int, keep: list) -> tuple[int, int | None]:
    """(pointer, value) of count: an int64 0-dim device tensor's pointer, or 0 and the Python int clamped to
    [0, rows] (the kernels clamp the same way; this keeps any Python int within int64), or (0, None) = all rows."""
    if count is None:
        return 0, None
    if isinstance(count, torch.Tensor) and count.device.type != "cuda":
        count = int(count)
    if isinstance(count, torch.Tensor):
        t = _as(count, torch.int64)
        keep.append(t)
        return t.data_ptr(), None
    return 0, min(max(int(count), 0), rows)


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
        need = _C.reduction_workspace_doubles(B, R, D, nb, bool(per_sample))
        buf, slot = _workspace(dev, stream, need)
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
        buf, slot = _workspace(dev, stream, _C.reduction_workspace_doubles(B, R, D, nb, False))
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
    tau_query: torch.Tensor | float,
    count: torch.Tensor | int | None,
    degree: int,
    lam: float,
    blend: float,
    out: torch.Tensor,
) -> None:
    dev = taus.device
    taus = _as(taus, torch.float32).contiguous()
    n = taus.shape[0]
    keep: list = []
    q_ptr, q_val = _f32(tau_query, keep)
    c_ptr, c_val = _count(count, n, keep)
    with _on(dev):
        dst = _dense_out(out)
        _C.chebyshev_weights(
            taus.data_ptr(), n, q_ptr, q_val, c_ptr, c_val, int(degree), float(lam), float(blend), dst.data_ptr(),
            _stream(dev),
        )  # fmt: skip
        if dst is not out:
            out.copy_(dst)


def chebyshev_forecast(
    history: torch.Tensor,
    taus: torch.Tensor,
    tau_query: torch.Tensor | float,
    count: torch.Tensor | int | None,
    degree: int,
    lam: float,
    blend: float,
    out: torch.Tensor,
) -> None:
    n, N = history.shape
    dev = history.device
    taus = _as(taus, torch.float32).contiguous()
    keep: list = []
    q_ptr, q_val = _f32(tau_query, keep)
    c_ptr, c_val = _count(count, n, keep)
    with _on(dev):
        dst = _dense_out(out)
        _C.chebyshev_forecast(
            _code(history), history.data_ptr(), n, N, history.stride(0), history.stride(1), taus.data_ptr(),
            q_ptr, q_val, c_ptr, c_val, int(degree), float(lam), float(blend), dst.data_ptr(), _stream(dev),
        )  # fmt: skip
        if dst is not out:
            out.copy_(dst)


def taylor_forecast(diffs: torch.Tensor, distance: torch.Tensor | float, out: torch.Tensor) -> None:
    K, N = diffs.shape
    dev = diffs.device
    keep: list = []
    x_ptr, x_val = _f32(distance, keep)
    with _on(dev):
        dst = _dense_out(out)
        _C.taylor_forecast(
            _code(diffs), diffs.data_ptr(), K, N, diffs.stride(0), diffs.stride(1), x_ptr, x_val, dst.data_ptr(),
            _stream(dev),
        )  # fmt: skip
        if dst is not out:
            out.copy_(dst)


def hermite_forecast(
    diffs: torch.Tensor, distance: torch.Tensor | float, scale: float, out: torch.Tensor
) -> None:
    K, N = diffs.shape
    dev = diffs.device
    keep: list = []
    x_ptr, x_val = _f32(distance, keep)
    with _on(dev):
        dst = _dense_out(out)
        _C.hermite_forecast(
            _code(diffs), diffs.data_ptr(), K, N, diffs.stride(0), diffs.stride(1), x_ptr, x_val, float(scale),
            dst.data_ptr(), _stream(dev),
        )  # fmt: skip
        if dst is not out:
            out.copy_(dst)


def taylor_update(
    diffs: torch.Tensor, feature: torch.Tensor, gap: torch.Tensor | float, count: torch.Tensor | int | None
) -> None:
    K, N = diffs.shape
    dev = diffs.device
    if feature.dtype != diffs.dtype:
        raise TypeError(f"cuda backend: feature dtype {feature.dtype} differs from diffs' {diffs.dtype}")
    keep: list = []
    g_ptr, g_val = _f32(gap, keep)
    c_ptr, c_val = _count(count, K, keep)
    with _on(dev):
        _C.taylor_update(
            _code(diffs), diffs.data_ptr(), K, N, diffs.stride(0), diffs.stride(1), feature.data_ptr(),
            _stride0(feature), g_ptr, g_val, c_ptr, c_val, _stream(dev),
        )  # fmt: skip


def _i64(x: torch.Tensor | int, keep: list) -> tuple[int, int]:
    """(pointer, value) of an int64 scalar (row): a 0-dim device tensor's pointer, or 0 and the Python int."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cuda":  # a host tensor: its value (a host read, no device sync)
            return 0, int(x)
        t = _as(x, torch.int64)
        keep.append(t)
        return t.data_ptr(), 0
    return 0, int(x)


def taylor_update_error(
    diffs: torch.Tensor,
    feature: torch.Tensor,
    gap: torch.Tensor | float,
    count: torch.Tensor | int | None,
    weights: torch.Tensor,
    error: torch.Tensor,
) -> None:
    K, N = diffs.shape
    B = error.shape[0]
    dev = diffs.device
    if feature.dtype != diffs.dtype:
        raise TypeError(f"cuda backend: feature dtype {feature.dtype} differs from diffs' {diffs.dtype}")
    keep: list = []
    g_ptr, g_val = _f32(gap, keep)
    c_ptr, c_val = _count(count, K, keep)
    weights = _as(weights, torch.float32).contiguous()
    with _on(dev):
        stream = _stream(dev)
        buf, slot = _workspace(dev, stream, _C.error_workspace_doubles(N, max(B, 1)))
        _C.taylor_update_error(
            _code(diffs), diffs.data_ptr(), K, N, diffs.stride(0), diffs.stride(1), feature.data_ptr(),
            _stride0(feature), g_ptr, g_val, c_ptr, c_val, weights.data_ptr(), error.data_ptr(), B, buf.data_ptr(),
            buf.numel(), slot, stream,
        )  # fmt: skip


def history_update(
    history: torch.Tensor,
    value: torch.Tensor,
    row: torch.Tensor | int,
    weights: torch.Tensor,
    count: torch.Tensor | int | None,
    error: torch.Tensor | None,
) -> None:
    n, N = history.shape
    dev = history.device
    if value.dtype != history.dtype:
        raise TypeError(f"cuda backend: value dtype {value.dtype} differs from history's {history.dtype}")
    keep: list = []
    r_ptr, r_val = _i64(row, keep)
    c_ptr, c_val = _count(count, n, keep)
    weights = _as(weights, torch.float32).contiguous()
    B = 0 if error is None else error.shape[0]
    with _on(dev):
        stream = _stream(dev)
        if error is None:
            buf_ptr, buf_n, slot = 0, 0, 0
        else:
            buf, slot = _workspace(dev, stream, _C.error_workspace_doubles(N, max(B, 1)))
            buf_ptr, buf_n = buf.data_ptr(), buf.numel()
        _C.history_update(
            _code(history), history.data_ptr(), n, N, history.stride(0), history.stride(1), value.data_ptr(),
            _stride0(value), r_ptr, r_val, weights.data_ptr(), c_ptr, c_val, _opt_ptr(error), B, buf_ptr, buf_n,
            slot, stream,
        )  # fmt: skip
