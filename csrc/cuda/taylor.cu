// taylor_forecast, hermite_forecast, taylor_update: forecasts from finite differences and their update.
//
// Design:
//  - Forecasts (one launch): thread 0 of every block turns the scalar `distance` (read from device memory, or the
//    float32 value the host passed in the kernel arguments) into the K <= kMaxOrders
//    float32 weights in shared memory, exactly as the reference's torch ops round them:
//      taylor   c_i = x^i / i!  with x^0 = 1, x^1 = x, x^2 = x*x, x^3 = x*x*x, else powf(x, i) (torch.pow's special
//               cases), divided by float32(i!);
//      hermite  y = x * float32(scale), H_0 = 1, H_1 = 2y, H_k = (2y) H_{k-1} - float32(2(k-1)) H_{k-2},
//               c_k = H_k * float32(scale^k) / float32(k!).
//    The host passes float32(i!) and float32(scale^k) (computed in double like Python does), so no device pow of
//    doubles is involved. Then the shared fp32 weighted row sum (common.cuh): rows in order, 16-byte packs and
//    4 rows in flight per thread on the contiguous aligned path, grid-stride, int64 offsets.
//  - Update (in place, one launch): each thread owns one 16-byte pack of columns (or one column on the strided
//    path) and walks the K rows: it reads old[i] before writing new[i], keeps new[i] in fp32 (the reference
//    stacks fp32 rows and rounds once at the end), and reads no row i >= count (a ring buffer may hold garbage
//    there). count and gap are read from device memory, or passed by value (ScalarF32 / ScalarI64).
//  - Update with the error (taylor_update_error, one launch): the same per-column arithmetic, on the error sums'
//    fixed partition (error_sums.cuh: one block per (sample, chunk of 4096 columns), thread t owns packs t,
//    t + 256, ...); while walking the rows it also forms pred = sum_{r < count} w[r] * old[r] (rows in order,
//    __fadd_rn(pred, __fmul_rn(w, old)) from 0: the reference's bits; the last row is read too when count == K)
//    and adds (pred - feature)^2, feature^2 to the thread's sums; err::finish reduces them.

#include <cmath>

#include "cuda/common.cuh"
#include "cuda/error_sums.cuh"

namespace fastcache_rt {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;

struct TaylorArgs {
  ScalarF32 distance;
  int K;
  float scale;                   // hermite: float32(scale)
  float fact[kMaxOrders];        // float32(i!)
  float scale_pow[kMaxOrders];   // hermite: float32(scale^i)
};

template <typename T, bool kVec, bool kHermite>
__global__ void __launch_bounds__(kThreads)
    taylor_forecast_kernel(TaylorArgs a, const T* __restrict__ h, int64_t N, int64_t hs0, int64_t hs1,
                           T* __restrict__ out) {
  __shared__ float s_fact[kMaxOrders];
  __shared__ float s_pow[kMaxOrders];
  __shared__ float w[kMaxOrders];
  if (threadIdx.x == 0) {
    // Static indices only: the parameter arrays stay in the constant bank.
#pragma unroll
    for (int i = 0; i < kMaxOrders; ++i) {
      s_fact[i] = a.fact[i];
      s_pow[i] = a.scale_pow[i];
    }
    const float x = read_scalar(a.distance);
    if (kHermite) {
      const float y = __fmul_rn(x, a.scale);
      const float two_y = __fmul_rn(2.0f, y);
      float hm2 = 1.0f;
      float hm1 = two_y;
      for (int k = 0; k < a.K; ++k) {
        float hk;
        if (k == 0) {
          hk = 1.0f;
        } else if (k == 1) {
          hk = two_y;
        } else {
          hk = __fsub_rn(__fmul_rn(two_y, hm1), __fmul_rn(static_cast<float>(2 * (k - 1)), hm2));
          hm2 = hm1;
          hm1 = hk;
        }
        w[k] = __fdiv_rn(__fmul_rn(hk, s_pow[k]), s_fact[k]);
      }
    } else {
      for (int i = 0; i < a.K; ++i) {
        float p;
        if (i == 0) {
          p = 1.0f;
        } else if (i == 1) {
          p = x;
        } else if (i == 2) {
          p = __fmul_rn(x, x);
        } else if (i == 3) {
          p = __fmul_rn(__fmul_rn(x, x), x);
        } else {
          p = powf(x, static_cast<float>(i));
        }
        w[i] = __fdiv_rn(p, s_fact[i]);
      }
    }
  }
  __syncthreads();
  weighted_rows<T, kVec>(h, a.K, N, hs0, hs1, w, false, out);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    taylor_update_kernel(T* d, int64_t K, int64_t N, int64_t ds0, int64_t ds1, const T* f, int64_t fs,
                         const ScalarF32 gap, const ScalarI64 count) {
  constexpr int kV = Pack<T>::kN;
  const float g = read_scalar(gap);
  const int64_t cnt = read_scalar(count);
  // Rows 0..nd-1 take a difference (i < count and i + 1 < K): read old[i], write new[i], new[i+1] =
  // (new[i] - old[i]) / gap. Row nd gets the last new value, the rows after it 0. Rows >= nd are never read.
  const int64_t nd = cnt < 0 ? 0 : (cnt < K - 1 ? cnt : K - 1);
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t gstride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (kVec) {
    const int64_t nvec = N / kV;
    for (int64_t v = gtid; v < nvec; v += gstride) {
      float cur[kV];
      unpack<T>(load16(f + v * kV), cur);
      T* row = d + v * kV;
      int64_t r = 0;
      for (; r < nd; ++r, row += ds0) {
        float old[kV];
        unpack<T>(load16(row), old);  // before row r is overwritten
        store16<T>(row, cur);
#pragma unroll
        for (int e = 0; e < kV; ++e) cur[e] = __fdiv_rn(__fsub_rn(cur[e], old[e]), g);
      }
      store16<T>(row, cur);
#pragma unroll
      for (int e = 0; e < kV; ++e) cur[e] = 0.0f;
      for (++r, row += ds0; r < K; ++r, row += ds0) store16<T>(row, cur);
    }
    done = nvec * kV;
  }
  for (int64_t i = done + gtid; i < N; i += gstride) {
    float cur = to_f32(f[i * fs]);
    T* p = d + i * ds1;
    int64_t r = 0;
    for (; r < nd; ++r, p += ds0) {
      const float old = to_f32(*p);
      *p = from_f32<T>(cur);
      cur = __fdiv_rn(__fsub_rn(cur, old), g);
    }
    *p = from_f32<T>(cur);
    for (++r, p += ds0; r < K; ++r, p += ds0) *p = from_f32<T>(0.0f);
  }
}

// Column c of the update with the error, element by element (strided path, and the short last pack).
template <typename T>
__device__ __forceinline__ void update_column_error(T* p, int64_t ds0, float cur, float g, const float* w, int64_t K,
                                                    int64_t nd, bool read_last, err::Acc& acc) {
  const float feat = cur;
  float pred = 0.0f;
  int64_t r = 0;
  for (; r < nd; ++r, p += ds0) {
    const float old = to_f32(*p);
    pred = __fadd_rn(pred, __fmul_rn(__ldg(w + r), old));
    *p = from_f32<T>(cur);
    cur = __fdiv_rn(__fsub_rn(cur, old), g);
  }
  if (read_last) pred = __fadd_rn(pred, __fmul_rn(__ldg(w + r), to_f32(*p)));  // r == K - 1
  *p = from_f32<T>(cur);
  for (++r, p += ds0; r < K; ++r, p += ds0) *p = from_f32<T>(0.0f);
  acc.add(pred, feat);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(err::kThreads)
    taylor_update_error_kernel(T* d, int64_t K, int64_t ds0, int64_t ds1, const T* f, int64_t fs,
                               const ScalarF32 gap, const ScalarI64 count, const float* __restrict__ w,
                               const err::Grid eg, double2* ws, int counter_slot, float* error) {
  constexpr int kV = Pack<T>::kN;
  const float g = read_scalar(gap);
  const int64_t c_in = read_scalar(count);
  const int64_t cnt = c_in < 0 ? 0 : (c_in < K ? c_in : K);
  const int64_t nd = cnt < K - 1 ? cnt : K - 1;  // rows that take a difference
  const bool read_last = cnt >= K;                // the last row feeds the forecast too
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
      float cur[kV];
      float feat[kV];
      float pred[kV];
      unpack<T>(load16(f + c0), cur);
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        feat[e] = cur[e];
        pred[e] = 0.0f;
      }
      T* row = d + c0;
      int64_t r = 0;
      for (; r < nd; ++r, row += ds0) {
        float old[kV];
        unpack<T>(load16(row), old);  // before row r is overwritten
        const float wr = __ldg(w + r);
        store16<T>(row, cur);
#pragma unroll
        for (int e = 0; e < kV; ++e) {
          pred[e] = __fadd_rn(pred[e], __fmul_rn(wr, old[e]));
          cur[e] = __fdiv_rn(__fsub_rn(cur[e], old[e]), g);
        }
      }
      if (read_last) {
        float old[kV];
        unpack<T>(load16(row), old);
        const float wr = __ldg(w + r);
#pragma unroll
        for (int e = 0; e < kV; ++e) pred[e] = __fadd_rn(pred[e], __fmul_rn(wr, old[e]));
      }
      store16<T>(row, cur);
#pragma unroll
      for (int e = 0; e < kV; ++e) cur[e] = 0.0f;
      for (++r, row += ds0; r < K; ++r, row += ds0) store16<T>(row, cur);
#pragma unroll
      for (int e = 0; e < kV; ++e) acc.add(pred[e], feat[e]);
    } else {
      for (int e = 0; e < ne; ++e) {
        const int64_t c = c0 + e;
        update_column_error<T>(d + c * ds1, ds0, to_f32(f[c * fs]), g, w, K, nd, read_last, acc);
      }
    }
  }
  err::finish(acc, eg, ws, counter_slot, error);
}

// ---- host side ------------------------------------------------------------------------------------------------

cudaError_t launch_forecast(DType dtype, const void* diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1,
                            ScalarF32 distance, bool hermite, double scale, void* out, cudaStream_t stream) {
  if (diffs == nullptr || K < 1 || K > kMaxOrders || N < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  TaylorArgs a;
  a.distance = distance;
  a.K = static_cast<int>(K);
  a.scale = static_cast<float>(scale);
  double fact = 1.0;  // exact in double up to 22!, then rounded once to float32 (as torch casts the int)
  for (int i = 0; i < kMaxOrders; ++i) {
    if (i > 0) fact *= static_cast<double>(i);
    a.fact[i] = static_cast<float>(fact);
    a.scale_pow[i] = static_cast<float>(std::pow(scale, static_cast<double>(i)));
  }
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const T* h = static_cast<const T*>(diffs);
    T* o = static_cast<T*>(out);
    const bool vec = rows_vectorisable<T>(h, K, ds0, ds1) && aligned16(o);
    int grid = 1;
    cudaError_t err = stride_grid(vec ? ceil_div(N, Pack<T>::kN) : N, kThreads, kBlocksPerSm, &grid);
    if (err != cudaSuccess) return err;
    if (vec) {
      if (hermite) {
        taylor_forecast_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(a, h, N, ds0, ds1, o);
      } else {
        taylor_forecast_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(a, h, N, ds0, ds1, o);
      }
    } else {
      if (hermite) {
        taylor_forecast_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(a, h, N, ds0, ds1, o);
      } else {
        taylor_forecast_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(a, h, N, ds0, ds1, o);
      }
    }
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t taylor_forecast(DType dtype, const void* diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1,
                            ScalarF32 distance, void* out, cudaStream_t stream) {
  return launch_forecast(dtype, diffs, K, N, ds0, ds1, distance, false, 1.0, out, stream);
}

cudaError_t hermite_forecast(DType dtype, const void* diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1,
                             ScalarF32 distance, double scale, void* out, cudaStream_t stream) {
  return launch_forecast(dtype, diffs, K, N, ds0, ds1, distance, true, scale, out, stream);
}

cudaError_t taylor_update(DType dtype, void* diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1,
                          const void* feature, int64_t fs, ScalarF32 gap, ScalarI64 count, cudaStream_t stream) {
  if (diffs == nullptr || feature == nullptr || K < 1 || N < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    T* d = static_cast<T*>(diffs);
    const T* f = static_cast<const T*>(feature);
    const bool vec = rows_vectorisable<T>(d, K, ds0, ds1) && fs == 1 && aligned16(f);
    int grid = 1;
    cudaError_t err = stride_grid(vec ? ceil_div(N, Pack<T>::kN) : N, kThreads, kBlocksPerSm, &grid);
    if (err != cudaSuccess) return err;
    if (vec) {
      taylor_update_kernel<T, true><<<grid, kThreads, 0, stream>>>(d, K, N, ds0, ds1, f, fs, gap, count);
    } else {
      taylor_update_kernel<T, false><<<grid, kThreads, 0, stream>>>(d, K, N, ds0, ds1, f, fs, gap, count);
    }
    return cudaGetLastError();
  });
}

cudaError_t taylor_update_error(DType dtype, void* diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1,
                                const void* feature, int64_t fs, ScalarF32 gap, ScalarI64 count, const float* weights,
                                float* error, int64_t B, double* partials, int64_t partials_doubles, int counter_slot,
                                cudaStream_t stream) {
  if (K < 1 || N < 0 || B < 0) return cudaErrorInvalidValue;
  if (B == 0) return N == 0 ? cudaSuccess : cudaErrorInvalidValue;
  err::Grid eg;
  cudaError_t status = err::grid_of(N, B, &eg);
  if (status != cudaSuccess) return status;
  if (error == nullptr || (N > 0 && (diffs == nullptr || feature == nullptr || weights == nullptr))) {
    return cudaErrorInvalidValue;
  }
  status = err::check_workspace(eg, partials, partials_doubles, counter_slot);
  if (status != cudaSuccess) return status;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    T* d = static_cast<T*>(diffs);
    const T* f = static_cast<const T*>(feature);
    // 16-byte packs: unit column strides, aligned bases and row stride, and every sample starting on a pack
    const bool vec = rows_vectorisable<T>(d, K, ds0, ds1) && fs == 1 && aligned16(f) &&
                     (B == 1 || eg.L % Pack<T>::kN == 0);
    const unsigned grid = static_cast<unsigned>(eg.B * eg.C);
    double2* ws = reinterpret_cast<double2*>(partials);
    if (vec) {
      taylor_update_error_kernel<T, true><<<grid, err::kThreads, 0, stream>>>(d, K, ds0, ds1, f, fs, gap, count,
                                                                              weights, eg, ws, counter_slot, error);
    } else {
      taylor_update_error_kernel<T, false><<<grid, err::kThreads, 0, stream>>>(d, K, ds0, ds1, f, fs, gap, count,
                                                                               weights, eg, ws, counter_slot, error);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastcache_rt
