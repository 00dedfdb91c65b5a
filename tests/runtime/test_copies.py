"""A deep copy of an enabled pipeline runs uncached (with a warning) and never touches the original, which keeps
its caching and can still be disabled; enabling caching on such a copy is refused with what to do; pickling an
enabled pipeline says to disable first."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch

import fastcache_rt
from fastcache_rt.models import SAMPLE_DEFAULTS, load_default

pytestmark = pytest.mark.slow


def _run(pipe, steps):
    kw = dict(SAMPLE_DEFAULTS, num_inference_steps=steps)
    with torch.no_grad():
        return pipe("red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images


@pytest.mark.parametrize("preset", ["spectrum", "teacache", "fora"])
def test_deepcopy_of_an_enabled_pipeline(preset, caplog):
    pipe, plain, cached = load_default(), load_default(), load_default()
    for p in (pipe, plain, cached):
        p.set_progress_bar_config(disable=True)
    fastcache_rt.enable(pipe, preset)
    fastcache_rt.enable(cached, preset)
    _run(pipe, 10)
    with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
        twin = copy.deepcopy(pipe)
        got = _run(twin, 20)
    assert torch.equal(got, _run(plain, 20)), "the copy is not the uncached model"
    assert any("copy" in r.getMessage() and "uncached" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="not enabled"):
        fastcache_rt.disable(twin)
    with pytest.raises(ValueError, match="copy"):
        fastcache_rt.enable(twin, preset)
    # the original: its caching, its scheduler, its handle
    assert torch.equal(_run(pipe, 12), _run(cached, 12))
    assert fastcache_rt.stats(pipe)["num_steps"] == 12
    fastcache_rt.disable(pipe)
    assert torch.equal(_run(pipe, 12), _run(plain, 12))


def test_pickling_an_enabled_pipeline_says_to_disable_first():
    pipe = load_default()
    fastcache_rt.enable(pipe, "spectrum")
    with pytest.raises(TypeError, match="disable"):
        pickle.dumps(pipe.transformer)
    fastcache_rt.disable(pipe)
    pickle.dumps(pipe.transformer)
