// The kernel loops compiled for the baseline instruction set (SSE2 on x86-64, NEON on aarch64): namespace generic.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "kernels.h"

#define FC_ISA_NS generic
#include "simd.h"
// clang-format off
#include "band_l1_kernel.h"
#include "weighted_rows_kernel.h"
#include "error_sums_kernel.h"
#include "taylor_kernel.h"
#include "history_kernel.h"
// clang-format on
#undef FC_ISA_NS
