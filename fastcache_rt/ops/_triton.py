"""The Triton backend: every op is one Triton kernel launch (``fastcache_rt.kernels``).

Runs on CUDA devices; with ``TRITON_INTERPRET=1`` set before this module (and triton) is imported, also on CPU
tensors through the Triton interpreter (slow: for tests and debugging). Nothing is read back to the host: count,
tau_query, distance, gap, the gate state and params are read by the kernels from device memory.

band_l1, gate_step and the error sums of taylor_update(error=) / history_update(error=) keep a small workspace and an
atomic counter per (device, stream) (see ``kernels/band_l1.py``, ``kernels/error_sums.py``).
"""

from __future__ import annotations

import os

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

DEVICE_TYPES = ("cuda", "cpu") if _INTERPRET else ("cuda",)

try:
    import triton  # noqa: F401

    from fastcache_rt.kernels import band_l1 as _band_l1
    from fastcache_rt.kernels import chebyshev as _chebyshev
    from fastcache_rt.kernels import taylor as _taylor

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # triton missing (or the kernels subpackage not installed)
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def available() -> str | None:
    if _IMPORT_ERROR is not None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if not _INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before import to run the kernels on CPU tensors)"
    return None


def band_l1(
    cur: torch.Tensor, prev: torch.Tensor, bounds: torch.Tensor, per_sample: bool, out: torch.Tensor
) -> None:
    _band_l1.band_l1(cur, prev, bounds, per_sample, out)


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
    _band_l1.gate_step(cur, prev, bounds, state, params, coeffs, gammas, decision_out, state_out, sums_out)


def gate_decide(
    sums: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: torch.Tensor,
    gammas: torch.Tensor | None,
    decision_out: torch.Tensor,
    state_out: torch.Tensor,
) -> None:
    _band_l1.gate_decide(sums, state, params, coeffs, gammas, decision_out, state_out)


def chebyshev_weights(
    taus: torch.Tensor,
    tau_query: torch.Tensor,
    count: torch.Tensor | None,
    degree: int,
    lam: float,
    blend: float,
    out: torch.Tensor,
) -> None:
    _chebyshev.chebyshev_weights(taus, tau_query, count, degree, lam, blend, out)


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
    _chebyshev.chebyshev_forecast(history, taus, tau_query, count, degree, lam, blend, out)


def taylor_forecast(diffs: torch.Tensor, distance: torch.Tensor, out: torch.Tensor) -> None:
    _taylor.taylor_forecast(diffs, distance, out)


def hermite_forecast(diffs: torch.Tensor, distance: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    _taylor.hermite_forecast(diffs, distance, scale, out)


def taylor_update(
    diffs: torch.Tensor, feature: torch.Tensor, gap: torch.Tensor, count: torch.Tensor | None
) -> None:
    _taylor.taylor_update(diffs, feature, gap, count)


def taylor_update_error(
    diffs: torch.Tensor,
    feature: torch.Tensor,
    gap: torch.Tensor,
    count: torch.Tensor | None,
    weights: torch.Tensor,
    error: torch.Tensor,
) -> None:
    _taylor.taylor_update_error(diffs, feature, gap, count, weights, error)


def history_update(
    history: torch.Tensor,
    value: torch.Tensor,
    row: torch.Tensor | int,
    weights: torch.Tensor,
    count: torch.Tensor | None,
    error: torch.Tensor | None,
) -> None:
    _chebyshev.history_update(history, value, row, weights, count, error)
