"""Band-wise relative-L1 sums and the cache gate, in Triton.

band_l1:     out[b, k] = (sum |cur - prev|, sum |prev|) over the channels of band k (and all rows; all samples unless
             per_sample). One launch: a grid of (channel block, row chunk, sample) tiles, fixed by the input's size;
             each program writes per-band partial sums to a per-stream workspace, the last program to finish (atomic
             ticket) reduces them. The order is ``_reference.band_l1_gpu_order``: float32 per channel and row chunk,
             sequential; then order-free exact group sums. The bits depend on the input only, not on the GPU, the
             grid or the order in which programs run, and equal the CUDA backend's.
gate_step:   the same launch with the gate epilogue (``gate_decide``) run by that last program.
gate_decide: the gate epilogue alone on given band sums: one program.

The launchers take the canonical protocol arguments (see ``fastcache_rt/ops/_backend.py``) and read no device value
on the host."""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from fastcache_rt.ops import layout

from .launch import cdiv, launch_options

# Gate layouts (constexpr so that @triton.jit code may read them).
S_STEP = tl.constexpr(layout.S_STEP)
S_ACC = tl.constexpr(layout.S_ACC)
S_CONSEC = tl.constexpr(layout.S_CONSEC)
S_HAS_CACHE = tl.constexpr(layout.S_HAS_CACHE)
S_LAST_COMPUTE = tl.constexpr(layout.S_LAST_COMPUTE)
S_REL_L1 = tl.constexpr(layout.S_REL_L1)
S_NONFINITE = tl.constexpr(layout.S_NONFINITE)
S_COMPUTED = tl.constexpr(layout.S_COMPUTED)
P_TAU = tl.constexpr(layout.P_TAU)
P_NUM_STEPS = tl.constexpr(layout.P_NUM_STEPS)
P_TADS_MIN = tl.constexpr(layout.P_TADS_MIN)
P_TADS_MAX = tl.constexpr(layout.P_TADS_MAX)
P_MAX_CACHED = tl.constexpr(layout.P_MAX_CACHED)
P_FORCE_LAST = tl.constexpr(layout.P_FORCE_LAST)
TWO_PI = tl.constexpr(6.283185307179586)



# ----------------------------------------------------------------------------------------------------------------
# gate epilogue (shared by gate_decide_kernel and the fused band_l1_fwd_kernel)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _rel(b_num, b_den):
    # 0/0 (nothing changed, nothing there) is 0; x/0 is inf; NaN stays NaN. div_rn: IEEE division, as torch.
    return tl.where((b_num == 0.0) & (b_den == 0.0), 0.0, tl.math.div_rn(b_num, b_den))


@triton.jit
def _gate_tau_eff(p_state, s_state, p_params, s_params):
    """TADS threshold tau * (s_min + (s_max - s_min) * (1 - cos(2 pi s / S)) / 2), float32 like the reference."""
    b_s = tl.load(p_state + S_STEP * s_state)
    b_tau = tl.load(p_params + P_TAU * s_params)
    b_steps = tl.load(p_params + P_NUM_STEPS * s_params)
    b_min = tl.load(p_params + P_TADS_MIN * s_params)
    b_max = tl.load(p_params + P_TADS_MAX * s_params)
    b_x = tl.math.div_rn(TWO_PI * b_s, b_steps)
    # cos of the float32 angle evaluated in float64 and rounded: the correctly rounded float32 cosine.
    b_cos = tl.cos(b_x.to(tl.float64)).to(tl.float32)
    b_bell = (1.0 - b_cos) * 0.5
    return b_tau * (b_min + (b_max - b_min) * b_bell)


@triton.jit
def _gate_band(
    b_num, b_den, b_fdc, b_diff, b_mag, b_tau_eff, p_gammas, s_gammas, i_k, HAS_GAMMAS: tl.constexpr
):
    """Fold band i_k's float32 sums into the totals and the per-band (FDC) check."""
    b_num += b_diff
    b_den += b_mag
    if HAS_GAMMAS:
        b_gamma = tl.load(p_gammas + i_k * s_gammas)
        # NaN compares false: a NaN band fails the check (the step is computed anyway, it is non-finite).
        b_fdc = b_fdc & (_rel(b_diff, b_mag) <= b_tau_eff * b_gamma)
    return b_num, b_den, b_fdc


@triton.jit
def _gate_finish(
    b_num,
    b_den,
    b_fdc,
    b_tau_eff,
    p_state,
    s_state,
    p_params,
    s_params,
    p_coeffs,
    s_coeffs,
    P,
    p_decision,
    p_state_out,
    s_state_out,
):
    """Decision + new state from the total sums, float32, the rules of ``_reference.gate_decide``."""
    b_d = _rel(b_num, b_den)
    b_s = tl.load(p_state + S_STEP * s_state)
    b_acc = tl.load(p_state + S_ACC * s_state)
    b_consec = tl.load(p_state + S_CONSEC * s_state)
    b_has = tl.load(p_state + S_HAS_CACHE * s_state)
    b_nonfinite = tl.load(p_state + S_NONFINITE * s_state)
    b_computed = tl.load(p_state + S_COMPUTED * s_state)
    b_steps = tl.load(p_params + P_NUM_STEPS * s_params)
    b_max_cached = tl.load(p_params + P_MAX_CACHED * s_params)
    b_force_last = tl.load(p_params + P_FORCE_LAST * s_params)

    # Horner from 0, highest power first (numpy.polyval order): 0 * inf = NaN, as the reference.
    b_poly = tl.zeros((), dtype=tl.float32)
    for i in range(P):
        b_poly = b_poly * b_d + tl.load(p_coeffs + i * s_coeffs)
    b_acc_new = b_acc + b_poly

    b_finite = tl.abs(b_d) < float("inf")
    b_forced = (b_s == 0.0) | ((b_force_last > 0.0) & (b_s >= b_steps - 1.0)) | (b_has <= 0.0) | (~b_finite)
    b_skip = (~b_forced) & (b_acc_new < b_tau_eff) & (b_consec < b_max_cached) & b_fdc
    b_compute = ~b_skip
    b_cf = b_compute.to(tl.float32)

    tl.store(p_state_out + S_STEP * s_state_out, b_s + 1.0)
    tl.store(p_state_out + S_ACC * s_state_out, tl.where(b_compute, 0.0, b_acc_new))
    tl.store(p_state_out + S_CONSEC * s_state_out, tl.where(b_compute, 0.0, b_consec + 1.0))
    tl.store(
        p_state_out + S_HAS_CACHE * s_state_out, tl.maximum(b_has, b_cf, propagate_nan=tl.PropagateNan.ALL)
    )
    tl.store(p_state_out + S_LAST_COMPUTE * s_state_out, b_cf)
    tl.store(p_state_out + S_REL_L1 * s_state_out, b_d)
    tl.store(p_state_out + S_NONFINITE * s_state_out, b_nonfinite + (~b_finite).to(tl.float32))
    tl.store(p_state_out + S_COMPUTED * s_state_out, b_computed + b_cf)
    tl.store(p_decision, b_compute)


@triton.jit(do_not_specialize=["nb", "P"])
def gate_decide_kernel(
    p_sums,
    s_sums_k,
    s_sums_c,
    p_state,
    s_state,
    p_params,
    s_params,
    p_coeffs,
    s_coeffs,
    p_gammas,
    s_gammas,
    p_decision,
    p_state_out,
    s_state_out,
    nb,
    P,
    HAS_GAMMAS: tl.constexpr,
):
    b_tau_eff = _gate_tau_eff(p_state, s_state, p_params, s_params)
    b_num = tl.zeros((), dtype=tl.float32)
    b_den = tl.zeros((), dtype=tl.float32)
    b_fdc = tl.full((), 1, dtype=tl.int1)
    for i_k in range(nb):
        b_diff = tl.load(p_sums + i_k * s_sums_k)
        b_mag = tl.load(p_sums + i_k * s_sums_k + s_sums_c)
        b_num, b_den, b_fdc = _gate_band(
            b_num, b_den, b_fdc, b_diff, b_mag, b_tau_eff, p_gammas, s_gammas, i_k, HAS_GAMMAS
        )
    _gate_finish(
        b_num,
        b_den,
        b_fdc,
        b_tau_eff,
        p_state,
        s_state,
        p_params,
        s_params,
        p_coeffs,
        s_coeffs,
        P,
        p_decision,
        p_state_out,
        s_state_out,
    )


# ----------------------------------------------------------------------------------------------------------------
# band sums (+ fused gate), in the GPU order of ``_reference.band_l1_gpu_order``
# ----------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_d", "n_c", "n_b", "R", "nb", "P", "num_slots", "B_OUT"])
def band_l1_fwd_kernel(
    p_cur,
    p_prev,
    p_bounds,
    p_out,
    p_ws,
    p_count,
    p_state,
    s_state,
    p_params,
    s_params,
    p_coeffs,
    s_coeffs,
    p_gammas,
    s_gammas,
    p_decision,
    p_state_out,
    s_state_out,
    n_d,
    n_c,
    n_b,
    R,
    D,
    nb,
    P,
    s_cur_b,
    s_cur_r,
    s_cur_d,
    s_prev_b,
    s_prev_r,
    s_prev_d,
    num_slots,
    B_OUT,
    PER_SAMPLE: tl.constexpr,
    FUSE_GATE: tl.constexpr,
    HAS_GAMMAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK_R: tl.constexpr,
    UNROLL: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """1-D grid of n_d x n_c x n_b programs: tile (channel block j of BLOCK_D channels, row chunk c of CHUNK_R rows,
    sample b), channel block fastest. The grid depends on the input's size only.
    Workspace p_ws: float64 [2 (diff, mag), n_b, num_slots, n_c]; the level-1 sum of tile (j, c, b) for band k goes
    to slot j + k. The (block, band) pairs that overlap form a staircase on which j + k strictly increases, so slots
    are unique (num_slots = J + nb - 1) and band k's partials of one sample are one contiguous run
    [j_first + k, j_last + k] x n_c: the last program streams it with vector loads."""
    i_p = tl.program_id(0)
    i_d = i_p % n_d
    i_c = (i_p // n_d) % n_c
    i_b = i_p // (n_d * n_c)

    # ---- level 0: each channel's float32 sum over the chunk's rows, sequential in row order ----
    d_lo = i_d.to(tl.int64) * BLOCK_D
    o_d = d_lo + tl.arange(0, BLOCK_D).to(tl.int64)  # [BLOCK_D]
    m_d = o_d < D
    r_lo = i_c.to(tl.int64) * CHUNK_R
    r_hi = tl.minimum(r_lo + CHUNK_R, R)
    p_x = p_cur + i_b.to(tl.int64) * s_cur_b + o_d * s_cur_d
    p_y = p_prev + i_b.to(tl.int64) * s_prev_b + o_d * s_prev_d
    b_diff = tl.zeros((BLOCK_D,), dtype=tl.float32)
    b_mag = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, UNROLL):
        for u in tl.static_range(UNROLL):  # UNROLL independent row loads in flight, added in row order
            r = r0 + u
            m = m_d & ((o_d * 0 + r) < r_hi)  # [BLOCK_D]
            b_x = tl.load(p_x + r * s_cur_r, mask=m, other=0.0).to(tl.float32)
            b_y = tl.load(p_y + r * s_prev_r, mask=m, other=0.0).to(tl.float32)
            b_diff += tl.abs(b_x - b_y)  # masked rows add +0: exact
            b_mag += tl.abs(b_y)

    # ---- level 1: per band overlapping the block, the order-free sum of its channels (first band: binary search) --
    d_hi = tl.minimum(d_lo + BLOCK_D, D)
    k_lo = tl.zeros((), dtype=tl.int32)
    k_hi = tl.maximum(nb - 1, 0)
    while k_lo < k_hi:
        k_mid = (k_lo + k_hi) // 2
        b_end = tl.load(p_bounds + k_mid + 1)
        go_left = b_end > d_lo
        k_hi = tl.where(go_left, k_mid, k_hi)
        k_lo = tl.where(go_left, k_lo, k_mid + 1)
    n_region = n_b.to(tl.int64) * num_slots * n_c  # size of the diff (then the mag) region of the workspace
    o_part = (i_b.to(tl.int64) * num_slots) * n_c + i_c
    b_diff64 = b_diff.to(tl.float64)
    b_mag64 = b_mag.to(tl.float64)
    i_k = k_lo
    b_band_lo = tl.load(p_bounds + i_k)
    while (i_k < nb) & (b_band_lo < d_hi):
        b_band_hi = tl.load(p_bounds + i_k + 1)
        m_band = m_d & (o_d >= b_band_lo) & (o_d < b_band_hi)  # [BLOCK_D]
        # where(), not a multiply: NaN/Inf of other bands' channels stay out of this band.
        o_slot = o_part + (i_d + i_k).to(tl.int64) * n_c
        # the order-free exact sum of ``exact_group_sum`` (log2_n = 8), written out for diff and mag together:
        # [BLOCK_D, 2] columns, three reductions (the interpreter pays per call)
        v = tl.join(tl.where(m_band, b_diff64, 0.0), tl.where(m_band, b_mag64, 0.0))  # [BLOCK_D, 2]
        code = (v != v).to(tl.int32) * 2 + (v == float("inf")).to(tl.int32)  # 2 NaN, 1 Inf, 0 finite
        fin = tl.where(code > 0, 0.0, v)
        m = tl.max(fin, axis=0)  # [2]
        q_bits = tl.maximum(((m.to(tl.int64, bitcast=True) >> 52) & 0x7FF) + 8 - 52, 1)
        q = (q_bits << 52).to(tl.float64, bitcast=True)
        inv_q = ((2046 - q_bits) << 52).to(tl.float64, bitcast=True)
        part = tl.sum(tl.floor(fin * inv_q[None, :]) * q[None, :], axis=0)  # [2], exact
        verdict = tl.max(code, axis=0)
        part = tl.where(verdict == 2, float("nan"), tl.where(verdict == 1, float("inf"), part))
        p_diff, p_mag = tl.split(part)
        tl.store(p_ws + o_slot, p_diff)
        tl.store(p_ws + n_region + o_slot, p_mag)
        i_k += 1
        b_band_lo = tl.load(p_bounds + i_k)

    # ---- last program done: make the partials visible, count, and let the last one reduce ----
    tl.debug_barrier()
    done = tl.atomic_add(p_count, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        if FUSE_GATE:
            b_tau_eff = _gate_tau_eff(p_state, s_state, p_params, s_params)
            b_num = tl.zeros((), dtype=tl.float32)
            b_den = tl.zeros((), dtype=tl.float32)
            b_fdc = tl.full((), 1, dtype=tl.int1)
        o_p = tl.arange(0, BLOCK_P).to(tl.int64)  # [BLOCK_P]
        for i_o in range(B_OUT):
            # samples summed into output row i_o: itself (per sample) or all of them
            if PER_SAMPLE:
                b_first = i_o
                b_end = i_o + 1
            else:
                b_first = 0
                b_end = n_b
            for i_kk in range(nb):
                b_lo = tl.load(p_bounds + i_kk)
                b_hi = tl.load(p_bounds + i_kk + 1)
                # band i_kk's partials of one sample: slots j + i_kk of its channel blocks j, contiguous [slots, C]
                j_first = b_lo // BLOCK_D
                j_last = (b_hi - 1) // BLOCK_D
                o_seg = (j_first + i_kk) * n_c
                n_seg = (j_last - j_first + 1) * n_c
                # level 2, pass 1: the group's finite maximum and NaN/Inf code (2 NaN, 1 Inf: the max is the
                # verdict), kept per lane and reduced once (few reductions: the interpreter pays per call)
                vmax_d = tl.zeros((BLOCK_P,), dtype=tl.float64)
                vmax_m = tl.zeros((BLOCK_P,), dtype=tl.float64)
                vcode_d = tl.zeros((BLOCK_P,), dtype=tl.int32)
                vcode_m = tl.zeros((BLOCK_P,), dtype=tl.int32)
                for i_bb in range(b_first, b_end):
                    p_seg = p_ws + tl.cast(i_bb, tl.int64) * num_slots * n_c + o_seg
                    for p0 in range(0, n_seg, BLOCK_P):
                        m_p = (p0 + o_p) < n_seg
                        # .cg: read at L2, where the other programs' writes are (never a stale L1 line).
                        v_d = tl.load(p_seg + p0 + o_p, mask=m_p, other=0.0, cache_modifier=".cg")
                        v_m = tl.load(p_seg + n_region + p0 + o_p, mask=m_p, other=0.0, cache_modifier=".cg")
                        c_d = (v_d != v_d).to(tl.int32) * 2 + (v_d == float("inf")).to(tl.int32)
                        c_m = (v_m != v_m).to(tl.int32) * 2 + (v_m == float("inf")).to(tl.int32)
                        vmax_d = tl.maximum(vmax_d, tl.where(c_d > 0, 0.0, v_d))
                        vmax_m = tl.maximum(vmax_m, tl.where(c_m > 0, 0.0, v_m))
                        vcode_d = tl.maximum(vcode_d, c_d)
                        vcode_m = tl.maximum(vcode_m, c_m)
                max_d = tl.max(vmax_d, axis=0)
                max_m = tl.max(vmax_m, axis=0)
                code_d = tl.max(vcode_d, axis=0)
                code_m = tl.max(vcode_m, axis=0)
                # log2_n = ceil(log2(values in the group)), from the float64 exponent of n - 1
                n_vals = ((b_end - b_first) * n_seg).to(tl.int64)
                nm1_bits = ((n_vals - 1).to(tl.float64).to(tl.int64, bitcast=True) >> 52) & 0x7FF
                log2_n = tl.where(n_vals <= 1, 0, nm1_bits - 1022)
                q_d_bits = tl.maximum(((max_d.to(tl.int64, bitcast=True) >> 52) & 0x7FF) + log2_n - 52, 1)
                q_m_bits = tl.maximum(((max_m.to(tl.int64, bitcast=True) >> 52) & 0x7FF) + log2_n - 52, 1)
                q_d = (q_d_bits << 52).to(tl.float64, bitcast=True)
                q_m = (q_m_bits << 52).to(tl.float64, bitcast=True)
                inv_d = ((2046 - q_d_bits) << 52).to(tl.float64, bitcast=True)
                inv_m = ((2046 - q_m_bits) << 52).to(tl.float64, bitcast=True)
                # pass 2: truncated multiples of q, summed exactly
                acc_d = tl.zeros((BLOCK_P,), dtype=tl.float64)
                acc_m = tl.zeros((BLOCK_P,), dtype=tl.float64)
                for i_bb in range(b_first, b_end):
                    p_seg = p_ws + tl.cast(i_bb, tl.int64) * num_slots * n_c + o_seg
                    for p0 in range(0, n_seg, BLOCK_P):
                        m_p = (p0 + o_p) < n_seg
                        v_d = tl.load(p_seg + p0 + o_p, mask=m_p, other=0.0, cache_modifier=".cg")
                        v_m = tl.load(p_seg + n_region + p0 + o_p, mask=m_p, other=0.0, cache_modifier=".cg")
                        v_d = tl.where((v_d != v_d) | (v_d == float("inf")), 0.0, v_d)
                        v_m = tl.where((v_m != v_m) | (v_m == float("inf")), 0.0, v_m)
                        acc_d += tl.floor(v_d * inv_d) * q_d
                        acc_m += tl.floor(v_m * inv_m) * q_m
                s_d = tl.sum(acc_d, axis=0)
                s_m = tl.sum(acc_m, axis=0)
                s_d = tl.where(code_d == 2, float("nan"), tl.where(code_d == 1, float("inf"), s_d))
                s_m = tl.where(code_m == 2, float("nan"), tl.where(code_m == 1, float("inf"), s_m))
                b_sum_diff = s_d.to(tl.float32)
                b_sum_mag = s_m.to(tl.float32)
                o_out = (tl.cast(i_o, tl.int64) * nb + i_kk) * 2
                tl.store(p_out + o_out, b_sum_diff)
                tl.store(p_out + o_out + 1, b_sum_mag)
                if FUSE_GATE:
                    b_num, b_den, b_fdc = _gate_band(
                        b_num,
                        b_den,
                        b_fdc,
                        b_sum_diff,
                        b_sum_mag,
                        b_tau_eff,
                        p_gammas,
                        s_gammas,
                        i_kk,
                        HAS_GAMMAS,
                    )
        if FUSE_GATE:
            _gate_finish(
                b_num,
                b_den,
                b_fdc,
                b_tau_eff,
                p_state,
                s_state,
                p_params,
                s_params,
                p_coeffs,
                s_coeffs,
                P,
                p_decision,
                p_state_out,
                s_state_out,
            )
        # ready for the next launch (and CUDA-graph replays) without a memset
        tl.atomic_xchg(p_count, 0, sem="relaxed")


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------

# the tensors whose bytes are the op's traffic (kernels/aot.py checks the width of their loads), and the bytes one
# program has in flight at a time (constexprs, bytes per element): UNROLL rows of both inputs
STREAMED = {"band_l1_fwd_kernel": ("p_cur", "p_prev")}
IN_FLIGHT = {"band_l1_fwd_kernel": lambda c, e: 2 * c["UNROLL"] * c["BLOCK_D"] * e}

BLOCK_D = 256  # == _reference.BAND_BLOCK_D
CHUNK_R = 64  # == _reference.BAND_CHUNK_R
UNROLL = 8  # rows in flight per step (the interpreter runs the same code: its cost is per op, not per byte)
# One warp per program: BLOCK_D channels over 32 threads, 8 each, one or two 16-byte loads per row and input. With
# more warps ptxas caps the registers lower and spills (sm_80: 72 at 2 warps, 56 at 4) and half-precision loads
# narrow to 8 bytes. The partition, hence the bits, does not depend on it.
NUM_WARPS = 1


# Scratch per (device, stream): [int32 ticket counter, float64 partials]. Launches on one stream are ordered, so
# they may share it; launches on different streams (two requests served concurrently, a CFG pair on two streams)
# never do. On CPU tensors (the interpreter) each host thread is its own stream. The counter is zero between
# launches (the last program resets it): it is zeroed once, when created outside a capture. The partials need no
# initialisation (every slot that is read is written in the same launch). An outgrown partials buffer is kept
# alive, not freed: a captured CUDA graph may still point at it.
_SCRATCH: dict[tuple, list] = {}
_LOCK = threading.Lock()


def _stream_key(device: torch.device) -> tuple:
    if device.type == "cuda":
        return (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    return (device.type, device.index, threading.get_ident())


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _scratch(device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 partials of >= numel elements, int32 counter) for the current stream of ``device``.

    Inside a CUDA-graph capture on a stream that has none yet, this launch gets its own pair, not cached: the
    counter's zeroing is then captured (a memset node that runs at every replay, before the kernel) rather than
    executed now, so no later eager launch can meet an unzeroed counter. Warm up on the capture stream (or capture
    after an eager call on it) to keep the graph at one node per op."""
    key = _stream_key(device)
    entry = _SCRATCH.get(key)
    if entry is not None and entry[0].numel() >= numel:
        return entry[0], entry[1]
    if entry is None and _capturing(device):
        return (torch.empty(numel, dtype=torch.float64, device=device),
                torch.zeros((), dtype=torch.int32, device=device))
    with _LOCK:
        entry = _SCRATCH.get(key)
        if entry is None:
            entry = [torch.empty(max(numel, 512), dtype=torch.float64, device=device),
                     torch.zeros((), dtype=torch.int32, device=device), []]
            _SCRATCH[key] = entry
        elif entry[0].numel() < numel:
            entry[2].append(entry[0])
            entry[0] = torch.empty(max(numel, 2 * entry[0].numel()), dtype=torch.float64, device=device)
        return entry[0], entry[1]


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its channels are contiguous; else a contiguous copy. A channel stride other than 1 would
    compile to one 2- or 4-byte load per channel (the 16-byte loads need unit stride): the copy costs one more read
    and one write of the input, so such an op moves about twice its bytes, in two launches."""
    return t if t.shape[2] <= 1 or t.stride(2) == 1 else t.contiguous()


def _launch_band(cur, prev, bounds, per_sample, out, gate) -> None:
    cur, prev = _channels_contiguous(cur), _channels_contiguous(prev)
    B, R, D = cur.shape
    nb = bounds.shape[0] - 1
    device = cur.device
    if B == 0:
        R = 0  # nothing to read; one (empty) sample row so that the sums are still written
    J = max(1, cdiv(D, BLOCK_D))
    C = max(1, cdiv(R, CHUNK_R))
    B_grid = max(B, 1)
    num_slots = max(J + nb - 1, 1)
    ws, count = _scratch(device, 2 * num_slots * B_grid * C)
    if gate is None:
        state = params = coeffs = gammas = decision = state_out = out  # unused (FUSE_GATE=False)
        s_state = s_params = s_coeffs = s_gammas = s_state_out = 0
        P = 0
        has_gammas = False
    else:
        state, params, coeffs, gammas, decision, state_out = gate
        has_gammas = gammas is not None
        if gammas is None:
            gammas = params
        s_state, s_params, s_coeffs, s_gammas = (
            state.stride(0),
            params.stride(0),
            coeffs.stride(0),
            gammas.stride(0),
        )
        s_state_out = state_out.stride(0)
        P = coeffs.shape[0]
    band_l1_fwd_kernel[(J * C * B_grid,)](
        cur,
        prev,
        bounds,
        out,
        ws,
        count,
        state,
        s_state,
        params,
        s_params,
        coeffs,
        s_coeffs,
        gammas,
        s_gammas,
        decision,
        state_out,
        s_state_out,
        J,
        C,
        B_grid,
        R,
        D,
        nb,
        P,
        *cur.stride(),
        *prev.stride(),
        num_slots,
        B if per_sample else 1,
        PER_SAMPLE=per_sample,
        FUSE_GATE=gate is not None,
        HAS_GAMMAS=has_gammas,
        BLOCK_D=BLOCK_D,
        CHUNK_R=CHUNK_R,
        UNROLL=UNROLL,
        BLOCK_P=256,
        num_warps=NUM_WARPS,
        **launch_options(),
    )


def band_l1(
    cur: torch.Tensor, prev: torch.Tensor, bounds: torch.Tensor, per_sample: bool, out: torch.Tensor
) -> None:
    """out[b, k] = (sum |cur - prev|, sum |prev|) over band k's channels: cur, prev (B, R, D) any strides,
    fp32/fp16/bf16; bounds int64 (nb+1,); out float32 contiguous (B or 1, nb, 2). One launch."""
    _launch_band(cur, prev, bounds, bool(per_sample), out, None)


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
    """band_l1 over everything into sums_out (nb, 2), then the gate epilogue, in one launch."""
    _launch_band(cur, prev, bounds, False, sums_out, (state, params, coeffs, gammas, decision_out, state_out))


def gate_decide(
    sums: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: torch.Tensor,
    gammas: torch.Tensor | None,
    decision_out: torch.Tensor,
    state_out: torch.Tensor,
) -> None:
    """The gate epilogue on float32 band sums (nb, 2): decision_out (bool scalar) and state_out. One program."""
    has_gammas = gammas is not None
    g = gammas if has_gammas else params
    gate_decide_kernel[(1,)](
        sums,
        sums.stride(0),
        sums.stride(1),
        state,
        state.stride(0),
        params,
        params.stride(0),
        coeffs,
        coeffs.stride(0),
        g,
        g.stride(0),
        decision_out,
        state_out,
        state_out.stride(0),
        sums.shape[0],
        coeffs.shape[0],
        HAS_GAMMAS=has_gammas,
        num_warps=1,
        **launch_options(),
    )
