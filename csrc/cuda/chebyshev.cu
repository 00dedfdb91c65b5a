// chebyshev_weights, chebyshev_forecast: Spectrum's ridge-regression Chebyshev forecast in one launch.
//
// Design: the forecast is linear in the history, out = sum_j w_j history[j] with
// w = Phi (Phi^T Phi + lam I)^-1 phi(q). Every block first computes the tiny weight vector itself, in fp64 and in
// shared memory (no second launch, no host read of count / tau_query):
//   1. count (int64, clamped to [0, n]) and tau_query are read by thread 0 (from device memory, or the values the
//      host passed in the kernel arguments); rows j < cnt are valid.
//   2. Gram G[a][b] = sum_{valid j} T_a(t_j) T_b(t_j) (+ lam on the diagonal): one thread per lower-triangle entry,
//      basis by the recurrence T_m = (2t) T_{m-1} - T_{m-2} with the reference's rounding (__d*_rn).
//   3. Right-looking Cholesky with the block (3 barriers per column). A pivot that is not > 0 (or NaN) fails it as
//      in LAPACK's potrf; then the Gram matrix is rebuilt with a jitter of 1e-6 * mean(diag G) and factorised
//      again (a second failure yields NaN weights; torch would solve with its partial factor, both are garbage).
//   4. Thread 0 solves L L^T z = phi(q) (the q basis by the same recurrence); meanwhile warp 1 finds the two
//      valid rows of largest tau (torch.argmax rules: NaN is the maximum, ties go to the first index) for the
//      linear blend (blend != 1).
//   5. One thread per row: w_j = phi_j . z (invalid rows have phi_j = 0, so they get 0, or NaN if z is not
//      finite, exactly like the reference), blend, NaN for all rows if no row is valid, rounded to float32.
//      If any invalid row's weight is not finite the reference's w_j * 0 poisons every output with NaN: so here.
// Then the weighted sum runs over the valid rows only (rows >= count are never read), fp32, rows in order, 4 rows
// of 16-byte packs in flight per thread on the contiguous aligned path, int64 offsets, grid-stride.
// Shared memory: 8 (m^2 + m) + 4 n bytes, m = degree + 1 (dynamic; above 48 KiB the kernel opts in, up to the
// device limit).

#include <algorithm>
#include <climits>
#include <cmath>

#include "cuda/common.cuh"

namespace fastcache_rt {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;
constexpr int64_t kDefaultSmem = 48 * 1024;

struct ChebArgs {
  const float* taus;  // (n,) contiguous
  int64_t n;
  ScalarF32 tau_query;
  ScalarI64 count;         // None (all rows) arrives as n
  int m;                   // degree + 1
  double lam;
  double blend;
  double one_minus_blend;
  bool use_blend;  // blend != 1.0
};

struct SolveShared {
  int64_t cnt;  // valid rows: j < cnt
  double q;
  double diag_sum;
  float t_last;  // blend: the largest valid tau and the next one
  float t_prev;
  int j_last;
  int j_prev;
  int fail;
  int poison;
};

// T_r(t) and T_c(t) by the reference's recurrence.
__device__ __forceinline__ void basis_pair(double t, int r, int c, double& tr, double& tc) {
  tr = (r == 0) ? 1.0 : t;
  tc = (c == 0) ? 1.0 : t;
  const int top = r > c ? r : c;
  const double two_t = __dmul_rn(2.0, t);
  double tm2 = 1.0;
  double tm1 = t;
  for (int k = 2; k <= top; ++k) {
    const double tk = __dsub_rn(__dmul_rn(two_t, tm1), tm2);
    if (k == r) tr = tk;
    if (k == c) tc = tk;
    tm2 = tm1;
    tm1 = tk;
  }
}

// Lower triangle of Phi^T Phi + lam I (+ jitter I) into A (m x m, row-major).
__device__ void build_gram(const ChebArgs& a, int64_t cnt, double* A, double jitter) {
  const int m = a.m;
  for (int e = threadIdx.x; e < m * m; e += blockDim.x) {
    const int r = e / m;
    const int c = e - r * m;
    if (c > r) continue;
    double s = 0.0;
    for (int64_t j = 0; j < cnt; ++j) {
      double tr, tc;
      basis_pair(static_cast<double>(a.taus[j]), r, c, tr, tc);
      s = fma(tr, tc, s);
    }
    const double eye = (r == c) ? 1.0 : 0.0;
    s = __dadd_rn(s, __dmul_rn(a.lam, eye));
    s = __dadd_rn(s, __dmul_rn(jitter, eye));
    A[r * m + c] = s;
  }
}

// In-place Cholesky of the lower triangle of A by the whole block; *fail = 1 if a pivot is not > 0 (or NaN).
// Starts with thread-0 work, ends with a barrier.
__device__ void block_cholesky(double* A, int m, int* fail) {
  for (int k = 0; k < m; ++k) {
    if (threadIdx.x == 0) {
      const double pivot = A[k * m + k];
      if (!(pivot > 0.0)) *fail = 1;
      A[k * m + k] = sqrt(pivot);
    }
    __syncthreads();
    // Scale the column by the reciprocal pivot, as LAPACK's potf2 does.
    const double rkk = 1.0 / A[k * m + k];
    for (int i = k + 1 + static_cast<int>(threadIdx.x); i < m; i += blockDim.x) A[i * m + k] *= rkk;
    __syncthreads();
    const int rest = m - k - 1;
    for (int e = threadIdx.x; e < rest * rest; e += blockDim.x) {
      const int i = k + 1 + e / rest;
      const int j = k + 1 + e % rest;
      if (j <= i) A[i * m + j] -= A[i * m + k] * A[j * m + k];
    }
    __syncthreads();
  }
}

// (value, index) a beats b under torch.argmax: NaN is the largest value, ties go to the smaller index. Compared
// in float32: the reference compares the same values widened to fp64, which orders them identically.
__device__ __forceinline__ bool beats(float va, int ja, float vb, int jb) {
  const bool na = is_nan(va);
  const bool nb = is_nan(vb);
  if (na != nb) return na;
  if (!na && va != vb) return va > vb;
  return ja < jb;
}

// argmax over j < n of (j < cnt && j != exclude ? taus[j] : -inf), by one full warp. (n < 2^31: taus is a
// history of at most that many rows.)
__device__ void warp_argmax(const float* taus, int n, int cnt, int exclude, float& best_v, int& best_j) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  float bv = -INFINITY;
  int bj = INT_MAX;
  for (int j = lane; j < n; j += kWarpSize) {
    const float v = (j < cnt && j != exclude) ? taus[j] : -INFINITY;
    if (beats(v, j, bv, bj)) {
      bv = v;
      bj = j;
    }
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, bv, offset);
    const int oj = __shfl_xor_sync(kFullMask, bj, offset);
    if (beats(ov, oj, bv, bj)) {
      bv = ov;
      bj = oj;
    }
  }
  best_v = bv;
  best_j = bj;
}

// The weights of all n rows into dst (float32; shared or global memory) and s.cnt / s.poison, by the whole block
// (blockDim.x >= 64). Ends with a barrier.
__device__ void solve_weights(const ChebArgs& a, SolveShared& s, double* A, double* z, float* dst) {
  const int tid = threadIdx.x;
  const int m = a.m;
  if (tid == 0) {
    const int64_t c = read_scalar(a.count);
    s.cnt = c < 0 ? 0 : (c < a.n ? c : a.n);
    s.q = static_cast<double>(read_scalar(a.tau_query));
    s.fail = 0;
    s.poison = 0;
    s.t_last = 0.0f;
    s.t_prev = 0.0f;
    s.j_last = 0;
    s.j_prev = 0;
  }
  __syncthreads();
  const int64_t cnt = s.cnt;

  // Blend: the two valid rows of largest tau (warp 0, while the other warps start on the Gram matrix).
  if (a.use_blend && tid < kWarpSize) {
    float f_last, f_prev;
    int j_last, j_prev;
    warp_argmax(a.taus, static_cast<int>(a.n), static_cast<int>(cnt), -1, f_last, j_last);
    warp_argmax(a.taus, static_cast<int>(a.n), static_cast<int>(cnt), j_last, f_prev, j_prev);
    if (tid == 0) {
      s.t_last = f_last;
      s.t_prev = f_prev;
      s.j_last = j_last;
      s.j_prev = j_prev;
    }
  }
  build_gram(a, cnt, A, 0.0);
  __syncthreads();
  if (tid == 0) {
    double d = 0.0;
    for (int i = 0; i < m; ++i) d += A[i * m + i];
    s.diag_sum = d;
  }
  block_cholesky(A, m, &s.fail);
  if (s.fail) {  // uniform: read after the barrier that ends block_cholesky
    const double jitter = __dmul_rn(1e-6, __ddiv_rn(s.diag_sum, static_cast<double>(m)));
    build_gram(a, cnt, A, jitter);
    __syncthreads();
    block_cholesky(A, m, &s.fail);
  }

  if (tid == 0) {
    // phi(q), then forward (L y = phi) and backward (L^T z = y) substitution, in place in z.
    const double q = s.q;
    const double two_q = __dmul_rn(2.0, q);
    for (int i = 0; i < m; ++i) z[i] = (i == 0) ? 1.0 : (i == 1) ? q : __dsub_rn(__dmul_rn(two_q, z[i - 1]), z[i - 2]);
    for (int i = 0; i < m; ++i) {
      double v = z[i];
      for (int k = 0; k < i; ++k) v -= A[i * m + k] * z[k];
      z[i] = v / A[i * m + i];
    }
    for (int i = m - 1; i >= 0; --i) {
      double v = z[i];
      for (int k = i + 1; k < m; ++k) v -= A[k * m + i] * z[k];
      z[i] = v / A[i * m + i];
    }
  }
  __syncthreads();

  const bool any_valid = cnt > 0;
  const int64_t j_last = s.j_last;
  const int64_t j_prev = s.j_prev;
  // Blend slope k = (q - t_last) / (t_last - t_prev) if a second valid row exists, else 0 * q (fp64).
  const double t_last = static_cast<double>(s.t_last);
  const double t_prev = static_cast<double>(s.t_prev);
  // Two equal largest taus give no slope: hold the last row (the limit of a vanishing extrapolation).
  const bool has_prev = is_finite(t_prev) && t_prev < t_last;
  const double k = a.use_blend ? (has_prev ? __ddiv_rn(__dsub_rn(s.q, t_last), __dsub_rn(t_last, t_prev))
                                           : __dmul_rn(0.0, s.q))
                               : 0.0;
  for (int64_t j = tid; j < a.n; j += blockDim.x) {
    const bool valid = j < cnt;
    const double t = valid ? static_cast<double>(a.taus[j]) : 0.0;
    const double mask = valid ? 1.0 : 0.0;
    const double two_t = __dmul_rn(2.0, t);
    double tm2 = 0.0;
    double tm1 = 0.0;
    double w = 0.0;
    for (int i = 0; i < m; ++i) {
      const double ti = (i == 0) ? 1.0 : (i == 1) ? t : __dsub_rn(__dmul_rn(two_t, tm1), tm2);
      w = fma(__dmul_rn(ti, mask), z[i], w);
      tm2 = tm1;
      tm1 = ti;
    }
    if (a.use_blend) {
      const double lin = __dadd_rn((j == j_last) ? __dadd_rn(1.0, k) : 0.0, (has_prev && j == j_prev) ? -k : 0.0);
      w = __dadd_rn(__dmul_rn(a.blend, w), __dmul_rn(a.one_minus_blend, lin));
    }
    if (!any_valid) w = __longlong_as_double(0x7ff8000000000000LL);
    const float wf = __double2float_rn(w);
    dst[j] = wf;
    if (!valid && !is_finite(wf)) s.poison = 1;
  }
  __syncthreads();
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    chebyshev_forecast_kernel(ChebArgs a, const T* __restrict__ h, int64_t N, int64_t hs0, int64_t hs1,
                              T* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char fcrt_smem[];
  __shared__ SolveShared s;
  double* A = reinterpret_cast<double*>(fcrt_smem);
  double* z = A + a.m * a.m;
  float* w = reinterpret_cast<float*>(z + a.m);
  solve_weights(a, s, A, z, w);
  weighted_rows<T, kVec>(h, s.cnt, N, hs0, hs1, w, s.poison != 0, out);
}

__global__ void __launch_bounds__(kThreads) chebyshev_weights_kernel(ChebArgs a, float* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char fcrt_smem[];
  __shared__ SolveShared s;
  double* A = reinterpret_cast<double*>(fcrt_smem);
  double* z = A + a.m * a.m;
  solve_weights(a, s, A, z, out);
}

// ---- host side ------------------------------------------------------------------------------------------------

int64_t smem_bytes(int64_t n_in_smem, int64_t degree) {
  if (degree < 0 || degree > 4096 || n_in_smem < 0 || n_in_smem > (int64_t{1} << 40)) return INT64_MAX;
  const int64_t m = degree + 1;
  return 8 * (m * m + m) + 4 * n_in_smem;
}

cudaError_t smem_limit(int64_t* limit) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  *limit = std::max<int64_t>(kDefaultSmem, optin) - static_cast<int64_t>(sizeof(SolveShared)) - 64;
  return cudaSuccess;
}

template <typename K>
cudaError_t prepare_smem(K kernel, int64_t need) {
  if (need <= kDefaultSmem - static_cast<int64_t>(sizeof(SolveShared)) - 64) return cudaSuccess;
  int64_t limit = 0;
  cudaError_t err = smem_limit(&limit);
  if (err != cudaSuccess) return err;
  if (need > limit) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(need));
}

bool make_args(const float* taus, int64_t n, ScalarF32 tau_query, ScalarI64 count, int64_t degree, double lam,
               double blend, ChebArgs* a) {
  if (taus == nullptr || n < 1 || n > INT_MAX || degree < 0 || degree > 4096) return false;
  a->taus = taus;
  a->n = n;
  a->tau_query = tau_query;
  a->count = count;
  a->m = static_cast<int>(degree + 1);
  a->lam = lam;
  a->blend = blend;
  a->one_minus_blend = 1.0 - blend;
  a->use_blend = blend != 1.0;
  return true;
}

}  // namespace

cudaError_t chebyshev_smem(int64_t n, int64_t degree, int64_t* need_bytes, int64_t* max_bytes) {
  *need_bytes = smem_bytes(n, degree);
  return smem_limit(max_bytes);
}

cudaError_t chebyshev_weights(const float* taus, int64_t n, ScalarF32 tau_query, ScalarI64 count, int64_t degree,
                              double lam, double blend, float* out, cudaStream_t stream) {
  ChebArgs a;
  if (!make_args(taus, n, tau_query, count, degree, lam, blend, &a)) return cudaErrorInvalidValue;
  const int64_t need = smem_bytes(0, degree);
  cudaError_t err = prepare_smem(chebyshev_weights_kernel, need);
  if (err != cudaSuccess) return err;
  chebyshev_weights_kernel<<<1, kThreads, static_cast<size_t>(need), stream>>>(a, out);
  return cudaGetLastError();
}

cudaError_t chebyshev_forecast(DType dtype, const void* history, int64_t n, int64_t N, int64_t hs0, int64_t hs1,
                               const float* taus, ScalarF32 tau_query, ScalarI64 count, int64_t degree, double lam,
                               double blend, void* out, cudaStream_t stream) {
  ChebArgs a;
  if (!make_args(taus, n, tau_query, count, degree, lam, blend, &a) || N < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const int64_t need = smem_bytes(n, degree);
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const T* h = static_cast<const T*>(history);
    T* o = static_cast<T*>(out);
    const bool vec = rows_vectorisable<T>(h, n, hs0, hs1) && aligned16(o);
    int grid = 1;
    cudaError_t err = stride_grid(vec ? ceil_div(N, Pack<T>::kN) : N, kThreads, kBlocksPerSm, &grid);
    if (err != cudaSuccess) return err;
    if (vec) {
      err = prepare_smem(chebyshev_forecast_kernel<T, true>, need);
      if (err != cudaSuccess) return err;
      chebyshev_forecast_kernel<T, true><<<grid, kThreads, static_cast<size_t>(need), stream>>>(a, h, N, hs0, hs1, o);
    } else {
      err = prepare_smem(chebyshev_forecast_kernel<T, false>, need);
      if (err != cudaSuccess) return err;
      chebyshev_forecast_kernel<T, false><<<grid, kThreads, static_cast<size_t>(need), stream>>>(a, h, N, hs0, hs1, o);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastcache_rt
