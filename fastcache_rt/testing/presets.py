"""Per-preset settings for the short runs of the tests (4-12 steps on the tiny models and the shipped FLUX model),
where the presets' published defaults (made for ~50 steps) would compute every step or none: one table,
``TINY_OVERRIDES``, and ``tiny_overrides`` that gives it for a step count with a test file's own deviations named
entry by entry. Also the presets of the compiled test matrices (``COMPILED_PRESETS``) and what makes them enough
(``step_path``)."""

from __future__ import annotations

import fastcache_rt
from fastcache_rt.policy import StreamSpec


def mag_ratios(steps: int) -> tuple[float, ...]:
    """A calibration run's ratios stand-in, one per step (MagCache caches some steps with them)."""
    return (1.0,) + (0.97,) * (steps - 1)


# The base: what caches some steps and computes others on the tiny family models at 6 steps
# (fastcache_rt.testing.families; tests/runtime/test_block_hooks.py runs exactly this).
TINY_STEPS = 6
TINY_OVERRIDES: dict[str, dict] = {
    "magcache": {"ratios": mag_ratios(TINY_STEPS)},
    "freqca": {"interval": 2},
    "taylorseer": {"interval": 2},
    "fora": {"interval": 2},
    "teacache": {"threshold": 0.3},
    "spectralcache": {"threshold": 0.3},
    "fbcache": {"threshold": 0.5},
    "dbcache": {"threshold": 0.5, "warmup": 1},  # (cache-dit's 8 warm-up steps would compute every step here)
    "adaptive": {"tol": 2.0, "warmup": 2},
}


def tiny_overrides(steps: int = TINY_STEPS, **entries: dict | None) -> dict[str, dict]:
    """``TINY_OVERRIDES`` for runs of ``steps`` steps (MagCache gets ``steps`` ratios); each keyword replaces one
    preset's whole entry (a dict), or drops it (None: the preset runs with its own defaults). A test file that
    differs from the table says so here, one entry at a time, with why."""
    table = {p: dict(kw) for p, kw in TINY_OVERRIDES.items()}
    table["magcache"] = {"ratios": mag_ratios(steps)}
    for preset, kw in entries.items():
        if preset not in fastcache_rt.PRESETS:
            raise ValueError(f"tiny_overrides: {preset!r} is not a preset")
        if kw is None:
            table.pop(preset, None)
        else:
            table[preset] = dict(kw)
    return table


# The compiled matrices (tests/runtime/test_{block_hooks,sharing,copies,nonfinite_pipeline,compiled_generations}.py,
# tests/families/test_stream_grids.py) run these presets compiled, and every preset eager: between them they trace
# every gate state class (SignalState with either probe, ScheduleState, ErrorControlState), every forecaster (Reuse,
# Taylor, Chebyshev, FreqCa) and both sites the presets use (residual, hidden). The others trace a step path these
# do: FORA and MagCache (with its ratios) are a ScheduleState with Reuse, SpectralCache a SignalState on the
# modulated probe with Reuse, TaylorSeer a ScheduleState with Taylor (adaptive's forecaster); SpectralCache's band
# split and TaylorSeer are compiled on their own in tests/runtime/test_compile.py and tests/families/test_compiled.py.
# tests/runtime/test_block_hooks.py checks that they cover every preset's step path.
COMPILED_PRESETS = ("adaptive", "fbcache", "freqca", "spectrum", "teacache")


def step_path(preset: str) -> tuple[str, str | None, str, str]:
    """What the compiled step path of ``preset`` traces: its gate's state class, the gate's probe, its forecaster's
    class, the cache site."""
    pol = fastcache_rt.PRESETS[preset]
    if preset in TINY_OVERRIDES:
        pol = pol.with_overrides(**TINY_OVERRIDES[preset])  # (MagCache builds its state only with ratios)
    state = pol.gate.make_state(StreamSpec((1, 4, 8), num_steps=TINY_STEPS))
    return type(state).__name__, getattr(state, "probe", None), type(pol.forecaster).__name__, pol.site
