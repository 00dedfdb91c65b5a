"""torch.compile(fullgraph=True) of a transformer with caching enabled: zero graph breaks, no recompiles after the
state exists, and the same outputs as eager."""

import pytest
import torch
from torch._dynamo.utils import counters

import fastcache_rt
from fastcache_rt.policy import Chebyshev, Policy, SpectralCacheGate, SpectrumSchedule
from tests.runtime.helpers import call, inputs, tiny_flux

CASES = {
    # the fused gate op + the Chebyshev forecast op + torch.cond
    "spectralcache-gate+chebyshev": Policy(SpectralCacheGate(threshold=0.15, coeffs=(1.0, 0.0)), Chebyshev(), "hidden"),
    # the in-place finite-difference update op under compile
    "taylorseer": "taylorseer",
    # the output site: the head runs inside the full branch only
    "spectrum-output": Policy(SpectrumSchedule(), Chebyshev(blend=0.5), "output"),
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

    with fastcache_rt.cached(model, CASES[name], num_steps=S, interval=3) if name == "taylorseer" else \
            fastcache_rt.cached(model, CASES[name], num_steps=S):
        eager = run(model)
        eager_computed = fastcache_rt.stats(model)["computed"]
    assert 2 < len(eager_computed) < S

    with fastcache_rt.cached(model, CASES[name], num_steps=S, interval=3) if name == "taylorseer" else \
            fastcache_rt.cached(model, CASES[name], num_steps=S) as handle:
        explain = torch._dynamo.explain(model)(
            hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=torch.ones(1),
            img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(5, 3), return_dict=False)
        assert explain.graph_break_count == 0, explain.break_reasons
        assert explain.graph_count == 1
        handle.new_generation(S)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, fullgraph=True)
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
