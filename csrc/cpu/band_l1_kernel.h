// band_l1 inner loop (per instruction set; see kernels.h): sums of |cur - prev| and |prev| per band over a range
// of work units, into the calling thread's double accumulators. No include guard: included once per ISA build,
// after simd.h, with FC_ISA_NS defined.

#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace fastcache_rt {
namespace cpu {
namespace FC_ISA_NS {

// Band k with bounds[k] <= c < bounds[k+1].
FC_INLINE int64_t band_of(const int64_t* bounds, int64_t nb, int64_t c) {
  int64_t lo = 0, hi = nb - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (bounds[mid] <= c)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// fp32 sums of |x - y| and |y| over n elements with element strides sx, sy.
template <typename T>
FC_INLINE void seg_sum(const T* x, int64_t sx, const T* y, int64_t sy, int64_t n, float* d_out, float* m_out) {
  if (sx == 1 && sy == 1) {
    vf d0 = splat(0.0f), d1 = d0, m0 = d0, m1 = d0;
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      // load2: lanes may come out permuted (bf16 on AVX2), identically for x and y; the sums do not care
      vf x0, x1, y0, y1;
      load2(y + i, &y0, &y1);
      load2(x + i, &x0, &x1);
      d0 += vabs(x0 - y0);
      d1 += vabs(x1 - y1);
      m0 += vabs(y0);
      m1 += vabs(y1);
    }
    if (i + W <= n) {
      const vf y0 = load(y + i), x0 = load(x + i);
      d0 += vabs(x0 - y0);
      m0 += vabs(y0);
      i += W;
    }
    float dt = 0.0f, mt = 0.0f;
    for (; i < n; ++i) {
      const float yv = to_f32(y[i]);
      dt += std::fabs(to_f32(x[i]) - yv);
      mt += std::fabs(yv);
    }
    *d_out = hsum(d0 + d1) + dt;
    *m_out = hsum(m0 + m1) + mt;
    return;
  }
  float d[8] = {0, 0, 0, 0, 0, 0, 0, 0}, m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) {
      const float yv = to_f32(y[(i + l) * sy]);
      d[l] += std::fabs(to_f32(x[(i + l) * sx]) - yv);
      m[l] += std::fabs(yv);
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float yv = to_f32(y[i * sy]);
    d[l] += std::fabs(to_f32(x[i * sx]) - yv);
    m[l] += std::fabs(yv);
  }
  *d_out = ((d[0] + d[4]) + (d[1] + d[5])) + ((d[2] + d[6]) + (d[3] + d[7]));
  *m_out = ((m[0] + m[4]) + (m[1] + m[5])) + ((m[2] + m[6]) + (m[3] + m[7]));
}

// Work units [u0, u1): unit = (sample, line, chunk).
template <typename T>
FC_INLINE void band_body(const BandArgs& a, int64_t u0, int64_t u1) {
  const T* cur = static_cast<const T*>(a.cur);
  const T* prev = static_cast<const T*>(a.prev);
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t line = u / a.chunks_per_line;
    const int64_t i0 = (u - line * a.chunks_per_line) * kBandChunk;
    const int64_t i1 = std::min(i0 + kBandChunk, a.line_len);
    const int64_t b = line / a.lines_per_sample;
    const int64_t l = line - b * a.lines_per_sample;
    double* acc = a.acc + (a.per_sample ? b * a.nb * 2 : 0);
    float d, m;
    if (a.rowwise) {
      // line = row l; channels [i0, i1), split at band bounds
      const T* x = cur + b * a.cs[0] + l * a.cs[1];
      const T* y = prev + b * a.ps[0] + l * a.ps[1];
      int64_t k = band_of(a.bounds, a.nb, i0);
      for (int64_t c = i0; c < i1; ++k) {
        const int64_t hi = std::min(a.bounds[k + 1], i1);
        seg_sum(x + c * a.cs[2], a.cs[2], y + c * a.ps[2], a.ps[2], hi - c, &d, &m);
        acc[2 * k] += d;
        acc[2 * k + 1] += m;
        c = hi;
      }
    } else {
      // line = channel l; rows [i0, i1), all in one band
      const int64_t k = band_of(a.bounds, a.nb, l);
      seg_sum(cur + b * a.cs[0] + l * a.cs[2] + i0 * a.cs[1], a.cs[1],
              prev + b * a.ps[0] + l * a.ps[2] + i0 * a.ps[1], a.ps[1], i1 - i0, &d, &m);
      acc[2 * k] += d;
      acc[2 * k + 1] += m;
    }
  }
}

void band_kernel(int dtype, const BandArgs& a, int64_t u0, int64_t u1) {
  switch (dtype) {
    case kFloat32:
      return band_body<float>(a, u0, u1);
    case kFloat16:
      return band_body<fp16_t>(a, u0, u1);
    case kBFloat16:
      return band_body<bf16_t>(a, u0, u1);
    default:
      return;
  }
}

}  // namespace FC_ISA_NS
}  // namespace cpu
}  // namespace fastcache_rt
