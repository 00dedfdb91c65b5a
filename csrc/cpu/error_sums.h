// The error sums of the forecasters' updates (taylor_update with error, history_update), shared by both ops:
// error[b] = (sum (pred - value)^2, sum value^2) over sample b, the b-th of B equal consecutive slices of the N
// columns (_reference.error_sums).
//
// Partition (a function of N and B only, never of the thread count): sample b, elements [b L, (b + 1) L) with
// L = N / B, in chunks of kErrorChunk elements (the last one shorter). Each chunk is one task: its loop body
// (error_sums_kernel.h, per ISA) forms each term in fp32 and adds it in double into a fixed lane (vector lanes,
// then the scalar tail), and the lanes are added in order into the chunk's ErrorPart slot. After the parallel
// region the calling thread adds each sample's slots in chunk order (double) and rounds once to float. So the sums
// are bitwise the same for any thread count and any task schedule (and between the AVX2 and generic builds up to
// the double rounding of the lane order, i.e. to the float32 bits in practice).
#pragma once

#include <cstdint>
#include <functional>

#include "common.h"
#include "kernels.h"

namespace fastcache_rt {
namespace cpu {

constexpr int64_t kErrorChunk = 16384;  // a multiple of 64: tasks of one sample share no output cache line

// Runs chunk(begin, end, &part) over every chunk of the partition on up to `nthreads` threads (`work` = elements
// read and written per column, for the thread count), then writes out[2 b], out[2 b + 1] (float32, contiguous
// (B, 2)). B == 0 needs N == 0 (nothing written); N % B must be 0. Samples with no element get zeros.
int error_sums_run(int64_t N, int64_t B, int64_t work, float* out, int nthreads,
                   const std::function<void(int64_t, int64_t, ErrorPart*)>& chunk);

}  // namespace cpu
}  // namespace fastcache_rt
