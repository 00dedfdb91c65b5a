// band_l1, gate_step, gate_decide: banded sums of |cur - prev| and |prev|, and the gate epilogue.
//
// The sums are bitwise equal to _reference.band_l1_gpu_order (and to the Triton kernel, which sums in the same
// order) for every input on every GPU: the partition depends on the input's size only, never on the SM count, and
// every reduction across threads and blocks is exact. One launch per call, no memset, no host sync, CUDA-graph safe.
// The order's constants, workspace layout and exact group sum live in band_order.h (host + device; the host
// reference test tests/cuda/test_band_order_host.py checks them bit for bit against the Python reference).
//
// Partition: one block of kThreads = 128 threads per tile (sample b, row chunk c of 64 rows, channel block j of 256
// channels); grid = B * C * J blocks, C = ceil(R / 64), J = ceil(D / 256), blockIdx.x = (b * C + c) * J + j (one
// idle block when B * C * J = 0, so that the zero sums and the gate are still written).
//  - Level 0 (fp32, sequential): thread t owns the kChan = 2 adjacent channels 256 j + 2 t, + 1 and adds for each,
//    over the chunk's rows in increasing order from 0.0f, __fadd_rn(acc, fabsf(__fsub_rn(x, y))) and
//    __fadd_rn(acc, fabsf(y)), x, y converted to float (exact for fp16 / bf16; the _rn intrinsics are never
//    contracted into FMAs). Unit channel stride with 2-element aligned rows: one 8-byte (fp32) or 4-byte
//    (fp16 / bf16) load per row and tensor (a warp reads 256 or 128 contiguous bytes), 8 rows in flight; other
//    layouts load element by element. Rows past R and channels past D are not added (the reference adds +0.0f:
//    same bits).
//  - Level 1 (per tile and band k overlapping block j): the exact group sum (band_order.h) of the band's channel
//    sums in the block, log2_n = 8. Max pass: warp max of the float bits (they order like the values for x >= +0)
//    and warp OR of the NaN/Inf flags (__reduce_*_sync), the 4 warps joined through shared memory; sum pass: the
//    truncated values summed in fp64 by warp shuffles (exact, so the tree does not matter). Thread 0 stores
//    {diff, mag} (NaN if the band had a NaN there, else +Inf if an Inf) at pair (b * S + j + k) * C + c of the
//    float64 workspace, S = J + nb - 1: band k's partials of one sample form one contiguous run.
//  - Tickets: thread 0 __threadfence()s its partials and takes a ticket from the stream's __device__ counter
//    (g_counters[counter_slot], zero at module load); the block that draws the last ticket reduces, then stores 0
//    back into the counter for the next launch (so graph replays need no memset either).
//  - Level 2 (last block): per (output row, band k) the exact group sum of the partials of the row's samples, all
//    chunks and the n_j blocks overlapping band k (n = samples * C * n_j of them, log2_n = ceil_log2(n)). Groups of
//    G lanes (a power of two; one group per (row, band) while there are enough threads) walk the runs twice (max
//    pass, then truncated-sum pass; __ldcg, 16-byte loads of {diff, mag}, 4 in flight per lane) and write
//    float(sum), rounded to nearest; NaN -> NaN, else Inf -> Inf. gate_step then runs the gate epilogue.
// Exactness: every step after level 0 is a function of the set of its inputs (a max, then exact sums of multiples
// of a power of two), so neither the thread tree, the grid, nor which block finishes last changes a bit.
// Error bound against the exact sum (relative): level 0 <= 64 * 2^-24 per channel and chunk (64 sequential fp32
// adds); level 1 <= 256 * 2^(8 - 52) = 2^-36 (truncation); level 2 <= n * 2^(log2_n - 52) <= 2^(2 log2_n - 52);
// then the float32 rounding, 2^-24. Together below 1e-5 up to 2^14 partials per band (2^28 elements per band).
// Workspace: order::workspace_doubles(B, R, D, nb) = 2 * B * S * C doubles, a function of the sizes only.
// NaN/Inf propagate per band and per output row exactly as in the reference.
//
// Gate epilogue: a float32 transcription of _reference.gate_decide with __f*_rn intrinsics (no FMA contraction:
// the reference rounds each torch op separately); the TADS cosine is float(cos(double(angle))) as in the Triton
// kernel (no fast math). Not inlined: it runs in one thread once per launch and would otherwise raise the register
// allocation of the whole reduction kernel.

#include <climits>

#include "cuda/band_order.h"
#include "gate_layout.h"
#include "cuda/common.cuh"

namespace fastcache_rt {
namespace cuda {
namespace {

using namespace detail;
namespace ord = order;

constexpr int kChan = 2;                            // adjacent channels per thread
constexpr int kThreads = ord::kBlockD / kChan;      // 128: one thread per 2 channels of the 256-channel block
constexpr int kWarps = kThreads / kWarpSize;        // 4
// 6 blocks (768 threads) per SM: a register cap of 80 per thread (the level-2 walk keeps 4 loads of 16 bytes in
// flight per lane without spilling). Each thread keeps 8 rows of 2 tensors in flight in level 0: 6 x 128 x 16
// loads of 4 (fp16/bf16) or 8 (fp32) bytes, 48-96 KiB per SM, well above what saturates HBM.
constexpr int kMinBlocksPerSm = 6;
constexpr int kLevel2Unroll = 4;                    // 16-byte partial loads in flight per lane (last block)

// Layout of the gate state / params: gate_layout.h, generated from fastcache_rt/ops/layout.py.
using namespace ::fastcache_rt::gate_layout;

// One self-resetting ticket counter per stream slot (zero-initialised when the module is loaded).
__device__ unsigned int g_counters[kCounterSlots];

template <typename T>
struct ReduceArgs {
  const T* cur;
  const T* prev;
  int64_t cs0, cs1, cs2;
  int64_t ps0, ps1, ps2;
  int64_t B, R, D;
  const int64_t* bounds;  // (nb + 1,)
  int64_t nb;
  ord::Partition p;       // row chunks C, channel blocks J, workspace slots per sample S
  unsigned tiles;         // B * C * J (< 2^31)
  int64_t rows_out;       // B if per_sample else 1
  bool per_sample;
  float* out;             // (rows_out, nb, 2)
  double2* ws;            // level-1 partials {diff, mag}: (B, S, C)
  int counter_slot;
};

// ---- gate epilogue (one thread) -------------------------------------------------------------------------------

__device__ __forceinline__ float rel_f32(float num, float den) {
  // 0/0 (nothing changed, nothing there) is 0; x/0 is inf; NaN stays NaN.
  return (num == 0.0f && den == 0.0f) ? 0.0f : __fdiv_rn(num, den);
}

__device__ __noinline__ void gate_epilogue(const float* sums, int64_t srow, int64_t scol, int64_t nb,
                                           const GateParams& g) {
  float num = 0.0f, den = 0.0f;
  for (int64_t k = 0; k < nb; ++k) {
    num = __fadd_rn(num, sums[k * srow]);
    den = __fadd_rn(den, sums[k * srow + scol]);
  }
  const float d = rel_f32(num, den);

  const float s = g.state[S_STEP * g.state_stride];
  const float acc = g.state[S_ACC * g.state_stride];
  const float consec = g.state[S_CONSEC * g.state_stride];
  const float has = g.state[S_HAS_CACHE * g.state_stride];
  const float nonfinite_count = g.state[S_NONFINITE * g.state_stride];
  const float computed_count = g.state[S_COMPUTED * g.state_stride];
  const float tau = g.params[P_TAU * g.params_stride];
  const float n_steps = g.params[P_NUM_STEPS * g.params_stride];
  const float tads_min = g.params[P_TADS_MIN * g.params_stride];
  const float tads_max = g.params[P_TADS_MAX * g.params_stride];
  const float max_cached = g.params[P_MAX_CACHED * g.params_stride];
  const float force_last = g.params[P_FORCE_LAST * g.params_stride];

  // bell = (1 - cos(2 pi s / S)) / 2; torch rounds the Python constant 2*pi to float32 before multiplying. The
  // cosine of the float32 angle is evaluated in float64 and rounded to float32, as the Triton kernel does
  // (tl.cos on float64: the same libdevice cos as here), so both GPU backends give the same bits.
  const float two_pi = static_cast<float>(2.0 * 3.14159265358979323846);
  const float angle = __fdiv_rn(__fmul_rn(two_pi, s), n_steps);
  const float cos_angle = static_cast<float>(cos(static_cast<double>(angle)));
  const float bell = __fmul_rn(__fsub_rn(1.0f, cos_angle), 0.5f);
  const float tau_eff = __fmul_rn(tau, __fadd_rn(tads_min, __fmul_rn(__fsub_rn(tads_max, tads_min), bell)));

  // Horner from 0, numpy.polyval order (0 * d is kept: NaN/Inf d poisons the polynomial as in the reference).
  float poly = 0.0f;
  for (int64_t i = 0; i < g.n_coeffs; ++i) poly = __fadd_rn(__fmul_rn(poly, d), g.coeffs[i * g.coeffs_stride]);
  const float acc_new = __fadd_rn(acc, poly);

  const bool nonfinite = !is_finite(d);
  bool fdc_ok = true;
  if (g.gammas != nullptr) {
    for (int64_t k = 0; k < nb; ++k) {
      const float band_rel = rel_f32(sums[k * srow], sums[k * srow + scol]);
      fdc_ok = fdc_ok && (band_rel <= __fmul_rn(tau_eff, g.gammas[k * g.gammas_stride]));
    }
  }

  const bool forced = (s == 0.0f) || ((force_last > 0.0f) && (s >= __fsub_rn(n_steps, 1.0f))) || (has <= 0.0f) ||
                      nonfinite;
  const bool skip = !forced && (acc_new < tau_eff) && (consec < max_cached) && fdc_ok;
  const bool compute = !skip;
  const float cf = compute ? 1.0f : 0.0f;

  float* o = g.state_out;
  const int64_t os = g.state_out_stride;
  o[S_STEP * os] = __fadd_rn(s, 1.0f);
  o[S_ACC * os] = compute ? 0.0f : acc_new;
  o[S_CONSEC * os] = compute ? 0.0f : __fadd_rn(consec, 1.0f);
  o[S_HAS_CACHE * os] = is_nan(has) ? has : (has >= cf ? has : cf);  // torch.maximum: NaN propagates
  o[S_LAST_COMPUTE * os] = cf;
  o[S_REL_L1 * os] = d;
  o[S_NONFINITE * os] = __fadd_rn(nonfinite_count, nonfinite ? 1.0f : 0.0f);
  o[S_COMPUTED * os] = __fadd_rn(computed_count, cf);
  *g.decision_out = compute;
}

// ---- level 0: one thread's channel sums over the chunk's rows ---------------------------------------------------

// kChan = 2 adjacent elements of T in one load: 8 bytes of fp32, 4 bytes of fp16 / bf16.
template <typename T>
struct Duo {
  using Raw = unsigned;
};
template <>
struct Duo<float> {
  using Raw = uint2;
};

template <typename T>
__device__ __forceinline__ typename Duo<T>::Raw load_duo(const T* p) {
  return __ldg(reinterpret_cast<const typename Duo<T>::Raw*>(p));
}

__device__ __forceinline__ void unpack_duo(float, const uint2& r, float (&v)[2]) {
  v[0] = __uint_as_float(r.x);
  v[1] = __uint_as_float(r.y);
}
template <typename T>
__device__ __forceinline__ void unpack_duo(T tag, unsigned r, float (&v)[2]) {
  unpack_word(tag, r, v);
}

__device__ __forceinline__ void add_row(float x, float y, float& sd, float& sm) {
  sd = __fadd_rn(sd, fabsf(__fsub_rn(x, y)));
  sm = __fadd_rn(sm, fabsf(y));
}

// sd[e], sm[e] += the rows 0..rows-1 (in order) of channel e < nch; c, p point at row 0, channel 0 of the thread
// (kVec: nch == kChan, 2-element aligned rows).
// The row pointers advance by one stride per row (no per-row 64-bit offsets kept live).
template <typename T, bool kVec>
__device__ __forceinline__ void level0(const T* __restrict__ c, int64_t cs1, int64_t cs2, const T* __restrict__ p,
                                       int64_t ps1, int64_t ps2, int rows, int nch, float (&sd)[kChan],
                                       float (&sm)[kChan]) {
  if (kVec) {  // the launcher guarantees nch == kChan (D % kChan == 0)
    constexpr int kU = 8;  // rows in flight per thread: 64 (fp32) or 32 (fp16 / bf16) bytes of loads
    using Raw = typename Duo<T>::Raw;
    int r = 0;
    for (; r + kU <= rows; r += kU) {
      Raw rc[kU];
      Raw rp[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        rc[u] = load_duo(c);
        rp[u] = load_duo(p);
        c += cs1;
        p += ps1;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        float x[kChan];
        float y[kChan];
        unpack_duo(T(), rc[u], x);
        unpack_duo(T(), rp[u], y);
#pragma unroll
        for (int e = 0; e < kChan; ++e) add_row(x[e], y[e], sd[e], sm[e]);
      }
    }
    for (; r < rows; ++r) {
      float x[kChan];
      float y[kChan];
      unpack_duo(T(), load_duo(c), x);
      unpack_duo(T(), load_duo(p), y);
      c += cs1;
      p += ps1;
#pragma unroll
      for (int e = 0; e < kChan; ++e) add_row(x[e], y[e], sd[e], sm[e]);
    }
  } else {
    // Element loads: channel e at c + e * cs2; channels e >= nch are neither read nor added.
    constexpr int kU = 2;
    int r = 0;
    for (; r + kU <= rows; r += kU) {
      float x[kU][kChan];
      float y[kU][kChan];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const T* ce = c;
        const T* pe = p;
#pragma unroll
        for (int e = 0; e < kChan; ++e) {
          const bool in = e < nch;
          x[u][e] = in ? to_f32(__ldg(ce)) : 0.0f;
          y[u][e] = in ? to_f32(__ldg(pe)) : 0.0f;
          ce += cs2;
          pe += ps2;
        }
        c += cs1;
        p += ps1;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
#pragma unroll
        for (int e = 0; e < kChan; ++e) add_row(x[u][e], y[u][e], sd[e], sm[e]);  // 0 - 0 adds +0: no change
      }
    }
    for (; r < rows; ++r) {
      const T* ce = c;
      const T* pe = p;
#pragma unroll
      for (int e = 0; e < kChan; ++e) {
        if (e < nch) add_row(to_f32(__ldg(ce)), to_f32(__ldg(pe)), sd[e], sm[e]);
        ce += cs2;
        pe += ps2;
      }
      c += cs1;
      p += ps1;
    }
  }
}

// ---- reductions across lanes ------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned warp_max_u32(unsigned v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, v);
#else
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
#endif
}

__device__ __forceinline__ unsigned warp_or_u32(unsigned v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_or_sync(kFullMask, v);
#else
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v |= __shfl_xor_sync(kFullMask, v, off);
  return v;
#endif
}

// Reductions over a level-2 group of G lanes (a power of two <= kThreads; groups are aligned, G / 32 whole warps
// when G > 32): the max pass and the sum pass of two quantities. Every thread of the block calls these (same trip
// counts, uniform G), so the barriers are reached by all.
struct Level2Shared {
  double v[kWarps][2];
  unsigned flags[kWarps];
};

__device__ __forceinline__ void group_max(double& a, double& b, unsigned& f, int G, Level2Shared& sh) {
  const int width = G < kWarpSize ? G : kWarpSize;
  for (int off = 1; off < width; off <<= 1) {
    a = fmax(a, __shfl_xor_sync(kFullMask, a, off));
    b = fmax(b, __shfl_xor_sync(kFullMask, b, off));
    f |= __shfl_xor_sync(kFullMask, f, off);
  }
  if (G > kWarpSize) {  // uniform: a group spans G / 32 whole warps; join them through shared memory
    const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const int per_group = G / kWarpSize;
    const int first = warp - warp % per_group;
    if (lane == 0) {
      sh.v[warp][0] = a;
      sh.v[warp][1] = b;
      sh.flags[warp] = f;
    }
    __syncthreads();
    for (int w = first; w < first + per_group; ++w) {
      a = fmax(a, sh.v[w][0]);
      b = fmax(b, sh.v[w][1]);
      f |= sh.flags[w];
    }
    __syncthreads();
  }
}

__device__ __forceinline__ void group_sum(double& a, double& b, int G, Level2Shared& sh) {
  const int width = G < kWarpSize ? G : kWarpSize;
  for (int off = 1; off < width; off <<= 1) {  // exact: the order does not matter
    a += __shfl_xor_sync(kFullMask, a, off);
    b += __shfl_xor_sync(kFullMask, b, off);
  }
  if (G > kWarpSize) {
    const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const int per_group = G / kWarpSize;
    const int first = warp - warp % per_group;
    if (lane == 0) {
      sh.v[warp][0] = a;
      sh.v[warp][1] = b;
    }
    __syncthreads();
    a = 0.0;
    b = 0.0;
    for (int w = first; w < first + per_group; ++w) {
      a += sh.v[w][0];
      b += sh.v[w][1];
    }
    __syncthreads();
  }
}

// Calls f(pair) for one lane's walk over a band's level-2 partials (order::RunWalk): kLevel2Unroll 16-byte loads in
// flight per lane.
template <typename F>
__device__ __forceinline__ void walk_partials(const double2* ws, const ord::BandRun& run, int first_i, int G, F&& f) {
  ord::RunWalk w(run, first_i, G);
  while (w.valid()) {
    double2 v[kLevel2Unroll];
    bool ok[kLevel2Unroll];
#pragma unroll
    for (int u = 0; u < kLevel2Unroll; ++u) {
      ok[u] = w.valid();
      v[u] = ok[u] ? __ldcg(ws + w.pair(run)) : make_double2(0.0, 0.0);
      w.advance();
    }
#pragma unroll
    for (int u = 0; u < kLevel2Unroll; ++u) {
      if (ok[u]) f(v[u]);
    }
  }
}

// ---- the reduction kernel ---------------------------------------------------------------------------------------

template <typename T, bool kVec, bool kGate>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    band_l1_kernel(const ReduceArgs<T> a, const __grid_constant__ GateParams g) {
  __shared__ unsigned s_max[kWarps][2];
  __shared__ unsigned s_flags[kWarps];
  __shared__ double s_sum[kWarps][2];
  __shared__ Level2Shared s_l2;
  __shared__ int s_last;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & (kWarpSize - 1);
  const int warp = tid / kWarpSize;

  if (blockIdx.x < a.tiles) {
    // ---- level 0: this thread's kChan channels of tile (b, c, j) ----
    const unsigned t = blockIdx.x;
    const unsigned J = static_cast<unsigned>(a.p.J);
    const unsigned C = static_cast<unsigned>(a.p.C);
    const unsigned j = t % J;
    const unsigned bc = t / J;
    const unsigned c = bc % C;
    const unsigned b = bc / C;
    const int64_t d_lo = static_cast<int64_t>(j) * ord::kBlockD;
    const int64_t d_hi = min(d_lo + ord::kBlockD, a.D);
    const int64_t d0 = d_lo + static_cast<int64_t>(tid) * kChan;
    const int nch = static_cast<int>(max(static_cast<int64_t>(0), min(static_cast<int64_t>(kChan), a.D - d0)));
    const int64_t r0 = static_cast<int64_t>(c) * ord::kChunkR;
    const int rows = static_cast<int>(min(static_cast<int64_t>(ord::kChunkR), a.R - r0));
    float sd[kChan];
    float sm[kChan];
#pragma unroll
    for (int e = 0; e < kChan; ++e) {
      sd[e] = 0.0f;
      sm[e] = 0.0f;
    }
    if (nch > 0) {
      const T* pc = a.cur + static_cast<int64_t>(b) * a.cs0 + r0 * a.cs1 + d0 * a.cs2;
      const T* pp = a.prev + static_cast<int64_t>(b) * a.ps0 + r0 * a.ps1 + d0 * a.ps2;
      level0<T, kVec>(pc, a.cs1, a.cs2, pp, a.ps1, a.ps2, rows, nch, sd, sm);
    }

    // ---- level 1: per band overlapping [d_lo, d_hi), the exact group sum of its channels' sums ----
    int64_t k = 0;  // first band whose end is past d_lo (binary search; same loads in every thread)
    {
      int64_t k_hi = a.nb - 1;
      while (k < k_hi) {
        const int64_t mid = (k + k_hi) / 2;
        if (a.bounds[mid + 1] > d_lo) {
          k_hi = mid;
        } else {
          k = mid + 1;
        }
      }
    }
    for (; k < a.nb; ++k) {
      const int64_t lo = a.bounds[k];
      const int64_t hi = a.bounds[k + 1];
      if (lo >= d_hi) break;  // uniform
      unsigned max_d = 0u;    // float bits: they order like the values for x >= +0
      unsigned max_m = 0u;
      unsigned flags = 0u;    // diff NaN/Inf in bits 0-1, mag in bits 2-3
#pragma unroll
      for (int e = 0; e < kChan; ++e) {
        const int64_t d = d0 + e;
        if (e < nch && d >= lo && d < hi) {
          const unsigned fd = ord::flags_of(static_cast<double>(sd[e]));
          const unsigned fm = ord::flags_of(static_cast<double>(sm[e]));
          if (fd == 0u) max_d = max(max_d, __float_as_uint(sd[e]));
          if (fm == 0u) max_m = max(max_m, __float_as_uint(sm[e]));
          flags |= fd | (fm << 2);
        }
      }
      max_d = warp_max_u32(max_d);
      max_m = warp_max_u32(max_m);
      flags = warp_or_u32(flags);
      if (lane == 0) {
        s_max[warp][0] = max_d;
        s_max[warp][1] = max_m;
        s_flags[warp] = flags;
      }
      __syncthreads();
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        max_d = max(max_d, s_max[w][0]);
        max_m = max(max_m, s_max[w][1]);
        flags |= s_flags[w];
      }
      const ord::Quantum zd = ord::quantum(static_cast<double>(__uint_as_float(max_d)), ord::kL1Log2);
      const ord::Quantum zm = ord::quantum(static_cast<double>(__uint_as_float(max_m)), ord::kL1Log2);
      double td = 0.0;
      double tm = 0.0;
#pragma unroll
      for (int e = 0; e < kChan; ++e) {
        const int64_t d = d0 + e;
        if (e < nch && d >= lo && d < hi) {
          const double vd = static_cast<double>(sd[e]);
          const double vm = static_cast<double>(sm[e]);
          if (ord::flags_of(vd) == 0u) td += ord::truncate(vd, zd);
          if (ord::flags_of(vm) == 0u) tm += ord::truncate(vm, zm);
        }
      }
      td = warp_sum(td);  // exact sums of multiples of q: any tree gives the same bits
      tm = warp_sum(tm);
      if (lane == 0) {
        s_sum[warp][0] = td;
        s_sum[warp][1] = tm;
      }
      __syncthreads();
      if (tid == 0) {
        double total_d = 0.0;
        double total_m = 0.0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          total_d += s_sum[w][0];
          total_m += s_sum[w][1];
        }
        if (static_cast<int64_t>(j) + k < a.p.S) {  // always, for valid bounds
          a.ws[ord::slot_pair(a.p, b, c, j, k)] =
              make_double2(ord::finish(total_d, flags & 3u), ord::finish(total_m, flags >> 2));
        }
      }
    }
  }

  // ---- ticket: the last block to finish reduces ----
  unsigned int* counter = &g_counters[a.counter_slot];
  if (tid == 0) {
    __threadfence();  // release this block's partials (all stored by thread 0) before taking a ticket
    const unsigned int ticket = atomicAdd(counter, 1u);
    s_last = (ticket == gridDim.x - 1u) ? 1 : 0;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();  // every other block's partials are visible (their fence precedes their ticket)

  // ---- level 2: per (output row, band), the exact group sum of the row's partials of the band ----
  const int64_t pairs = a.rows_out * a.nb;
  const int G = ord::level2_group_size(pairs, kThreads);
  const int groups = kThreads / G;
  const int gid = tid / G;
  const int glane = tid - gid * G;
  for (int64_t base = 0; base < pairs; base += groups) {  // same trip count in every thread
    const int64_t pr = base + gid;
    ord::BandRun run{0, 0, 0, 0};  // no values (lanes past the last pair still take part in the shuffles)
    if (pr < pairs) {
      const int64_t o = pr / a.nb;
      const int64_t k = pr - o * a.nb;
      run = ord::band_run(a.p, a.bounds[k], a.bounds[k + 1], a.D, k, o, a.per_sample, a.B);
    }
    double max_d = 0.0;
    double max_m = 0.0;
    unsigned flags = 0u;
    walk_partials(a.ws, run, glane, G, [&](const double2& v) {
      const unsigned fd = ord::flags_of(v.x);
      const unsigned fm = ord::flags_of(v.y);
      if (fd == 0u) max_d = fmax(max_d, v.x);
      if (fm == 0u) max_m = fmax(max_m, v.y);
      flags |= fd | (fm << 2);
    });
    group_max(max_d, max_m, flags, G, s_l2);
    const int lg = ord::ceil_log2(run.total);
    const ord::Quantum zd = ord::quantum(max_d, lg);
    const ord::Quantum zm = ord::quantum(max_m, lg);
    double sum_d = 0.0;
    double sum_m = 0.0;
    walk_partials(a.ws, run, glane, G, [&](const double2& v) {
      if (ord::flags_of(v.x) == 0u) sum_d += ord::truncate(v.x, zd);
      if (ord::flags_of(v.y) == 0u) sum_m += ord::truncate(v.y, zm);
    });
    group_sum(sum_d, sum_m, G, s_l2);
    if (pr < pairs && glane == 0) {
      float* dst = a.out + 2 * pr;  // (row o, band k) = pair pr
      dst[0] = static_cast<float>(ord::finish(sum_d, flags & 3u));  // round to nearest
      dst[1] = static_cast<float>(ord::finish(sum_m, flags >> 2));
    }
  }
  if (kGate) {
    __syncthreads();  // the float32 sums of all bands are written
    if (tid == 0) gate_epilogue(a.out, 2, 1, a.nb, g);
  }
  if (tid == 0) *counter = 0u;  // ready for the next launch on this stream
}

__global__ void __launch_bounds__(kWarpSize)
    gate_decide_kernel(const float* sums, int64_t srow, int64_t scol, int64_t nb,
                       const __grid_constant__ GateParams g) {
  if (threadIdx.x == 0) gate_epilogue(sums, srow, scol, nb, g);
}

// ---- host side ------------------------------------------------------------------------------------------------

template <typename T, bool kGate>
cudaError_t launch_reduce(const void* cur, const int64_t cs[3], const void* prev, const int64_t ps[3], int64_t B,
                          int64_t R, int64_t D, const int64_t* bounds, int64_t nb, bool per_sample, float* out,
                          const GateParams& gate, double* partials, int64_t partials_doubles, int counter_slot,
                          cudaStream_t stream) {
  if (B < 0 || R < 0 || D < 1 || nb < 1 || counter_slot < 0 || counter_slot >= kCounterSlots) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows_out = per_sample ? B : 1;
  if (rows_out == 0) return cudaSuccess;  // per-sample sums of an empty batch: nothing to write
  const ord::Partition p = ord::partition(R, D, nb);
  // tiles = B * C * J must fit a 1-D grid (and the kernel's unsigned tile decode)
  int64_t tiles = 0;
  if (B > 0 && p.C > 0) {
    if (B > INT_MAX / p.C) return cudaErrorInvalidConfiguration;
    tiles = B * p.C;
    if (tiles > INT_MAX / p.J) return cudaErrorInvalidConfiguration;
    tiles *= p.J;
  }
  const int64_t need = ord::workspace_doubles(B, R, D, nb);
  if (need > 0 && (partials == nullptr || partials_doubles < need || !aligned16(partials))) {
    return cudaErrorInvalidValue;
  }

  ReduceArgs<T> a;
  a.cur = static_cast<const T*>(cur);
  a.prev = static_cast<const T*>(prev);
  a.cs0 = cs[0];
  a.cs1 = cs[1];
  a.cs2 = cs[2];
  a.ps0 = ps[0];
  a.ps1 = ps[1];
  a.ps2 = ps[2];
  a.B = B;
  a.R = R;
  a.D = D;
  a.bounds = bounds;
  a.nb = nb;
  a.p = p;
  a.tiles = static_cast<unsigned>(tiles);
  a.rows_out = rows_out;
  a.per_sample = per_sample;
  a.out = out;
  a.ws = reinterpret_cast<double2*>(partials);
  a.counter_slot = counter_slot;
  // Vector loads of kChan = 2 channels: unit channel stride, every (sample, row) start aligned to 2 elements, and
  // D a multiple of 2 (every thread with a channel has both).
  constexpr int64_t kAlign = kChan * static_cast<int64_t>(sizeof(T));
  const auto pair_aligned = [&](const void* base, const int64_t s[3]) {
    return s[2] == 1 && (reinterpret_cast<uintptr_t>(base) % kAlign) == 0 && (R <= 1 || s[1] % kChan == 0) &&
           (B <= 1 || s[0] % kChan == 0);
  };
  const bool vec = D % kChan == 0 && pair_aligned(cur, cs) && pair_aligned(prev, ps);
  const unsigned grid = tiles > 0 ? static_cast<unsigned>(tiles) : 1u;  // one block still writes the (zero) sums
  if (vec) {
    band_l1_kernel<T, true, kGate><<<grid, kThreads, 0, stream>>>(a, gate);
  } else {
    band_l1_kernel<T, false, kGate><<<grid, kThreads, 0, stream>>>(a, gate);
  }
  return cudaGetLastError();
}

template <bool kGate>
cudaError_t dispatch_reduce(DType dtype, const void* cur, const int64_t cs[3], const void* prev, const int64_t ps[3],
                            int64_t B, int64_t R, int64_t D, const int64_t* bounds, int64_t nb, bool per_sample,
                            float* out, const GateParams& gate, double* partials, int64_t partials_doubles,
                            int counter_slot, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_reduce<float, kGate>(cur, cs, prev, ps, B, R, D, bounds, nb, per_sample, out, gate, partials,
                                         partials_doubles, counter_slot, stream);
    case DType::kFloat16:
      return launch_reduce<__half, kGate>(cur, cs, prev, ps, B, R, D, bounds, nb, per_sample, out, gate, partials,
                                          partials_doubles, counter_slot, stream);
    case DType::kBFloat16:
      return launch_reduce<__nv_bfloat16, kGate>(cur, cs, prev, ps, B, R, D, bounds, nb, per_sample, out, gate,
                                                 partials, partials_doubles, counter_slot, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t reduction_workspace_doubles(int64_t B, int64_t R, int64_t D, int64_t nb, bool /*per_sample*/) {
  return ord::workspace_doubles(B, R, D, nb);
}

cudaError_t band_l1(DType dtype, const void* cur, const int64_t cstride[3], const void* prev, const int64_t pstride[3],
                    int64_t B, int64_t R, int64_t D, const int64_t* bounds, int64_t nb, bool per_sample, float* out,
                    double* partials, int64_t partials_doubles, int counter_slot, cudaStream_t stream) {
  const GateParams none{};
  return dispatch_reduce<false>(dtype, cur, cstride, prev, pstride, B, R, D, bounds, nb, per_sample, out, none,
                                partials, partials_doubles, counter_slot, stream);
}

cudaError_t gate_step(DType dtype, const void* cur, const int64_t cstride[3], const void* prev,
                      const int64_t pstride[3], int64_t B, int64_t R, int64_t D, const int64_t* bounds, int64_t nb,
                      const GateParams& gate, float* sums_out, double* partials, int64_t partials_doubles,
                      int counter_slot, cudaStream_t stream) {
  if (gate.n_coeffs < 1) return cudaErrorInvalidValue;
  return dispatch_reduce<true>(dtype, cur, cstride, prev, pstride, B, R, D, bounds, nb, false, sums_out, gate,
                               partials, partials_doubles, counter_slot, stream);
}

cudaError_t gate_decide(const float* sums, int64_t sums_row_stride, int64_t sums_col_stride, int64_t nb,
                        const GateParams& gate, cudaStream_t stream) {
  if (nb < 1 || gate.n_coeffs < 1) return cudaErrorInvalidValue;
  gate_decide_kernel<<<1, kWarpSize, 0, stream>>>(sums, sums_row_stride, sums_col_stride, nb, gate);
  return cudaGetLastError();
}

cudaError_t probe_device(int device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  if (device != previous) {
    err = cudaSetDevice(device);
    if (err != cudaSuccess) return err;
  }
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(band_l1_kernel<float, true, true>));
  if (device != previous) {
    const cudaError_t back = cudaSetDevice(previous);
    if (err == cudaSuccess) err = back;
  }
  return err;
}

}  // namespace cuda
}  // namespace fastcache_rt
