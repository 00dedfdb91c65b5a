// Weighted sum of rows, shared by chebyshev_forecast, taylor_forecast and hermite_forecast:
// out[c] = sum_j w[j] * rows[j, c], fp32, one pass over the rows (loop: weighted_rows_kernel.h), columns split
// between threads.
#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"
#include "kernels.h"

namespace fastcache_rt {
namespace cpu {
namespace {

constexpr int64_t kTaskColumns = 16384;

int weighted_rows_run(int dtype, const WeightedArgs& a, int nthreads) {
  const int nt = threads_for(a.N * (a.n > 0 ? a.n : 1), nthreads);
  // Column tasks of kTaskColumns (a multiple of 64: threads never share an output cache line).
  const int64_t tasks = nt > 1 ? (a.N + kTaskColumns - 1) / kTaskColumns : 1;
  run_tasks(nt, tasks, [&](int64_t i) {
    const int64_t b = nt > 1 ? i * kTaskColumns : 0;
    const int64_t e = nt > 1 ? std::min(a.N, b + kTaskColumns) : a.N;
    weighted_rows_kernel(dtype, a, b, e);
  });
  return kOk;
}

}  // namespace

int weighted_rows(int dtype, const void* rows, int64_t n, int64_t N, int64_t s_row, int64_t s_col, const float* w,
                  void* out, int64_t s_out, int nthreads) {
  if (n < 0 || N < 0) return kBadSize;
  if (N == 0) return kOk;
  if (out == nullptr || (n > 0 && (rows == nullptr || w == nullptr))) return kNullPointer;
  const WeightedArgs a{rows, n, N, s_row, s_col, w, out, s_out};
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return kBadDType;
  return weighted_rows_run(dtype, a, nthreads);
}

namespace {
template <typename T>
void fill_t(void* out, int64_t N, int64_t s_out, int nthreads) {
  const T v = from_f32<T>(std::numeric_limits<float>::quiet_NaN());
  T* o = static_cast<T*>(out);
  const int nt = threads_for(N, nthreads);
  run_parallel(nt, [&](int t) {
    int64_t b, e;
    split_range(N, nt, t, 64, &b, &e);
    for (int64_t c = b; c < e; ++c) o[c * s_out] = v;
  });
}
}  // namespace

int fill_nan(int dtype, void* out, int64_t N, int64_t s_out, int nthreads) {
  if (N < 0) return kBadSize;
  if (N == 0) return kOk;
  if (out == nullptr) return kNullPointer;
  switch (dtype) {
    case kFloat32:
      fill_t<float>(out, N, s_out, nthreads);
      return kOk;
    case kFloat16:
      fill_t<fp16_t>(out, N, s_out, nthreads);
      return kOk;
    case kBFloat16:
      fill_t<bf16_t>(out, N, s_out, nthreads);
      return kOk;
    default:
      return kBadDType;
  }
}

}  // namespace cpu
}  // namespace fastcache_rt
