// The error sums' accumulator (per instruction set; see kernels.h and error_sums.h), shared by the loops of
// taylor_update (taylor_kernel.h) and history_update (history_kernel.h). No include guard: included once per ISA
// build, after simd.h.
//
// Each term in fp32 as the reference forms it (e = pred - value, then e * e; value * value; no FMA), converted
// exactly to double and added into a fixed double lane: vector lanes for the vector loops, one scalar for the
// scalar ones. finish() adds the lanes in order, then the scalar. The lane an element lands in depends only on its
// position in the chunk (and the ISA's width), so a chunk's partial is reproducible bit for bit.

#include "kernels.h"

namespace fastcache_rt {
namespace cpu {
namespace FC_ISA_NS {

typedef double vd __attribute__((vector_size(8 * W)));

struct ErrAcc {
  vd e{}, f{};            // vector lanes
  double es = 0.0, fs = 0.0;  // scalar terms

  FC_INLINE void add(vf pred, vf value) {
    const vf d = pred - value;
    e += __builtin_convertvector(d * d, vd);
    f += __builtin_convertvector(value * value, vd);
  }
  FC_INLINE void add(float pred, float value) {
    const float d = pred - value;
    es += static_cast<double>(d * d);
    fs += static_cast<double>(value * value);
  }
  FC_INLINE void finish(ErrorPart* part) const {
    double se = 0.0, sf = 0.0;
    for (int i = 0; i < W; ++i) {
      se += e[i];
      sf += f[i];
    }
    part->e2 = se + es;
    part->f2 = sf + fs;
  }
};

}  // namespace FC_ISA_NS
}  // namespace cpu
}  // namespace fastcache_rt
