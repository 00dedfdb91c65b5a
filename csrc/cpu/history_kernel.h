// history_update inner loop (per instruction set; see kernels.h) over a column range: with the error, the forecast
// pred = sum_{k < count} w[k] * history[k] (rows in order, from +0.0, a product then an add, fp32) read before the
// write, and (pred - value)^2, value^2 into the chunk's accumulator (error_sums_kernel.h); then history[row] =
// value, a copy of the bits (no write when row is outside [0, n)). Column by column (a block of 2W columns at a
// time on the contiguous path): a block's rows are all read before its columns of row `row` are written. No include
// guard: included once per ISA build, after simd.h and error_sums_kernel.h.

#include <cstring>

#include "kernels.h"

namespace fastcache_rt {
namespace cpu {
namespace FC_ISA_NS {

template <typename T, bool kError>
FC_INLINE void history_body(const HistoryArgs& a, int64_t begin, int64_t end, ErrAcc* acc) {
  T* hist = static_cast<T*>(a.history);
  const T* val = static_cast<const T*>(a.value);
  const bool write = a.row >= 0 && a.row < a.n;
  T* dst = hist + (write ? a.row * a.s_row : 0);
  const bool contiguous = a.s_col == 1 && a.s_value == 1;
  if (!kError) {
    if (!write) return;
    if (contiguous) {
      std::memmove(dst + begin, val + begin, static_cast<size_t>(end - begin) * sizeof(T));
    } else {
      for (int64_t c = begin; c < end; ++c) dst[c * a.s_col] = val[c * a.s_value];
    }
    return;
  }
  const int64_t cnt = a.count;
  const float* w = a.w;
  if (!contiguous) {
    for (int64_t c = begin; c < end; ++c) {
      const T raw = val[c * a.s_value];
      const T* col = hist + c * a.s_col;
      float pred = 0.0f;
      for (int64_t k = 0; k < cnt; ++k) pred = pred + w[k] * to_f32(col[k * a.s_row]);
      acc->add(pred, to_f32(raw));
      if (write) dst[c * a.s_col] = raw;
    }
    return;
  }
  const vf zero = splat(0.0f);
  int64_t c = begin;
  for (; c + 2 * W <= end; c += 2 * W) {
    // load2 may permute lanes (bf16 on AVX2), the same way for every row and the value
    vf p0 = zero, p1 = zero;
    const T* h = hist + c;
    for (int64_t k = 0; k < cnt; ++k, h += a.s_row) {
      vf x0, x1;
      load2(h, &x0, &x1);
      const vf wk = splat(w[k]);
      p0 = p0 + wk * x0;
      p1 = p1 + wk * x1;
    }
    vf v0, v1;
    load2(val + c, &v0, &v1);
    acc->add(p0, v0);
    acc->add(p1, v1);
    if (write) std::memmove(dst + c, val + c, 2 * W * sizeof(T));
  }
  for (; c + W <= end; c += W) {
    vf pv = zero;
    const T* h = hist + c;
    for (int64_t k = 0; k < cnt; ++k, h += a.s_row) pv = pv + splat(w[k]) * load(h);
    acc->add(pv, load(val + c));
    if (write) std::memmove(dst + c, val + c, W * sizeof(T));
  }
  for (; c < end; ++c) {
    const T raw = val[c];
    const T* h = hist + c;
    float pred = 0.0f;
    for (int64_t k = 0; k < cnt; ++k, h += a.s_row) pred = pred + w[k] * to_f32(*h);
    acc->add(pred, to_f32(raw));
    if (write) dst[c] = raw;
  }
}

template <typename T>
FC_INLINE void history_typed(const HistoryArgs& a, int64_t c0, int64_t c1, ErrorPart* part) {
  if (part == nullptr) return history_body<T, false>(a, c0, c1, nullptr);
  ErrAcc acc;
  history_body<T, true>(a, c0, c1, &acc);
  acc.finish(part);
}

void history_kernel(int dtype, const HistoryArgs& a, int64_t c0, int64_t c1, ErrorPart* part) {
  switch (dtype) {
    case kFloat32:
      return history_typed<float>(a, c0, c1, part);
    case kFloat16:
      return history_typed<fp16_t>(a, c0, c1, part);
    case kBFloat16:
      return history_typed<bf16_t>(a, c0, c1, part);
    default:
      return;
  }
}

}  // namespace FC_ISA_NS
}  // namespace cpu
}  // namespace fastcache_rt
