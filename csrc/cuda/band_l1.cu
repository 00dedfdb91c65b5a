// band_l1, gate_step, gate_decide: banded sums of |cur - prev| and |prev|, and the gate epilogue.
//
// Design (one launch per call, no memset, CUDA-graph safe):
//  - Output slot s = (sample group, band) with (B if per_sample else 1) * nb slots; each slot gets `chunks` blocks
//    (blockIdx.x = s * chunks + chunk), sized so the whole grid is ~8 blocks per SM.
//  - Inside a slot the work is cut into warp tasks (row, channel chunk of 32 * 4 * 16-byte packs); the warps of
//    the slot's blocks stride over the tasks. A task sums in fp32 per lane (at most 32 elements per lane), the
//    lane adds the task sum to fp64 accumulators, so the fp32 error stays that of 32-term sums however large the
//    tensor (relative error ~1e-7 at 2^24 elements and beyond). Contiguous channels use 128-bit loads when cur
//    and prev reach 16-byte alignment at the same element (scalar head/tail); other layouts take a strided
//    scalar path. Offsets are int64.
//  - Warp shuffle + shared-memory block sum (fp64) -> per-block partials in a caller workspace; thread 0 then
//    __threadfence()s and bumps a per-stream counter (__device__ array, zero at module load). The block that sees
//    the last ticket reads all partials (__ldcg, L2) and sums each slot's chunks in fp64 in a fixed order (lane
//    groups with a fixed xor tree: deterministic for a given device, and fast when one slot has hundreds of
//    chunks), writes the float32 sums, runs the gate epilogue (gate_step) and stores 0 back into its counter for
//    the next launch.
//  - Gate epilogue: a float32 transcription of _reference.gate_decide using __f*_rn intrinsics (no FMA
//    contraction: the reference rounds each torch op separately) and cosf (no fast math).
// NaN/Inf propagate: they stay in the sums of the band (and sample) they belong to.

#include <climits>

#include "cuda/common.cuh"

namespace fastcache_rt {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kUnroll = 4;  // 16-byte packs per lane per task
constexpr int kBlocksPerSm = 8;

// Layout of the gate state / params (fastcache_rt/ops/layout.py).
constexpr int S_STEP = 0, S_ACC = 1, S_CONSEC = 2, S_HAS_CACHE = 3, S_LAST_COMPUTE = 4, S_REL_L1 = 5,
              S_NONFINITE = 6, S_COMPUTED = 7;
constexpr int P_TAU = 0, P_NUM_STEPS = 1, P_TADS_MIN = 2, P_TADS_MAX = 3, P_MAX_CACHED = 4, P_FORCE_LAST = 5;

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
  int64_t num_slots;  // (B if per_sample else 1) * nb
  int64_t chunks;     // blocks per slot
  float* out;         // (num_slots, 2)
  double* partials;   // (gridDim.x, 2)
  int counter_slot;
  bool per_sample;
};

// Elements of one warp task: 32 lanes x kUnroll 16-byte packs.
template <typename T>
struct Task {
  static constexpr int64_t kElems = static_cast<int64_t>(kWarpSize) * kUnroll * Pack<T>::kN;
};

// ---- gate epilogue (one thread) -------------------------------------------------------------------------------

__device__ __forceinline__ float rel_f32(float num, float den) {
  // 0/0 (nothing changed, nothing there) is 0; x/0 is inf; NaN stays NaN.
  return (num == 0.0f && den == 0.0f) ? 0.0f : __fdiv_rn(num, den);
}

__device__ void gate_epilogue(const float* sums, int64_t srow, int64_t scol, int64_t nb, const GateParams& g) {
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

  // bell = (1 - cos(2 pi s / S)) / 2; torch rounds the Python constant 2*pi to float32 before multiplying.
  const float two_pi = static_cast<float>(2.0 * 3.14159265358979323846);
  const float bell = __fmul_rn(__fsub_rn(1.0f, cosf(__fdiv_rn(__fmul_rn(two_pi, s), n_steps))), 0.5f);
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

// ---- per-warp task sums ---------------------------------------------------------------------------------------

// Contiguous channels c[0..len), q[0..len): 128-bit loads where both reach 16-byte alignment at the same element.
template <typename T>
__device__ __forceinline__ void task_sum_contig(const T* __restrict__ c, const T* __restrict__ q, int len, int lane,
                                                float& fd, float& fm) {
  constexpr int kV = Pack<T>::kN;
  const unsigned mc = static_cast<unsigned>(reinterpret_cast<uintptr_t>(c) & 15u);
  const unsigned mq = static_cast<unsigned>(reinterpret_cast<uintptr_t>(q) & 15u);
  int head = len;
  int nvec = 0;
  if (mc == mq) {
    head = min(len, static_cast<int>(((16u - mc) & 15u) / sizeof(T)));
    nvec = (len - head) / kV;
  }
  for (int i = lane; i < head; i += kWarpSize) {
    const float x = to_f32(c[i]);
    const float y = to_f32(q[i]);
    fd += fabsf(x - y);
    fm += fabsf(y);
  }
  const T* cv = c + head;
  const T* qv = q + head;
  uint4 rc[kUnroll];
  uint4 rq[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int v = lane + u * kWarpSize;
    if (v < nvec) {
      rc[u] = load16_ro(cv + v * kV);
      rq[u] = load16_ro(qv + v * kV);
    } else {
      rc[u] = make_uint4(0u, 0u, 0u, 0u);
      rq[u] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (lane + u * kWarpSize < nvec) {
      float x[kV];
      float y[kV];
      unpack<T>(rc[u], x);
      unpack<T>(rq[u], y);
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        fd += fabsf(x[e] - y[e]);
        fm += fabsf(y[e]);
      }
    }
  }
  for (int i = head + nvec * kV + lane; i < len; i += kWarpSize) {
    const float x = to_f32(c[i]);
    const float y = to_f32(q[i]);
    fd += fabsf(x - y);
    fm += fabsf(y);
  }
}

template <typename T>
__device__ __forceinline__ void task_sum_strided(const T* __restrict__ c, int64_t sc, const T* __restrict__ q,
                                                 int64_t sq, int len, int lane, float& fd, float& fm) {
#pragma unroll 4
  for (int i = lane; i < len; i += kWarpSize) {
    const float x = to_f32(c[static_cast<int64_t>(i) * sc]);
    const float y = to_f32(q[static_cast<int64_t>(i) * sq]);
    fd += fabsf(x - y);
    fm += fabsf(y);
  }
}

// ---- the reduction kernel -------------------------------------------------------------------------------------

template <typename T, bool kContig, bool kGate>
__global__ void __launch_bounds__(kThreads) band_l1_kernel(ReduceArgs<T> a, GateParams g) {
  constexpr int64_t kTask = Task<T>::kElems;
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;

  const int64_t slot = static_cast<int64_t>(blockIdx.x) / a.chunks;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) - slot * a.chunks;
  const int64_t group = slot / a.nb;
  const int64_t band = slot - group * a.nb;
  // Clamp to [0, D] so that a malformed bounds tensor can never make us read outside the tensors.
  const int64_t lo = min(max(a.bounds[band], static_cast<int64_t>(0)), a.D);
  const int64_t hi = min(max(a.bounds[band + 1], lo), a.D);
  const int64_t nrows = a.per_sample ? a.R : a.B * a.R;
  const int64_t nparts = (hi - lo + kTask - 1) / kTask;
  const int64_t ntasks = nrows * nparts;

  double acc_d = 0.0;
  double acc_m = 0.0;
  for (int64_t t = chunk * kWarps + warp; t < ntasks; t += a.chunks * kWarps) {
    const int64_t row = t / nparts;
    const int64_t part = t - row * nparts;
    int64_t b, r;
    if (a.per_sample) {
      b = group;
      r = row;
    } else {
      b = row / a.R;
      r = row - b * a.R;
    }
    const int64_t c0 = lo + part * kTask;
    const int len = static_cast<int>(min(kTask, hi - c0));
    const T* pc = a.cur + b * a.cs0 + r * a.cs1 + c0 * a.cs2;
    const T* pp = a.prev + b * a.ps0 + r * a.ps1 + c0 * a.ps2;
    float fd = 0.0f;
    float fm = 0.0f;
    if (kContig) {
      task_sum_contig<T>(pc, pp, len, lane, fd, fm);
    } else {
      task_sum_strided<T>(pc, a.cs2, pp, a.ps2, len, lane, fd, fm);
    }
    acc_d += static_cast<double>(fd);
    acc_m += static_cast<double>(fm);
  }

  acc_d = warp_sum(acc_d);
  acc_m = warp_sum(acc_m);
  __shared__ double s_red[2][kWarps];
  __shared__ int s_last;
  if (lane == 0) {
    s_red[0][warp] = acc_d;
    s_red[1][warp] = acc_m;
  }
  __syncthreads();
  unsigned int* counter = &g_counters[a.counter_slot];
  if (threadIdx.x == 0) {
    double bd = 0.0;
    double bm = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      bd += s_red[0][w];
      bm += s_red[1][w];
    }
    a.partials[2 * static_cast<int64_t>(blockIdx.x)] = bd;
    a.partials[2 * static_cast<int64_t>(blockIdx.x) + 1] = bm;
    __threadfence();  // release the partials before taking a ticket
    const unsigned int ticket = atomicAdd(counter, 1u);
    s_last = (ticket == gridDim.x - 1u) ? 1 : 0;
  }
  __syncthreads();
  if (!s_last) return;

  // Last block: every other block's partials are visible (their fence precedes their ticket). Each slot is summed
  // by a group of G lanes (G = a power of two <= 32, >= chunks when chunks is small): lane g adds chunks g, g + G,
  // ... in order, then a fixed xor tree joins the G lanes. The order depends only on `chunks`, so the result is
  // deterministic, and no single thread walks hundreds of partials.
  __threadfence();
  int group_size = 1;
  while (group_size < a.chunks && group_size < kWarpSize) group_size <<= 1;
  const int groups = kThreads / group_size;
  const int gid = static_cast<int>(threadIdx.x) / group_size;
  const int glane = static_cast<int>(threadIdx.x) % group_size;
  for (int64_t base = 0; base < a.num_slots; base += groups) {  // same trip count in every thread
    const int64_t s = base + gid;
    double sd = 0.0;
    double sm = 0.0;
    if (s < a.num_slots) {
      const double* p = a.partials + 2 * s * a.chunks;
      for (int64_t c = glane; c < a.chunks; c += group_size) {
        sd += __ldcg(p + 2 * c);
        sm += __ldcg(p + 2 * c + 1);
      }
    }
    for (int offset = group_size / 2; offset > 0; offset >>= 1) {
      sd += __shfl_xor_sync(kFullMask, sd, offset);
      sm += __shfl_xor_sync(kFullMask, sm, offset);
    }
    if (s < a.num_slots && glane == 0) {
      a.out[2 * s] = static_cast<float>(sd);
      a.out[2 * s + 1] = static_cast<float>(sm);
    }
  }
  if (kGate) {
    __syncthreads();  // the float32 sums of all bands are written
    if (threadIdx.x == 0) gate_epilogue(a.out, 2, 1, a.nb, g);
  }
  if (threadIdx.x == 0) *counter = 0u;  // ready for the next launch on this stream
}

__global__ void __launch_bounds__(kWarpSize)
    gate_decide_kernel(const float* sums, int64_t srow, int64_t scol, int64_t nb, GateParams g) {
  if (threadIdx.x == 0) gate_epilogue(sums, srow, scol, nb, g);
}

// ---- host side ------------------------------------------------------------------------------------------------

int64_t block_target(cudaError_t* err) {
  int sms = 1;
  *err = sm_count(&sms);
  return static_cast<int64_t>(sms) * kBlocksPerSm;
}

template <typename T, bool kGate>
cudaError_t launch_reduce(const void* cur, const int64_t cs[3], const void* prev, const int64_t ps[3], int64_t B,
                          int64_t R, int64_t D, const int64_t* bounds, int64_t nb, bool per_sample, float* out,
                          const GateParams& gate, double* partials, int64_t partials_doubles, int counter_slot,
                          cudaStream_t stream) {
  if (B < 0 || R < 0 || D < 1 || nb < 1 || counter_slot < 0 || counter_slot >= kCounterSlots) {
    return cudaErrorInvalidValue;
  }
  const int64_t num_slots = (per_sample ? B : 1) * nb;
  if (num_slots == 0) return cudaSuccess;  // per-sample sums of an empty batch: nothing to write
  cudaError_t err = cudaSuccess;
  const int64_t target = block_target(&err);
  if (err != cudaSuccess) return err;
  const int64_t nrows = per_sample ? R : B * R;
  const int64_t max_tasks = nrows * ceil_div(D, Task<T>::kElems);
  int64_t chunks = ceil_div(target, num_slots);
  chunks = std::min(chunks, ceil_div(max_tasks, kWarps));
  if (chunks < 1) chunks = 1;
  if (num_slots > INT_MAX / chunks) chunks = std::max<int64_t>(1, INT_MAX / num_slots);
  if (num_slots * chunks > INT_MAX) return cudaErrorInvalidConfiguration;
  const int64_t grid = num_slots * chunks;
  if (partials == nullptr || 2 * grid > partials_doubles) return cudaErrorInvalidValue;

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
  a.num_slots = num_slots;
  a.chunks = chunks;
  a.out = out;
  a.partials = partials;
  a.counter_slot = counter_slot;
  a.per_sample = per_sample;
  const bool contig = (cs[2] == 1 || D == 1) && (ps[2] == 1 || D == 1);
  if (contig) {
    band_l1_kernel<T, true, kGate><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, gate);
  } else {
    band_l1_kernel<T, false, kGate><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, gate);
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

int64_t reduction_workspace_doubles(int64_t num_slots, cudaError_t* err) {
  // chunks <= ceil(target / slots)  =>  grid = slots * chunks < slots + target.
  const int64_t target = block_target(err);
  return 2 * (num_slots + target);
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
