"""Pipelines that share one transformer (``from_pipe``, components passed on) each get correct caching: cache state
belongs to a generation, announced by the pipeline that drives it, with that pipeline's policy and step count; one
pipeline's disable leaves the other cached. Generations of one transformer from two threads at once are refused
with a clear error, never interleaved."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import fastcache_rt
from fastcache_rt.models import SAMPLE_DEFAULTS, load_default

pytestmark = pytest.mark.slow


def _run(pipe, steps):
    kw = dict(SAMPLE_DEFAULTS, num_inference_steps=steps)
    with torch.no_grad():
        return pipe("red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images


def _fresh(preset, **kw):
    p = load_default()
    p.set_progress_bar_config(disable=True)
    fastcache_rt.enable(p, preset, **kw)
    return p


def test_two_pipelines_sharing_a_transformer_each_cache_correctly():
    from diffusers import FluxPipeline

    p1 = load_default()
    p1.set_progress_bar_config(disable=True)
    p2 = FluxPipeline.from_pipe(p1, scheduler=copy.deepcopy(p1.scheduler))
    p2.set_progress_bar_config(disable=True)
    assert p2.transformer is p1.transformer and p2.scheduler is not p1.scheduler
    fastcache_rt.enable(p1, "spectrum")
    fastcache_rt.enable(p2, "fora")
    ref1, ref2 = _fresh("spectrum"), _fresh("fora")
    for steps1, steps2 in ((10, 20), (14, 8)):
        a = _run(p1, steps1)
        b = _run(p2, steps2)
        assert torch.equal(a, _run(ref1, steps1)), "p1 after p2 enabled"
        assert torch.equal(b, _run(ref2, steps2)), "p2"
        assert fastcache_rt.stats(p1)["num_steps"] == steps1 and fastcache_rt.stats(p2)["num_steps"] == steps2
        assert fastcache_rt.stats(p1)["policy"] == "spectrum" and fastcache_rt.stats(p2)["policy"] == "fora"
    fastcache_rt.disable(p2)  # p1 stays cached
    assert torch.equal(_run(p1, 10), _run(ref1, 10))
    fastcache_rt.disable(p1)  # now the transformer is the plain model again
    plain = load_default()
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(_run(p1, 10), _run(plain, 10))
    assert "_diffusers_hook" not in p1.transformer.__dict__ or not p1.transformer._diffusers_hook.hooks


def test_pipelines_sharing_the_scheduler_too_are_cached_as_one():
    """``from_pipe`` shares every component: a second enable is refused with what to do, and the second pipeline's
    calls are cached as the first one's (its stats are the shared transformer's)."""
    from diffusers import FluxPipeline

    p1 = load_default()
    p1.set_progress_bar_config(disable=True)
    p2 = FluxPipeline.from_pipe(p1)
    p2.set_progress_bar_config(disable=True)
    fastcache_rt.enable(p1, "spectrum")
    with pytest.raises(ValueError, match="shares its scheduler"):
        fastcache_rt.enable(p2, "fora")
    assert torch.equal(_run(p2, 10), _run(_fresh("spectrum"), 10))
    assert fastcache_rt.stats(p2)["policy"] == "spectrum"
    fastcache_rt.disable(p1)


def test_generations_of_one_transformer_from_two_threads_are_refused():
    pipe = load_default()
    pipe.set_progress_bar_config(disable=True)
    fastcache_rt.enable(pipe, "teacache")
    started, release = threading.Event(), threading.Event()
    result = {}

    def slow_step(p, i, t, kw):
        started.set()
        release.wait(60)
        return {}

    def first():
        kw = dict(SAMPLE_DEFAULTS, num_inference_steps=6)
        with torch.no_grad():
            result["first"] = pipe("red circle", generator=torch.Generator().manual_seed(0), output_type="latent",
                                   callback_on_step_end=slow_step, **kw).images

    t = threading.Thread(target=first, name="first-generation")
    t.start()
    assert started.wait(60)
    try:
        with pytest.raises(RuntimeError, match="generating in thread 'first-generation'"):
            _run(pipe, 6)
    finally:
        release.set()
        t.join(120)
    assert torch.equal(result["first"], _run(_fresh("teacache"), 6))  # the first generation was not disturbed
