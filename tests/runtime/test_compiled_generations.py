"""Under ``torch.compile(fullgraph=True)`` every preset runs generation after generation when the step count and the
image size change (the state a generation depends on reaches the graph as tensors, never as Python floats that
change), with the eager decisions and outputs. ``aot_eager``: what is checked is tracing, not inductor's code."""

from __future__ import annotations

import pytest
import torch

import fastcache_rt
from fastcache_rt.models import SAMPLE_DEFAULTS, load_default

pytestmark = pytest.mark.slow

RUNS = ((6, 32, 32), (8, 48, 32))  # the step count and the size change together: one more graph
OVERRIDES = {"magcache": {"ratios": (1.0,) + (0.97,) * 7}, "freqca": {"interval": 3, "grid": None},
             "taylorseer": {"interval": 3}, "fora": {"interval": 2}}


@pytest.fixture(scope="module")
def pipe():
    p = load_default()
    p.set_progress_bar_config(disable=True)
    return p


def _generate(pipe, steps, h, w):
    kw = dict(SAMPLE_DEFAULTS, num_inference_steps=steps, height=h, width=w)
    with torch.no_grad():
        out = pipe("red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    return out, fastcache_rt.stats(pipe)["computed"]


@pytest.mark.parametrize("preset", [p for p in sorted(fastcache_rt.PRESETS) if p != "none"])
def test_every_preset_compiled_across_step_counts_and_sizes(pipe, preset):
    kw = {k: v for k, v in OVERRIDES.get(preset, {}).items() if v is not None}
    if preset == "freqca":
        pytest.skip("FreqCa needs the token grid, which FLUX's img_ids give only in eager mode (pass grid=)")
    fastcache_rt.enable(pipe, preset, **kw)
    try:
        eager = [_generate(pipe, *r) for r in RUNS]
        original = pipe.transformer.forward
        pipe.transformer.compile(fullgraph=True, backend="aot_eager")
        try:
            torch._dynamo.reset()
            compiled = [_generate(pipe, *r) for r in RUNS]
        finally:
            pipe.transformer._compiled_call_impl = None
            torch._dynamo.reset()
        assert pipe.transformer.forward == original
    finally:
        fastcache_rt.disable(pipe)
    for (e, ce), (c, cc), run in zip(eager, compiled, RUNS):
        assert ce == cc, (run, ce, cc)
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4, msg=f"{preset} {run}")


@pytest.mark.parametrize("preset", ["teacache", "spectralcache", "fbcache", "spectrum", "taylorseer", "magcache"])
def test_later_identical_generations_compile_nothing(pipe, preset):
    """The first generation compiles (its first call creates the device state); identical generations after it
    reuse those graphs: nothing a generation resets reaches the graph as a Python value."""
    from torch._dynamo.utils import counters

    kw = {k: v for k, v in OVERRIDES.get(preset, {}).items() if v is not None}
    fastcache_rt.enable(pipe, preset, **kw)
    pipe.transformer.compile(fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        graphs = []
        for _ in range(3):
            _generate(pipe, 8, 32, 32)
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        pipe.transformer._compiled_call_impl = None
        torch._dynamo.reset()
        fastcache_rt.disable(pipe)
    assert graphs[0] >= 1 and graphs[2] == graphs[0], graphs
