"""FBCache's probe blocks on every family, block-by-block lists included (HiDream, Chroma): with the probe covering
the whole first block list the decision is taken at the next list's first block; a threshold nothing reaches
computes every step bitwise as the uncached model, and a large one caches."""

from __future__ import annotations

import pytest
import torch

import fastcache_rt
from fastcache_rt.families import family_for
from fastcache_rt.testing.families import TINY, denoise, model

STEPS = 4


@pytest.mark.parametrize("name", sorted(TINY))
def test_fbcache_probe_over_the_whole_first_list(name):
    m = model(name)
    sizes = [len(getattr(m, b.attr)) for b in family_for(m).lists]
    if sum(sizes) <= sizes[0]:
        pytest.skip(f"{name}: one block list, nothing left to skip after it")
    ref = denoise(m, name, STEPS)
    with fastcache_rt.cached(m, "fbcache", num_steps=STEPS, blocks=sizes[0], threshold=1e-12):
        out = denoise(m, name, STEPS)
        assert fastcache_rt.stats(m)["computed"] == list(range(STEPS))
    assert torch.equal(out, ref)
    with fastcache_rt.cached(m, "fbcache", num_steps=STEPS, blocks=sizes[0], threshold=1e6):
        out = denoise(m, name, STEPS)
        assert fastcache_rt.stats(m)["computed"] == [0]
    assert torch.isfinite(out).all()
