// taylor_update inner loop (per instruction set; see kernels.h), in place over a column range:
// new[0] = feature; new[i+1] = (new[i] - old[i]) / gap for i < count, 0 beyond; fp32 arithmetic, each row read
// (only if valid) and written once. No include guard: included once per ISA build, after simd.h.

#include "kernels.h"

namespace fastcache_rt {
namespace cpu {
namespace FC_ISA_NS {

template <typename T>
FC_INLINE void update_body(const UpdateArgs& a, int64_t begin, int64_t end) {
  T* diffs = static_cast<T*>(a.diffs);
  const T* feat = static_cast<const T*>(a.feature);
  const float g = a.gap;
  const int64_t K = a.K;
  // Rows whose old value feeds the next order; rows >= count are never read.
  const int64_t n_read = a.count < K - 1 ? a.count : K - 1;
  if (a.s_col != 1 || a.s_feature != 1) {
    for (int64_t c = begin; c < end; ++c) {
      float v = to_f32(feat[c * a.s_feature]);
      T* col = diffs + c * a.s_col;
      for (int64_t r = 0; r < K; ++r) {
        if (r < n_read) {
          const float old = to_f32(col[r * a.s_row]);
          col[r * a.s_row] = from_f32<T>(v);
          v = (v - old) / g;
        } else {
          col[r * a.s_row] = from_f32<T>(v);
          v = 0.0f;
        }
      }
    }
    return;
  }
  // One vector of every row per step: all rows stream together, the running value stays in a register.
  const vf vg = splat(g), zero = splat(0.0f);
  int64_t c = begin;
  for (; c + 2 * W <= end; c += 2 * W) {
    // load2 / store2 may permute lanes (bf16 on AVX2), the same way for the feature and every row
    vf v0, v1;
    load2(feat + c, &v0, &v1);
    T* p = diffs + c;
    int64_t r = 0;
    for (; r < n_read; ++r, p += a.s_row) {
      vf old0, old1;
      load2(p, &old0, &old1);
      store2(p, v0, v1);
      v0 = (v0 - old0) / vg;
      v1 = (v1 - old1) / vg;
    }
    for (; r < K; ++r, p += a.s_row) {
      store2(p, v0, v1);
      v0 = zero;
      v1 = zero;
    }
  }
  for (; c + W <= end; c += W) {
    vf v = load(feat + c);
    T* p = diffs + c;
    int64_t r = 0;
    for (; r < n_read; ++r, p += a.s_row) {
      const vf old = load(p);
      store(p, v);
      v = (v - old) / vg;
    }
    for (; r < K; ++r, p += a.s_row) {
      store(p, v);
      v = zero;
    }
  }
  for (; c < end; ++c) {
    float v = to_f32(feat[c]);
    T* p = diffs + c;
    for (int64_t r = 0; r < K; ++r, p += a.s_row) {
      if (r < n_read) {
        const float old = to_f32(*p);
        *p = from_f32<T>(v);
        v = (v - old) / g;
      } else {
        *p = from_f32<T>(v);
        v = 0.0f;
      }
    }
  }
}

void update_kernel(int dtype, const UpdateArgs& a, int64_t c0, int64_t c1) {
  switch (dtype) {
    case kFloat32:
      return update_body<float>(a, c0, c1);
    case kFloat16:
      return update_body<fp16_t>(a, c0, c1);
    case kBFloat16:
      return update_body<bf16_t>(a, c0, c1);
    default:
      return;
  }
}

}  // namespace FC_ISA_NS
}  // namespace cpu
}  // namespace fastcache_rt
