// fp32 vectors for the kernel bodies, in namespace FC_ISA_NS (defined by the including kernels_*.cpp).
// Written with GCC/Clang vector extensions, so the same code is SSE2 / NEON in the generic build and AVX2 in the
// AVX2 build; with FC_SIMD_AVX2 the fp16/bf16 loads and stores use F16C and AVX2 widening/narrowing instructions.
// Loads widen fp16/bf16 to fp32 exactly; stores round fp32 to fp16/bf16 to nearest even. Results are bit-identical
// between the builds (NaN payloads aside) and to the scalar conversions in common.h.
//
// No include guard: included once per instruction-set build.

#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(FC_SIMD_AVX2)
#include <immintrin.h>
#endif

#ifndef FC_INLINE
#define FC_INLINE inline __attribute__((always_inline))
#endif

namespace fastcache_rt {
namespace cpu {
namespace FC_ISA_NS {

// Vector width: 8 fp32 lanes (one AVX register) in the AVX2 build, 4 (one SSE2 / NEON register) in the generic
// one, so that every vector operation, comparisons included, maps to native instructions.
#if defined(FC_SIMD_AVX2)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

FC_INLINE vf splat(float x) { return vf{} + x; }
FC_INLINE vu splat_u(uint32_t x) { return vu{} + x; }
// same-size vector casts reinterpret the bits
FC_INLINE vf as_f(vu u) { return (vf)u; }
FC_INLINE vu as_u(vf f) { return (vu)f; }
FC_INLINE vi as_i(vu u) { return (vi)u; }
FC_INLINE vu mask_of(vi cmp) { return (vu)cmp; }
// lanes of mask all ones -> a, all zeros -> b
FC_INLINE vu select(vu mask, vu a, vu b) { return (a & mask) | (b & ~mask); }

// |x|, NaN stays NaN
FC_INLINE vf vabs(vf x) { return as_f(as_u(x) & 0x7fffffffu); }

FC_INLINE float hsum(vf v) {
#if defined(FC_SIMD_AVX2)
  const float a = (v[0] + v[4]) + (v[1] + v[5]);
  const float b = (v[2] + v[6]) + (v[3] + v[7]);
  return a + b;
#else
  return (v[0] + v[2]) + (v[1] + v[3]);
#endif
}

FC_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FC_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// fp32 -> bf16 bits (in the low half of each lane), round to nearest even, NaN -> 0x7fc0 (as torch)
FC_INLINE vu f32_to_bf16(vf f) {
  const vu u = as_u(f);
  const vu nan = mask_of(as_i(u & 0x7fffffffu) > as_i(splat_u(0x7f800000u)));
  const vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return select(nan, splat_u(0x7fc0u), r);
}

#if defined(FC_SIMD_AVX2)

FC_INLINE vf load(const bf16_t* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vf)_mm256_slli_epi32(v, 16);
}
FC_INLINE vf load(const fp16_t* p) {
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FC_INLINE void store(bf16_t* p, vf v) {
  const __m256i r = (__m256i)f32_to_bf16(v);
  // pack 32 -> 16 bits (per 128-bit lane), then gather the two lanes' low halves
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
FC_INLINE void store(fp16_t* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
}

// Two vectors from 2W consecutive bf16 elements with one load and two unpacks. The lanes come out permuted
// (lo = elements 0-3 and 8-11, hi = 4-7 and 12-15); store2 undoes exactly that permutation, so element-wise
// arithmetic between load2 and store2 (or a permutation-free reduction) sees the right pairs.
FC_INLINE void load2(const bf16_t* p, vf* lo, vf* hi) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i z = _mm256_setzero_si256();
  *lo = (vf)_mm256_unpacklo_epi16(z, x);
  *hi = (vf)_mm256_unpackhi_epi16(z, x);
}
FC_INLINE void store2(bf16_t* p, vf lo, vf hi) {
  const __m256i packed = _mm256_packus_epi32((__m256i)f32_to_bf16(lo), (__m256i)f32_to_bf16(hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
}

#else  // portable: integer bit manipulation on the vector extension types

FC_INLINE vu load_vh(const void* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vu);
}
FC_INLINE void store_vh(void* p, vu v) {
  const vh h = __builtin_convertvector(v, vh);
  std::memcpy(p, &h, sizeof(h));
}

FC_INLINE vf fp16_to_f32(vu h) {
  vu o = (h & 0x7fffu) << 13;              // exponent + mantissa, aligned to fp32
  const vu e = o & (0x7c00u << 13);        // the exponent alone
  o += (127u - 15u) << 23;                    // rebias
  o = select(mask_of(e == splat_u(0x7c00u << 13)), o + ((128u - 16u) << 23), o);  // inf / NaN
  // zero / subnormal: renormalise through an exact fp32 subtract of 2^-14
  const vf renorm = as_f(o + (1u << 23)) - splat(6.103515625e-05f);
  o = select(mask_of(e == splat_u(0)), as_u(renorm), o);
  return as_f(o | ((h & 0x8000u) << 16));
}

FC_INLINE vu f32_to_fp16(vf f) {
  vu u = as_u(f);
  const vu sign = u & 0x80000000u;
  u ^= sign;
  const vu overflow = mask_of(as_i(u) >= as_i(splat_u(143u << 23)));  // >= 65536, inf, NaN
  const vu o_over = select(mask_of(as_i(u) > as_i(splat_u(0x7f800000u))), splat_u(0x7e00u), splat_u(0x7c00u));
  const vu small = mask_of(as_i(u) < as_i(splat_u(113u << 23)));  // below the smallest normal half
  const vu o_small = as_u(as_f(u) + splat(0.5f)) - 0x3f000000u;
  const vu o_norm = (u + (((15u - 127u) << 23) + 0xfffu) + ((u >> 13) & 1u)) >> 13;
  return select(overflow, o_over, select(small, o_small, o_norm)) | (sign >> 16);
}

FC_INLINE vf load(const bf16_t* p) { return as_f(load_vh(p) << 16); }
FC_INLINE vf load(const fp16_t* p) { return fp16_to_f32(load_vh(p)); }
FC_INLINE void store(bf16_t* p, vf v) { store_vh(p, f32_to_bf16(v)); }
FC_INLINE void store(fp16_t* p, vf v) { store_vh(p, f32_to_fp16(v)); }

#endif

// load2 / store2: 2W consecutive elements as two vectors, in a lane order private to the pair (only bf16 in the
// AVX2 build permutes; everything else is plain order).
template <typename T>
FC_INLINE void load2(const T* p, vf* lo, vf* hi) {
  *lo = load(p);
  *hi = load(p + W);
}
template <typename T>
FC_INLINE void store2(T* p, vf lo, vf hi) {
  store(p, lo);
  store(p + W, hi);
}

}  // namespace FC_ISA_NS
}  // namespace cpu
}  // namespace fastcache_rt
