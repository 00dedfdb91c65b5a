"""Taylor (TaylorSeer) and Hermite (FreqCa) forecasts from finite differences, and their in-place update, in Triton.

taylor_forecast:  out = sum_i diffs[i] * x^i / i!
hermite_forecast: out = sum_k diffs[k] * c_k, c_0 = 1, c_k = H_k(scale x) scale^k / k! (physicists' Hermite)
taylor_update:    new[0] = feature; new[i+1] = (new[i] - old[i]) / gap while i < count, else 0; with ``error=``
                  (constexpr ERROR) also the error sums of the forecast sum_{i < count} w_i old[i] of the feature

One kernel for both forecasts (constexpr MODE picks the weights, computed per program as scalars while streaming the
rows), one for the update. Each is one launch over column blocks (with ERROR: (sample, chunk) blocks, the partition
of ``error_sums.py``).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from . import band_l1 as _band_l1
from .error_sums import BLOCK_P, error_finish, error_grid, error_partial
from .launch import cdiv, launch_options

MODE_TAYLOR = tl.constexpr(0)
MODE_HERMITE = tl.constexpr(1)


def _f64_bits(x: float) -> int:
    """A Python float as the int64 of its IEEE bits (Triton passes float arguments as float32)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit(do_not_specialize=["K", "scale_bits", "distance_value"])
def weighted_rows_fwd_kernel(
    p_diffs,
    p_distance,
    p_out,
    K,
    N,
    s_diffs_k,
    s_diffs_n,
    s_out,
    scale_bits,
    distance_value,
    DISTANCE_PTR: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[o_n] = sum_i c_i diffs[i, o_n], c_i by MODE. The weights are float32, rounded as the reference rounds
    them (x^i via float64 then float32, x^3 as (x*x)*x like torch.pow; factorials as float32; Hermite by its
    float32 recurrence), accumulated row by row in float32."""
    i_n = tl.program_id(0)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
    m_n = o_n < N
    if DISTANCE_PTR:
        b_x = tl.load(p_distance).to(tl.float32)
    else:
        b_x = tl.cast(distance_value, tl.float32)
    b_x64 = b_x.to(tl.float64)
    b_pow = tl.full((), 1.0, tl.float64)  # x^i (Taylor) or scale^i (Hermite), float64
    b_fact = tl.full((), 1.0, tl.float64)  # i!
    if MODE == MODE_HERMITE:
        b_scale = tl.cast(scale_bits, tl.int64).to(tl.float64, bitcast=True)
        b_two_y = 2.0 * (b_x * b_scale.to(tl.float32))  # 2 * y, y = x * scale in float32
        b_h1 = tl.zeros((), dtype=tl.float32)  # H_{i-1}
        b_h2 = tl.zeros((), dtype=tl.float32)  # H_{i-2}
    b_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # [BLOCK_N]
    for i in range(K):
        if MODE == MODE_TAYLOR:
            b_num = tl.where(i == 3, (b_x * b_x) * b_x, b_pow.to(tl.float32))
            b_pow = b_pow * b_x64
        else:
            # H_0 = 1; H_i = 2y H_{i-1} - 2(i-1) H_{i-2} (with H_{-1} = 0 this also gives H_1 = 2y)
            b_h = tl.where(i == 0, 1.0, b_two_y * b_h1 - tl.cast(2 * (i - 1), tl.float32) * b_h2)
            b_num = b_h * b_pow.to(tl.float32)
            b_h2 = b_h1
            b_h1 = b_h
            b_pow = b_pow * b_scale
        b_w = tl.math.div_rn(b_num, b_fact.to(tl.float32))
        b_fact = b_fact * tl.cast(i + 1, tl.float64)
        p_row = p_diffs + tl.cast(i, tl.int64) * s_diffs_k + o_n * s_diffs_n
        b_row = tl.load(p_row, mask=m_n, other=0.0).to(tl.float32)
        b_acc += b_w * b_row
    tl.store(p_out + o_n * s_out, b_acc.to(p_out.dtype.element_ty), mask=m_n)


@triton.jit(do_not_specialize=["K", "gap_value", "count_value", "C", "B"])
def taylor_update_fwd_kernel(
    p_diffs,
    p_feature,
    p_gap,
    p_count,
    p_weights,
    p_ws,
    p_counter,
    p_error,
    K,
    N,
    L,
    C,
    B,
    s_diffs_k,
    s_diffs_n,
    s_feature,
    gap_value,
    count_value,
    GAP_PTR: tl.constexpr,
    COUNT_PTR: tl.constexpr,
    ERROR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """In place over columns o_n: row i is read (when i < count) before it is overwritten; the chain carries
    new[i] in float32 (not rounded to the storage dtype between orders, as the reference).
    ERROR: program (sample i_p // C, chunk i_p % C) of the error partition (``error_sums.py``); the same pass forms
    pred = sum_{i < count} w_i old[i] (rows in order, from 0, a product then an add: the reference's bits) and the
    error sums of pred against the feature; the last program writes them."""
    i_p = tl.program_id(0)
    if ERROR:
        i_b = i_p // C
        o_l = (i_p - i_b * C).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N] in the sample
        m_n = o_l < L
        o_n = i_b.to(tl.int64) * L + o_l
    else:
        o_n = i_p.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        m_n = o_n < N
    if GAP_PTR:
        b_gap = tl.load(p_gap).to(tl.float32)
    else:
        b_gap = tl.cast(gap_value, tl.float32)
    if COUNT_PTR:
        n_old = tl.load(p_count)
    else:
        n_old = tl.cast(count_value, tl.int64)
    b_cur = tl.load(p_feature + o_n * s_feature, mask=m_n, other=0.0).to(tl.float32)  # [BLOCK_N] new[0]
    if ERROR:
        b_feat = b_cur
        b_pred = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(K - 1):
        p_row = p_diffs + tl.cast(i, tl.int64) * s_diffs_k + o_n * s_diffs_n
        ok = i < n_old
        # rows i >= count are not read (their mask is empty)
        m_old = m_n & (o_n < tl.where(ok, N, 0))
        b_old = tl.load(p_row, mask=m_old, other=0.0).to(tl.float32)
        if ERROR:
            b_pred = tl.where(ok, b_pred + tl.load(p_weights + i) * b_old, b_pred)
        b_next = tl.where(ok, tl.math.div_rn(b_cur - b_old, b_gap), 0.0)
        tl.store(p_row, b_cur.to(p_diffs.dtype.element_ty), mask=m_n)
        b_cur = b_next
    p_last = p_diffs + tl.cast(K - 1, tl.int64) * s_diffs_k + o_n * s_diffs_n
    if ERROR:  # the last order feeds the forecast when it was valid (count == K), read before it is overwritten
        ok_last = (K - 1) < n_old
        b_old = tl.load(p_last, mask=m_n & (o_n < tl.where(ok_last, N, 0)), other=0.0).to(tl.float32)
        b_pred = tl.where(ok_last, b_pred + tl.load(p_weights + K - 1) * b_old, b_pred)
    tl.store(p_last, b_cur.to(p_diffs.dtype.element_ty), mask=m_n)
    if ERROR:
        error_partial(b_pred, b_feat, m_n, p_ws, i_p, tl.cast(B, tl.int64) * C)
        error_finish(p_ws, p_counter, p_error, B, C, BLOCK_P)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------

# the tensors whose bytes are the op's traffic (kernels/aot.py checks the width of their loads), and the bytes one
# program has in flight at a time (constexprs, bytes per element): one row of BLOCK_N (the order loop is not
# unrolled); the update reads the feature and an old row
STREAMED = {"weighted_rows_fwd_kernel": ("p_diffs",), "taylor_update_fwd_kernel": ("p_diffs", "p_feature")}
IN_FLIGHT = {"weighted_rows_fwd_kernel": lambda c, e: c["BLOCK_N"] * e,
             "taylor_update_fwd_kernel": lambda c, e: 2 * c["BLOCK_N"] * e}

# 1024 columns x 4 warps: 8 contiguous elements per thread per row (16-byte fp16 loads), one row in flight per
# program, enough programs (N / 1024) to fill any GPU for feature-sized N.
BLOCK_N = 1024
NUM_WARPS = 4


def _forecast(
    diffs: torch.Tensor, distance: torch.Tensor | float, scale: float, mode: int, out: torch.Tensor
) -> None:
    K, N = diffs.shape
    if N == 0:
        return
    d_ptr = isinstance(distance, torch.Tensor)
    weighted_rows_fwd_kernel[(cdiv(N, BLOCK_N),)](
        diffs,
        distance if d_ptr else diffs,
        out,
        K,
        N,
        diffs.stride(0),
        diffs.stride(1),
        out.stride(0),
        _f64_bits(scale),
        0.0 if d_ptr else float(distance),
        DISTANCE_PTR=d_ptr,
        MODE=mode,
        BLOCK_N=BLOCK_N,
        num_warps=NUM_WARPS,
        **launch_options(),
    )


def taylor_forecast(diffs: torch.Tensor, distance: torch.Tensor | float, out: torch.Tensor) -> None:
    """out (N,) = sum_i diffs[i] * distance^i / i!; diffs (K, N) any strides; distance a float32 scalar tensor or a
    Python float. One launch."""
    _forecast(diffs, distance, 1.0, 0, out)


def hermite_forecast(diffs: torch.Tensor, distance: torch.Tensor | float, scale: float, out: torch.Tensor) -> None:
    """out (N,) = diffs[0] + sum_{k>=1} diffs[k] H_k(scale * distance) scale^k / k!. One launch."""
    _forecast(diffs, distance, scale, 1, out)


def _update(diffs, feature, gap, count, weights, error) -> None:
    K, N = diffs.shape
    if K == 0:
        return
    has_error = error is not None
    if has_error:
        B = error.shape[0]
        if B == 0:
            return
        L, C, programs = error_grid(B, N, BLOCK_N)
        ws, counter = _band_l1._scratch(diffs.device, 2 * programs)
    else:
        if N == 0:
            return
        L, C, B, programs = N, 1, 1, cdiv(N, BLOCK_N)
        weights = ws = counter = error = diffs  # unused (ERROR=False)
    g_ptr = isinstance(gap, torch.Tensor)
    c_ptr = isinstance(count, torch.Tensor)
    taylor_update_fwd_kernel[(programs,)](
        diffs,
        feature,
        gap if g_ptr else diffs,
        count if c_ptr else diffs,
        weights,
        ws,
        counter,
        error,
        K,
        N,
        L,
        C,
        B,
        diffs.stride(0),
        diffs.stride(1),
        feature.stride(0),
        0.0 if g_ptr else float(gap),
        0 if c_ptr else (K if count is None else int(count)),
        GAP_PTR=g_ptr,
        COUNT_PTR=c_ptr,
        ERROR=has_error,
        BLOCK_N=BLOCK_N,
        BLOCK_P=BLOCK_P,
        num_warps=NUM_WARPS,
        **launch_options(),
    )


def taylor_update(
    diffs: torch.Tensor, feature: torch.Tensor, gap: torch.Tensor | float, count: torch.Tensor | int | None
) -> None:
    """In place on diffs (K, N): new[0] = feature, new[i+1] = (new[i] - old[i]) / gap if i < count else 0. One launch."""
    _update(diffs, feature, gap, count, None, None)


def taylor_update_error(
    diffs: torch.Tensor,
    feature: torch.Tensor,
    gap: torch.Tensor | float,
    count: torch.Tensor | int | None,
    weights: torch.Tensor,
    error: torch.Tensor,
) -> None:
    """taylor_update, and the error sums (error (B, 2) float32) of pred = sum_{i < count} weights[i] old[i] against
    the feature, in the same launch (``error_sums.py``: one program per (sample, chunk), the last one reduces)."""
    _update(diffs, feature, gap, count, weights, error)
