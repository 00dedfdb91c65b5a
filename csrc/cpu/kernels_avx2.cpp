// The kernel loops compiled for AVX2 + F16C (x86-64), namespace avx2; kernels.h picks them at run time when the CPU
// has AVX2 (common.cpp: best_isa). The target is set by pragma for this file's own functions only: every system
// header is included first, so no inline library function is compiled for AVX2 (the linker could otherwise keep
// that copy for the baseline code too).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "kernels.h"

#if FC_HAS_AVX2

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif

#define FC_ISA_NS avx2
#define FC_SIMD_AVX2 1
#include "simd.h"
// clang-format off
#include "band_l1_kernel.h"
#include "weighted_rows_kernel.h"
#include "error_sums_kernel.h"
#include "taylor_kernel.h"
#include "history_kernel.h"
// clang-format on
#undef FC_SIMD_AVX2
#undef FC_ISA_NS

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // FC_HAS_AVX2
