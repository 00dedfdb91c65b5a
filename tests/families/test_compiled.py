"""Eager and ``torch.compile(fullgraph=True)`` agree on the families the README names for it: one graph, zero
graph breaks, at most two compilations in a generation, the same decisions, outputs within 1e-4.

Backends: inductor where its code generation is what is tested (the video path, Wan; FLUX's image path is
tests/runtime/test_compile.py; MagCache's calibration); elsewhere AOTAutograd's functionalised graph without code
generation (aot_eager: where a mutation or an aliasing mistake of the step path shows up, at a fraction of
inductor's compile time) or dynamo alone (eager)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import fastcache_rt
from fastcache_rt.policy import Chebyshev, Policy, SpectralCacheGate
from fastcache_rt.testing.families import COMPILED, TINY, denoise, model

pytestmark = pytest.mark.slow  # torch.compile of whole models: 5-60 s per case on 2 cores

S = 8
# a threshold that caches some steps and computes others on each tiny model (Qwen-Image's probe moves more)
THRESHOLD = {"qwenimage": 1.0}


def _policy(name: str) -> Policy:
    gate = SpectralCacheGate(threshold=THRESHOLD.get(name, 0.25), coeffs=(1.0, 0.0), max_cached=3)
    return Policy(gate, Chebyshev(degree=2), "hidden")


# FLUX: tests/runtime/test_compile.py runs the same policy (on inductor, with a second generation)
FAMILY_BACKEND = {"sd3": "aot_eager", "wan": "inductor", "qwenimage": "aot_eager", "hunyuanvideo": "aot_eager"}
assert set(FAMILY_BACKEND) == set(COMPILED) - {"flux"}


@pytest.mark.parametrize("name", list(FAMILY_BACKEND))
def test_compiled_matches_eager(name):
    m = model(name)
    tiny = TINY[name]
    POLICY = _policy(name)
    with fastcache_rt.cached(m, POLICY, num_steps=S):
        eager = denoise(m, name, S)
        eager_computed = fastcache_rt.stats(m)["computed"]
    assert 1 < len(eager_computed) < S, eager_computed
    torch._dynamo.reset()
    counters.clear()
    with fastcache_rt.cached(m, POLICY, num_steps=S) as handle:
        kw = tiny.inputs(0, 1, 0)
        with torch.no_grad():
            explain = torch._dynamo.explain(m)(**kw, **{tiny.timestep_arg: tiny.timestep(1.0, 1)})
        assert explain.graph_break_count == 0, explain.break_reasons
        assert explain.graph_count == 1
        handle.new_generation(S)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend(FAMILY_BACKEND[name])
        got = denoise(torch.compile(m, fullgraph=True, backend=cnt), name, S)
        st = fastcache_rt.stats(m)
    # the first call compiles, the second once more (it sees the state the first one created), then nothing
    assert 1 <= cnt.frame_count <= 2, cnt.frame_count
    assert st["computed"] == eager_computed
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)



PRESETS = {
    "spectrum": {}, "teacache": {"threshold": 0.3, "coeffs": (1.0, 0.0)},
    "spectralcache": {"threshold": 0.3, "coeffs": (1.0, 0.0)}, "freqca": {"interval": 3, "grid": (1, 4, 4)},
    "taylorseer": {"interval": 3}, "fora": {}, "fbcache": {"threshold": 0.5}, "magcache": None,
    "adaptive": {"tol": 1.0, "warmup": 2},
}


# inductor for MagCache (calibration + schedule); the other presets through AOTAutograd's functionalised graph
# without code generation (aot_eager), which is where a mutation or an aliasing mistake of the step path shows up,
# at a fraction of inductor's compile time. (The Chebyshev forecast op and TaylorSeer's in-place update are compiled
# by inductor in tests/runtime/test_compile.py.)
COMPILE_BACKEND = {"magcache": "inductor"}


# TaylorSeer on FLUX: tests/runtime/test_compile.py (inductor, the same interval, and a second generation)
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "taylorseer"])
def test_every_preset_compiled_matches_eager(preset):
    """The same step path in both modes: every preset on FLUX, eager vs torch.compile(fullgraph=True)."""
    name = "flux"
    m = model(name)
    kw = PRESETS[preset]
    backend = COMPILE_BACKEND.get(preset, "aot_eager")
    if kw is None:  # MagCache: its calibration in both modes, then a run with the eager ratios
        runs = {}
        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            with fastcache_rt.cached(m, "magcache", num_steps=S, calibrate=True):
                denoise(m if mode == "eager" else torch.compile(m, fullgraph=True, backend=backend), name, S)
                runs[mode] = fastcache_rt.stats(m)["mag_ratios"]
        torch.testing.assert_close(runs["compiled"], runs["eager"], rtol=1e-4, atol=1e-6)
        kw = {"ratios": runs["eager"], "threshold": 0.5, "retention": 0.2}
    with fastcache_rt.cached(m, preset, num_steps=S, **kw):
        eager = denoise(m, name, S)
        eager_computed = fastcache_rt.stats(m)["computed"]
    torch._dynamo.reset()
    with fastcache_rt.cached(m, preset, num_steps=S, **kw):
        got = denoise(torch.compile(m, fullgraph=True, backend=backend), name, S)
        computed = fastcache_rt.stats(m)["computed"]
    assert computed == eager_computed and len(computed) < S
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", [n for n in COMPILED if n != "flux"])
def test_every_preset_traces_fullgraph_on_every_family(name, preset):
    """Every preset x the other families, compiled first (nothing warmed up in eager before), traced with
    fullgraph=True and run on dynamo's eager backend (inductor is covered above): the eager decisions, the eager
    result."""
    from fastcache_rt.families import base as family_base

    m = model(name)
    steps = 6
    magcache = {"ratios": [1.0, 0.99, 0.98, 0.99, 1.01, 1.0], "threshold": 0.5}
    kw = dict(PRESETS[preset] if PRESETS[preset] is not None else magcache)
    kw.pop("grid", None)
    with fastcache_rt.cached(m, preset, num_steps=steps, **kw):
        eager = denoise(m, name, steps)
        eager_computed = fastcache_rt.stats(m)["computed"]
    torch._dynamo.reset()
    family_base._SIGNATURES.clear()  # as in a fresh process: enable reads what tracing cannot
    with fastcache_rt.cached(m, preset, num_steps=steps, **kw):
        got = denoise(torch.compile(m, fullgraph=True, backend="eager"), name, steps)
        computed = fastcache_rt.stats(m)["computed"]
    assert computed == eager_computed
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
