// history_update: write a computed step into a ring-buffer history (Spectrum), and optionally, in the same pass,
// the error sums of the forecast of that step from the history before the write (error_sums.h; loop:
// history_kernel.h).
#include <algorithm>
#include <vector>

#include "common.h"
#include "error_sums.h"
#include "kernels.h"
#include "ops.h"

namespace fastcache_rt {
namespace cpu {

int history_update(int dtype, void* history, int64_t n, int64_t N, int64_t s_row, int64_t s_col, const void* value,
                   int64_t s_value, const int64_t* row, const float* weights, int64_t s_weights,
                   const int64_t* count, float* error, int64_t B, int nthreads) {
  if (n < 1 || N < 0 || B < 0) return kBadSize;
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return kBadDType;
  if (row == nullptr) return kNullPointer;
  if (N > 0 && (history == nullptr || value == nullptr)) return kNullPointer;
  int64_t cnt = n;
  if (count != nullptr) cnt = *count < 0 ? 0 : (*count < n ? *count : n);
  HistoryArgs a{history, n, s_row, s_col, value, s_value, *row, cnt};
  if (error == nullptr) {
    if (N == 0) return kOk;
    const int nt = threads_for(N, nthreads);
    constexpr int64_t kTaskColumns = 16384;  // a multiple of 64: threads never share a cache line of the row
    const int64_t tasks = nt > 1 ? (N + kTaskColumns - 1) / kTaskColumns : 1;
    run_tasks(nt, tasks, [&](int64_t i) {
      const int64_t b = nt > 1 ? i * kTaskColumns : 0;
      const int64_t e = nt > 1 ? std::min(N, b + kTaskColumns) : N;
      history_kernel(dtype, a, b, e, nullptr);
    });
    return kOk;
  }
  if (N > 0 && weights == nullptr) return kNullPointer;
  std::vector<float> w(static_cast<size_t>(n), 0.0f);  // the weights of the rows that are read, contiguous
  for (int64_t k = 0; k < cnt; ++k) w[static_cast<size_t>(k)] = weights[k * s_weights];
  a.w = w.data();
  return error_sums_run(N, B, cnt + 1, error, nthreads, [&](int64_t b, int64_t e, ErrorPart* part) {
    history_kernel(dtype, a, b, e, part);
  });
}

}  // namespace cpu
}  // namespace fastcache_rt
