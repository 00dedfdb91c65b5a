"""The error sums of the forecasters' updates in Triton, shared by ``taylor_update_fwd_kernel`` (``taylor.py``, with
``error=``) and ``history_update_fwd_kernel`` (``chebyshev.py``): one set of ``@triton.jit`` helpers, so the two
ops cannot drift apart.

error[b] = (sum (pred - value)^2, sum value^2) over sample b, the b-th of B equal consecutive slices of the N
columns (``fastcache_rt.ops._reference.error_sums``).

Partition (fixed by the sizes, never by the GPU): a 1-D grid of B * C programs, program p = (sample p // C, chunk
p % C), chunk = BLOCK_N consecutive columns of one sample (C = ceil(L / BLOCK_N), at least 1; L = N / B).

1. ``error_partial``: each program forms its terms in float32 (e = pred - value, e * e; value * value: the same
   bits as every backend) and sums its BLOCK_N lanes in float64 with ``tl.sum`` (a tree fixed at compile time),
   into workspace slots p (squared error) and B * C + p (squared value).
2. ``error_finish``: ``tl.debug_barrier()``, one ``tl.atomic_add`` ticket per program (acq_rel, GPU scope); the
   program that draws the last ticket reduces: per sample, lane l adds the sample's partials l, l + BLOCK_P, ... in
   order (float64, ``.cg`` loads: L2, never a stale L1 line), ``tl.sum`` joins the lanes, the result is rounded once
   to float32; then it stores 0 into the counter (no memset before the next launch or a CUDA-graph replay).

The workspace and counter are the band kernels' per-stream scratch (``band_l1._scratch``): launches on one stream
are ordered, so they may share it. Nothing depends on which program finishes last: bitwise run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def error_partial(b_pred, b_value, m, p_ws, i_p, n_parts):
    """Program i_p's float64 partials of the masked lanes (m) into slots i_p and n_parts + i_p."""
    b_e = b_pred - b_value
    b_e2 = tl.where(m, b_e * b_e, 0.0).to(tl.float64)
    b_f2 = tl.where(m, b_value * b_value, 0.0).to(tl.float64)
    o = tl.cast(i_p, tl.int64)
    tl.store(p_ws + o, tl.sum(b_e2, axis=0))
    tl.store(p_ws + n_parts + o, tl.sum(b_f2, axis=0))


@triton.jit
def error_finish(p_ws, p_counter, p_error, B, C, BLOCK_P: tl.constexpr):
    """Ticket; the last program writes error (B, 2) float32 from the B * C partials, per sample in a fixed order,
    and resets the counter."""
    tl.debug_barrier()
    done = tl.atomic_add(p_counter, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        n_parts = tl.cast(B, tl.int64) * C
        o_p = tl.arange(0, BLOCK_P).to(tl.int64)  # [BLOCK_P]
        for i_b in range(B):
            p_e = p_ws + tl.cast(i_b, tl.int64) * C
            acc_e = tl.zeros((BLOCK_P,), dtype=tl.float64)
            acc_f = tl.zeros((BLOCK_P,), dtype=tl.float64)
            for c0 in range(0, C, BLOCK_P):
                m = (c0 + o_p) < C
                acc_e += tl.load(p_e + c0 + o_p, mask=m, other=0.0, cache_modifier=".cg")
                acc_f += tl.load(p_e + n_parts + c0 + o_p, mask=m, other=0.0, cache_modifier=".cg")
            o_out = tl.cast(i_b, tl.int64) * 2
            tl.store(p_error + o_out, tl.sum(acc_e, axis=0).to(tl.float32))
            tl.store(p_error + o_out + 1, tl.sum(acc_f, axis=0).to(tl.float32))
        tl.atomic_xchg(p_counter, 0, sem="relaxed")


# the workspace of one launch: B * C programs, two float64 partials each
BLOCK_P = 256


def error_grid(B: int, N: int, block_n: int) -> tuple[int, int, int]:
    """(L, C, programs) of the partition: L columns per sample, C = max(1, ceil(L / block_n)) chunks per sample,
    B * C programs (B >= 1)."""
    L = N // B
    C = max(1, -(-L // block_n))
    return L, C, B * C
