"""The one-line use on a real diffusers FluxPipeline (tiny components from configs, no downloads; prompt embeddings
passed directly, so no text encoder is needed)."""

import pytest
import torch

import fastcache_rt
from tests.runtime.helpers import tiny_flux

diffusers = pytest.importorskip("diffusers")


def tiny_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4, norm_num_groups=4,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0,
    ).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux())


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


def test_true_cfg_branches_keep_separate_state_eager_and_compiled():
    """Separate cond / uncond calls per step: each branch its own gate and cache, in eager mode (told apart by the
    text embedding) and under torch.compile(fullgraph=True) (told apart by the call's position within the step);
    the compiled pipeline gives the eager result and compiles once per branch."""
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
    pipe.transformer = torch.compile(original, fullgraph=True)
    try:
        compiled = _run_cfg(pipe, 12)
        graphs = counters["stats"]["unique_graphs"]
        st_c = fastcache_rt.stats(original)
        again = _run_cfg(pipe, 12)  # a second generation: no new graphs
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        pipe.transformer = original
    assert st_c["streams"] == 2 and st_c["per_stream_computed"] == per_branch, (st_c, per_branch)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-5)
    fastcache_rt.disable(pipe)
    assert "step" not in pipe.scheduler.__dict__
