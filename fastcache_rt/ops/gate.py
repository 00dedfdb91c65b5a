"""The fused gate: banded relative-L1 change of a probe + the decision epilogue (TeaCache's polynomial-rescaled
accumulator, SpectralCache's TADS / CEB / FDC, forced full first and last steps), state kept on the device.

Layouts of ``state`` and ``params``: ``fastcache_rt.ops.layout``. Decision rules: ``_reference.gate_decide``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _backend
from ._common import backend_name, bounds_tensor, check_bounds, check_float, check_same, float_vector, three_d
from .layout import PARAMS_LEN, STATE_LEN


@torch.library.custom_op("fastcache_rt::gate_step", mutates_args=())
def _gate_step_op(
    cur: torch.Tensor,
    prev: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: torch.Tensor,
    gammas: torch.Tensor | None,
    bounds: list[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_bounds(bounds, cur.shape[-1])  # the registered op checks too (it may be called directly)
    dev = cur.device
    decision = torch.empty((), dtype=torch.bool, device=dev)
    new_state = torch.empty(STATE_LEN, dtype=torch.float32, device=dev)
    sums = torch.empty((len(bounds) - 1, 2), dtype=torch.float32, device=dev)
    _backend.get(backend).gate_step(
        three_d(cur), three_d(prev), bounds_tensor(bounds, dev), state, params, coeffs, gammas, decision, new_state, sums
    )
    return decision, new_state, sums


@_gate_step_op.register_fake
def _(cur, prev, state, params, coeffs, gammas, bounds, backend):
    return (
        cur.new_empty((), dtype=torch.bool),
        cur.new_empty((STATE_LEN,), dtype=torch.float32),
        cur.new_empty((len(bounds) - 1, 2), dtype=torch.float32),
    )


@torch.library.custom_op("fastcache_rt::gate_decide", mutates_args=())
def _gate_decide_op(
    sums: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: torch.Tensor,
    gammas: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    dev = sums.device
    decision = torch.empty((), dtype=torch.bool, device=dev)
    new_state = torch.empty(STATE_LEN, dtype=torch.float32, device=dev)
    _backend.get(backend).gate_decide(sums, state, params, coeffs, gammas, decision, new_state)
    return decision, new_state


@_gate_decide_op.register_fake
def _(sums, state, params, coeffs, gammas, backend):
    return sums.new_empty((), dtype=torch.bool), sums.new_empty((STATE_LEN,), dtype=torch.float32)


def gate_state(device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh gate state (float32 zeros of length STATE_LEN): step 0, empty accumulator, nothing cached."""
    return torch.zeros(STATE_LEN, dtype=torch.float32, device=device)


def gate_params(
    tau: float,
    num_steps: int,
    *,
    tads: tuple[float, float] = (1.0, 1.0),
    max_cached: float = math.inf,
    force_last: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Pack the gate's scalar parameters (see ``layout``).

    Args:
        tau: threshold on the accumulator (TeaCache's ``rel_l1_thresh``), > 0.
        num_steps: steps of the generation S (>= 1); steps 0 and (with ``force_last``) S-1 always compute.
        tads: (s_min, s_max) of SpectralCache's cosine-bell threshold scale; (1, 1) = off, paper default (0.5, 1.5).
        max_cached: CEB budget C_max, a step may be cached only while fewer than this many in a row were; inf = off.
        force_last: compute the last step.
    """
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau: must be a finite number > 0, got {tau!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
    if len(tads) != 2:
        raise ValueError(f"tads: expected (s_min, s_max), got {tads!r}")
    s_min, s_max = float(tads[0]), float(tads[1])
    if not (math.isfinite(s_min) and math.isfinite(s_max)) or s_min <= 0 or s_max < s_min:
        raise ValueError(f"tads: need 0 < s_min <= s_max, finite, got {tads!r}")
    if math.isnan(max_cached) or max_cached < 1:
        raise ValueError(f"max_cached: must be >= 1 (or inf), got {max_cached!r}")
    return torch.tensor(
        [float(tau), float(num_steps), s_min, s_max, float(max_cached), 1.0 if force_last else 0.0],
        dtype=torch.float32,
        device=device,
    )


def _check_gate_args(state, params, coeffs, gammas, nb, device):
    for name, t, n in (("state", state, STATE_LEN), ("params", params, PARAMS_LEN)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32 or t.shape != (n,):
            raise ValueError(f"{name}: expected float32 of shape ({n},), got {t.dtype} {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}: on {t.device}, but the data is on {device}")
    coeffs_t = float_vector("coeffs", coeffs, device, finite=True)
    gammas_t = None if gammas is None else float_vector("gammas", gammas, device, length=nb)
    return state.contiguous(), params.contiguous(), coeffs_t, gammas_t


def gate_step(
    cur: torch.Tensor,
    prev: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: Sequence[float] | torch.Tensor = (1.0, 0.0),
    *,
    bounds: Sequence[int] | torch.Tensor | None = None,
    gammas: Sequence[float] | torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused gate step: the banded sums of ``band_l1(cur, prev, bounds)`` and the decision, in one launch.

    d = sum|cur - prev| / sum|prev|; acc += polyval(coeffs, d); tau_eff = tau * TADS(s); the step is cached iff
    s is not 0 (nor S-1 with force_last), something was computed before, d is finite, acc < tau_eff, the consecutive
    cached count < max_cached, and every band k has rel-L1_k <= tau_eff * gammas[k] (when ``gammas`` is given).
    A computed step resets acc and the consecutive count.

    Args:
        cur, prev: the probe now and at the previous step, same shape ``(..., D)``.
        state: float32 (STATE_LEN,) from ``gate_state`` or a previous call (not modified).
        params: float32 (PARAMS_LEN,) from ``gate_params``.
        coeffs: rescaling polynomial, highest power first (numpy.polyval order); default identity.
        bounds, gammas: FDC channel bands and their threshold multipliers (SpectralCache: [0, D//2, D], (0.8, 1.5)).

    Returns:
        (compute: bool 0-dim tensor on the device, True = run the transformer; new_state; sums (num_bands, 2)).
        Nothing is read back to the host.
    """
    check_float("cur", cur)
    check_float("prev", prev)
    check_same("cur", cur, "prev", prev)
    if cur.dim() == 0 or cur.shape[-1] == 0:
        raise ValueError("cur: must have shape (..., D) with D > 0")
    b = check_bounds(bounds, cur.shape[-1])
    state, params, coeffs_t, gammas_t = _check_gate_args(state, params, coeffs, gammas, len(b) - 1, cur.device)
    return _gate_step_op(cur, prev, state, params, coeffs_t, gammas_t, b, backend_name(cur.device, backend))


def gate_decide(
    sums: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: Sequence[float] | torch.Tensor = (1.0, 0.0),
    *,
    gammas: Sequence[float] | torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate epilogue alone, for sums that were combined first (e.g. ``all_reduce`` of ``band_l1`` results across
    context-parallel ranks, so every rank takes the same decision). ``sums``: float32 (num_bands, 2).
    Returns (compute, new_state) as ``gate_step``."""
    if not isinstance(sums, torch.Tensor):
        raise TypeError(f"sums: expected a torch.Tensor, got {type(sums).__name__}")
    if sums.dtype != torch.float32 or sums.dim() != 2 or sums.shape[1] != 2 or sums.shape[0] < 1:
        raise ValueError(f"sums: expected float32 of shape (num_bands, 2), got {sums.dtype} {tuple(sums.shape)}")
    state, params, coeffs_t, gammas_t = _check_gate_args(state, params, coeffs, gammas, sums.shape[0], sums.device)
    return _gate_decide_op(sums.contiguous(), state, params, coeffs_t, gammas_t, backend_name(sums.device, backend))
