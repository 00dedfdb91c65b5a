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
    """A fresh gate state: float32 zeros of shape ``(STATE_LEN,)`` on ``device``: step 0, empty accumulator, nothing
    cached (layout: ``fastcache_rt.ops.layout``). One per independent stream of steps (a generation, a CFG branch);
    start the next generation with a fresh one (or ``state.zero_()``).

    Not a registered op: a host helper that makes one small tensor (no upload: zeros are filled on the device). Make
    it outside a CUDA-graph capture and keep it; ``gate_step`` / ``gate_decide`` never modify it in place.

    Example::

        >>> ops.gate_state()
        tensor([0., 0., 0., 0., 0., 0., 0., 0.])
    """
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
    """Pack the gate's scalar parameters: float32 ``(PARAMS_LEN,)`` = ``[tau, S, s_min, s_max, max_cached,
    force_last]`` on ``device`` (layout: ``fastcache_rt.ops.layout``).

    Args:
        tau: threshold on the accumulator (TeaCache's ``rel_l1_thresh``), > 0.
        num_steps: steps of the generation S (>= 1); steps 0 and (with ``force_last``) S-1 always compute. S is read
            only by ``force_last`` and TADS: a rule with both off (FBCache) may pass any S; the state's step counter
            keeps counting past S.
        tads: (s_min, s_max) of SpectralCache's cosine-bell threshold scale ``tau_eff = tau * (s_min + (s_max -
            s_min) * (1 - cos(2 pi s / S)) / 2)``; (1, 1) = off (``tau_eff == tau`` exactly), paper default
            (0.5, 1.5).
        max_cached: CEB budget C_max, a step may be cached only while fewer than this many in a row were; inf = off.
        force_last: compute the last step.

    Not a registered op: a host helper (values checked on the host, ``ValueError`` naming the argument) that
    uploads one small tensor; call it once per generation outside a CUDA-graph capture and reuse the tensor.

    Example::

        >>> ops.gate_params(0.1, 4)                      # tau 0.1, 4 steps, TADS / CEB off, last step forced
        tensor([0.1000, 4.0000, 1.0000, 1.0000,    inf, 1.0000])
    """
    if torch.compiler.is_compiling():
        # made inside a compiled call (a stream's first step): the values were checked where the gate was made, and
        # a gate's float can be symbolic here (a transformer shared by pipelines whose gates have other thresholds)
        s_min, s_max = tads
    else:
        _check_gate_params(tau, num_steps, tads, max_cached)
        s_min, s_max = (float(v) for v in tads)
    return torch.tensor(
        [tau, num_steps, s_min, s_max, max_cached, 1.0 if force_last else 0.0],
        dtype=torch.float32,
        device=device,
    )


def _check_gate_params(tau, num_steps, tads, max_cached) -> None:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau: must be a finite number > 0, got {tau!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
    try:
        s_min, s_max = (float(v) for v in tads)
        if isinstance(tads, (str, bytes)) or any(isinstance(v, bool) for v in tads):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"tads: expected (s_min, s_max), two numbers, got {tads!r}") from None
    if not (math.isfinite(s_min) and math.isfinite(s_max)) or s_min <= 0 or s_max < s_min:
        raise ValueError(f"tads: need 0 < s_min <= s_max, finite, got {tads!r}")
    if isinstance(max_cached, bool) or not isinstance(max_cached, (int, float)):
        raise ValueError(f"max_cached: must be a number >= 1 (or inf), got {max_cached!r}")
    if math.isnan(max_cached) or max_cached < 1:
        raise ValueError(f"max_cached: must be >= 1 (or inf), got {max_cached!r}")


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

    Formula (float32, ``s`` = the state's step counter, ``S`` = ``params``' step count)::

        d       = sum|cur - prev| / sum|prev|                  (over every element and band)
        acc     = state.acc + polyval(coeffs, d)               (TeaCache's rescaled accumulator)
        tau_eff = tau * TADS(s)                                (tau when TADS is off)
        cached  = s != 0 and not (force_last and s >= S - 1) and something was computed before and d is finite
                  and acc < tau_eff and consecutive cached < max_cached
                  and every band k has d_k <= tau_eff * gammas[k]   (when ``gammas`` is given: FDC)
        compute = not cached

    The new state has ``s + 1`` (every call counts, cached or computed), the accumulator and the consecutive-cached
    count reset to 0 on a computed step (kept on a cached one), ``d`` at ``S_REL_L1`` and the counters (layout:
    ``fastcache_rt.ops.layout``). Two rules a caller builds from it without another op: no accumulation (diffusers'
    FirstBlockCache compares each step alone) = zero the accumulator after each call (``new_state * keep``, keep = 1
    but 0 at ``S_ACC``); comparing against the last *computed* step = keep ``prev = torch.where(compute, cur,
    prev)`` instead of the previous step's probe. fastcache_rt's FBCache gate does both
    (``policy.gates.SignalState(accumulate=False, against_last_computed=True)``).

    Args:
        cur, prev: the probe now and at the previous (or last computed) step, same shape ``(..., D)``, same dtype
            float32/float16/bfloat16, same device, any strides.
        state: float32 (STATE_LEN,) from ``gate_state`` or a previous call (not modified).
        params: float32 (PARAMS_LEN,) from ``gate_params``.
        coeffs: rescaling polynomial, highest power first (numpy.polyval order); default identity ``(1, 0)``. A
            sequence (checked on the host, uploaded once per value and stream) or a float32 device tensor.
        bounds, gammas: FDC channel bands and their threshold multipliers (SpectralCache: [0, D//2, D], (0.8, 1.5)).
        backend: as ``band_l1``.

    Returns:
        ``(compute, new_state, sums)``: compute is a bool 0-dim tensor on the device (True = run the transformer),
        new_state float32 (STATE_LEN,), sums float32 (num_bands, 2) (those of ``band_l1``). Nothing is read back
        to the host: a runtime branches on ``compute`` with ``torch.cond`` (compiled), or reads it once where a
        Python ``if`` needs it (eager).

    Reduction: one decision per call for the whole tensor: the sums run over every element (all samples of the
    batch together, e.g. both CFG halves of a batched call), fp32 accumulation, in the order of ``band_l1``. With
    the tokens split over ranks use ``band_l1`` + ``all_reduce`` + ``gate_decide`` instead, so every rank decides
    alike.

    Capture / compile: registered as ``torch.ops.fastcache_rt.gate_step`` (functional, ``mutates_args=()``, with a
    fake kernel: ``torch.compile(fullgraph=True)`` traces it, its outputs can be carried through ``torch.cond``);
    no host sync, nothing uploaded per call once ``coeffs`` / ``bounds`` / ``gammas`` were seen on the stream;
    capturable in a CUDA graph (one kernel node on the GPU backends).

    Example::

        >>> params = ops.gate_params(0.1, num_steps=4)      # tau 0.1; steps 0 and 3 always compute
        >>> state = ops.gate_state()
        >>> prev = torch.ones(2, 8)
        >>> compute, state, _ = ops.gate_step(prev, prev, state, params)          # step 0: computes
        >>> compute, state, sums = ops.gate_step(prev * 1.05, prev, state, params)
        >>> compute, sums                                   # d = 0.8 / 16 = 0.05 < 0.1: cached
        (tensor(False), tensor([[ 0.8000, 16.0000]]))
        >>> compute, state, _ = ops.gate_step(prev * 1.1, prev, state, params)
        >>> compute, state[:3]                              # acc 0.05 + 0.1 >= 0.1: computes, acc resets
        (tensor(True), tensor([3., 0., 0.]))
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
    """The gate epilogue alone, for sums that were combined first: ``gate_step`` = ``band_l1`` + ``gate_decide``.

    With the tokens split over context-parallel ranks, each rank computes ``band_l1`` of its shard, the sums are
    all-reduced (SUM: they add across ranks), and every rank runs ``gate_decide`` on the same sums and state, so every
    rank takes the same decision. The formula and the new state are ``gate_step``'s, with ``d = sum(sums[:, 0]) /
    sum(sums[:, 1])`` and ``d_k = sums[k, 0] / sums[k, 1]``.

    Args:
        sums: float32 of shape (num_bands, 2) on the device: per band (sum |cur - prev|, sum |prev|).
        state, params, coeffs, gammas, backend: as ``gate_step`` (``gammas`` of length num_bands).

    Returns:
        ``(compute, new_state)``: bool 0-dim tensor (True = compute) and float32 (STATE_LEN,), on the device.

    Reduction: only over the bands (``d`` adds the bands' sums); the sums over the data were made (and reduced
    across ranks) before the call.

    Capture / compile: registered as ``torch.ops.fastcache_rt.gate_decide`` (functional, with a fake kernel;
    traced by ``torch.compile(fullgraph=True)``); a few scalar float32 operations, no host sync, capturable in a
    CUDA graph; bitwise the same on every GPU backend (no FMA, one float64-rounded cosine).

    Example::

        >>> params, state = ops.gate_params(0.1, 4), ops.gate_state()
        >>> x = torch.ones(2, 8)
        >>> shards = [ops.band_l1(x[i:i + 1] * 1.05, x[i:i + 1]) for i in range(2)]   # two ranks' halves
        >>> _, state = ops.gate_decide(sum(shards), state, params)      # all_reduce(SUM) in a real run; step 0
        >>> compute, state = ops.gate_decide(sum(shards), state, params)
        >>> compute, state[5]                                            # d = 0.05: cached
        (tensor(False), tensor(0.0500))
    """
    if not isinstance(sums, torch.Tensor):
        raise TypeError(f"sums: expected a torch.Tensor, got {type(sums).__name__}")
    if sums.dtype != torch.float32 or sums.dim() != 2 or sums.shape[1] != 2 or sums.shape[0] < 1:
        raise ValueError(f"sums: expected float32 of shape (num_bands, 2), got {sums.dtype} {tuple(sums.shape)}")
    state, params, coeffs_t, gammas_t = _check_gate_args(state, params, coeffs, gammas, sums.shape[0], sums.device)
    return _gate_decide_op(sums.contiguous(), state, params, coeffs_t, gammas_t, backend_name(sums.device, backend))
