"""Chebyshev ridge-regression forecast (Spectrum) in Triton.

With Phi[j, m] = T_m(taus[j]) over the valid rows j < min(count, n) and m = 0..degree,
w = Phi (Phi^T Phi + lam I)^-1 phi(tau_query), optionally blended with a linear extrapolation, and the forecast is
sum_j w_j history[j]. The (degree+1)^2 system is tiny: every program fits it itself (basis, Gram, Cholesky with the
reference's jitter retry, two triangular solves, all float64 in registers as masked [BLOCK_M, BLOCK_M] blocks), so
chebyshev_forecast is one launch that then streams the valid history rows once.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from . import band_l1 as _band_l1
from .error_sums import BLOCK_P, error_finish, error_grid, error_partial
from .launch import cdiv, launch_options, next_pow2, persistent_programs

NEG_INF = tl.constexpr(float("-inf"))


def _f64_bits(x: float) -> int:
    """A Python float as the int64 of its IEEE bits: Triton passes float arguments as float32, this keeps all 64."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def _f64_arg(bits):
    return tl.cast(bits, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _cheb_basis_rows(b_t, o_m, degree, BLOCK_M: tl.constexpr):
    """[BLOCK_J, BLOCK_M] float64: T_m(t_j) for m <= degree (T_0 = 1, T_1 = t, T_m = 2 t T_{m-1} - T_{m-2}), 0 beyond."""
    b_tm2 = tl.full(b_t.shape, 1.0, tl.float64)  # [BLOCK_J]
    b_tm1 = b_t
    b_phi = tl.where(o_m[None, :] == 0, b_tm2[:, None], tl.where(o_m[None, :] == 1, b_tm1[:, None], 0.0))
    for m in tl.static_range(2, BLOCK_M):
        b_tm = 2.0 * b_t * b_tm1 - b_tm2
        b_phi = tl.where(o_m[None, :] == m, b_tm[:, None], b_phi)
        b_tm2 = b_tm1
        b_tm1 = b_tm
    return tl.where(o_m[None, :] <= degree, b_phi, 0.0)


@triton.jit
def _cheb_basis_point(b_q, o_m, degree, BLOCK_M: tl.constexpr):
    """[BLOCK_M] float64: T_m(q) for m <= degree, 0 beyond."""
    b_tm2 = tl.full((), 1.0, tl.float64)
    b_tm1 = b_q
    b_phi = tl.where(o_m == 0, b_tm2, tl.where(o_m == 1, b_tm1, 0.0))
    for m in tl.static_range(2, BLOCK_M):
        b_tm = 2.0 * b_q * b_tm1 - b_tm2
        b_phi = tl.where(o_m == m, b_tm, b_phi)
        b_tm2 = b_tm1
        b_tm1 = b_tm
    return tl.where(o_m <= degree, b_phi, 0.0)


@triton.jit
def _cholesky_forward(b_a, b_rhs, o_m, BLOCK_M: tl.constexpr):
    """Right-looking Cholesky A = L L^T of a [BLOCK_M, BLOCK_M] float64 block with the forward substitution
    L y = rhs fused in. Returns (L, y, ok): ok = every pivot was > 0 (a NaN pivot fails, as in LAPACK)."""
    o_c = o_m[None, :]
    b_s = b_a  # [BLOCK_M, BLOCK_M] Schur complement: rows/columns > j still to factor
    b_l = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float64)  # [BLOCK_M, BLOCK_M]
    b_r = b_rhs  # [BLOCK_M] right-hand side minus the solved part
    b_y = tl.zeros((BLOCK_M,), dtype=tl.float64)
    b_ok = tl.full((), 1, tl.int1)
    for j in tl.static_range(BLOCK_M):
        b_sj = tl.sum(tl.where(o_c == j, b_s, 0.0), axis=1)  # [BLOCK_M] column j of the Schur complement
        b_d = tl.sum(tl.where(o_m == j, b_sj, 0.0), axis=0)
        b_ok = b_ok & (b_d > 0.0)
        b_piv = tl.sqrt(b_d)
        b_v = tl.where(o_m > j, b_sj / b_piv, 0.0)  # [BLOCK_M] L[j+1:, j]
        b_l = tl.where(o_c == j, tl.where(o_m == j, b_piv, b_v)[:, None], b_l)
        b_s = b_s - b_v[:, None] * b_v[None, :]
        b_yj = tl.sum(tl.where(o_m == j, b_r, 0.0), axis=0) / b_piv
        b_y = tl.where(o_m == j, b_yj, b_y)
        b_r = b_r - b_yj * b_v
    return b_l, b_y, b_ok


@triton.jit
def _backward_substitution(b_l, b_y, o_m, BLOCK_M: tl.constexpr):
    """z with L^T z = y (column-oriented), float64 [BLOCK_M]."""
    o_r = o_m[:, None]
    b_w = b_y
    b_z = tl.zeros((BLOCK_M,), dtype=tl.float64)
    for ii in tl.static_range(BLOCK_M):
        i = BLOCK_M - 1 - ii
        b_li = tl.sum(tl.where(o_r == i, b_l, 0.0), axis=0)  # [BLOCK_M] row i of L = column i of L^T
        b_lii = tl.sum(tl.where(o_m == i, b_li, 0.0), axis=0)
        b_zi = tl.sum(tl.where(o_m == i, b_w, 0.0), axis=0) / b_lii
        b_z = tl.where(o_m == i, b_zi, b_z)
        b_w = b_w - b_zi * tl.where(o_m < i, b_li, 0.0)
    return b_z


@triton.jit
def _valid_count(p_count, count_value, n, COUNT_PTR: tl.constexpr):
    """min(count, n) clamped at 0: count read from the device (COUNT_PTR) or given as an argument (None -> n)."""
    if COUNT_PTR:
        n_valid = tl.minimum(tl.maximum(tl.load(p_count), 0), n)
    else:
        n_valid = tl.minimum(tl.maximum(tl.cast(count_value, tl.int64), 0), n)
    return n_valid


@triton.jit
def _query(p_tau_query, tau_query_value, QUERY_PTR: tl.constexpr):
    """tau_query as float64: read from the device, or the float32 argument."""
    if QUERY_PTR:
        b_q = tl.load(p_tau_query).to(tl.float64)
    else:
        b_q = tl.cast(tau_query_value, tl.float32).to(tl.float64)
    return b_q


@triton.jit
def _cheb_fit(
    p_taus,
    b_q,
    n_valid,
    degree,
    lam,
    HAS_BLEND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_JF: tl.constexpr,
):
    """Solve (Phi^T Phi + lam I) z = phi(q) in float64 over the valid rows (Cholesky; on failure again with the
    jitter 1e-6 * mean(diag), as the reference), and find the two valid rows of largest tau for the blend.
    Returns (z [BLOCK_M], j_last, j_prev, k, has_prev): the linear weights are 1 + k on j_last, -k on j_prev."""
    o_m = tl.arange(0, BLOCK_M)
    o_r = o_m[:, None]
    o_c = o_m[None, :]
    b_gram = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float64)  # [BLOCK_M, BLOCK_M]
    # top-2 of tau over the valid rows, ties to the first index (torch.argmax order)
    b_t1 = tl.full((), NEG_INF, tl.float64)
    b_t2 = tl.full((), NEG_INF, tl.float64)
    i_1 = tl.zeros((), dtype=tl.int64)
    i_2 = tl.zeros((), dtype=tl.int64)
    for j0 in range(0, n_valid, BLOCK_JF):
        o_j = j0 + tl.arange(0, BLOCK_JF).to(tl.int64)  # [BLOCK_JF]
        m_j = o_j < n_valid
        b_t = tl.load(p_taus + o_j, mask=m_j, other=0.0).to(tl.float64)
        b_phi = tl.where(
            m_j[:, None], _cheb_basis_rows(b_t, o_m, degree, BLOCK_M), 0.0
        )  # [BLOCK_JF, BLOCK_M]
        b_gram += tl.sum(b_phi[:, :, None] * b_phi[:, None, :], axis=0)  # [BLOCK_M, BLOCK_M]
        if HAS_BLEND:
            b_tv = tl.where(m_j, b_t, NEG_INF)
            b_c1 = tl.max(b_tv, axis=0)
            i_c1 = tl.min(tl.where(b_tv == b_c1, o_j, j0 + BLOCK_JF), axis=0)
            b_tv = tl.where(o_j == i_c1, NEG_INF, b_tv)
            b_c2 = tl.max(b_tv, axis=0)
            i_c2 = tl.min(tl.where(b_tv == b_c2, o_j, j0 + BLOCK_JF), axis=0)
            # merge with the rows before this chunk (which win ties: lower index)
            take = b_c1 > b_t1
            b_n2 = tl.where(take, tl.where(b_c2 > b_t1, b_c2, b_t1), tl.where(b_c1 > b_t2, b_c1, b_t2))
            i_n2 = tl.where(take, tl.where(b_c2 > b_t1, i_c2, i_1), tl.where(b_c1 > b_t2, i_c1, i_2))
            b_t1 = tl.where(take, b_c1, b_t1)
            i_1 = tl.where(take, i_c1, i_1)
            b_t2 = b_n2
            i_2 = i_n2

    # ridge (real block only); the padding block is the identity, so it factors and solves to zero
    m_real = (o_r <= degree) & (o_c <= degree)
    b_eye = tl.where(o_r == o_c, 1.0, 0.0).to(tl.float64)
    b_gram = tl.where(m_real, b_gram + lam * b_eye, b_eye)
    b_phi_q = _cheb_basis_point(b_q, o_m, degree, BLOCK_M)
    b_l, b_y, b_ok = _cholesky_forward(b_gram, b_phi_q, o_m, BLOCK_M)
    if b_ok == 0:
        # not positive definite (lam = 0 and too few distinct rows): retry with 1e-6 * mean(diag) on the diagonal
        b_diag = tl.sum(tl.where((o_r == o_c) & m_real, b_gram, 0.0), axis=1)  # [BLOCK_M]
        b_jitter = 1e-6 * (tl.sum(b_diag, axis=0) / (degree + 1.0))
        b_l, b_y, b_ok = _cholesky_forward(
            tl.where(m_real, b_gram + b_jitter * b_eye, b_eye), b_phi_q, o_m, BLOCK_M
        )
    b_z = _backward_substitution(b_l, b_y, o_m, BLOCK_M)

    if HAS_BLEND:
        # two equal largest taus give no slope: hold the last row
        b_has_prev = (tl.abs(b_t2) < float("inf")) & (b_t2 < b_t1)
        b_k = tl.where(b_has_prev, (b_q - b_t1) / (b_t1 - tl.where(b_has_prev, b_t2, b_t1 - 1.0)), 0.0 * b_q)
    else:
        b_has_prev = tl.full((), 0, tl.int1)
        b_k = tl.zeros((), dtype=tl.float64)
    return b_z, i_1, i_2, b_k, b_has_prev


@triton.jit
def _cheb_row_weights(
    p_taus,
    o_j,
    n_valid,
    degree,
    b_z,
    i_last,
    i_prev,
    b_k,
    b_has_prev,
    blend,
    HAS_BLEND: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """float32 weights of rows o_j ([BLOCK_J]): phi(t_j) . z (0 . z for invalid rows, as the reference's masked Phi),
    blended, NaN if no row is valid. Invalid rows' taus are not read."""
    o_m = tl.arange(0, BLOCK_M)
    m_j = o_j < n_valid
    b_t = tl.load(p_taus + o_j, mask=m_j, other=0.0).to(tl.float64)
    b_phi = tl.where(m_j[:, None], _cheb_basis_rows(b_t, o_m, degree, BLOCK_M), 0.0)  # [BLOCK_J, BLOCK_M]
    b_w = tl.sum(b_phi * b_z[None, :], axis=1)  # [BLOCK_J]
    if HAS_BLEND:
        i_prev = tl.where(b_has_prev, i_prev, -1)  # (folded into the index: no scalar & vector mask)
        b_lin = tl.where(o_j == i_last, 1.0 + b_k, 0.0) + tl.where(o_j == i_prev, -b_k, 0.0)
        b_w = blend * b_w + (1.0 - blend) * b_lin
    b_w = tl.where(n_valid > 0, b_w, float("nan"))
    return b_w.to(tl.float32)


@triton.jit(do_not_specialize=["n", "degree", "lam_bits", "blend_bits", "tau_query_value", "count_value"])
def chebyshev_weights_kernel(
    p_taus,
    p_tau_query,
    p_count,
    p_out,
    n,
    degree,
    lam_bits,
    blend_bits,
    tau_query_value,
    count_value,
    QUERY_PTR: tl.constexpr,
    COUNT_PTR: tl.constexpr,
    HAS_BLEND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_JF: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """One program: fit, then write all n weights (zero or NaN as the reference for invalid rows)."""
    n_valid = _valid_count(p_count, count_value, n, COUNT_PTR)
    b_q = _query(p_tau_query, tau_query_value, QUERY_PTR)
    lam = _f64_arg(lam_bits)
    blend = _f64_arg(blend_bits)
    b_z, i_last, i_prev, b_k, b_has_prev = _cheb_fit(
        p_taus, b_q, n_valid, degree, lam, HAS_BLEND, BLOCK_M, BLOCK_JF
    )
    for j0 in range(0, n, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)  # [BLOCK_J]
        b_w = _cheb_row_weights(
            p_taus, o_j, n_valid, degree, b_z, i_last, i_prev, b_k, b_has_prev, blend, HAS_BLEND, BLOCK_M
        )
        tl.store(p_out + o_j, b_w, mask=o_j < n)


@triton.jit
def _cheb_rows_tile(p_hist, o_j, o_n, m_n, n_valid, s_hist_j, s_hist_n, b_w):
    """sum_j w_j history[j, o_n] over the valid rows among o_j: [BLOCK_N] float32 (rows >= n_valid not read)."""
    m_j = o_j < n_valid
    p_h = p_hist + o_j[:, None] * s_hist_j + o_n[None, :] * s_hist_n
    b_h = tl.load(p_h, mask=m_j[:, None] & m_n[None, :], other=0.0).to(tl.float32)  # [BLOCK_J, BLOCK_N]
    return tl.sum(tl.where(m_j[:, None], b_w[:, None] * b_h, 0.0), axis=0)


@triton.jit(do_not_specialize=["n", "degree", "lam_bits", "blend_bits", "tau_query_value", "count_value"])
def chebyshev_forecast_fwd_kernel(
    p_hist,
    p_taus,
    p_tau_query,
    p_count,
    p_out,
    n,
    N,
    s_hist_j,
    s_hist_n,
    s_out,
    degree,
    lam_bits,
    blend_bits,
    tau_query_value,
    count_value,
    QUERY_PTR: tl.constexpr,
    COUNT_PTR: tl.constexpr,
    HAS_BLEND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_JF: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Persistent grid: each program fits the weights once, then loops over its column blocks of [BLOCK_N]."""
    i_p = tl.program_id(0)
    n_p = tl.num_programs(0)
    n_valid = _valid_count(p_count, count_value, n, COUNT_PTR)
    b_q = _query(p_tau_query, tau_query_value, QUERY_PTR)
    lam = _f64_arg(lam_bits)
    blend = _f64_arg(blend_bits)
    b_z, i_last, i_prev, b_k, b_has_prev = _cheb_fit(
        p_taus, b_q, n_valid, degree, lam, HAS_BLEND, BLOCK_M, BLOCK_JF
    )

    o_jb = tl.arange(0, BLOCK_J).to(tl.int64)  # [BLOCK_J]
    # The reference sums w_j * 0 over the invalid rows too: 0, or NaN when w is (e.g. no valid row at all).
    o_inv = n_valid + o_jb
    b_w_inv = _cheb_row_weights(
        p_taus, o_inv, n_valid, degree, b_z, i_last, i_prev, b_k, b_has_prev, blend, HAS_BLEND, BLOCK_M
    )
    b_inv = tl.sum(tl.where(o_inv < n, b_w_inv * 0.0, 0.0), axis=0)
    # weights of the first BLOCK_J rows, reused by every column block (the usual history fits in one chunk)
    b_w0 = _cheb_row_weights(
        p_taus, o_jb, n_valid, degree, b_z, i_last, i_prev, b_k, b_has_prev, blend, HAS_BLEND, BLOCK_M
    )

    n_blocks = tl.cdiv(tl.cast(N, tl.int64), BLOCK_N)  # int64: N + BLOCK_N - 1 may pass 2^31 - 1
    for i_blk in range(i_p, n_blocks, n_p):
        o_n = tl.cast(i_blk, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        m_n = o_n < N
        b_acc = tl.zeros((BLOCK_N,), dtype=tl.float32) + b_inv
        b_acc += _cheb_rows_tile(p_hist, o_jb, o_n, m_n, n_valid, s_hist_j, s_hist_n, b_w0)
        for j0 in range(BLOCK_J, n_valid, BLOCK_J):
            o_j = j0 + o_jb
            b_w = _cheb_row_weights(
                p_taus, o_j, n_valid, degree, b_z, i_last, i_prev, b_k, b_has_prev, blend, HAS_BLEND, BLOCK_M
            )
            b_acc += _cheb_rows_tile(p_hist, o_j, o_n, m_n, n_valid, s_hist_j, s_hist_n, b_w)
        tl.store(p_out + o_n * s_out, b_acc.to(p_out.dtype.element_ty), mask=m_n)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n", "row_value", "count_value", "C", "B"])
def history_update_fwd_kernel(
    p_hist,
    p_value,
    p_row,
    p_weights,
    p_count,
    p_ws,
    p_counter,
    p_error,
    n,
    N,
    L,
    C,
    B,
    s_hist_j,
    s_hist_n,
    s_value,
    row_value,
    count_value,
    ROW_PTR: tl.constexpr,
    COUNT_PTR: tl.constexpr,
    ERROR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """history[row, o_n] = value[o_n] (the bits; no write when row is outside [0, n)). ERROR: program (sample
    i_p // C, chunk i_p % C) of the error partition (``error_sums.py``); first pred = sum_{j < count} w_j
    history[j] (the valid rows in order, from 0, a product then an add: the reference's bits), read before the
    write, and the error sums of pred against value; the last program writes them."""
    i_p = tl.program_id(0)
    if ERROR:
        i_b = i_p // C
        o_l = (i_p - i_b * C).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N] in the sample
        m_n = o_l < L
        o_n = i_b.to(tl.int64) * L + o_l
    else:
        o_n = i_p.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        m_n = o_n < N
    if ROW_PTR:
        row = tl.load(p_row)
    else:
        row = tl.cast(row_value, tl.int64)
    b_raw = tl.load(p_value + o_n * s_value, mask=m_n, other=0.0)  # [BLOCK_N] value, its own dtype
    if ERROR:
        n_valid = _valid_count(p_count, count_value, n, COUNT_PTR)
        b_pred = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in range(n_valid):  # rows j >= count are not read
            b_x = tl.load(p_hist + tl.cast(j, tl.int64) * s_hist_j + o_n * s_hist_n, mask=m_n, other=0.0)
            b_pred = b_pred + tl.load(p_weights + j) * b_x.to(tl.float32)
        error_partial(b_pred, b_raw.to(tl.float32), m_n, p_ws, i_p, tl.cast(B, tl.int64) * C)
    m_w = m_n & (o_n < tl.where((row >= 0) & (row < n), N, 0))
    tl.store(p_hist + row * s_hist_j + o_n * s_hist_n, b_raw, mask=m_w)
    if ERROR:
        error_finish(p_ws, p_counter, p_error, B, C, BLOCK_P)


# the tensors whose bytes are the op's traffic (kernels/aot.py checks the width of their loads), and the bytes one
# program has in flight at a time (constexprs, bytes per element): a [BLOCK_J, BLOCK_N] history tile; the value's
# BLOCK_N columns (and one history row at a time with the error sums)
STREAMED = {"chebyshev_forecast_fwd_kernel": ("p_hist",), "history_update_fwd_kernel": ("p_hist", "p_value")}
IN_FLIGHT = {"chebyshev_forecast_fwd_kernel": lambda c, e: c["BLOCK_J"] * c["BLOCK_N"] * e,
             "history_update_fwd_kernel": lambda c, e: (2 if c["ERROR"] else 1) * c["BLOCK_N"] * e}


def _fit_blocks(degree: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_JF): the padded system size and rows per Gram chunk ([BLOCK_JF, BLOCK_M, BLOCK_M] <= 1024)."""
    BLOCK_M = next_pow2(degree + 1)
    return BLOCK_M, max(1, min(32, 1024 // (BLOCK_M * BLOCK_M)))


def _scalars(taus: torch.Tensor, tau_query, count, n: int) -> tuple:
    """(tau_query pointer, count pointer, tau_query value, count value, QUERY_PTR, COUNT_PTR) for the kernels:
    a tensor is read by the kernel, a Python number passed as an argument (no upload)."""
    q_ptr = isinstance(tau_query, torch.Tensor)
    c_ptr = isinstance(count, torch.Tensor)
    return (
        tau_query if q_ptr else taus,
        count if c_ptr else taus,
        0.0 if q_ptr else float(tau_query),
        0 if c_ptr else (n if count is None else int(count)),
        q_ptr,
        c_ptr,
    )


WEIGHTS_NUM_WARPS = 8  # the [BLOCK_JF, BLOCK_M, BLOCK_M] Gram blocks over 256 threads: no spills at degree 16


def chebyshev_weights(
    taus: torch.Tensor,
    tau_query: torch.Tensor | float,
    count: torch.Tensor | int | None,
    degree: int,
    lam: float,
    blend: float,
    out: torch.Tensor,
) -> None:
    """out (float32 (n,)) = the forecast weights; taus float32 (n,) contiguous. One program, one launch."""
    n = taus.shape[0]
    BLOCK_M, BLOCK_JF = _fit_blocks(degree)
    p_q, p_c, q_val, c_val, q_ptr, c_ptr = _scalars(taus, tau_query, count, n)
    chebyshev_weights_kernel[(1,)](
        taus,
        p_q,
        p_c,
        out,
        n,
        degree,
        _f64_bits(lam),
        _f64_bits(blend),
        q_val,
        c_val,
        QUERY_PTR=q_ptr,
        COUNT_PTR=c_ptr,
        HAS_BLEND=float(blend) != 1.0,
        BLOCK_M=BLOCK_M,
        BLOCK_JF=BLOCK_JF,
        BLOCK_J=64,
        num_warps=WEIGHTS_NUM_WARPS,
        **launch_options(),
    )


# [16, 1024] history tiles over 8 warps: 16-byte loads, 32 KiB (half precision) in flight per program. ptxas left to
# itself caps some variants at 128 registers (to fit two programs per SM) and spills; allowed 255 it spills in none
# (sm_80 / sm_90: 137-248 registers, one program per SM, which the grid follows: ``persistent_programs``).
FORECAST_BLOCK_N = 1024
FORECAST_NUM_WARPS = 8
FORECAST_MAXNREG = 255


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
    """out (N,) any stride = sum over valid rows j of w_j history[j]; history (n, N) any strides, fp32/fp16/bf16.
    One launch."""
    n, N = history.shape
    if N == 0:
        return
    BLOCK_M, BLOCK_JF = _fit_blocks(degree)
    BLOCK_N = FORECAST_BLOCK_N
    p_q, p_c, q_val, c_val, q_ptr, c_ptr = _scalars(taus, tau_query, count, n)
    args = (history, taus, p_q, p_c, out, n, N, history.stride(0), history.stride(1), out.stride(0), degree,
            _f64_bits(lam), _f64_bits(blend), q_val, c_val)
    meta = dict(QUERY_PTR=q_ptr, COUNT_PTR=c_ptr, HAS_BLEND=float(blend) != 1.0, BLOCK_M=BLOCK_M, BLOCK_JF=BLOCK_JF,
                BLOCK_J=16, BLOCK_N=BLOCK_N, num_warps=FORECAST_NUM_WARPS, maxnreg=FORECAST_MAXNREG,
                **launch_options())
    # Persistent grid, one wave: every program fits the system itself (float64, in registers), then streams
    # [16, BLOCK_N] tiles of the history. As many programs as the compiled kernel lets reside at once on the device,
    # never more than there are column blocks.
    key = (history.dtype, out.dtype, q_ptr, c_ptr, meta["HAS_BLEND"], BLOCK_M, N % 16 == 0, _aligned(history, out))
    programs = persistent_programs(chebyshev_forecast_fwd_kernel, key, history.device, cdiv(N, BLOCK_N), args, meta)
    chebyshev_forecast_fwd_kernel[(programs,)](*args, **meta)


def _aligned(*tensors: torch.Tensor) -> tuple:
    """What of the tensors' addresses and strides Triton specializes on (16-byte divisibility): the same key, the
    same compiled kernel."""
    return tuple((t.data_ptr() % 16 == 0, *(s % 16 == 0 for s in t.stride()), *(s == 1 for s in t.stride()))
                 for t in tensors)


HISTORY_BLOCK_N = 1024


def history_update(
    history: torch.Tensor,
    value: torch.Tensor,
    row: torch.Tensor | int,
    weights: torch.Tensor,
    count: torch.Tensor | int | None,
    error: torch.Tensor | None,
) -> None:
    """history (n, N) any strides: history[row] = value (value (N,) any stride, same dtype); with error (float32
    (B, 2)) first the error sums of pred = sum_{j < count} weights[j] history[j] against value. One launch."""
    n, N = history.shape
    has_error = error is not None
    if has_error:
        B = error.shape[0]
        if B == 0:
            return
        L, C, programs = error_grid(B, N, HISTORY_BLOCK_N)
        ws, counter = _band_l1._scratch(history.device, 2 * programs)
    else:
        if N == 0:
            return
        L, C, B, programs = N, 1, 1, cdiv(N, HISTORY_BLOCK_N)
        ws = counter = error = history  # unused (ERROR=False)
    r_ptr = isinstance(row, torch.Tensor)
    c_ptr = isinstance(count, torch.Tensor)
    history_update_fwd_kernel[(programs,)](
        history,
        value,
        row if r_ptr else history,
        weights,
        count if c_ptr else history,
        ws,
        counter,
        error,
        n,
        N,
        L,
        C,
        B,
        history.stride(0),
        history.stride(1),
        value.stride(0),
        0 if r_ptr else int(row),
        0 if c_ptr else (n if count is None else int(count)),
        ROW_PTR=r_ptr,
        COUNT_PTR=c_ptr,
        ERROR=has_error,
        BLOCK_N=HISTORY_BLOCK_N,
        BLOCK_P=BLOCK_P,
        num_warps=4,
        **launch_options(),
    )
