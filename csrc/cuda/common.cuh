// Shared device helpers of the fastcache_rt CUDA kernels: dtype conversions, 16-byte packed loads/stores,
// warp sums, IEEE predicates that survive any optimisation flags, and launch sizing.
//
// Arithmetic that mirrors the torch reference bit for bit (gate epilogue, basis recurrences, weighted sums) is
// written with the __f*_rn / __d*_rn intrinsics: nvcc contracts a*b+c into an FMA by default, torch runs the
// multiply and the add as two separately rounded ops, and the intrinsics are never contracted.
#pragma once

#include <cfloat>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launchers.h"

namespace fastcache_rt {
namespace cuda {
namespace detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- predicates (x != x is not folded away: no --use_fast_math anywhere) ---------------------------------------
__device__ __forceinline__ bool is_nan(float x) { return x != x; }
__device__ __forceinline__ bool is_nan(double x) { return x != x; }
__device__ __forceinline__ bool is_finite(float x) { return fabsf(x) <= FLT_MAX; }
__device__ __forceinline__ bool is_finite(double x) { return fabs(x) <= DBL_MAX; }

// ---- scalar arguments: a device pointer, or the value passed by the host -------------------------------------------
__device__ __forceinline__ float read_scalar(const ScalarF32& s) { return s.ptr != nullptr ? *s.ptr : s.value; }
__device__ __forceinline__ int64_t read_scalar(const ScalarI64& s) { return s.ptr != nullptr ? *s.ptr : s.value; }

// ---- element conversions ------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- 16-byte packs: kPack<T> elements moved by one 128-bit load or store ------------------------------------------
template <typename T>
struct Pack {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
};

__device__ __forceinline__ void unpack_word(float, unsigned w, float* v) { v[0] = __uint_as_float(w); }
__device__ __forceinline__ void unpack_word(__half, unsigned w, float* v) {
  v[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  v[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ void unpack_word(__nv_bfloat16, unsigned w, float* v) {
  // bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
  v[0] = __uint_as_float(w << 16);
  v[1] = __uint_as_float(w & 0xffff0000u);
}

__device__ __forceinline__ unsigned pack_word(float, const float* v) { return __float_as_uint(v[0]); }
__device__ __forceinline__ unsigned pack_word(__half, const float* v) {
  return static_cast<unsigned>(__half_as_ushort(__float2half_rn(v[0]))) |
         (static_cast<unsigned>(__half_as_ushort(__float2half_rn(v[1]))) << 16);
}
__device__ __forceinline__ unsigned pack_word(__nv_bfloat16, const float* v) {
  return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(v[0]))) |
         (static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(v[1]))) << 16);
}

// Raw 16-byte words -> kN floats.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& r, float (&v)[Pack<T>::kN]) {
  constexpr int kPerWord = Pack<T>::kN / 4;
  unpack_word(T(), r.x, v + 0 * kPerWord);
  unpack_word(T(), r.y, v + 1 * kPerWord);
  unpack_word(T(), r.z, v + 2 * kPerWord);
  unpack_word(T(), r.w, v + 3 * kPerWord);
}

// Read-only 16-byte load (p 16-byte aligned; the data is not written during the kernel).
template <typename T>
__device__ __forceinline__ uint4 load16_ro(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// Plain 16-byte load (the kernel may write the data later, e.g. taylor_update).
template <typename T>
__device__ __forceinline__ uint4 load16(const T* p) {
  return *reinterpret_cast<const uint4*>(p);
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const float (&v)[Pack<T>::kN]) {
  constexpr int kPerWord = Pack<T>::kN / 4;
  uint4 r;
  r.x = pack_word(T(), v + 0 * kPerWord);
  r.y = pack_word(T(), v + 1 * kPerWord);
  r.z = pack_word(T(), v + 2 * kPerWord);
  r.w = pack_word(T(), v + 3 * kPerWord);
  *reinterpret_cast<uint4*>(p) = r;
}

// ---- reductions ---------------------------------------------------------------------------------------------------
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// out[i] = sum_{j < rows} w[j] * h[j, i] for i < N, fp32, rows in order, each product and each sum rounded
// separately (torch's (w[:, None] * h).sum(0)); NaN everywhere when `poison`. Grid-stride over the columns: with
// kVec (hs1 == 1, h / out / row stride 16-byte aligned) a thread owns one 16-byte pack of columns and loads 4
// rows at a time; the last N % kN columns and all other layouts go element by element (same arithmetic).
// w: shared memory, written before a __syncthreads().
template <typename T, bool kVec>
__device__ __forceinline__ void weighted_rows(const T* __restrict__ h, int64_t rows, int64_t N, int64_t hs0,
                                              int64_t hs1, const float* w, bool poison, T* __restrict__ out) {
  constexpr int kV = Pack<T>::kN;
  constexpr int kRowUnroll = 4;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t gstride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float start = poison ? __int_as_float(0x7fc00000) : 0.0f;
  int64_t done = 0;
  if (kVec) {
    const int64_t nvec = N / kV;
    for (int64_t v = gtid; v < nvec; v += gstride) {
      float acc[kV];
#pragma unroll
      for (int e = 0; e < kV; ++e) acc[e] = start;
      if (!poison) {
        const T* p = h + v * kV;
        int64_t j = 0;
        for (; j + kRowUnroll <= rows; j += kRowUnroll) {
          uint4 r[kRowUnroll];
#pragma unroll
          for (int u = 0; u < kRowUnroll; ++u) r[u] = load16_ro(p + (j + u) * hs0);
#pragma unroll
          for (int u = 0; u < kRowUnroll; ++u) {
            float x[kV];
            unpack<T>(r[u], x);
            const float wj = w[j + u];
#pragma unroll
            for (int e = 0; e < kV; ++e) acc[e] = __fadd_rn(acc[e], __fmul_rn(wj, x[e]));
          }
        }
        for (; j < rows; ++j) {
          float x[kV];
          unpack<T>(load16_ro(p + j * hs0), x);
          const float wj = w[j];
#pragma unroll
          for (int e = 0; e < kV; ++e) acc[e] = __fadd_rn(acc[e], __fmul_rn(wj, x[e]));
        }
      }
      store16<T>(out + v * kV, acc);
    }
    done = nvec * kV;
  }
  for (int64_t i = done + gtid; i < N; i += gstride) {
    float acc = start;
    if (!poison) {
      const T* p = h + i * hs1;
      int64_t j = 0;
      for (; j + kRowUnroll <= rows; j += kRowUnroll) {
        float x[kRowUnroll];
#pragma unroll
        for (int u = 0; u < kRowUnroll; ++u) x[u] = to_f32(p[(j + u) * hs0]);
#pragma unroll
        for (int u = 0; u < kRowUnroll; ++u) acc = __fadd_rn(acc, __fmul_rn(w[j + u], x[u]));
      }
      for (; j < rows; ++j) acc = __fadd_rn(acc, __fmul_rn(w[j], to_f32(p[j * hs0])));
    }
    out[i] = from_f32<T>(acc);
  }
}

// ---- host side ----------------------------------------------------------------------------------------------------
__host__ inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Number of SMs of the current device (cached per device; the attribute query is host-only, no sync).
__host__ inline cudaError_t sm_count(int* out) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices && cache[dev] > 0) {
    *out = cache[dev];
    return cudaSuccess;
  }
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (sms < 1) sms = 1;
  if (dev >= 0 && dev < kMaxDevices) cache[dev] = sms;
  *out = sms;
  return cudaSuccess;
}

// Calls f(T{}) with T the element type of `dtype`.
template <typename F>
__host__ cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// 16-byte packs can be used for rows of a (rows, N) tensor: unit column stride, aligned base, aligned row stride.
template <typename T>
__host__ inline bool rows_vectorisable(const void* base, int64_t rows, int64_t row_stride, int64_t col_stride) {
  return col_stride == 1 && aligned16(base) &&
         (rows <= 1 || (row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0);
}

__host__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of a grid-stride elementwise kernel: enough blocks to cover `work` items of `per_block` each, at most
// `per_sm` blocks per SM (every thread then loops).
__host__ inline cudaError_t stride_grid(int64_t work, int64_t per_block, int per_sm, int* grid) {
  int sms = 1;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  int64_t want = ceil_div(work > 0 ? work : 1, per_block);
  const int64_t cap = static_cast<int64_t>(sms) * per_sm;
  if (want > cap) want = cap;
  *grid = static_cast<int>(want < 1 ? 1 : want);
  return cudaSuccess;
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastcache_rt
