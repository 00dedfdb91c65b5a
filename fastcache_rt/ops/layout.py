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


def fields() -> dict[str, int]:
    """Every index and length above, by name (the order of the file)."""
    return {k: v for k, v in globals().items() if k[:2] in ("S_", "P_") or k in ("STATE_LEN", "PARAMS_LEN")}


HEADER = "csrc/gate_layout.h"


def mismatch(compiled: dict | None) -> str:
    """What differs between a compiled module's ``GATE_LAYOUT`` and this layout ("" when nothing does)."""
    if compiled is None:
        return "it exports no GATE_LAYOUT"
    ours = fields()
    diff = sorted(k for k in set(ours) | set(compiled) if ours.get(k) != compiled.get(k))
    return ", ".join(f"{k}: {compiled.get(k)} built, {ours.get(k)} here" for k in diff)


def header() -> str:
    """The C++ / CUDA header of this layout (``csrc/gate_layout.h``). This module is the one source: the header is
    generated from it (``python -c "from fastcache_rt.ops import layout; print(layout.header(), end='')" >
    csrc/gate_layout.h``), a test checks the committed
    header against it, and each compiled module exports the layout it was built with (``GATE_LAYOUT``), which its
    backend compares with this one before it is used."""
    lines = [
        "// Generated from fastcache_rt/ops/layout.py (its header()): do not edit. Indices of the gate state and",
        "// params tensors; tests/ops/test_layout.py checks this file against layout.py.",
        "#pragma once",
        "",
        "namespace fastcache_rt {",
        "namespace gate_layout {",
    ]
    lines += [f"constexpr int {name} = {value};" for name, value in fields().items()]
    lines += ["", "// every field by name: the compiled modules export it as GATE_LAYOUT",
              "struct Field {", "  const char* name;", "  int value;", "};",
              "constexpr Field kFields[] = {"]
    lines += [f"    {{\"{name}\", {name}}}," for name in fields()]
    lines += ["};", "}  // namespace gate_layout", "}  // namespace fastcache_rt", ""]
    return "\n".join(lines)
