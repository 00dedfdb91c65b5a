// Host launchers of the fastcache_rt CUDA kernels (fastcache_rt._C_cuda).
//
// Framework-free: raw device pointers, sizes and *element* strides in, a cudaError_t out. Every launcher enqueues
// exactly one kernel on `stream` (none when there is nothing to write) and never synchronises; device scalars
// (count, tau_query, distance, gap, state, ...) are read by the kernels, host scalars travel as kernel arguments
// (ScalarF32 / ScalarI64: never a host-to-device copy). Included by the host compiler (bindings.cpp) and by nvcc
// (csrc/cuda/*.cu).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastcache_rt {
namespace cuda {

// Element types of the feature tensors.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Highest number of rows (orders) taylor_forecast / hermite_forecast take; the reference stops at 21 (i! must fit
// an int64 there).
constexpr int kMaxOrders = 32;

// Number of self-resetting block counters of the reductions (band_l1, gate_step). A caller gives each stream its
// own slot so that reductions running concurrently on different streams never share a counter.
constexpr int kCounterSlots = 1024;

// A float32 scalar argument: the kernel reads *ptr (a float32 0-dim device tensor) when ptr != nullptr, else uses
// value (a Python float, rounded to float32 on the host).
struct ScalarF32 {
  const float* ptr;
  float value;
};

// An int64 scalar argument (count): *ptr (an int64 0-dim device tensor) when ptr != nullptr, else value. The
// caller turns "None" (all rows) into value = the number of rows (n or K).
struct ScalarI64 {
  const int64_t* ptr;
  int64_t value;
};

// The gate epilogue's inputs and outputs (fastcache_rt.ops.layout); float32, any element strides.
struct GateParams {
  const float* state;
  int64_t state_stride;
  const float* params;
  int64_t params_stride;
  const float* coeffs;  // highest power first
  int64_t coeffs_stride;
  int64_t n_coeffs;  // >= 1
  const float* gammas;  // nullptr: no per-band (FDC) check
  int64_t gammas_stride;
  bool* decision_out;  // 0-dim torch.bool
  float* state_out;
  int64_t state_out_stride;
};

// Number of doubles the `partials` workspace of band_l1 / gate_step must hold for a (B, R, D) input with nb bands:
// 2 * B * (J + nb - 1) * C with C = ceil(R / 64), J = ceil(D / 256) (csrc/cuda/band_order.h). A function of the sizes
// only (no device query); the same for both per_sample settings. The workspace must be 16-byte aligned.
int64_t reduction_workspace_doubles(int64_t B, int64_t R, int64_t D, int64_t nb, bool per_sample);

// out (S, nb, 2) float32 contiguous, S = B if per_sample else 1: [s, k, 0] = sum |cur - prev|,
// [s, k, 1] = sum |prev| over channels bounds[k]:bounds[k+1] (bounds: int64 (nb+1,) on the device).
// cur/prev: (B, R, D) with element strides cstride[3] / pstride[3].
cudaError_t band_l1(DType dtype, const void* cur, const int64_t cstride[3], const void* prev, const int64_t pstride[3],
                    int64_t B, int64_t R, int64_t D, const int64_t* bounds, int64_t nb, bool per_sample, float* out,
                    double* partials, int64_t partials_doubles, int counter_slot, cudaStream_t stream);

// band_l1 over everything into sums_out (nb, 2) float32 contiguous, then the gate epilogue, in one launch.
cudaError_t gate_step(DType dtype, const void* cur, const int64_t cstride[3], const void* prev,
                      const int64_t pstride[3], int64_t B, int64_t R, int64_t D, const int64_t* bounds, int64_t nb,
                      const GateParams& gate, float* sums_out, double* partials, int64_t partials_doubles,
                      int counter_slot, cudaStream_t stream);

// The gate epilogue alone on sums (nb, 2) float32 with element strides (sums_row_stride, sums_col_stride).
cudaError_t gate_decide(const float* sums, int64_t sums_row_stride, int64_t sums_col_stride, int64_t nb,
                        const GateParams& gate, cudaStream_t stream);

// Chebyshev ridge weights (float32 (n,)) into out. taus: float32 (n,) contiguous; tau_query: float32 scalar;
// count: int64 scalar (rows j < count are valid; count None = n).
cudaError_t chebyshev_weights(const float* taus, int64_t n, ScalarF32 tau_query, ScalarI64 count, int64_t degree,
                              double lam, double blend, float* out, cudaStream_t stream);

// out (N,) contiguous = sum over valid rows j of w_j * history[j]; history (n, N) with element strides
// (hs0, hs1), dtype `dtype` (out has the same dtype).
cudaError_t chebyshev_forecast(DType dtype, const void* history, int64_t n, int64_t N, int64_t hs0, int64_t hs1,
                               const float* taus, ScalarF32 tau_query, ScalarI64 count, int64_t degree, double lam,
                               double blend, void* out, cudaStream_t stream);

// Largest degree / n chebyshev_forecast and chebyshev_weights accept on the current device (shared memory of the
// per-block solve); returns cudaSuccess and the byte counts through the pointers.
cudaError_t chebyshev_smem(int64_t n, int64_t degree, int64_t* need_bytes, int64_t* max_bytes);

// out (N,) contiguous = sum_i c_i * diffs[i], c_i = distance^i / i! (taylor) or H_i(scale*distance) scale^i / i!
// (hermite); diffs (K, N) with element strides (ds0, ds1), 1 <= K <= kMaxOrders; distance: float32 scalar.
cudaError_t taylor_forecast(DType dtype, const void* diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1,
                            ScalarF32 distance, void* out, cudaStream_t stream);
cudaError_t hermite_forecast(DType dtype, const void* diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1,
                             ScalarF32 distance, double scale, void* out, cudaStream_t stream);

// In place on diffs (K, N) (strides ds0, ds1): new[0] = feature (stride fs); new[i+1] = (new[i] - old[i]) / gap if
// i < count else 0. gap: float32 scalar; count: int64 scalar (None = K).
cudaError_t taylor_update(DType dtype, void* diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1,
                          const void* feature, int64_t fs, ScalarF32 gap, ScalarI64 count, cudaStream_t stream);

// Doubles of the `partials` workspace of the error sums (taylor_update_error, history_update with an error) for N
// columns in B samples: 2 * B * C, C = max(1, ceil((N / B) / 4096)) (error_sums.cuh). A function of the sizes only.
int64_t error_workspace_doubles(int64_t N, int64_t B);

// taylor_update, and in the same launch the error sums of pred = sum_{i < count} weights[i] * old diffs[i]
// (weights: float32 (K,) contiguous on the device) against the feature: error (B, 2) float32 contiguous,
// error[b] = (sum (pred - feature)^2, sum feature^2) over the b-th of B equal slices of the N columns. The partials
// workspace (16-byte aligned, >= error_workspace_doubles) and the counter slot as band_l1's.
cudaError_t taylor_update_error(DType dtype, void* diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1,
                                const void* feature, int64_t fs, ScalarF32 gap, ScalarI64 count, const float* weights,
                                float* error, int64_t B, double* partials, int64_t partials_doubles, int counter_slot,
                                cudaStream_t stream);

// history (n, N) (strides hs0, hs1): history[row] = value (stride vs; a bit copy; no write when row is outside
// [0, n)); with error != nullptr first the error sums (as taylor_update_error) of pred = sum_{k < count}
// weights[k] * history[k] against value. count: int64 scalar (None = n).
cudaError_t history_update(DType dtype, void* history, int64_t n, int64_t N, int64_t hs0, int64_t hs1,
                           const void* value, int64_t vs, ScalarI64 row, const float* weights, ScalarI64 count,
                           float* error, int64_t B, double* partials, int64_t partials_doubles, int counter_slot,
                           cudaStream_t stream);

// cudaSuccess when this module's kernels can run on `device` (an image for its architecture is present).
cudaError_t probe_device(int device);

}  // namespace cuda
}  // namespace fastcache_rt
