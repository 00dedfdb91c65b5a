// The inner loops of the CPU ops, compiled once per instruction set: kernels_generic.cpp (the baseline: SSE2 on
// x86-64, NEON on aarch64) and kernels_avx2.cpp (AVX2 + F16C, x86-64 only, chosen at run time). Each
// *_kernel.h holds one op's loop bodies and is included by both, inside namespace generic / avx2.
// This header: the argument structs and the run-time dispatch.
#pragma once

#include <cstdint>

#include "common.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define FC_HAS_AVX2 1
#else
#define FC_HAS_AVX2 0
#endif

namespace fastcache_rt {
namespace cpu {

// band_l1: work unit = (sample, line, chunk of kBandChunk elements along the line).
struct BandArgs {
  const void* cur;
  const void* prev;
  int64_t cs[3], ps[3];  // element strides (B, R, D)
  int64_t nb;
  const int64_t* bounds;  // validated: 0 = b0 < ... < b_nb = D
  bool per_sample;
  bool rowwise;              // lines run along D (else along R)
  int64_t lines_per_sample;  // R if rowwise else D
  int64_t line_len;          // D if rowwise else R
  int64_t chunks_per_line;
  double* acc;  // this thread's accumulators: (B or 1, nb, 2)
};
// fp32 partial sums cover at most this many elements (per lane: 64 terms with AVX2, 128 in the generic and strided
// loops) before they go into double: relative error ~1e-7 whatever the tensor size.
constexpr int64_t kBandChunk = 1024;

// out[c] = sum_{j < n} w[j] * rows[j * s_row + c * s_col]
struct WeightedArgs {
  const void* rows;
  int64_t n, N, s_row, s_col;
  const float* w;
  void* out;
  int64_t s_out;
};

// taylor_update on columns
struct UpdateArgs {
  void* diffs;
  int64_t K, s_row, s_col;
  const void* feature;
  int64_t s_feature;
  float gap;
  int64_t count;         // valid orders before the call, clamped to [0, K]
  const float* w = nullptr;  // update_error_kernel: the forecast's weights (K,), contiguous
};

// history_update on columns: history[row] = value (a bit copy; no write when row is outside [0, n)), and with the
// error the forecast pred = sum_{k < count} w[k] * history[k] (read before the write).
struct HistoryArgs {
  void* history;
  int64_t n, s_row, s_col;
  const void* value;
  int64_t s_value;
  int64_t row;
  int64_t count;             // valid rows before the call, clamped to [0, n]
  const float* w = nullptr;  // (n,), contiguous (error only)
};

// The double partial sums of one chunk of the error sums: sum (pred - value)^2, sum value^2 (error_sums.h).
struct ErrorPart {
  double e2, f2;
};

#define FC_DECLARE_KERNELS(ns)                                                                      \
  namespace ns {                                                                                    \
  void band_kernel(int dtype, const BandArgs& a, int64_t u0, int64_t u1);                           \
  void weighted_rows_kernel(int dtype, const WeightedArgs& a, int64_t c0, int64_t c1);               \
  void update_kernel(int dtype, const UpdateArgs& a, int64_t c0, int64_t c1);                       \
  void update_error_kernel(int dtype, const UpdateArgs& a, int64_t c0, int64_t c1, ErrorPart* part); \
  void history_kernel(int dtype, const HistoryArgs& a, int64_t c0, int64_t c1, ErrorPart* part);    \
  }

FC_DECLARE_KERNELS(generic)
#if FC_HAS_AVX2
FC_DECLARE_KERNELS(avx2)
#endif
#undef FC_DECLARE_KERNELS

inline void band_kernel(int dtype, const BandArgs& a, int64_t u0, int64_t u1) {
#if FC_HAS_AVX2
  if (active_isa() == kIsaAvx2) return avx2::band_kernel(dtype, a, u0, u1);
#endif
  generic::band_kernel(dtype, a, u0, u1);
}

inline void weighted_rows_kernel(int dtype, const WeightedArgs& a, int64_t c0, int64_t c1) {
#if FC_HAS_AVX2
  if (active_isa() == kIsaAvx2) return avx2::weighted_rows_kernel(dtype, a, c0, c1);
#endif
  generic::weighted_rows_kernel(dtype, a, c0, c1);
}

inline void update_kernel(int dtype, const UpdateArgs& a, int64_t c0, int64_t c1) {
#if FC_HAS_AVX2
  if (active_isa() == kIsaAvx2) return avx2::update_kernel(dtype, a, c0, c1);
#endif
  generic::update_kernel(dtype, a, c0, c1);
}

// taylor_update over columns [c0, c1) and the error sums of that chunk into *part.
inline void update_error_kernel(int dtype, const UpdateArgs& a, int64_t c0, int64_t c1, ErrorPart* part) {
#if FC_HAS_AVX2
  if (active_isa() == kIsaAvx2) return avx2::update_error_kernel(dtype, a, c0, c1, part);
#endif
  generic::update_error_kernel(dtype, a, c0, c1, part);
}

// history_update over columns [c0, c1); the error sums of the chunk into *part, none when part is null.
inline void history_kernel(int dtype, const HistoryArgs& a, int64_t c0, int64_t c1, ErrorPart* part) {
#if FC_HAS_AVX2
  if (active_isa() == kIsaAvx2) return avx2::history_kernel(dtype, a, c0, c1, part);
#endif
  generic::history_kernel(dtype, a, c0, c1, part);
}

}  // namespace cpu
}  // namespace fastcache_rt
