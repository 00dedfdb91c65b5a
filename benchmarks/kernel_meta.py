"""The pure-Python half of the kernel-op benchmark cases (no torch import, so that ``bench_table.py`` starts fast):
op lists, sizes, the peers' names, bytes each op must move, the suite's options and the ratios of the table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

FLUX_SHAPE = (1, 4096, 3072)
QUICK_SHAPE = (1, 64, 256)
HISTORY = 14
ORDER = 2
DEGREE = 4
LAM = 0.1
TAU = 0.6
HERMITE_SCALE = 0.71
# TeaCache's FLUX rescaling polynomial (highest power first)
TEACACHE_FLUX = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)

# ops whose bytes stream through memory (a copy roof applies), tiny device ops, host-side packers
STREAMING = (
    "band_l1", "gate_step", "chebyshev_forecast", "taylor_forecast", "hermite_forecast", "taylor_update",
)
SMALL = ("gate_decide", "chebyshev_weights")
HOST = ("gate_params", "gate_state")
ALL_OPS = STREAMING + SMALL + HOST
FORECASTS = ("chebyshev_forecast", "taylor_forecast", "hermite_forecast")

PEERS = {
    "band_l1": ("FBCache", "((a - b).abs().mean() / a.abs().mean()).item()"),
    "gate_step": ("FBCache", "((a - b).abs().mean() / a.abs().mean()).item() < tau"),
    "chebyshev_forecast": ("ridge solve", "C = solve(Phi^T Phi + lam I, Phi^T H); phi(q) @ C"),
    "taylor_forecast": ("TaylorSeer", "out = d0; for i in 1..K: out = out + d_i * x**i / i!"),
    "hermite_forecast": ("FreqCa loop", "out = d0; for k in 1..K: out = out + d_k * (H_k(s x) s^k / k!)"),
    "taylor_update": ("TaylorSeer", "new = [F]; for i: new.append((new[i] - old[i]) / gap)"),
}


# pytest options of the suite (benchmarks/conftest.py); each also an environment variable, the option wins
OPTIONS = {
    # option dest: (env var, default, help)
    "kernel_shape": ("FASTCACHE_RT_BENCH_SHAPE", None, "feature shape, e.g. 1,4096,3072 (default FLUX-like)"),
    "kernel_dtypes": ("FASTCACHE_RT_BENCH_DTYPES", "float32,bfloat16", "dtypes, comma separated"),
    "kernel_backends": ("FASTCACHE_RT_BENCH_BACKENDS", "auto", "backends, comma separated (auto: all available)"),
    "kernel_devices": ("FASTCACHE_RT_BENCH_DEVICES", "auto", "devices: cpu, cuda (auto: cuda too when present)"),
    "kernel_history": ("FASTCACHE_RT_BENCH_HISTORY", str(HISTORY), "Chebyshev history rows"),
    "kernel_ops": ("FASTCACHE_RT_BENCH_OPS", "all", "ops, comma separated"),
}


def option(config, name: str) -> str | None:
    """A suite option from the pytest command line, else its environment variable, else its default."""
    value = config.getoption(name, default=None)
    if value is not None:
        return value
    env, default, _ = OPTIONS[name]
    return os.environ.get(env) or default


def quick(config) -> bool:
    if config.getoption("kernel_quick", default=None):
        return True
    return os.environ.get("FASTCACHE_RT_BENCH_QUICK", "").strip().lower() in ("1", "true", "yes", "on")


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in str(text).replace("x", ",").split(",") if s.strip())


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def must_move_bytes(op: str, numel: int, elsize: int, rows: int) -> int | None:
    """Bytes an op must read + write for ``numel`` elements per feature, ``rows`` history / difference rows."""
    if op in ("band_l1", "gate_step"):
        return 2 * numel * elsize  # read cur and prev
    if op in FORECASTS:
        return (rows + 1) * numel * elsize  # read the rows, write one
    if op == "taylor_update":
        return 2 * rows * numel * elsize  # read the feature + rows - 1 old orders, write rows
    return None


def op_label(op: str, history: int = HISTORY, order: int = ORDER) -> str:
    if op == "chebyshev_forecast":
        return f"{op}(n={history})"
    if op == "chebyshev_weights":
        return f"{op}(n={history})"
    if op in ("taylor_forecast", "hermite_forecast", "taylor_update"):
        return f"{op}(order={order})"
    return op


# ---------------------------------------------------------------------------------------------------------------
# ratios (shared by bench_table.py and bench_ops.py)
# ---------------------------------------------------------------------------------------------------------------

TARGET_SPEEDUP = 3.0  # band_l1, chebyshev_forecast: >= this times the eager reference
TARGET_ROOF = 0.70  # ... and >= this fraction of the copy's bytes/s
TARGET_OPS = ("band_l1", "chebyshev_forecast")


def ratios(times: dict[str, float], backend: str) -> dict:
    """From times of one case (keys: backend names, "copy", "peer", "alloc:<backend>") the ratios of ``backend``:
    speedup over the peer and the reference, fraction of the copy roof (preallocated and allocating result)."""

    def ratio(num, den):
        a, b = times.get(num), times.get(den)
        return None if a is None or b is None or b <= 0 else a / b

    return {
        "vs_peer": ratio("peer", backend),
        "of_copy_roof": ratio("copy", backend),
        "allocating_of_roof": ratio("copy", f"alloc:{backend}"),
        "vs_reference": ratio("reference", backend),
        "peer_of_roof": ratio("copy", "peer"),
        "reference_of_roof": ratio("copy", "reference"),
    }


def targets(op: str, r: dict) -> str:
    if op not in TARGET_OPS or r.get("vs_reference") is None or r.get("of_copy_roof") is None:
        return ""
    return "met" if r["vs_reference"] >= TARGET_SPEEDUP and r["of_copy_roof"] >= TARGET_ROOF else "MISSED"


def git_commit(short: bool = True) -> str:
    """This checkout's commit ("unknown" outside git): recorded with every benchmark result."""
    args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        return subprocess.run(args, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
