"""Layouts of the small device tensors the gate reads and writes. Shared by every backend.

Gate state, float32 (STATE_LEN,), one per independent stream of steps (e.g. per CFG branch):
  [S_STEP]         index of the step the next call decides (0 at the start of a generation)
  [S_ACC]          TeaCache accumulator of polynomial-rescaled relative L1 changes
  [S_CONSEC]       consecutive cached steps so far (SpectralCache's CEB counter)
  [S_HAS_CACHE]    1 once a full step has been computed (a cached step needs something cached)
  [S_LAST_COMPUTE] 1 if the last decision was "compute", else 0
  [S_REL_L1]       the last relative L1 change sum|cur-prev| / sum|prev| (diagnostics)
  [S_NONFINITE]    number of steps whose relative change was NaN/Inf (forced to compute)
  [S_COMPUTED]     number of steps decided "compute"

Gate parameters, float32 (PARAMS_LEN,):
  [P_TAU]          threshold tau on the accumulator
  [P_NUM_STEPS]    S, the number of steps of the generation
  [P_TADS_MIN]     TADS scale s_min (1.0 together with s_max = 1.0 turns TADS off)
  [P_TADS_MAX]     TADS scale s_max; tau_eff = tau * (s_min + (s_max - s_min) * (1 - cos(2 pi s / S)) / 2)
  [P_MAX_CACHED]   CEB: a step may be cached only while consecutive cached < this (inf = no budget)
  [P_FORCE_LAST]   1: step S-1 is always computed
"""

S_STEP, S_ACC, S_CONSEC, S_HAS_CACHE, S_LAST_COMPUTE, S_REL_L1, S_NONFINITE, S_COMPUTED = range(8)
STATE_LEN = 8

P_TAU, P_NUM_STEPS, P_TADS_MIN, P_TADS_MAX, P_MAX_CACHED, P_FORCE_LAST = range(6)
PARAMS_LEN = 6
