"""The ``cpu`` backend: multithreaded C++ kernels (csrc/cpu, pybind11 module ``fastcache_rt._C``).

Each function takes the canonical arguments of the protocol (``_backend.py``), checks dtypes, devices and shapes
(cheap: no data is read here), and hands data pointers, sizes and element strides to ``fastcache_rt._C``, which
runs with the GIL released on ``torch.get_num_threads()`` threads. Scalars held in tensors (``count``,
``tau_query``, ``distance``, ``gap``, gate state) are read by the kernels, never by Python.
"""

from __future__ import annotations

import torch

from . import layout

DEVICE_TYPES = ("cpu",)

try:
    from .. import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built (e.g. a source checkout without `pip install -e .`)
    _C = None
    _IMPORT_ERROR = f"fastcache_rt._C is not built ({exc}); run `pip install --no-build-isolation -e .`"

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

def available() -> str | None:
    if _C is None:
        return _IMPORT_ERROR
    changed = layout.mismatch(getattr(_C, "GATE_LAYOUT", None))
    if changed:
        return f"fastcache_rt._C was built for another gate layout ({changed}); rebuild it: pip install -e ."
    return None


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"fastcache_rt cpu backend, {op}: {msg}")


def _code(op: str, t: torch.Tensor) -> int:
    code = _DTYPES.get(t.dtype)
    if code is None:
        _fail(op, f"dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    return code


def _on_cpu(op: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            _fail(op, f"expected CPU tensors, got one on {t.device}")


def _scalar(op: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> int:
    if t.dtype != dtype or t.numel() != 1:
        _fail(op, f"{name} must be a {dtype} scalar tensor, got {t.dtype} with shape {tuple(t.shape)}")
    return t.data_ptr()


def _host(x, dtype: torch.dtype):
    """A canonical scalar as a CPU tensor the kernels read (a Python number: a fill, no copy from anywhere)."""
    return x if isinstance(x, torch.Tensor) or x is None else torch.full((), x, dtype=dtype)


def _vec(op: str, name: str, t: torch.Tensor, n: int | None, min_len: int = 0) -> tuple[int, int]:
    """(pointer, stride) of a float32 1-D tensor of n (or >= min_len) elements."""
    if t.dtype != torch.float32 or t.dim() != 1 or (n is not None and t.shape[0] != n) or t.shape[0] < min_len:
        want = f"({n},)" if n is not None else f"at least {min_len} elements"
        _fail(op, f"{name} must be float32 1-D {want}, got {t.dtype} {tuple(t.shape)}")
    return t.data_ptr(), t.stride(0)


def _gate_args(op, state, params, coeffs, gammas, decision_out, state_out, nb):
    _on_cpu(op, state, params, coeffs, gammas, decision_out, state_out)
    st, st_s = _vec(op, "state", state, None, layout.STATE_LEN)
    pa, pa_s = _vec(op, "params", params, None, layout.PARAMS_LEN)
    co, co_s = _vec(op, "coeffs", coeffs, None, 1)
    if gammas is None:
        ga, ga_s = 0, 0
    else:
        ga, ga_s = _vec(op, "gammas", gammas, nb)
    if decision_out.dtype != torch.bool or decision_out.numel() != 1:
        _fail(op, f"decision_out must be a bool scalar tensor, got {decision_out.dtype} {tuple(decision_out.shape)}")
    so, so_s = _vec(op, "state_out", state_out, layout.STATE_LEN)
    return (st, st_s, pa, pa_s, co, coeffs.shape[0], co_s, ga, ga_s, decision_out.data_ptr(), so, so_s)


def _band_inputs(op, cur, prev, bounds):
    _on_cpu(op, cur, prev, bounds)
    dt = _code(op, cur)
    if prev.dtype != cur.dtype:
        _fail(op, f"cur and prev dtypes differ ({cur.dtype}, {prev.dtype})")
    if cur.dim() != 3 or prev.shape != cur.shape:
        _fail(op, f"cur and prev must be (B, R, D) of one shape, got {tuple(cur.shape)} and {tuple(prev.shape)}")
    if bounds.dtype != torch.int64 or bounds.dim() != 1 or bounds.shape[0] < 1:
        _fail(op, f"bounds must be int64 (nb + 1,), got {bounds.dtype} {tuple(bounds.shape)}")
    if not bounds.is_contiguous():
        bounds = bounds.contiguous()
    return dt, bounds


# ---- ops ---------------------------------------------------------------------------------------------------


def band_l1(cur: torch.Tensor, prev: torch.Tensor, bounds: torch.Tensor, per_sample: bool, out: torch.Tensor) -> None:
    dt, bounds = _band_inputs("band_l1", cur, prev, bounds)
    _on_cpu("band_l1", out)
    B, R, D = cur.shape
    nb = bounds.shape[0] - 1
    if out.dtype != torch.float32 or tuple(out.shape) != (B if per_sample else 1, nb, 2):
        _fail("band_l1", f"out must be float32 {(B if per_sample else 1, nb, 2)}, got {out.dtype} {tuple(out.shape)}")
    _C.band_l1(dt, cur.data_ptr(), *cur.stride(), prev.data_ptr(), *prev.stride(), B, R, D, bounds.data_ptr(), nb,
               bool(per_sample), out.data_ptr(), *out.stride(), torch.get_num_threads())  # fmt: skip


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
    dt, bounds = _band_inputs("gate_step", cur, prev, bounds)
    B, R, D = cur.shape
    nb = bounds.shape[0] - 1
    _on_cpu("gate_step", sums_out)
    if sums_out.dtype != torch.float32 or tuple(sums_out.shape) != (nb, 2):
        _fail("gate_step", f"sums_out must be float32 ({nb}, 2), got {sums_out.dtype} {tuple(sums_out.shape)}")
    g = _gate_args("gate_step", state, params, coeffs, gammas, decision_out, state_out, nb)
    _C.gate_step(dt, cur.data_ptr(), *cur.stride(), prev.data_ptr(), *prev.stride(), B, R, D, bounds.data_ptr(), nb,
                 *g, sums_out.data_ptr(), *sums_out.stride(), torch.get_num_threads())  # fmt: skip


def gate_decide(
    sums: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: torch.Tensor,
    gammas: torch.Tensor | None,
    decision_out: torch.Tensor,
    state_out: torch.Tensor,
) -> None:
    _on_cpu("gate_decide", sums)
    if sums.dtype != torch.float32 or sums.dim() != 2 or sums.shape[1] != 2:
        _fail("gate_decide", f"sums must be float32 (nb, 2), got {sums.dtype} {tuple(sums.shape)}")
    nb = sums.shape[0]
    g = _gate_args("gate_decide", state, params, coeffs, gammas, decision_out, state_out, nb)
    _C.gate_decide(sums.data_ptr(), *sums.stride(), nb, *g)


def _cheb_inputs(op, taus, tau_query, count, n):
    _on_cpu(op, taus, tau_query, count)
    ta, ta_s = _vec(op, "taus", taus, n)
    tq = _scalar(op, "tau_query", tau_query, torch.float32)
    cn = 0 if count is None else _scalar(op, "count", count, torch.int64)
    return ta, ta_s, tq, cn


def chebyshev_weights(
    taus: torch.Tensor,
    tau_query: torch.Tensor,
    count: torch.Tensor | None,
    degree: int,
    lam: float,
    blend: float,
    out: torch.Tensor,
) -> None:
    n = taus.shape[0] if taus.dim() == 1 else -1
    tau_query, count = _host(tau_query, torch.float32), _host(count, torch.int64)
    ta, ta_s, tq, cn = _cheb_inputs("chebyshev_weights", taus, tau_query, count, n)
    _on_cpu("chebyshev_weights", out)
    o, o_s = _vec("chebyshev_weights", "out", out, n)
    _C.chebyshev_weights(ta, n, ta_s, tq, cn, int(degree), float(lam), float(blend), o, o_s)


def _rows_out(op, rows, out, name):
    dt = _code(op, rows)
    if rows.dim() != 2:
        _fail(op, f"{name} must be 2-D (n, N), got {tuple(rows.shape)}")
    if out.dtype != rows.dtype or out.dim() != 1 or out.shape[0] != rows.shape[1]:
        _fail(op, f"out must be {rows.dtype} ({rows.shape[1]},), got {out.dtype} {tuple(out.shape)}")
    return dt


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
    _on_cpu("chebyshev_forecast", history, out)
    dt = _rows_out("chebyshev_forecast", history, out, "history")
    n, N = history.shape
    tau_query, count = _host(tau_query, torch.float32), _host(count, torch.int64)
    ta, ta_s, tq, cn = _cheb_inputs("chebyshev_forecast", taus, tau_query, count, n)
    s_row, s_col = history.stride()
    _C.chebyshev_forecast(dt, history.data_ptr(), n, N, s_row, s_col, ta, ta_s, tq, cn, int(degree), float(lam),
                          float(blend), out.data_ptr(), out.stride(0), torch.get_num_threads())  # fmt: skip


def taylor_forecast(diffs: torch.Tensor, distance: torch.Tensor | float, out: torch.Tensor) -> None:
    distance = _host(distance, torch.float32)
    _on_cpu("taylor_forecast", diffs, distance, out)
    dt = _rows_out("taylor_forecast", diffs, out, "diffs")
    d = _scalar("taylor_forecast", "distance", distance, torch.float32)
    K, N = diffs.shape
    s_row, s_col = diffs.stride()
    _C.taylor_forecast(dt, diffs.data_ptr(), K, N, s_row, s_col, d, out.data_ptr(), out.stride(0),
                       torch.get_num_threads())  # fmt: skip


def hermite_forecast(diffs: torch.Tensor, distance: torch.Tensor | float, scale: float, out: torch.Tensor) -> None:
    distance = _host(distance, torch.float32)
    _on_cpu("hermite_forecast", diffs, distance, out)
    dt = _rows_out("hermite_forecast", diffs, out, "diffs")
    d = _scalar("hermite_forecast", "distance", distance, torch.float32)
    K, N = diffs.shape
    s_row, s_col = diffs.stride()
    _C.hermite_forecast(dt, diffs.data_ptr(), K, N, s_row, s_col, d, float(scale), out.data_ptr(), out.stride(0),
                        torch.get_num_threads())  # fmt: skip


def taylor_update(
    diffs: torch.Tensor, feature: torch.Tensor, gap: torch.Tensor | float, count: torch.Tensor | int | None
) -> None:
    op = "taylor_update"
    gap, count = _host(gap, torch.float32), _host(count, torch.int64)
    _on_cpu(op, diffs, feature, gap, count)
    dt = _code(op, diffs)
    if diffs.dim() != 2:
        _fail(op, f"diffs must be 2-D (K, N), got {tuple(diffs.shape)}")
    K, N = diffs.shape
    if feature.dtype != diffs.dtype or feature.dim() != 1 or feature.shape[0] != N:
        _fail(op, f"feature must be {diffs.dtype} ({N},), got {feature.dtype} {tuple(feature.shape)}")
    g = _scalar(op, "gap", gap, torch.float32)
    cn = 0 if count is None else _scalar(op, "count", count, torch.int64)
    s_row, s_col = diffs.stride()
    _C.taylor_update(dt, diffs.data_ptr(), K, N, s_row, s_col, feature.data_ptr(), feature.stride(0), g, cn,
                     torch.get_num_threads())  # fmt: skip


def _error_out(op: str, error: torch.Tensor | None, N: int) -> tuple[int, int]:
    """(pointer, B) of the error sums (0, 0 without)."""
    if error is None:
        return 0, 0
    _on_cpu(op, error)
    if error.dtype != torch.float32 or error.dim() != 2 or error.shape[1] != 2 or not error.is_contiguous():
        _fail(op, f"error must be float32 contiguous (B, 2), got {error.dtype} {tuple(error.shape)}")
    B = error.shape[0]
    if (B == 0 and N != 0) or (B > 0 and N % B != 0):
        _fail(op, f"error has {B} rows (samples), which do not divide the {N} elements")
    return error.data_ptr(), B


def taylor_update_error(
    diffs: torch.Tensor,
    feature: torch.Tensor,
    gap: torch.Tensor | float,
    count: torch.Tensor | int | None,
    weights: torch.Tensor,
    error: torch.Tensor,
) -> None:
    op = "taylor_update_error"
    gap, count = _host(gap, torch.float32), _host(count, torch.int64)
    _on_cpu(op, diffs, feature, gap, count, weights)
    dt = _code(op, diffs)
    if diffs.dim() != 2:
        _fail(op, f"diffs must be 2-D (K, N), got {tuple(diffs.shape)}")
    K, N = diffs.shape
    if feature.dtype != diffs.dtype or feature.dim() != 1 or feature.shape[0] != N:
        _fail(op, f"feature must be {diffs.dtype} ({N},), got {feature.dtype} {tuple(feature.shape)}")
    g = _scalar(op, "gap", gap, torch.float32)
    cn = 0 if count is None else _scalar(op, "count", count, torch.int64)
    w, w_s = _vec(op, "weights", weights, K)
    e, B = _error_out(op, error, N)
    if error is None:
        _fail(op, "error is required")
    s_row, s_col = diffs.stride()
    _C.taylor_update_error(dt, diffs.data_ptr(), K, N, s_row, s_col, feature.data_ptr(), feature.stride(0), g, cn,
                           w, w_s, e, B, torch.get_num_threads())  # fmt: skip


def history_update(
    history: torch.Tensor,
    value: torch.Tensor,
    row: torch.Tensor | int,
    weights: torch.Tensor,
    count: torch.Tensor | int | None,
    error: torch.Tensor | None,
) -> None:
    op = "history_update"
    row, count = _host(row, torch.int64), _host(count, torch.int64)
    _on_cpu(op, history, value, row, count, weights)
    dt = _code(op, history)
    if history.dim() != 2:
        _fail(op, f"history must be 2-D (n, N), got {tuple(history.shape)}")
    n, N = history.shape
    if value.dtype != history.dtype or value.dim() != 1 or value.shape[0] != N:
        _fail(op, f"value must be {history.dtype} ({N},), got {value.dtype} {tuple(value.shape)}")
    r = _scalar(op, "row", row, torch.int64)
    cn = 0 if count is None else _scalar(op, "count", count, torch.int64)
    w, w_s = _vec(op, "weights", weights, n)
    e, B = _error_out(op, error, N)
    s_row, s_col = history.stride()
    _C.history_update(dt, history.data_ptr(), n, N, s_row, s_col, value.data_ptr(), value.stride(0), r, w, w_s, cn,
                      e, B, torch.get_num_threads())  # fmt: skip
