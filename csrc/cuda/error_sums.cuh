// The error sums of the forecasters' updates, shared by taylor_update_error (taylor.cu) and history_update
// (history.cu): error[b] = (sum (pred - value)^2, sum value^2) over sample b, the b-th of B equal consecutive
// slices of the N columns (_reference.error_sums).
//
// Partition (a function of N and B only, never of the SM count): one block of kThreads threads per (sample b,
// chunk j) of kChunk consecutive columns of that sample, blockIdx.x = b * C + j, C = max(1, ceil(L / kChunk)),
// L = N / B. Inside a chunk, thread t owns the packs p = t, t + kThreads, ... of Pack<T>::kN columns (the last one
// may be short) and adds their terms in column order into two doubles (Acc: fp32 terms formed with the _rn
// intrinsics, as the reference forms them, converted exactly); the vector and the element-wise paths visit the
// same packs in the same order, so they give the same bits. Block sum: warp xor-shuffles (a fixed tree), then the
// warps in order (thread 0), stored as the block's double2 partial. Tickets: thread 0 __threadfence()s and takes a
// ticket from this translation unit's counter of the stream's slot; the block with the last ticket adds, per
// sample, its partials with the same fixed pattern (thread t: partials t, t + kThreads, ... in order; then the
// block sum), rounds once to float, writes error and resets the counter. Nothing depends on which block is last:
// bitwise run to run, and on every GPU.
#pragma once

#include <climits>

#include "cuda/common.cuh"

namespace fastcache_rt {
namespace cuda {
namespace detail {
namespace err {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int64_t kChunk = 4096;  // columns of one sample per block (16 per thread; a multiple of every pack)


// L columns per sample, C chunks per sample, B * C blocks.
struct Grid {
  int64_t L;
  int64_t C;
  int64_t B;
};

__host__ inline cudaError_t grid_of(int64_t N, int64_t B, Grid* g) {
  if (B < 1 || N < 0 || N % B != 0) return cudaErrorInvalidValue;
  g->B = B;
  g->L = N / B;
  g->C = g->L > 0 ? ceil_div(g->L, kChunk) : 1;
  if (g->B > INT_MAX / g->C) return cudaErrorInvalidConfiguration;
  return cudaSuccess;
}

__host__ inline int64_t workspace_doubles(int64_t N, int64_t B) {
  Grid g;
  if (grid_of(N, B, &g) != cudaSuccess) return 0;
  return 2 * g.B * g.C;
}

__host__ inline cudaError_t check_workspace(const Grid& g, const double* partials, int64_t partials_doubles,
                                            int counter_slot) {
  if (counter_slot < 0 || counter_slot >= kCounterSlots) return cudaErrorInvalidValue;
  if (partials == nullptr || partials_doubles < 2 * g.B * g.C || !aligned16(partials)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// The columns [base, base + len) of this block's chunk (len <= 0: none).
__device__ __forceinline__ void chunk_of(const Grid& g, int64_t* base, int64_t* len) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) / g.C;
  const int64_t lo = (static_cast<int64_t>(blockIdx.x) - b * g.C) * kChunk;
  *base = b * g.L + lo;
  *len = min(kChunk, g.L - lo);
}

// A thread's running sums: fp32 terms, double accumulation, in the order add() is called.
struct Acc {
  double e2 = 0.0;
  double f2 = 0.0;
  __device__ __forceinline__ void add(float pred, float value) {
    const float d = __fsub_rn(pred, value);
    e2 = __dadd_rn(e2, static_cast<double>(__fmul_rn(d, d)));
    f2 = __dadd_rn(f2, static_cast<double>(__fmul_rn(value, value)));
  }
};

// Sum over the block (valid in thread 0): warp xor-shuffles, then the warps in order. Ends with a barrier, so
// s_warp may be reused at once.
__device__ __forceinline__ double2 block_sum(double e2, double f2, double2* s_warp) {
  e2 = warp_sum(e2);
  f2 = warp_sum(f2);
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  if (lane == 0) s_warp[warp] = make_double2(e2, f2);
  __syncthreads();
  double2 t = make_double2(0.0, 0.0);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      t.x = __dadd_rn(t.x, s_warp[w].x);
      t.y = __dadd_rn(t.y, s_warp[w].y);
    }
  }
  __syncthreads();
  return t;
}

namespace {  // this translation unit's own counters and copy of finish()

// One self-resetting ticket counter per stream slot, zero at module load.
__device__ unsigned int g_error_counters[kCounterSlots];

// Every thread of every block calls this once at the end: the block's partial, the ticket, and in the last block
// the per-sample sums into error (float32 (B, 2) contiguous). Not inlined: the final reduction runs in one block
// per launch.
__device__ __forceinline__ void finish(const Acc& acc, const Grid& g, double2* ws, int counter_slot, float* error) {
  __shared__ double2 s_warp[kWarps];
  __shared__ int s_last;
  const double2 part = block_sum(acc.e2, acc.f2, s_warp);
  unsigned int* counter = &g_error_counters[counter_slot];
  if (threadIdx.x == 0) {
    ws[blockIdx.x] = part;
    __threadfence();  // release the partial before taking a ticket
    const unsigned int ticket = atomicAdd(counter, 1u);
    s_last = (ticket == gridDim.x - 1u) ? 1 : 0;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();  // every other block's partial is visible (their fence precedes their ticket)
  for (int64_t b = 0; b < g.B; ++b) {
    double e2 = 0.0;
    double f2 = 0.0;
    for (int64_t j = threadIdx.x; j < g.C; j += kThreads) {
      const double2 v = __ldcg(ws + b * g.C + j);  // L2: never a stale L1 line
      e2 = __dadd_rn(e2, v.x);
      f2 = __dadd_rn(f2, v.y);
    }
    const double2 t = block_sum(e2, f2, s_warp);
    if (threadIdx.x == 0) {
      error[2 * b] = __double2float_rn(t.x);
      error[2 * b + 1] = __double2float_rn(t.y);
    }
  }
  if (threadIdx.x == 0) *counter = 0u;  // ready for the next launch on this stream
}

}  // namespace
}  // namespace err
}  // namespace detail
}  // namespace cuda
}  // namespace fastcache_rt
