// taylor_forecast, hermite_forecast (weighted sums of finite differences) and taylor_update (in-place refresh of
// the finite differences after a full step), float32 arithmetic as the reference.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "error_sums.h"
#include "ops.h"
#include "kernels.h"

namespace fastcache_rt {
namespace cpu {
namespace {

// torch's float32 x**i for a Python int i (at::pow(Tensor, Scalar)): 1, x, x*x, x*x*x, else pow in double.
float torch_pow_int(float x, int64_t i) {
  if (i == 0) return 1.0f;
  if (i == 1) return x;
  if (i == 2) return x * x;
  if (i == 3) return x * x * x;
  return static_cast<float>(std::pow(static_cast<double>(x), static_cast<double>(i)));
}

// math.factorial(i) as the float32 torch divides by (exact for i <= 13, rounded once beyond).
float factorial_f32(int64_t i) {
  double f = 1.0;
  for (int64_t k = 2; k <= i; ++k) f *= static_cast<double>(k);
  return static_cast<float>(f);
}

// _reference.taylor_weights: c_i = distance^i / i!
void taylor_weights(int64_t K, float x, std::vector<float>& w) {
  w.resize(static_cast<size_t>(K));
  for (int64_t i = 0; i < K; ++i) w[i] = torch_pow_int(x, i) / factorial_f32(i);
}

// _reference.hermite_weights: y = distance * scale; H_0 = 1, H_1 = 2y, H_k = 2y H_{k-1} - 2(k-1) H_{k-2};
// c_k = H_k * scale^k / k!
void hermite_weights(int64_t K, float x, double scale, std::vector<float>& w) {
  const float y = x * static_cast<float>(scale);
  std::vector<float> h(static_cast<size_t>(K > 2 ? K : 2));
  h[0] = 1.0f;
  h[1] = 2.0f * y;
  for (int64_t k = 2; k < K; ++k) h[k] = 2.0f * y * h[k - 1] - static_cast<float>(2.0 * static_cast<double>(k - 1)) * h[k - 2];
  w.resize(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k)
    w[k] = (h[k] * static_cast<float>(std::pow(scale, static_cast<double>(k)))) / factorial_f32(k);
}

void update_run(int dtype, const UpdateArgs& a, int64_t N, int nthreads) {
  const int nt = threads_for(N * a.K, nthreads);
  // Column tasks of kTaskColumns (a multiple of 64: threads never share a cache line of a row).
  constexpr int64_t kTaskColumns = 16384;
  const int64_t tasks = nt > 1 ? (N + kTaskColumns - 1) / kTaskColumns : 1;
  run_tasks(nt, tasks, [&](int64_t i) {
    const int64_t b = nt > 1 ? i * kTaskColumns : 0;
    const int64_t e = nt > 1 ? std::min(N, b + kTaskColumns) : N;
    update_kernel(dtype, a, b, e);
  });
}

int forecast(int dtype, const void* diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col,
             const std::vector<float>& w, void* out, int64_t s_out, int nthreads) {
  return weighted_rows(dtype, diffs, K, N, s_row, s_col, w.data(), out, s_out, nthreads);
}

}  // namespace

int taylor_forecast(int dtype, const void* diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col,
                    const float* distance, void* out, int64_t s_out, int nthreads) {
  if (K < 0 || N < 0) return kBadSize;
  if (distance == nullptr) return kNullPointer;
  std::vector<float> w;
  taylor_weights(K, *distance, w);
  return forecast(dtype, diffs, K, N, s_row, s_col, w, out, s_out, nthreads);
}

int hermite_forecast(int dtype, const void* diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col,
                     const float* distance, double scale, void* out, int64_t s_out, int nthreads) {
  if (K < 0 || N < 0) return kBadSize;
  if (distance == nullptr) return kNullPointer;
  std::vector<float> w;
  hermite_weights(K, *distance, scale, w);
  return forecast(dtype, diffs, K, N, s_row, s_col, w, out, s_out, nthreads);
}

int taylor_update(int dtype, void* diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col, const void* feature,
                  int64_t s_feature, const float* gap, const int64_t* count, int nthreads) {
  if (K < 0 || N < 0) return kBadSize;
  if (K == 0 || N == 0) return kOk;
  if (diffs == nullptr || feature == nullptr || gap == nullptr) return kNullPointer;
  int64_t cnt = K;
  if (count != nullptr) cnt = *count < 0 ? 0 : (*count < K ? *count : K);
  const UpdateArgs a{diffs, K, s_row, s_col, feature, s_feature, *gap, cnt};
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return kBadDType;
  update_run(dtype, a, N, nthreads);
  return kOk;
}

int taylor_update_error(int dtype, void* diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col,
                        const void* feature, int64_t s_feature, const float* gap, const int64_t* count,
                        const float* weights, int64_t s_weights, float* error, int64_t B, int nthreads) {
  if (K < 1 || N < 0 || B < 0) return kBadSize;
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return kBadDType;
  if (error == nullptr && B > 0) return kNullPointer;
  if (N > 0 && (diffs == nullptr || feature == nullptr || gap == nullptr || weights == nullptr)) return kNullPointer;
  int64_t cnt = K;
  if (count != nullptr) cnt = *count < 0 ? 0 : (*count < K ? *count : K);
  // The weights of the rows that are read, contiguous (K is small).
  std::vector<float> w(static_cast<size_t>(K), 0.0f);
  for (int64_t i = 0; i < cnt; ++i) w[static_cast<size_t>(i)] = weights[i * s_weights];
  UpdateArgs a{diffs, K, s_row, s_col, feature, s_feature, N > 0 ? *gap : 1.0f, cnt};
  a.w = w.data();
  return error_sums_run(N, B, 2 * K, error, nthreads, [&](int64_t b, int64_t e, ErrorPart* part) {
    update_error_kernel(dtype, a, b, e, part);
  });
}

}  // namespace cpu
}  // namespace fastcache_rt
