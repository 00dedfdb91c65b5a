"""torch.compile(fullgraph=True) of a transformer with caching enabled: zero graph breaks, no recompiles after the
state exists, and the same outputs as eager.

The tiny FLUX model is the compiled image-family path kept on inductor (code generation of the fused gate op, the
Chebyshev forecast op and the in-place Taylor update); the other families run through AOTAutograd without code
generation (aot_eager) in tests/families/test_compiled.py, except Wan (the video path), also on inductor there."""

import pytest
import torch
from torch._dynamo.utils import counters

import fastcache_rt
from fastcache_rt.policy import Chebyshev, Policy, SpectralCacheGate, SpectrumSchedule
from fastcache_rt.testing.tiny_flux import call, inputs, tiny_flux

pytestmark = pytest.mark.slow  # torch.compile of a transformer: 25-70 s per case on 2 busy cores

CASES = {
    # the fused gate op + the Chebyshev forecast op + torch.cond (FLUX's eager-vs-inductor case: the family test of
    # the same policy, tests/families/test_compiled.py, runs the other families)
    "spectralcache-gate+chebyshev": (
        Policy(SpectralCacheGate(threshold=0.15, coeffs=(1.0, 0.0)), Chebyshev(), "hidden"), "inductor"),
    # the in-place finite-difference update op under compile
    "taylorseer": ("taylorseer", "inductor"),
    # the output site: the head runs inside the full branch only (the graph's structure: no code generation needed)
    "spectrum-output": (Policy(SpectrumSchedule(), Chebyshev(blend=0.5), "output"), "aot_eager"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile(name):
    torch._dynamo.reset()
    counters.clear()
    model = tiny_flux(layers=1, single=1)
    S = 10
    x, enc, pooled = inputs(0)

    def run(m):
        outs = []
        for s in range(S):
            with torch.no_grad():
                outs.append(call(m, x, enc, pooled, 1.0 - s / S, 8, 8))
        return outs

    policy, backend = CASES[name]
    with fastcache_rt.cached(model, policy, num_steps=S, interval=3) if name == "taylorseer" else \
            fastcache_rt.cached(model, policy, num_steps=S):
        eager = run(model)
        eager_computed = fastcache_rt.stats(model)["computed"]
    assert 2 < len(eager_computed) < S

    with fastcache_rt.cached(model, policy, num_steps=S, interval=3) if name == "taylorseer" else \
            fastcache_rt.cached(model, policy, num_steps=S) as handle:
        explain = torch._dynamo.explain(model)(
            hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=torch.ones(1),
            img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(5, 3), return_dict=False)
        assert explain.graph_break_count == 0, explain.break_reasons
        assert explain.graph_count == 1
        handle.new_generation(S)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        got = []
        graphs_after = []
        for gen in range(2):
            outs = run(compiled)
            if gen == 0:
                got = outs
                computed = fastcache_rt.stats(model)["computed"]
            graphs_after.append(counters["stats"]["unique_graphs"])
        # the first call compiles, the second once more (it sees the state the first one created), then nothing:
        # neither the remaining steps nor a second generation compile again
        assert graphs_after[0] <= 2 and graphs_after[1] == graphs_after[0], graphs_after
    assert computed == eager_computed
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
