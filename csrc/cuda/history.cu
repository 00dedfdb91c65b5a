// history_update: history[row] = value (a ring-buffer history, Spectrum), and with the error, in the same launch,
// the error sums of the forecast pred = sum_{k < count} w[k] * history[k] of that step from the rows before the
// write (error_sums.cuh).
//
// One launch on the error sums' fixed partition (one block per (sample, chunk of 4096 columns); without the error:
// B = 1, chunks of the N columns, no reduction). Thread t owns packs t, t + 256, ... of Pack<T>::kN columns: with
// unit column strides, aligned bases, row stride and samples, one 16-byte load of the value and of every valid row
// per pack, pred in fp32 with the rows in order (__fadd_rn(pred, __fmul_rn(w, x)) from 0: the reference's bits),
// then the value's raw 16 bytes stored into row `row` (after all of the pack's reads); other layouts and the short
// last pack go element by element in the same order. Rows k >= count are never read; a row outside [0, n) (a
// device tensor) writes nothing.

#include "cuda/common.cuh"
#include "cuda/error_sums.cuh"

namespace fastcache_rt {
namespace cuda {
namespace {

using namespace detail;

template <typename T, bool kVec, bool kError>
__global__ void __launch_bounds__(err::kThreads)
    history_update_kernel(T* h, int64_t n, int64_t hs0, int64_t hs1, const T* v, int64_t vs, const ScalarI64 row,
                          const ScalarI64 count, const float* __restrict__ w, const err::Grid eg, double2* ws,
                          int counter_slot, float* error) {
  constexpr int kV = Pack<T>::kN;
  const int64_t r = read_scalar(row);
  const bool write = r >= 0 && r < n;
  T* dst = h + (write ? r * hs0 : 0);
  int64_t cnt = 0;
  if (kError) {
    const int64_t c_in = read_scalar(count);
    cnt = c_in < 0 ? 0 : (c_in < n ? c_in : n);
  }
  int64_t base = 0;
  int64_t len = 0;
  err::chunk_of(eg, &base, &len);
  const int n_len = len > 0 ? static_cast<int>(len) : 0;  // <= kChunk
  const int packs = (n_len + kV - 1) / kV;
  err::Acc acc;
  for (int pk = static_cast<int>(threadIdx.x); pk < packs; pk += err::kThreads) {
    const int64_t c0 = base + static_cast<int64_t>(pk) * kV;
    const int ne = min(kV, n_len - pk * kV);
    if (kVec && ne == kV) {
      const uint4 raw = load16(v + c0);
      if (kError) {
        float x[kV];
        float pred[kV];
        unpack<T>(raw, x);
#pragma unroll
        for (int e = 0; e < kV; ++e) pred[e] = 0.0f;
        const T* p = h + c0;
#pragma unroll 4
        for (int64_t k = 0; k < cnt; ++k) {
          float y[kV];
          unpack<T>(load16(p + k * hs0), y);
          const float wk = __ldg(w + k);
#pragma unroll
          for (int e = 0; e < kV; ++e) pred[e] = __fadd_rn(pred[e], __fmul_rn(wk, y[e]));
        }
#pragma unroll
        for (int e = 0; e < kV; ++e) acc.add(pred[e], x[e]);
      }
      if (write) *reinterpret_cast<uint4*>(dst + c0) = raw;
    } else {
      for (int e = 0; e < ne; ++e) {
        const int64_t c = c0 + e;
        const T raw = v[c * vs];
        if (kError) {
          const T* p = h + c * hs1;
          float pred = 0.0f;
          for (int64_t k = 0; k < cnt; ++k) pred = __fadd_rn(pred, __fmul_rn(__ldg(w + k), to_f32(p[k * hs0])));
          acc.add(pred, to_f32(raw));
        }
        if (write) dst[c * hs1] = raw;
      }
    }
  }
  if (kError) err::finish(acc, eg, ws, counter_slot, error);
}

template <typename T, bool kVec, bool kError>
cudaError_t launch_history(T* h, int64_t n, int64_t hs0, int64_t hs1, const T* v, int64_t vs, ScalarI64 row,
                           ScalarI64 count, const float* w, const err::Grid& eg, double2* ws, int counter_slot,
                           float* error, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(eg.B * eg.C);
  history_update_kernel<T, kVec, kError><<<grid, err::kThreads, 0, stream>>>(h, n, hs0, hs1, v, vs, row, count, w,
                                                                            eg, ws, counter_slot, error);
  return cudaGetLastError();
}

}  // namespace

int64_t error_workspace_doubles(int64_t N, int64_t B) { return detail::err::workspace_doubles(N, B); }

cudaError_t history_update(DType dtype, void* history, int64_t n, int64_t N, int64_t hs0, int64_t hs1,
                           const void* value, int64_t vs, ScalarI64 row, const float* weights, ScalarI64 count,
                           float* error, int64_t B, double* partials, int64_t partials_doubles, int counter_slot,
                           cudaStream_t stream) {
  using namespace detail;
  if (n < 1 || N < 0 || B < 0) return cudaErrorInvalidValue;
  const bool with_error = error != nullptr;
  err::Grid eg;
  if (with_error) {
    if (B == 0) return N == 0 ? cudaSuccess : cudaErrorInvalidValue;
    cudaError_t status = err::grid_of(N, B, &eg);
    if (status != cudaSuccess) return status;
    status = err::check_workspace(eg, partials, partials_doubles, counter_slot);
    if (status != cudaSuccess) return status;
    if (N > 0 && weights == nullptr) return cudaErrorInvalidValue;
  } else {
    if (N == 0) return cudaSuccess;
    cudaError_t status = err::grid_of(N, 1, &eg);  // chunks of the N columns, no reduction
    if (status != cudaSuccess) return status;
  }
  if (N > 0 && (history == nullptr || value == nullptr)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    T* h = static_cast<T*>(history);
    const T* v = static_cast<const T*>(value);
    // 16-byte packs: unit column strides, aligned bases and row stride, and every sample starting on a pack
    const bool vec = rows_vectorisable<T>(h, n, hs0, hs1) && vs == 1 && aligned16(v) &&
                     (eg.B == 1 || eg.L % Pack<T>::kN == 0);
    double2* ws = reinterpret_cast<double2*>(partials);
    if (with_error) {
      return vec ? launch_history<T, true, true>(h, n, hs0, hs1, v, vs, row, count, weights, eg, ws, counter_slot,
                                                 error, stream)
                 : launch_history<T, false, true>(h, n, hs0, hs1, v, vs, row, count, weights, eg, ws, counter_slot,
                                                  error, stream);
    }
    return vec ? launch_history<T, true, false>(h, n, hs0, hs1, v, vs, row, count, weights, eg, ws, 0, error,
                                                stream)
               : launch_history<T, false, false>(h, n, hs0, hs1, v, vs, row, count, weights, eg, ws, 0, error,
                                                 stream);
  });
}

}  // namespace cuda
}  // namespace fastcache_rt
