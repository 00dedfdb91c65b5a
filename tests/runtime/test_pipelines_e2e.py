"""End to end through real diffusers pipelines built offline from tiny components (random weights from configs, no
downloads): StableDiffusion3Pipeline (CFG batched as one call of batch 2), WanPipeline (Wan 2.1, CFG as separate
"cond" / "uncond" calls), a Wan 2.2 A14B-style WanPipeline (``transformer_2`` + ``boundary_ratio``: both experts
run), QwenImagePipeline (true CFG with negative embeddings) and HunyuanVideoPipeline (true CFG). Prompt embeddings
are passed directly, so the pipelines (``fastcache_rt.testing.pipelines``) have no text encoders.

Per pipeline: the "none" preset is bitwise the pipeline without fastcache_rt and ``disable`` restores it bitwise;
every preset runs with finite output and computes fewer steps than it calls the model; a second generation with
another step count and size is bitwise a fresh run and reports the new step count; the CFG branches are separate
streams."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastcache_rt
from fastcache_rt.testing.pipelines import (
    tiny_hunyuanvideo_embeds_pipeline,
    tiny_qwenimage_embeds_pipeline,
    tiny_sd3_embeds_pipeline,
    tiny_wan_embeds_pipeline,
)

pytestmark = pytest.mark.slow  # five pipelines x every preset, end to end (the FLUX pipeline: test_pipeline.py)

STEPS = 10  # the first generation of every test
STEPS2 = 7  # the second generation (another step count)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster and, on a busy 2-core machine, far less noisy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -------------------------------------------------------------------- how to call them (their embeddings' sizes)
def _sd3_call(pipe, steps, hw, output_type):
    g = torch.Generator().manual_seed(100)
    pe, ne = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    pp, npp = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
    out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
               negative_pooled_prompt_embeds=npp, guidance_scale=4.0, num_inference_steps=steps, height=hw[0],
               width=hw[1], output_type=output_type, generator=torch.Generator().manual_seed(0))
    return out.images


def _wan_call(pipe, steps, hw, output_type):
    g = torch.Generator().manual_seed(100)
    pe, ne = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=4.0, num_inference_steps=steps,
               height=hw[0], width=hw[1], num_frames=5, output_type=output_type,
               generator=torch.Generator().manual_seed(0))
    return out.frames


def _qwen_call(pipe, steps, hw, output_type):
    g = torch.Generator().manual_seed(100)
    pe, ne = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    mask = torch.ones(1, 5, dtype=torch.long)
    out = pipe(prompt_embeds=pe, prompt_embeds_mask=mask, negative_prompt_embeds=ne,
               negative_prompt_embeds_mask=mask, true_cfg_scale=3.0, num_inference_steps=steps, height=hw[0],
               width=hw[1], output_type=output_type, generator=torch.Generator().manual_seed(0))
    return out.images


def _hunyuan_call(pipe, steps, hw, output_type):
    g = torch.Generator().manual_seed(100)
    pe, ne = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    pp, npp = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    mask = torch.ones(1, 6)
    out = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, prompt_attention_mask=mask, negative_prompt_embeds=ne,
               negative_pooled_prompt_embeds=npp, negative_prompt_attention_mask=mask, true_cfg_scale=3.0,
               guidance_scale=6.0, num_inference_steps=steps, height=hw[0], width=hw[1], num_frames=5,
               output_type=output_type, generator=torch.Generator().manual_seed(0))
    return out.frames


@dataclass
class Case:
    build: Callable
    call: Callable  # (pipe, steps, (height, width), output_type) -> images / frames
    hw: tuple  # the first size
    hw2: tuple  # another (non-square) size for the second generation
    branches: tuple  # the branches stats reports: cache contexts, or (0,) for one batched call per step
    batch: int  # the batch of the transformer's calls (2: cond and uncond stacked)
    experts: tuple = ("transformer",)
    signal_threshold: float = 0.3  # TeaCache / SpectralCache threshold with coeffs=(1, 0) that caches here


CASES = {
    "sd3": Case(tiny_sd3_embeds_pipeline, _sd3_call, (16, 16), (16, 24), (0,), 2),
    "wan": Case(lambda: tiny_wan_embeds_pipeline(False), _wan_call, (32, 32), (32, 48), ("cond", "uncond"), 1),
    "wan22": Case(lambda: tiny_wan_embeds_pipeline(True), _wan_call, (32, 32), (32, 48), ("cond", "uncond"), 1,
                  experts=("transformer", "transformer_2")),
    # Qwen-Image's probe is the timestep embedding, whose relative change per step is larger here
    "qwenimage": Case(tiny_qwenimage_embeds_pipeline, _qwen_call, (32, 32), (32, 48), ("cond", "uncond"), 1,
                      signal_threshold=1.0),
    "hunyuanvideo": Case(tiny_hunyuanvideo_embeds_pipeline, _hunyuan_call, (16, 16), (16, 32), ("cond", "uncond"),
                         1),
}


class Built:
    """One pipeline of a case, built once per module, with its uncached reference outputs."""

    def __init__(self, name: str, case: Case):
        self.name, self.case = name, case
        self.pipe = case.build()
        self.pipe.set_progress_bar_config(disable=True)
        self.ref_pt = self.run(STEPS, case.hw, "pt")  # decoded images / frames, before fastcache_rt was ever on
        self.ref_latent = self.run(STEPS, case.hw)

    def run(self, steps, hw=None, output_type="latent"):
        return self.case.call(self.pipe, steps, hw or self.case.hw, output_type)


@pytest.fixture(scope="module", params=list(CASES))
def built(request):
    b = Built(request.param, CASES[request.param])
    yield b
    with pytest.raises(ValueError):  # every test left the pipeline as it found it
        fastcache_rt.stats(b.pipe)


# ------------------------------------------------------------------------------------------------------- helpers
def _models(st: dict, case: Case) -> dict:
    """{transformer name: its stats} (one entry unless the pipeline has two transformers)."""
    if len(case.experts) == 1:
        assert "models" not in st, st.keys()
        return {"transformer": st}
    assert set(st["models"]) == set(case.experts), st.keys()
    return st["models"]


def _streams(st: dict, case: Case) -> list[tuple[str, dict]]:
    return [(name, row) for name, m in _models(st, case).items() for row in m["per_stream"]]


def _check_streams(st: dict, case: Case, hw_tokens=None) -> dict:
    """The streams are exactly the case's branches (per transformer), each a consistent record of one call per
    step, numbered by the generation's steps (a second expert's stream starts where the first one's ended);
    returns {branch: number of model calls of the generation, all transformers together}."""
    calls, steps = {}, {}
    for name, m in _models(st, case).items():
        rows = m["per_stream"]
        assert sorted(map(str, (r["branch"] for r in rows))) == sorted(map(str, case.branches)), (name, rows)
        shapes = {tuple(r["shape"]) for r in rows}
        assert len(shapes) == 1 and next(iter(shapes))[0] == case.batch, (name, rows)
        for r in rows:
            n = len(r["computed"]) + len(r["cached"])
            own = sorted(r["computed"] + r["cached"])
            assert own == list(range(own[0], own[0] + n)) if n else True, (name, r)  # contiguous generation steps
            assert n == 0 or r["computed"][0] == own[0], (name, r)  # nothing to reuse at a stream's first step
            assert r["nonfinite"] == 0, (name, r)
            calls[r["branch"]] = calls.get(r["branch"], 0) + n
            steps.setdefault(r["branch"], []).extend(own)
    assert all(n == st["num_steps"] for n in calls.values()), (calls, st["num_steps"])
    assert all(sorted(v) == list(range(st["num_steps"])) for v in steps.values()), steps  # the experts tile the run
    return calls


# --------------------------------------------------------------------------------------------------------- tests
def test_none_is_bitwise_the_pipeline_and_disable_restores_it(built):
    case, pipe = built.case, built.pipe
    fastcache_rt.enable(pipe, "none")
    try:
        got = built.run(STEPS, output_type="pt")
        st = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)
    assert torch.equal(got, built.ref_pt)
    assert st["num_steps"] == STEPS and st["policy"] == "none"
    _check_streams(st, case)
    assert all(not row["cached"] for _, row in _streams(st, case))
    # every transformer of the pipeline ran under fastcache_rt (the Wan 2.2 experts split the steps)
    assert all(m["per_stream"] and m["per_stream"][0]["computed"] for m in _models(st, case).values())

    assert torch.equal(built.run(STEPS, output_type="pt"), built.ref_pt)
    for name in case.experts:
        assert "_fastcache_rt" not in getattr(pipe, name).__dict__
    assert "set_timesteps" not in pipe.scheduler.__dict__ and "step" not in pipe.scheduler.__dict__


SIGNAL = ("teacache", "spectralcache")
PRESETS = ("spectrum", "teacache", "spectralcache", "freqca", "taylorseer", "fora", "fbcache", "magcache")
# the schedule presets' decisions at STEPS steps, from their documented rules
SCHEDULES = {
    "spectrum": [0, 1, 2, 3, 4, 6, 8],  # 5 warm-up steps, then gaps floor(2 + 0.75 j)
    "fora": [0, 3, 6, 9],  # every 3rd step
    "freqca": [0, 1, 2, 8],  # 3 warm-up steps, then every 6th
    "taylorseer": [0, 1, 2, 8],
}


def _overrides(preset: str, case: Case) -> dict:
    if preset in SIGNAL:
        return {"threshold": case.signal_threshold, "coeffs": (1.0, 0.0)}
    if preset == "fbcache":
        return {"threshold": 0.5}
    return {}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_finite_and_caches(built, preset):
    case, pipe = built.case, built.pipe
    if preset == "magcache":
        fastcache_rt.enable(pipe, "magcache", calibrate=True)
        try:
            calib = built.run(STEPS)
            cst = fastcache_rt.stats(pipe)
        finally:
            fastcache_rt.disable(pipe)
        assert torch.equal(calib, built.ref_latent)  # calibration computes every step
        assert all(not row["cached"] for _, row in _streams(cst, case))
        ratios = cst["mag_ratios"]
        for name, m in _models(cst, case).items():
            n = len(m["per_stream"][0]["computed"])
            assert len(m["mag_ratios"]) == n and all(math.isfinite(r) and r > 0 for r in m["mag_ratios"]), name
        overrides = {"ratios": ratios}
    else:
        overrides = _overrides(preset, case)

    fastcache_rt.enable(pipe, preset, **overrides)
    try:
        got = built.run(STEPS)
        st = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)

    assert got.shape == built.ref_latent.shape and torch.isfinite(got).all()
    assert st["num_steps"] == STEPS and st["nonfinite"] == 0
    calls = _check_streams(st, case)
    rows = _streams(st, case)
    computed = sum(len(r["computed"]) for _, r in rows)
    assert computed < sum(calls.values()), (preset, rows)  # fewer computed steps than model calls
    for branch in calls:  # in every branch
        assert sum(len(r["computed"]) for _, r in rows if r["branch"] == branch) < STEPS, (preset, branch, rows)
    assert not torch.equal(got, built.ref_latent)  # the skipped steps were forecast, not computed
    # the forecasts stay close to the uncached result (relative to the latents' scale)
    assert (got - built.ref_latent).abs().mean() < 0.5 * built.ref_latent.abs().mean()
    if preset in SCHEDULES or preset == "magcache":  # a schedule: every branch (and stream) decides alike
        for name, m in _models(st, case).items():
            assert len({tuple(r["computed"]) for r in m["per_stream"]}) == 1, (name, m["per_stream"])
    if preset in SCHEDULES and len(case.experts) == 1:
        assert st["computed"] == SCHEDULES[preset], st["computed"]


@pytest.mark.parametrize("preset", ["spectrum", "teacache", "fbcache"])
def test_a_second_generation_with_other_steps_and_size_is_a_fresh_run(built, preset):
    case, pipe = built.case, built.pipe
    overrides = _overrides(preset, case)
    fastcache_rt.enable(pipe, preset, **overrides)
    try:
        first = built.run(STEPS)
        st1 = fastcache_rt.stats(pipe)
        second = built.run(STEPS2, case.hw2)
        st2 = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)
    fastcache_rt.enable(pipe, preset, **overrides)
    try:
        fresh = built.run(STEPS2, case.hw2)
        st_fresh = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)

    assert st1["num_steps"] == STEPS and st2["num_steps"] == STEPS2
    assert second.shape != first.shape  # another size really ran
    assert torch.equal(second, fresh)
    assert torch.isfinite(second).all()
    _check_streams(st2, case)
    assert st2["computed"] == st_fresh["computed"] and st2["cached"] == st_fresh["cached"]
    for name in _models(st2, case):
        m2, mf, m1 = _models(st2, case)[name], _models(st_fresh, case)[name], _models(st1, case)[name]
        assert m2["per_stream"] == mf["per_stream"], name
        # the streams are those of the new size (the first generation's are gone)
        assert {tuple(r["shape"]) for r in m2["per_stream"]}.isdisjoint(tuple(r["shape"]) for r in m1["per_stream"])
    if not (preset == "spectrum" and len(case.experts) > 1):  # (each Wan 2.2 expert warms up on its own 5 steps)
        assert sum(len(r["computed"]) for _, r in _streams(st2, case)) < len(case.branches) * STEPS2


def test_cfg_branches_are_separate_streams(built):
    """Each CFG branch (cache context "cond" / "uncond") has its own stream, in each transformer; SD3 batches the
    branches into one call of batch 2: one stream with one decision for the batch, per-sample caches."""
    case, pipe = built.case, built.pipe
    fastcache_rt.enable(pipe, "teacache", threshold=case.signal_threshold, coeffs=(1.0, 0.0))
    try:
        built.run(STEPS)
        st = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)
    calls = _check_streams(st, case)
    for name, m in _models(st, case).items():
        branches = [r["branch"] for r in m["per_stream"]]
        assert m["streams"] == len(case.branches) and len(set(branches)) == len(branches), (name, m["per_stream"])
        if case.branches == ("cond", "uncond"):
            assert set(branches) == {"cond", "uncond"}, (name, branches)
        else:
            assert branches == [0] and m["per_stream"][0]["shape"][0] == 2, (name, m["per_stream"])
    assert set(calls) == set(case.branches)


# -------------------------------------------------------------------------------------- Wan 2.2 A14B: two experts
def test_wan22_both_experts_are_cached_with_their_own_state():
    """``enable(pipe)`` patches ``transformer`` and ``transformer_2``; each expert keeps its own streams and
    decisions, and together they make up the generation's steps (high noise first)."""
    b = Built("wan22", CASES["wan22"])
    pipe = b.pipe
    handle = fastcache_rt.enable(pipe, "fora")
    try:
        assert set(handle.controllers) == {"transformer", "transformer_2"}
        assert pipe.transformer._fastcache_rt is handle and pipe.transformer_2._fastcache_rt is handle
        got = b.run(STEPS)
        st = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)
    models = st["models"]
    n1 = len(models["transformer"]["per_stream"][0]["computed"]) + len(models["transformer"]["per_stream"][0]["cached"])
    n2 = len(models["transformer_2"]["per_stream"][0]["computed"]) + \
        len(models["transformer_2"]["per_stream"][0]["cached"])
    assert n1 >= 2 and n2 >= 2 and n1 + n2 == STEPS, (n1, n2)  # both experts ran, several steps each
    assert models["transformer"]["num_steps"] == models["transformer_2"]["num_steps"] == STEPS
    # FORA's every-3rd-step rule on the generation's steps (the low-noise expert starts at step n1, which
    # computes: it has nothing cached yet): each expert caches something
    for name, first, last in (("transformer", 0, n1), ("transformer_2", n1, STEPS)):
        for row in models[name]["per_stream"]:
            expect = [s for s in range(first, last) if s == first or s % 3 == 0]
            assert row["computed"] == expect and row["cached"], (name, row)
    # the top level reports the first transformer (the high-noise expert)
    assert st["per_stream"] == models["transformer"]["per_stream"]
    assert not torch.equal(got, b.ref_latent) and torch.isfinite(got).all()
    assert torch.equal(b.run(STEPS), b.ref_latent)


# ------------------------------------------------------------------------------- found and fixed
def test_teacache_computes_the_first_and_last_step_of_a_wan_generation():
    """TeaCache's rule: the first and last steps run whatever the threshold (the control of the test below)."""
    pipe = tiny_wan_embeds_pipeline(False)
    pipe.set_progress_bar_config(disable=True)
    fastcache_rt.enable(pipe, "teacache", threshold=100.0, coeffs=(1.0, 0.0))
    try:
        _wan_call(pipe, STEPS, (32, 32), "latent")
        st = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)
    assert [r["computed"] for r in st["per_stream"]] == [[0, STEPS - 1]] * 2


def test_wan22_last_step_of_the_generation_is_computed():
    pipe = tiny_wan_embeds_pipeline(True)
    pipe.set_progress_bar_config(disable=True)
    fastcache_rt.enable(pipe, "teacache", threshold=100.0, coeffs=(1.0, 0.0))
    try:
        _wan_call(pipe, STEPS, (32, 32), "latent")
        st = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)
    for row in st["models"]["transformer_2"]["per_stream"]:  # the low-noise expert runs the generation's last step
        assert row["computed"][-1] == STEPS - 1 and row["cached"], row


def test_stats_after_another_size_at_the_same_step_count():
    pipe = tiny_qwenimage_embeds_pipeline()
    pipe.set_progress_bar_config(disable=True)
    fastcache_rt.enable(pipe, "fora")
    try:
        _qwen_call(pipe, STEPS2, (32, 32), "latent")
        _qwen_call(pipe, STEPS2, (32, 48), "latent")
        st = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)
    assert st["computed"] == [0, 3, 6]
    assert [r["computed"] for r in st["per_stream"]] == [[0, 3, 6]] * 2
