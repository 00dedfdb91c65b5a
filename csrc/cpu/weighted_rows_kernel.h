// Weighted sum of rows, inner loop (per instruction set; see kernels.h): out[c] = sum_j w[j] * rows[j, c] over a
// column range. No include guard: included once per ISA build, after simd.h, with FC_ISA_NS defined.
//
// Up to kRowGroup rows stream side by side (one vector of each row per step, so every row's stream keeps the
// memory system busy) and the sum stays in registers; longer histories go through an fp32 block buffer in L1.
// Rows are added in order j = 0..n-1 starting from 0, a product then an add each: bit-identical to torch's
// (w[:, None] * rows).sum(0) for n < 16 (torch's own order for longer sums is a cascade). The vector and scalar
// paths perform the same IEEE operations.

#include <algorithm>

#include "kernels.h"

namespace fastcache_rt {
namespace cpu {
namespace FC_ISA_NS {

constexpr int kRowGroup = 16;
constexpr int64_t kRowsBlock = 2048;  // columns per block buffer (8 KiB of fp32)

template <typename T>
FC_INLINE void weighted_rows_body(const WeightedArgs& a, int64_t begin, int64_t end) {
  const T* rows = static_cast<const T*>(a.rows);
  T* out = static_cast<T*>(a.out);
  const int64_t n = a.n;
  if (a.s_col != 1) {
    // General strides: one column at a time (with s_row == 1, e.g. a transposed history, this reads contiguously).
    for (int64_t c = begin; c < end; ++c) {
      float s = 0.0f;
      const T* p = rows + c * a.s_col;
      for (int64_t j = 0; j < n; ++j) s = s + a.w[j] * to_f32(p[j * a.s_row]);
      out[c * a.s_out] = from_f32<T>(s);
    }
    return;
  }
  alignas(64) float acc[kRowsBlock];
  const bool direct = a.s_out == 1;
  const T* rp[kRowGroup];
  vf wv[kRowGroup];
  float ws[kRowGroup];
  for (int64_t c0 = begin; c0 < end; c0 += kRowsBlock) {
    const int64_t len = std::min(kRowsBlock, end - c0);
    const int64_t vlen = len - len % W;
    T* o = out + c0;
    for (int64_t g0 = 0; g0 == 0 || g0 < n; g0 += kRowGroup) {
      const int g = static_cast<int>(std::min<int64_t>(kRowGroup, n - g0));  // 0 when n == 0: writes zeros
      const bool first = g0 == 0;
      const bool to_out = direct && g0 + kRowGroup >= n;
      for (int j = 0; j < g; ++j) {
        rp[j] = rows + (g0 + j) * a.s_row + c0;
        ws[j] = a.w[g0 + j];
        wv[j] = splat(ws[j]);
      }
      int64_t i = 0;
      if (first && to_out) {
        // Whole sum in registers: load2 / store2 may permute lanes (bf16 on AVX2), consistently for every row.
        for (; i + 2 * W <= vlen; i += 2 * W) {
          vf s0 = splat(0.0f), s1 = s0;
          for (int j = 0; j < g; ++j) {
            vf x0, x1;
            load2(rp[j] + i, &x0, &x1);
            s0 = s0 + wv[j] * x0;
            s1 = s1 + wv[j] * x1;
          }
          store2(o + i, s0, s1);
        }
      }
      for (; i + 2 * W <= vlen; i += 2 * W) {
        vf s0 = first ? splat(0.0f) : load(acc + i);
        vf s1 = first ? splat(0.0f) : load(acc + i + W);
        for (int j = 0; j < g; ++j) {
          s0 = s0 + wv[j] * load(rp[j] + i);
          s1 = s1 + wv[j] * load(rp[j] + i + W);
        }
        if (to_out) {
          store(o + i, s0);
          store(o + i + W, s1);
        } else {
          store(acc + i, s0);
          store(acc + i + W, s1);
        }
      }
      for (; i < vlen; i += W) {
        vf s0 = first ? splat(0.0f) : load(acc + i);
        for (int j = 0; j < g; ++j) s0 = s0 + wv[j] * load(rp[j] + i);
        if (to_out)
          store(o + i, s0);
        else
          store(acc + i, s0);
      }
      for (; i < len; ++i) {
        float s = first ? 0.0f : acc[i];
        for (int j = 0; j < g; ++j) s = s + ws[j] * to_f32(rp[j][i]);
        if (to_out)
          o[i] = from_f32<T>(s);
        else
          acc[i] = s;
      }
    }
    if (!direct)
      for (int64_t i = 0; i < len; ++i) out[(c0 + i) * a.s_out] = from_f32<T>(acc[i]);
  }
}

void weighted_rows_kernel(int dtype, const WeightedArgs& a, int64_t c0, int64_t c1) {
  switch (dtype) {
    case kFloat32:
      return weighted_rows_body<float>(a, c0, c1);
    case kFloat16:
      return weighted_rows_body<fp16_t>(a, c0, c1);
    case kBFloat16:
      return weighted_rows_body<bf16_t>(a, c0, c1);
    default:
      return;
  }
}

}  // namespace FC_ISA_NS
}  // namespace cpu
}  // namespace fastcache_rt
