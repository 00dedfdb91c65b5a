// The CPU kernels' entry points: raw pointers, sizes and element strides in, a Status code (common.h) out.
// Semantics: fastcache_rt/ops/_backend.py (protocol) and fastcache_rt/ops/_reference.py (the spec).
// `nthreads` is the number of threads allowed (the caller passes torch.get_num_threads()).
#pragma once

#include <cstdint>

#include "common.h"

namespace fastcache_rt {
namespace cpu {

// A strided 3-D view (B, R, D) in element strides.
struct View3 {
  const void* data;
  int64_t stride[3];
};

// A strided 1-D float32 vector (small tensors: state, params, coefficients, ...).
struct VecF {
  const float* data;
  int64_t stride;
};

// out (B or 1, nb, 2) float32, element strides out_stride: [.., k, 0] = sum |cur - prev|, [.., k, 1] = sum |prev|
// over channels bounds[k]:bounds[k+1], all rows (and samples unless per_sample). fp32 partials per row chunk,
// combined in double.
int band_l1(int dtype, View3 cur, View3 prev, int64_t B, int64_t R, int64_t D, const int64_t* bounds, int64_t nb,
            bool per_sample, float* out, const int64_t out_stride[3], int nthreads);

// The gate epilogue (_reference.gate_decide), float32. sums (nb, 2) with element strides sums_stride;
// gammas.data may be null (no per-band check). decision_out: one byte, 0/1. state_out: contiguous not required.
struct GateArgs {
  VecF state, params, coeffs, gammas;
  int64_t n_coeffs;
  uint8_t* decision_out;
  float* state_out;
  int64_t state_out_stride;
};
int gate_decide(const float* sums, const int64_t sums_stride[2], int64_t nb, const GateArgs& g);

// band_l1 over everything (per_sample = false) into sums_out (nb, 2) (element strides), then gate_decide on it.
int gate_step(int dtype, View3 cur, View3 prev, int64_t B, int64_t R, int64_t D, const int64_t* bounds, int64_t nb,
              float* sums_out, const int64_t sums_stride[2], const GateArgs& g, int nthreads);

// Chebyshev ridge weights (float32 out[n], element stride out_stride). count: null = n.
int chebyshev_weights(VecF taus, int64_t n, const float* tau_query, const int64_t* count, int64_t degree,
                      double lam, double blend, float* out, int64_t out_stride);

// out[c] = sum_{valid j} w_j * history[j, c]; history (n, N) with element strides; out in history's dtype.
int chebyshev_forecast(int dtype, const void* history, int64_t n, int64_t N, int64_t s_row, int64_t s_col,
                       VecF taus, const float* tau_query, const int64_t* count, int64_t degree, double lam,
                       double blend, void* out, int64_t s_out, int nthreads);

// out[c] = sum_i diffs[i, c] * distance^i / i!  (taylor)   or with Hermite weights (hermite).
int taylor_forecast(int dtype, const void* diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col,
                    const float* distance, void* out, int64_t s_out, int nthreads);
int hermite_forecast(int dtype, const void* diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col,
                     const float* distance, double scale, void* out, int64_t s_out, int nthreads);

// In place on diffs (K, N): new[0] = feature; new[i+1] = (new[i] - old[i]) / gap if i < count else 0.
int taylor_update(int dtype, void* diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col, const void* feature,
                  int64_t s_feature, const float* gap, const int64_t* count, int nthreads);

// taylor_update, and in the same pass the error sums (error_sums.h) of pred = sum_{i < count} weights[i] * old[i]
// (weights: float32 (K,), element stride s_weights) against the feature into error (float32 (B, 2) contiguous;
// N % B == 0).
int taylor_update_error(int dtype, void* diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col,
                        const void* feature, int64_t s_feature, const float* gap, const int64_t* count,
                        const float* weights, int64_t s_weights, float* error, int64_t B, int nthreads);

// history[row] = value (a bit copy; history (n, N) element strides, value stride s_value; no write when *row is
// outside [0, n)); with error != null, first the error sums of pred = sum_{k < count} weights[k] * history[k]
// against value (count: null = n). error: float32 (B, 2) contiguous, N % B == 0.
int history_update(int dtype, void* history, int64_t n, int64_t N, int64_t s_row, int64_t s_col, const void* value,
                   int64_t s_value, const int64_t* row, const float* weights, int64_t s_weights,
                   const int64_t* count, float* error, int64_t B, int nthreads);

}  // namespace cpu
}  // namespace fastcache_rt
