// taylor_update inner loop (per instruction set; see kernels.h), in place over a column range:
// new[0] = feature; new[i+1] = (new[i] - old[i]) / gap for i < count, 0 beyond; fp32 arithmetic, each row read
// (only if valid) and written once. With the error (kError, update_error_kernel) the same pass also forms the
// forecast pred = sum_{r < count} w[r] * old[r] (rows in order, from +0.0, a product then an add) and adds
// (pred - feature)^2, feature^2 into the chunk's accumulator (error_sums_kernel.h); the update itself is the same
// arithmetic. No include guard: included once per ISA build, after simd.h and error_sums_kernel.h.

#include "kernels.h"

namespace fastcache_rt {
namespace cpu {
namespace FC_ISA_NS {

template <typename T, bool kError>
FC_INLINE void update_body(const UpdateArgs& a, int64_t begin, int64_t end, ErrAcc* acc) {
  T* diffs = static_cast<T*>(a.diffs);
  const T* feat = static_cast<const T*>(a.feature);
  const float g = a.gap;
  const int64_t K = a.K;
  // Rows whose old value feeds the next order; rows >= count are never read.
  const int64_t n_read = a.count < K - 1 ? a.count : K - 1;
  // The forecast reads rows r < count: those n_read, and the last row K - 1 too when count == K.
  const bool read_last = kError && a.count >= K;
  const float* w = a.w;
  if (a.s_col != 1 || a.s_feature != 1) {
    for (int64_t c = begin; c < end; ++c) {
      float v = to_f32(feat[c * a.s_feature]);
      const float f = v;
      float pred = 0.0f;
      T* col = diffs + c * a.s_col;
      for (int64_t r = 0; r < K; ++r) {
        if (r < n_read) {
          const float old = to_f32(col[r * a.s_row]);
          if (kError) pred = pred + w[r] * old;
          col[r * a.s_row] = from_f32<T>(v);
          v = (v - old) / g;
        } else {
          if (kError && read_last && r == K - 1) pred = pred + w[r] * to_f32(col[r * a.s_row]);
          col[r * a.s_row] = from_f32<T>(v);
          v = 0.0f;
        }
      }
      if (kError) acc->add(pred, f);
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
    const vf f0 = v0, f1 = v1;
    vf p0 = zero, p1 = zero;
    T* p = diffs + c;
    int64_t r = 0;
    for (; r < n_read; ++r, p += a.s_row) {
      vf old0, old1;
      load2(p, &old0, &old1);
      if (kError) {
        const vf wr = splat(w[r]);
        p0 = p0 + wr * old0;
        p1 = p1 + wr * old1;
      }
      store2(p, v0, v1);
      v0 = (v0 - old0) / vg;
      v1 = (v1 - old1) / vg;
    }
    for (; r < K; ++r, p += a.s_row) {
      if (kError && read_last && r == K - 1) {
        vf old0, old1;
        load2(p, &old0, &old1);
        const vf wr = splat(w[r]);
        p0 = p0 + wr * old0;
        p1 = p1 + wr * old1;
      }
      store2(p, v0, v1);
      v0 = zero;
      v1 = zero;
    }
    if (kError) {
      acc->add(p0, f0);
      acc->add(p1, f1);
    }
  }
  for (; c + W <= end; c += W) {
    vf v = load(feat + c);
    const vf f = v;
    vf pv = zero;
    T* p = diffs + c;
    int64_t r = 0;
    for (; r < n_read; ++r, p += a.s_row) {
      const vf old = load(p);
      if (kError) pv = pv + splat(w[r]) * old;
      store(p, v);
      v = (v - old) / vg;
    }
    for (; r < K; ++r, p += a.s_row) {
      if (kError && read_last && r == K - 1) pv = pv + splat(w[r]) * load(p);
      store(p, v);
      v = zero;
    }
    if (kError) acc->add(pv, f);
  }
  for (; c < end; ++c) {
    float v = to_f32(feat[c]);
    const float f = v;
    float pred = 0.0f;
    T* p = diffs + c;
    for (int64_t r = 0; r < K; ++r, p += a.s_row) {
      if (r < n_read) {
        const float old = to_f32(*p);
        if (kError) pred = pred + w[r] * old;
        *p = from_f32<T>(v);
        v = (v - old) / g;
      } else {
        if (kError && read_last && r == K - 1) pred = pred + w[r] * to_f32(*p);
        *p = from_f32<T>(v);
        v = 0.0f;
      }
    }
    if (kError) acc->add(pred, f);
  }
}

template <bool kError>
FC_INLINE void update_dispatch(int dtype, const UpdateArgs& a, int64_t c0, int64_t c1, ErrAcc* acc) {
  switch (dtype) {
    case kFloat32:
      return update_body<float, kError>(a, c0, c1, acc);
    case kFloat16:
      return update_body<fp16_t, kError>(a, c0, c1, acc);
    case kBFloat16:
      return update_body<bf16_t, kError>(a, c0, c1, acc);
    default:
      return;
  }
}

void update_kernel(int dtype, const UpdateArgs& a, int64_t c0, int64_t c1) {
  update_dispatch<false>(dtype, a, c0, c1, nullptr);
}

void update_error_kernel(int dtype, const UpdateArgs& a, int64_t c0, int64_t c1, ErrorPart* part) {
  ErrAcc acc;
  update_dispatch<true>(dtype, a, c0, c1, &acc);
  acc.finish(part);
}

}  // namespace FC_ISA_NS
}  // namespace cpu
}  // namespace fastcache_rt
