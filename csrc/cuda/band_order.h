// The GPU summation order of band_l1 / gate_step (``_reference.band_l1_gpu_order``): partition constants, the
// workspace layout, and the order-free exact group sum, usable from host and device code.
//
// Included by csrc/cuda/band_l1.cu (device kernels) and by the host reference test (tests/cuda/band_order_host.cpp,
// built with a plain host compiler: no CUDA header is needed outside nvcc). Every function here is exact IEEE
// arithmetic (a power of two, a floor, a multiply by a power of two, additions of multiples of one quantum), so
// host and device give the same bits; the host build must not contract multiplies and adds (-ffp-contract=off;
// the only product here is exact anyway).
//
// Exact group sum (``_reference.exact_group_sum``) of n <= 2^log2_n non-negative values v_i:
//   m = max of the finite v_i, e its frexp exponent (m = f 2^e, f in [0.5, 1); e = 0 for m = 0),
//   q = 2^(e + log2_n - 53), t_i = floor(v_i / q) q (finite v_i only),
//   sum = sum_i t_i in float64, in any order: every t_i is k_i q with k_i < 2^(53 - log2_n), so every partial sum
//   is a multiple of q below 2^53 q, exactly representable. NaN among the v_i -> NaN, else +Inf -> +Inf.
//   Relative error (truncation) <= n 2^(log2_n - 52) (the max alone loses < q <= 2^(log2_n - 52) m).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FCRT_HD __host__ __device__ __forceinline__
#else
#define FCRT_HD inline
#endif

namespace fastcache_rt {
namespace cuda {
namespace order {

// ---- partition (fixed by the input's size only; mirrors _reference.BAND_*) ------------------------------------------
constexpr int kBlockD = 256;  // channels per tile (BAND_BLOCK_D)
constexpr int kChunkR = 64;   // rows per tile (BAND_CHUNK_R)
constexpr int kL1Log2 = 8;    // level-1 groups hold at most kBlockD = 2^8 values (BAND_L1_LOG2)

FCRT_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiles: (sample b, row chunk c, channel block j); C = ceil(R / 64) chunks, J = ceil(D / 256) blocks.
// Level-1 workspace: pairs of doubles {diff, mag}, index (b * S + j + k) * C + c for tile (b, c, j) and band k,
// S = J + nb - 1 slots per sample. The (block, band) pairs that overlap form a staircase on which j + k strictly
// increases, so slots are unique, and band k's partials of sample b are one contiguous run of
// (j_last(k) - j_first(k) + 1) * C pairs starting at (b * S + j_first(k) + k) * C.
struct Partition {
  int64_t C;  // row chunks
  int64_t J;  // channel blocks
  int64_t S;  // slots per sample
};

FCRT_HD Partition partition(int64_t R, int64_t D, int64_t nb) {
  Partition p;
  p.C = R > 0 ? cdiv(R, kChunkR) : 0;
  p.J = D > 0 ? cdiv(D, kBlockD) : 0;
  p.S = (p.J > 0 && nb > 0) ? p.J + nb - 1 : 0;
  return p;
}

// Doubles of the level-1 workspace for a (B, R, D) input with nb bands (either per_sample setting): a function of
// the sizes only.
FCRT_HD int64_t workspace_doubles(int64_t B, int64_t R, int64_t D, int64_t nb) {
  if (B <= 0 || R <= 0 || D <= 0 || nb <= 0) return 0;
  const Partition p = partition(R, D, nb);
  return 2 * B * p.S * p.C;
}

// Pair index {diff, mag} of tile (b, c, j)'s partial of band k.
FCRT_HD int64_t slot_pair(const Partition& p, int64_t b, int64_t c, int64_t j, int64_t k) {
  return (b * p.S + j + k) * p.C + c;
}

// The level-2 inputs of (output row o, band k): nsamp runs of L pairs, run s starting at pair first + s * stride.
// Bounds are clamped to [0, D] so that malformed bounds can never address outside the workspace (for valid bounds
// the clamp changes nothing); a band with no channel has no partial (its sums are 0).
struct BandRun {
  int64_t first;   // pair index of the first partial of the first sample
  int64_t stride;  // S * C pairs between two samples' runs
  int64_t L;       // pairs per sample: n_j overlapping blocks x C chunks
  int64_t total;   // nsamp * L (<= the number of tiles)
};

FCRT_HD BandRun band_run(const Partition& p, int64_t lo, int64_t hi, int64_t D, int64_t k, int64_t o, bool per_sample,
                         int64_t B) {
  BandRun run;
  run.first = 0;
  run.stride = p.S * p.C;
  run.L = 0;
  run.total = 0;
  lo = lo < 0 ? 0 : (lo > D ? D : lo);
  hi = hi < lo ? lo : (hi > D ? D : hi);
  if (hi > lo && p.C > 0) {
    const int64_t jf = lo / kBlockD;
    const int64_t nj = (hi - 1) / kBlockD - jf + 1;
    if (jf + k + nj <= p.S) {
      const int64_t nsamp = per_sample ? 1 : B;
      run.L = nj * p.C;
      run.total = nsamp * run.L;
      run.first = ((per_sample ? o : 0) * p.S + jf + k) * p.C;
    }
  }
  return run;
}

// Lanes per (row, band) group in the last block of `threads` threads: a power of two, the largest that still gives
// every (row, band) pair its own group when possible.
FCRT_HD int level2_group_size(int64_t pairs, int threads) {
  int G = threads;
  while (G > 1 && static_cast<int64_t>(threads / G) < pairs) G >>= 1;
  return G;
}

// One lane's walk over a BandRun: flat indices i = first_i, first_i + G, ... < total (i = s * L + off), pair index
// run.first + s * run.stride + off. 32-bit counters: total < 2^31 (at most the number of tiles).
struct RunWalk {
  int i, s, off, step_s, step_off, L, total, G;
  FCRT_HD RunWalk(const BandRun& run, int first_i, int group) {
    L = static_cast<int>(run.L);
    total = static_cast<int>(run.total);
    G = group;
    i = first_i;
    s = L > 0 ? first_i / L : 0;
    off = first_i - s * L;
    step_s = L > 0 ? G / L : 0;
    step_off = G - step_s * L;
  }
  FCRT_HD bool valid() const { return i < total; }
  FCRT_HD int64_t pair(const BandRun& run) const { return run.first + static_cast<int64_t>(s) * run.stride + off; }
  FCRT_HD void advance() {
    i += G;
    s += step_s;
    off += step_off;
    if (off >= L) {
      off -= L;
      ++s;
    }
  }
};

// ceil(log2(n)) for n >= 1, 0 for n <= 1 (_reference.ceil_log2; capped at 62 like it).
FCRT_HD int ceil_log2(int64_t n) {
  int r = 0;
  while (r < 62 && (int64_t{1} << r) < n) ++r;
  return r;
}

// ---- exact double bit helpers ---------------------------------------------------------------------------------------
FCRT_HD uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FCRT_HD double from_bits(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

FCRT_HD double nan64() { return from_bits(0x7ff8000000000000ull); }  // the canonical quiet NaN (torch's math.nan)
FCRT_HD double inf64() { return from_bits(0x7ff0000000000000ull); }

FCRT_HD bool finite64(double x) { return (bits_of(x) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull; }

// 2^n exactly (0 below the subnormals, +Inf above the range), as torch.ldexp(1.0, n).
FCRT_HD double pow2(int n) {
  if (n > 1023) return inf64();
  if (n >= -1022) return from_bits(static_cast<uint64_t>(n + 1023) << 52);
  if (n >= -1074) return from_bits(uint64_t{1} << (n + 1074));
  return 0.0;
}

// frexp exponent of a finite m >= 0: m = f 2^e with f in [0.5, 1); 0 for m = 0 (as torch.frexp).
FCRT_HD int frexp_exp(double m) {
  const uint64_t u = bits_of(m) & 0x7fffffffffffffffull;
  if (u == 0) return 0;
  const int biased = static_cast<int>(u >> 52);
  if (biased != 0) return biased - 1022;
  // subnormal: m = mant 2^-1074, mant < 2^52
#if defined(__CUDA_ARCH__)
  const int msb = 63 - __clzll(static_cast<long long>(u));
#else
  const int msb = 63 - __builtin_clzll(u);
#endif
  return msb - 1073;
}

// ---- the exact group sum --------------------------------------------------------------------------------------------

// Flags of a group: any NaN, any Inf (either sign; the values are non-negative).
constexpr unsigned kNaN = 1u, kInf = 2u;

FCRT_HD unsigned flags_of(double v) {
  if (v != v) return kNaN;
  return finite64(v) ? 0u : kInf;
}

// The truncation quantum of a group whose finite maximum is m, for at most 2^log2_n values.
struct Quantum {
  double q;    // 2^n, n = e + log2_n - 53
  double inv;  // 2^-n when both 2^n and 2^-n are normal (then v * inv == v / q exactly), else unused
  bool use_inv;
};

FCRT_HD Quantum quantum(double m, int log2_n) {
  const int n = frexp_exp(m) + log2_n - 53;
  Quantum z;
  z.q = pow2(n);
  z.use_inv = n >= -1022 && n <= 1022;
  z.inv = z.use_inv ? pow2(-n) : 1.0;
  return z;
}

// floor(v / q) * q for a finite v >= 0: exact (q is a power of two; the product is a multiple of q below 2^53 q).
FCRT_HD double truncate(double v, const Quantum& z) {
#if defined(__CUDA_ARCH__)
  const double k = floor(z.use_inv ? __dmul_rn(v, z.inv) : __ddiv_rn(v, z.q));
  return __dmul_rn(k, z.q);
#else
  const double k = std::floor(z.use_inv ? v * z.inv : v / z.q);
  return k * z.q;
#endif
}

// The group's result from its exact sum and flags: NaN wins over Inf.
FCRT_HD double finish(double sum, unsigned flags) {
  if (flags & kNaN) return nan64();
  if (flags & kInf) return inf64();
  return sum;
}

// The whole group sum, sequentially (host reference; the kernels distribute the same two passes over threads).
FCRT_HD double exact_group_sum(const double* v, int64_t n, int log2_n) {
  double m = 0.0;
  unsigned flags = 0;
  for (int64_t i = 0; i < n; ++i) {
    const unsigned f = flags_of(v[i]);
    flags |= f;
    if (f == 0 && v[i] > m) m = v[i];
  }
  const Quantum z = quantum(m, log2_n);
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (flags_of(v[i]) == 0) s += truncate(v[i], z);
  }
  return finish(s, flags);
}

#if !defined(__CUDA_ARCH__)
// ---- host reference of the whole GPU-order band sum -----------------------------------------------------------------
// band_l1 of float32 (B, R, D) arrays with element strides, bounds (nb + 1) valid (0 = b0 < ... < b_nb = D), into
// out (B if per_sample else 1, nb, 2), through the same workspace layout and the same level-2 walk (for a last block
// of level2_threads threads) the kernel uses. fp16 / bf16 inputs are given as their (exact) float32 values.
// Returns false if a level-2 walk did not visit its run's pair count (a layout bug).
inline bool band_l1_host(const float* cur, const int64_t cs[3], const float* prev, const int64_t ps[3], int64_t B,
                         int64_t R, int64_t D, const int64_t* bounds, int64_t nb, bool per_sample, double* ws,
                         float* out, int level2_threads) {
  const Partition p = partition(R, D, nb);
  const int64_t rows_out = per_sample ? B : 1;
  // level 0 + level 1, tile by tile
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < p.C; ++c) {
      for (int64_t j = 0; j < p.J; ++j) {
        float sd[kBlockD], sm[kBlockD];
        const int64_t d_lo = j * kBlockD;
        const int64_t d_hi = (d_lo + kBlockD < D) ? d_lo + kBlockD : D;
        const int64_t r_hi = ((c + 1) * kChunkR < R) ? (c + 1) * kChunkR : R;
        for (int64_t d = d_lo; d < d_lo + kBlockD; ++d) {
          float acc_d = 0.0f;
          float acc_m = 0.0f;
          if (d < D) {
            for (int64_t r = c * kChunkR; r < r_hi; ++r) {
              const float x = cur[b * cs[0] + r * cs[1] + d * cs[2]];
              const float y = prev[b * ps[0] + r * ps[1] + d * ps[2]];
              acc_d = acc_d + std::fabs(x - y);
              acc_m = acc_m + std::fabs(y);
            }
          }
          sd[d - d_lo] = acc_d;
          sm[d - d_lo] = acc_m;
        }
        for (int64_t k = 0; k < nb; ++k) {
          const int64_t lo = bounds[k], hi = bounds[k + 1];
          if (hi <= d_lo || lo >= d_hi) continue;
          double vd[kBlockD], vm[kBlockD];
          int n = 0;
          for (int64_t d = d_lo; d < d_hi; ++d) {
            if (d >= lo && d < hi) {
              vd[n] = static_cast<double>(sd[d - d_lo]);
              vm[n] = static_cast<double>(sm[d - d_lo]);
              ++n;
            }
          }
          double* w = ws + 2 * slot_pair(p, b, c, j, k);
          w[0] = exact_group_sum(vd, n, kL1Log2);
          w[1] = exact_group_sum(vm, n, kL1Log2);
        }
      }
    }
  }
  // level 2: the values each (row, band) group gathers, lane by lane, through the kernel's own walk
  bool walks_ok = true;
  const int64_t pairs = rows_out * nb;
  const int G = level2_group_size(pairs, level2_threads);
  for (int64_t o = 0; o < rows_out; ++o) {
    for (int64_t k = 0; k < nb; ++k) {
      const BandRun run = band_run(p, bounds[k], bounds[k + 1], D, k, o, per_sample, B);
      const int64_t n = run.total;
      double* vd = new double[n > 0 ? n : 1];
      double* vm = new double[n > 0 ? n : 1];
      int64_t got = 0;
      for (int lane = 0; lane < G; ++lane) {
        for (RunWalk w(run, lane, G); w.valid(); w.advance()) {
          const double* pr = ws + 2 * w.pair(run);
          vd[got] = pr[0];
          vm[got] = pr[1];
          ++got;
        }
      }
      walks_ok = walks_ok && got == n;
      const int lg = ceil_log2(n);
      out[(o * nb + k) * 2] = static_cast<float>(exact_group_sum(vd, got, lg));
      out[(o * nb + k) * 2 + 1] = static_cast<float>(exact_group_sum(vm, got, lg));
      delete[] vd;
      delete[] vm;
    }
  }
  return walks_ok;
}
#endif

}  // namespace order
}  // namespace cuda
}  // namespace fastcache_rt
