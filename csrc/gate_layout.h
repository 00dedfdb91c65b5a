// Generated from fastcache_rt/ops/layout.py (its header()): do not edit. Indices of the gate state and
// params tensors; tests/ops/test_layout.py checks this file against layout.py.
#pragma once

namespace fastcache_rt {
namespace gate_layout {
constexpr int S_STEP = 0;
constexpr int S_ACC = 1;
constexpr int S_CONSEC = 2;
constexpr int S_HAS_CACHE = 3;
constexpr int S_LAST_COMPUTE = 4;
constexpr int S_REL_L1 = 5;
constexpr int S_NONFINITE = 6;
constexpr int S_COMPUTED = 7;
constexpr int STATE_LEN = 8;
constexpr int P_TAU = 0;
constexpr int P_NUM_STEPS = 1;
constexpr int P_TADS_MIN = 2;
constexpr int P_TADS_MAX = 3;
constexpr int P_MAX_CACHED = 4;
constexpr int P_FORCE_LAST = 5;
constexpr int PARAMS_LEN = 6;

// every field by name: the compiled modules export it as GATE_LAYOUT
struct Field {
  const char* name;
  int value;
};
constexpr Field kFields[] = {
    {"S_STEP", S_STEP},
    {"S_ACC", S_ACC},
    {"S_CONSEC", S_CONSEC},
    {"S_HAS_CACHE", S_HAS_CACHE},
    {"S_LAST_COMPUTE", S_LAST_COMPUTE},
    {"S_REL_L1", S_REL_L1},
    {"S_NONFINITE", S_NONFINITE},
    {"S_COMPUTED", S_COMPUTED},
    {"STATE_LEN", STATE_LEN},
    {"P_TAU", P_TAU},
    {"P_NUM_STEPS", P_NUM_STEPS},
    {"P_TADS_MIN", P_TADS_MIN},
    {"P_TADS_MAX", P_TADS_MAX},
    {"P_MAX_CACHED", P_MAX_CACHED},
    {"P_FORCE_LAST", P_FORCE_LAST},
    {"PARAMS_LEN", PARAMS_LEN},
};
}  // namespace gate_layout
}  // namespace fastcache_rt
