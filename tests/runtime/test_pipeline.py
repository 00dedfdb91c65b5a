"""The one-line use on a real diffusers FluxPipeline (tiny components from configs, no downloads; prompt embeddings
passed directly, so no text encoder is needed)."""

import pytest
import torch

import fastcache_rt

diffusers = pytest.importorskip("diffusers")

from fastcache_rt.testing.pipelines import tiny_flux_embeds_pipeline as tiny_pipeline  # noqa: E402


def _run(pipe, steps, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pe, pp = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=steps, height=size, width=size,
                guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(seed),
                ).images


def test_pipeline_announces_generations_and_step_counts():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ref50 = _run(pipe, 50)
    ref20 = _run(pipe, 20, size=48)
    fastcache_rt.enable(pipe, "spectrum")
    assert "set_timesteps" in pipe.scheduler.__dict__
    a = _run(pipe, 50)
    st = fastcache_rt.stats(pipe)
    assert st["num_steps"] == 50 and st["computed"] == [0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 25, 31, 38, 46]
    # the finished generation's timing is reported too (the pipeline's end closes the generation)
    assert st["calls"] == 50 and st["controller_seconds"] > 0
    b = _run(pipe, 20, size=48)  # a new call: new step count and size, announced by the scheduler
    st = fastcache_rt.stats(pipe)
    assert st["num_steps"] == 20 and st["computed"] == [0, 1, 2, 3, 4, 6, 8, 11, 15]
    again = _run(pipe, 50)
    assert torch.equal(again, a)  # same as the first (fresh) cached run
    for got, ref in ((a, ref50), (b, ref20)):
        assert torch.isfinite(got).all()
        assert (got - ref).abs().mean() < 0.1 * ref.abs().mean() + 1e-3
    fastcache_rt.disable(pipe)
    assert "set_timesteps" not in pipe.scheduler.__dict__ and "forward" not in pipe.transformer.__dict__
    assert torch.equal(_run(pipe, 50), ref50)


def _run_cfg(pipe, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    pe, pp = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    ne, npool = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                negative_pooled_prompt_embeds=npool, true_cfg_scale=3.0, num_inference_steps=steps, height=32,
                width=32, guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.slow  # torch.compile of the pipeline's transformer
def test_true_cfg_branches_keep_separate_state_eager_and_compiled():
    """Separate cond / uncond calls per step: each branch its own gate and cache, told apart by the pipeline's
    cache context ("cond" / "uncond"), in eager mode and under torch.compile(fullgraph=True); the compiled pipeline
    gives the eager result, compiles once per branch, and stats() reports both branches. (AOTAutograd without code
    generation: what is checked is the graphs and the state per branch; inductor's code generation of the step path
    is tests/runtime/test_compile.py's.)"""
    from torch._dynamo.utils import counters

    from fastcache_rt.policy import Policy, TeaCacheGate

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # a signal gate: each branch decides on its own probe, so shared state would change the decisions
    policy = Policy(TeaCacheGate(threshold=0.3, coeffs=(1.0, 0.0)), name="teacache-test")
    fastcache_rt.enable(pipe, policy)
    eager = _run_cfg(pipe, 12)
    st = fastcache_rt.stats(pipe)
    assert st["streams"] == 2, st
    per_branch = st["per_stream_computed"]
    assert 2 < len(per_branch[0]) < 12 and 2 < len(per_branch[1]) < 12, per_branch

    torch._dynamo.reset()
    counters.clear()
    original = pipe.transformer
    pipe.transformer = torch.compile(original, fullgraph=True, backend="aot_eager")
    try:
        compiled = _run_cfg(pipe, 12)
        graphs = counters["stats"]["unique_graphs"]
        st_c = fastcache_rt.stats(original)
        again = _run_cfg(pipe, 12)  # a second generation: no new graphs
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        pipe.transformer = original
    assert st_c["streams"] == 2 and st_c["per_stream_computed"] == per_branch, (st_c, per_branch)
    assert {p["branch"] for p in st_c["per_stream"]} == {"cond", "uncond"}
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-5)
    fastcache_rt.disable(pipe)
    assert "step" not in pipe.scheduler.__dict__


def test_negative_embeddings_that_are_the_positive_tensor_keep_their_own_state():
    """True CFG whose negative embeddings are the very same tensor objects as the positive ones: still two
    branches (the cache context names them), the same images as with equal copies."""
    from fastcache_rt.policy import Policy, TeaCacheGate

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    fastcache_rt.enable(pipe, Policy(TeaCacheGate(threshold=0.3, coeffs=(1.0, 0.0))))
    g = torch.Generator().manual_seed(0)
    pe, pp = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pp, true_cfg_scale=2.0, num_inference_steps=10, height=32,
              width=32, guidance_scale=1.0, output_type="pt")
    same = pipe(negative_prompt_embeds=pe, negative_pooled_prompt_embeds=pp,
                generator=torch.Generator().manual_seed(0), **kw).images
    st_same = fastcache_rt.stats(pipe)
    copy = pipe(negative_prompt_embeds=pe.clone(), negative_pooled_prompt_embeds=pp.clone(),
                generator=torch.Generator().manual_seed(0), **kw).images
    st_copy = fastcache_rt.stats(pipe)
    fastcache_rt.disable(pipe)
    assert st_same["streams"] == 2 and st_same["per_stream"] == st_copy["per_stream"]
    assert torch.equal(same, copy)


def test_a_callback_that_returns_the_embeddings_does_not_restart_the_cache():
    """``callback_on_step_end`` returning ``prompt_embeds`` (a new tensor each step) mid-generation: the same
    decisions and images as without the callback."""
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    fastcache_rt.enable(pipe, "spectrum")
    ref = _run(pipe, 20)
    ref_computed = fastcache_rt.stats(pipe)["computed"]
    g = torch.Generator().manual_seed(0)
    pe, pp = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    got = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=20, height=32, width=32,
               guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(0),
               callback_on_step_end=lambda p, i, t, kw: {"prompt_embeds": kw["prompt_embeds"].clone()},
               callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    computed = fastcache_rt.stats(pipe)["computed"]
    fastcache_rt.disable(pipe)
    assert computed == ref_computed == [0, 1, 2, 3, 4, 6, 8, 11, 15]
    assert torch.equal(got, ref)


def test_a_scheduler_replaced_after_enable_announces_its_steps():
    """``pipe.scheduler`` replaced after ``enable`` and more steps run: the new count is used (not the old one
    clamped), as a fresh enable would."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    fastcache_rt.enable(pipe, "spectrum")
    _run(pipe, 10)
    assert fastcache_rt.stats(pipe)["num_steps"] == 10
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    got = _run(pipe, 30)
    st = fastcache_rt.stats(pipe)
    fastcache_rt.disable(pipe)
    fastcache_rt.enable(pipe, "spectrum")
    fresh = _run(pipe, 30)
    fresh_st = fastcache_rt.stats(pipe)
    fastcache_rt.disable(pipe)
    assert st["num_steps"] == 30 and st["computed"] == fresh_st["computed"]
    assert st["computed"] == [0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 25]
    assert torch.equal(got, fresh)
    assert "set_timesteps" not in pipe.scheduler.__dict__
