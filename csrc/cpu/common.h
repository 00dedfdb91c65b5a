// Shared pieces of the CPU kernels: dtype codes, status codes, scalar dtype conversion, ISA selection and the
// thread pool. Framework-free C++17 (no torch, no pybind11).
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>

namespace fastcache_rt {
namespace cpu {

// ---- dtype and status codes (shared with csrc/bindings.cpp and fastcache_rt/ops/_cpu.py) --------------------
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum Status : int {
  kOk = 0,
  kBadDType = 1,      // dtype code not one of DType
  kBadSize = 2,       // a negative size, or a size that does not fit the op (e.g. degree < 0)
  kBadBounds = 3,     // band bounds are not 0 = b0 < b1 < ... < b_nb = D
  kNullPointer = 4,   // a required pointer is null while the data it points to is needed
  kBadIsa = 5,        // requested instruction set is not supported by this CPU / build
};

const char* status_message(int status);

// Element types as distinct tags (both half types are 16-bit patterns).
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// ---- scalar conversions (bit-exact: fp16/bf16 -> fp32 exact; fp32 -> fp16/bf16 round to nearest even) --------
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_f32(float x) { return x; }
inline float to_f32(bf16_t x) { return bits_f32(static_cast<uint32_t>(x.bits) << 16); }
inline float to_f32(fp16_t x) {
  const uint32_t h = x.bits;
  uint32_t o = (h & 0x7fffu) << 13;          // exponent + mantissa, aligned to fp32
  const uint32_t e = o & (0x7c00u << 13);    // the exponent alone
  o += (127u - 15u) << 23;                   // rebias
  if (e == (0x7c00u << 13)) {
    o += (128u - 16u) << 23;                 // inf / NaN: exponent all ones
  } else if (e == 0) {
    o += 1u << 23;                           // zero / subnormal: renormalise through an exact fp32 subtract
    o = f32_bits(bits_f32(o) - bits_f32(113u << 23));
  }
  return bits_f32(o | ((h & 0x8000u) << 16));
}

template <typename T>
inline T from_f32(float f);
template <>
inline float from_f32<float>(float f) {
  return f;
}
template <>
inline bf16_t from_f32<bf16_t>(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};  // NaN -> canonical quiet NaN (as torch)
  return bf16_t{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <>
inline fp16_t from_f32<fp16_t>(float f) {
  uint32_t u = f32_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (143u << 23)) {                   // >= 65536 (and inf / NaN): overflow
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {             // below the smallest normal half: let an fp32 add do the rounding
    o = f32_bits(bits_f32(u) + 0.5f) - 0x3f000000u;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += ((15u - 127u) << 23) + 0xfffu;
    u += mant_odd;
    o = u >> 13;
  }
  return fp16_t{static_cast<uint16_t>(o | (sign >> 16))};
}

// ---- instruction set selection ---------------------------------------------------------------------------
enum Isa : int { kIsaGeneric = 0, kIsaAvx2 = 1 };
// Best ISA supported by this CPU (and build), detected once.
int best_isa();
// The ISA the kernels use now (default: best_isa()).
int active_isa();
// Force an ISA (tests / benchmarks): returns kBadIsa when unsupported.
int set_active_isa(int isa);

// ---- threads ---------------------------------------------------------------------------------------------
// Runs fn(t) for t = 0..nt-1, t = 0 on the calling thread, the others on a persistent pool; returns when all are
// done. A nested or concurrent call runs its tasks one after the other on its own thread (same results: the work
// split depends only on nt).
void run_parallel(int nt, const std::function<void(int)>& fn);

// How many threads to use for `work` elements with `nthreads` allowed: at least `grain` elements per thread (about
// a millisecond of streaming, so that waking a worker, tens of microseconds, stays negligible).
inline int threads_for(int64_t work, int nthreads, int64_t grain = int64_t(1) << 20) {
  if (nthreads < 1) nthreads = 1;
  if (nthreads > 256) nthreads = 256;
  const int64_t by_work = work / (grain > 0 ? grain : 1);
  if (by_work < 2) return 1;
  return by_work < nthreads ? static_cast<int>(by_work) : nthreads;
}

// Splits [0, n) into `parts` contiguous ranges, boundaries multiples of `align`; the range of part p.
inline void split_range(int64_t n, int64_t parts, int64_t p, int64_t align, int64_t* begin, int64_t* end) {
  const int64_t blocks = (n + align - 1) / align;
  const int64_t b0 = blocks * p / parts, b1 = blocks * (p + 1) / parts;
  *begin = b0 * align < n ? b0 * align : n;
  *end = b1 * align < n ? b1 * align : n;
}

// Runs fn(0..n_tasks-1) on nt threads, tasks handed out one at a time (a thread that is descheduled, e.g. on a busy
// machine, does not hold back the others). Results must not depend on which thread runs a task.
void run_tasks(int nt, int64_t n_tasks, const std::function<void(int64_t)>& fn);

// ---- shared kernel: weighted sum of rows -------------------------------------------------------------------
// out[c] = sum_{j < n} w[j] * rows[j * s_row + c * s_col] for c < N, fp32, rows in order j = 0..n-1 (each a
// product then an add, as torch's (w[:, None] * rows).sum(0) for n < 16). n == 0 writes zeros. Element strides.
int weighted_rows(int dtype, const void* rows, int64_t n, int64_t N, int64_t s_row, int64_t s_col, const float* w,
                  void* out, int64_t s_out, int nthreads);

// Fills out[c * s_out] (c < N) with NaN in dtype.
int fill_nan(int dtype, void* out, int64_t N, int64_t s_out, int nthreads);

}  // namespace cpu
}  // namespace fastcache_rt
