// band_l1, gate_step, gate_decide: per-band sums of |cur - prev| and |prev| in one pass over both tensors, and the
// TeaCache / SpectralCache gate epilogue (float32, exactly _reference.gate_decide).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "gate_layout.h"
#include "ops.h"
#include "kernels.h"

namespace fastcache_rt {
namespace cpu {
namespace {

inline int64_t iabs(int64_t x) { return x < 0 ? -x : x; }

// Work split of band_sums: up to kMaxGroups groups of at least kGroupElems elements (and at most kMaxAccDoubles
// accumulators in all, for per-sample sums over many samples).
constexpr int64_t kMaxGroups = 64;
constexpr int64_t kGroupElems = int64_t(1) << 14;
constexpr int64_t kMaxAccDoubles = int64_t(1) << 20;

int check_bounds(const int64_t* bounds, int64_t nb, int64_t D) {
  if (nb < 0) return kBadSize;
  if (bounds == nullptr) return kNullPointer;
  if (bounds[0] != 0 || bounds[nb] != D) return kBadBounds;
  for (int64_t k = 0; k < nb; ++k)
    if (bounds[k + 1] <= bounds[k]) return kBadBounds;
  return kOk;
}

// Band sums into `sums` (Bout * nb * 2 doubles, zeroed here).
int band_sums(int dtype, const View3& cur, const View3& prev, int64_t B, int64_t R, int64_t D, const int64_t* bounds,
              int64_t nb, bool per_sample, double* sums, int nthreads) {
  if (B < 0 || R < 0 || D < 0) return kBadSize;
  if (int rc = check_bounds(bounds, nb, D)) return rc;
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return kBadDType;
  const int64_t bout = per_sample ? B : 1;
  const int64_t n_acc = bout * nb * 2;
  std::fill(sums, sums + n_acc, 0.0);
  if (B == 0 || R == 0 || D == 0) return kOk;
  if (cur.data == nullptr || prev.data == nullptr) return kNullPointer;

  BandArgs a;
  a.cur = cur.data;
  a.prev = prev.data;
  for (int i = 0; i < 3; ++i) {
    a.cs[i] = cur.stride[i];
    a.ps[i] = prev.stride[i];
  }
  a.nb = nb;
  a.bounds = bounds;
  a.per_sample = per_sample;
  // Lines run along the dimension with unit stride in both tensors (a size-1 dimension counts as unit stride);
  // if both qualify, along the longer one; if neither, along the smaller strides.
  const bool d_unit = D == 1 || (a.cs[2] == 1 && a.ps[2] == 1);
  const bool r_unit = R == 1 || (a.cs[1] == 1 && a.ps[1] == 1);
  if (d_unit && r_unit)
    a.rowwise = D >= R;
  else if (d_unit || r_unit)
    a.rowwise = d_unit;
  else
    a.rowwise = iabs(a.cs[2]) + iabs(a.ps[2]) <= iabs(a.cs[1]) + iabs(a.ps[1]);
  a.lines_per_sample = a.rowwise ? R : D;
  a.line_len = a.rowwise ? D : R;
  a.chunks_per_line = (a.line_len + kBandChunk - 1) / kBandChunk;
  const int64_t units = B * a.lines_per_sample * a.chunks_per_line;

  // Fixed groups of work units, each with its own double accumulators, combined in group order: the result does
  // not depend on the thread count or on which thread ran which group.
  const int64_t elems = B * R * D;
  int64_t groups = std::min<int64_t>(std::min<int64_t>(kMaxGroups, units), std::max<int64_t>(1, elems / kGroupElems));
  const int64_t pad = (n_acc + 7) / 8 * 8;  // whole cache lines per group
  groups = std::max<int64_t>(1, std::min<int64_t>(groups, kMaxAccDoubles / pad));
  std::vector<double> part(static_cast<size_t>(pad * groups), 0.0);
  run_tasks(threads_for(elems, nthreads), groups, [&](int64_t grp) {
    int64_t u0, u1;
    split_range(units, groups, grp, 1, &u0, &u1);
    BandArgs mine = a;
    mine.acc = part.data() + grp * pad;
    if (u0 < u1) band_kernel(dtype, mine, u0, u1);
  });
  for (int64_t grp = 0; grp < groups; ++grp)
    for (int64_t i = 0; i < n_acc; ++i) sums[i] += part[static_cast<size_t>(grp * pad + i)];
  return kOk;
}

// ---- gate epilogue ---------------------------------------------------------------------------------------

// Indices of fastcache_rt/ops/layout.py (gate_layout.h is generated from it; the module exports them as
// GATE_LAYOUT, which fastcache_rt/ops/_cpu.py compares with layout.py before use).
using namespace ::fastcache_rt::gate_layout;

inline int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<unsigned long long>(x - 1));
}

// torch's float32 sum of a 1-D tensor on CPU (ATen SumKernel's row_sum: 4 interleaved partial sums, each a
// cascade with chunks of >= 16), reproduced so that gate_decide matches the reference bit for bit. Exact for the
// strided columns of a (nb, 2) sums tensor, and for contiguous columns shorter than one torch SIMD vector (8 or 16
// floats); longer contiguous columns take torch's vectorised path and may differ in the last bit.
float torch_strided_sum(const float* p, int64_t stride, int64_t n) {
  const int64_t size = n / 4;  // rows of the (size, 4) view
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / 4);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  float acc[4][4] = {};
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] += p[(4 * i + k) * stride];
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] += acc[j - 1][k];
        acc[j - 1][k] = 0.0f;
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] += p[(4 * i + k) * stride];
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] += acc[j][k];
  for (int64_t r = size * 4; r < n; ++r) acc[0][0] += p[r * stride];
  float s = acc[0][0];
  for (int k = 1; k < 4; ++k) s += acc[0][k];
  return 0.0f + s;
}

// _reference._rel: 0/0 -> 0, else num / den
inline float rel(float num, float den) { return (num == 0.0f && den == 0.0f) ? 0.0f : num / den; }

inline float nan_max(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  return a > b ? a : b;
}

int gate_epilogue(const float* sums, const int64_t ss[2], int64_t nb, const GateArgs& g) {
  if (nb < 0 || g.n_coeffs < 0) return kBadSize;
  if (g.state.data == nullptr || g.params.data == nullptr || g.decision_out == nullptr ||
      g.state_out == nullptr || (g.n_coeffs > 0 && g.coeffs.data == nullptr) || (nb > 0 && sums == nullptr))
    return kNullPointer;
  auto st = [&](int64_t i) { return g.state.data[i * g.state.stride]; };
  auto pa = [&](int64_t i) { return g.params.data[i * g.params.stride]; };

  const float num = torch_strided_sum(sums, ss[0], nb);
  const float den = torch_strided_sum(sums + ss[1], ss[0], nb);
  const float d = rel(num, den);

  const float s = st(S_STEP), acc = st(S_ACC), consec = st(S_CONSEC), has = st(S_HAS_CACHE);
  const float nonfinite_count = st(S_NONFINITE), computed = st(S_COMPUTED);
  const float tau = pa(P_TAU), n_steps = pa(P_NUM_STEPS);

  // (1 - cos(2 pi s / S)) / 2 as torch evaluates it in float32: (float(2 pi) * s) / S; cos rounded from double.
  const float two_pi = static_cast<float>(2.0 * 3.14159265358979323846);
  const float angle = (two_pi * s) / n_steps;
  const float bell = (1.0f - static_cast<float>(std::cos(static_cast<double>(angle)))) * 0.5f;
  const float tmin = pa(P_TADS_MIN), tmax = pa(P_TADS_MAX);
  const float tau_eff = tau * (tmin + (tmax - tmin) * bell);

  float poly = 0.0f;  // Horner, highest power first (numpy.polyval)
  for (int64_t i = 0; i < g.n_coeffs; ++i) poly = poly * d + g.coeffs.data[i * g.coeffs.stride];
  const float acc_new = acc + poly;

  const bool nonfinite = !std::isfinite(d);
  bool fdc_ok = true;
  if (g.gammas.data != nullptr) {
    for (int64_t k = 0; k < nb; ++k) {
      const float br = rel(sums[k * ss[0]], sums[k * ss[0] + ss[1]]);
      if (!(br <= tau_eff * g.gammas.data[k * g.gammas.stride])) fdc_ok = false;
    }
  }
  const bool forced = (s == 0.0f) || ((pa(P_FORCE_LAST) > 0.0f) && (s >= n_steps - 1.0f)) || (has <= 0.0f) ||
                      nonfinite;
  const bool skip = !forced && (acc_new < tau_eff) && (consec < pa(P_MAX_CACHED)) && fdc_ok;
  const bool compute = !skip;
  const float cf = compute ? 1.0f : 0.0f;

  const float out[STATE_LEN] = {
      s + 1.0f,
      compute ? 0.0f : acc_new,
      compute ? 0.0f : consec + 1.0f,
      nan_max(has, cf),
      cf,
      d,
      nonfinite_count + (nonfinite ? 1.0f : 0.0f),
      computed + cf,
  };
  for (int64_t i = 0; i < STATE_LEN; ++i) g.state_out[i * g.state_out_stride] = out[i];
  *g.decision_out = compute ? 1 : 0;
  return kOk;
}

}  // namespace

int band_l1(int dtype, View3 cur, View3 prev, int64_t B, int64_t R, int64_t D, const int64_t* bounds, int64_t nb,
            bool per_sample, float* out, const int64_t os[3], int nthreads) {
  if (nb < 0 || B < 0) return kBadSize;
  const int64_t bout = per_sample ? B : 1;
  std::vector<double> sums(static_cast<size_t>(bout * nb * 2));
  if (int rc = band_sums(dtype, cur, prev, B, R, D, bounds, nb, per_sample, sums.data(), nthreads))
    return rc;
  if (bout * nb > 0 && out == nullptr) return kNullPointer;
  for (int64_t b = 0; b < bout; ++b)
    for (int64_t k = 0; k < nb; ++k)
      for (int64_t q = 0; q < 2; ++q)
        out[b * os[0] + k * os[1] + q * os[2]] = static_cast<float>(sums[static_cast<size_t>((b * nb + k) * 2 + q)]);
  return kOk;
}

int gate_decide(const float* sums, const int64_t sums_stride[2], int64_t nb, const GateArgs& g) {
  return gate_epilogue(sums, sums_stride, nb, g);
}

int gate_step(int dtype, View3 cur, View3 prev, int64_t B, int64_t R, int64_t D, const int64_t* bounds, int64_t nb,
              float* sums_out, const int64_t ss[2], const GateArgs& g, int nthreads) {
  if (nb < 0) return kBadSize;
  std::vector<double> sums(static_cast<size_t>(nb * 2));
  if (int rc = band_sums(dtype, cur, prev, B, R, D, bounds, nb, false, sums.data(), nthreads)) return rc;
  if (nb > 0 && sums_out == nullptr) return kNullPointer;
  for (int64_t k = 0; k < nb; ++k)
    for (int64_t q = 0; q < 2; ++q) sums_out[k * ss[0] + q * ss[1]] = static_cast<float>(sums[static_cast<size_t>(2 * k + q)]);
  return gate_epilogue(sums_out, ss, nb, g);
}

}  // namespace cpu
}  // namespace fastcache_rt
