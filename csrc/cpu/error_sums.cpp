// The fixed partition and ordered final reduction of the error sums (error_sums.h).
#include "error_sums.h"

#include <algorithm>
#include <vector>

namespace fastcache_rt {
namespace cpu {

int error_sums_run(int64_t N, int64_t B, int64_t work, float* out, int nthreads,
                   const std::function<void(int64_t, int64_t, ErrorPart*)>& chunk) {
  if (N < 0 || B < 0) return kBadSize;
  if (B == 0) return N == 0 ? kOk : kBadSize;
  if (N % B != 0) return kBadSize;
  if (out == nullptr) return kNullPointer;
  const int64_t L = N / B;
  const int64_t C = (L + kErrorChunk - 1) / kErrorChunk;  // chunks per sample
  std::vector<ErrorPart> parts(static_cast<size_t>(B * C), ErrorPart{0.0, 0.0});
  const int nt = threads_for(N * (work > 0 ? work : 1), nthreads);
  run_tasks(nt, B * C, [&](int64_t t) {
    const int64_t b = t / C;
    const int64_t j = t - b * C;
    const int64_t begin = b * L + j * kErrorChunk;
    const int64_t end = b * L + std::min(L, (j + 1) * kErrorChunk);
    chunk(begin, end, &parts[static_cast<size_t>(t)]);
  });
  for (int64_t b = 0; b < B; ++b) {
    double e2 = 0.0, f2 = 0.0;
    for (int64_t j = 0; j < C; ++j) {
      e2 += parts[static_cast<size_t>(b * C + j)].e2;
      f2 += parts[static_cast<size_t>(b * C + j)].f2;
    }
    out[2 * b] = static_cast<float>(e2);
    out[2 * b + 1] = static_cast<float>(f2);
  }
  return kOk;
}

}  // namespace cpu
}  // namespace fastcache_rt
