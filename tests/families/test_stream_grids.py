"""Stream selection on families whose token grid comes from the latent's shape (SD3: NCHW, Wan: video): a
transposed grid (the same token count) after another is bitwise a fresh generation's, eager for every preset and
under ``torch.compile(fullgraph=True)`` for presets that trace every preset's step path; FreqCa's DCT depends on the
grid."""

from __future__ import annotations

import pytest
import torch

import fastcache_rt
from fastcache_rt.testing.families import TINY, _update, call, model
from fastcache_rt.testing.presets import COMPILED_PRESETS, tiny_overrides

pytestmark = pytest.mark.slow

STEPS = 6
# the table, with what this file always ran where it differs: the signal gates at their presets' thresholds,
# adaptive's tolerance 1.0 (its assertions compare two runs, whatever each caches)
OVERRIDES = tiny_overrides(STEPS, teacache=None, spectralcache=None, fbcache=None,
                           adaptive={"tol": 1.0, "warmup": 2})


@torch.no_grad()
def _generate(m, name, kw):
    tiny = TINY[name]
    kw = dict(kw)
    for s in range(STEPS):
        out = call(m, tiny, kw, 1.0 - s / STEPS, 1)
        kw[tiny.latent] = _update(kw[tiny.latent], out, 1.0 / STEPS)
    return kw[tiny.latent]


def _inputs(name):
    tiny = TINY[name]
    kw = tiny.inputs(0, 1, 1)  # size 1: a grid that is not square
    t = dict(kw)
    t[tiny.latent] = kw[tiny.latent].transpose(-1, -2).contiguous()
    return kw, t


# Compiled keeps every one of COMPILED_PRESETS (every gate state class, probe and forecaster; the other presets'
# compiled step path is one of theirs: fastcache_rt/testing/presets.py): FreqCa, whose DCT is bound to the grid, on
# both families, each other one on one family, alternating (the grid's stream selection is the same host code).
FAMILIES = ("sd3", "wan")


def _compiled_on(name: str, preset: str) -> bool:
    if preset not in COMPILED_PRESETS:
        return False
    others = [p for p in COMPILED_PRESETS if p != "freqca"]
    return preset == "freqca" or FAMILIES[others.index(preset) % len(FAMILIES)] == name


def _params():
    presets = [p for p in sorted(fastcache_rt.PRESETS) if p != "none"]
    return [pytest.param(name, preset, compiled, id=f"{name}-{preset}-{'compiled' if compiled else 'eager'}")
            for name in FAMILIES for preset in presets for compiled in (False, True)
            if not compiled or _compiled_on(name, preset)]


@pytest.mark.parametrize(("name", "preset", "compiled"), _params())
def test_a_transposed_grid_after_another_is_a_fresh_generation(name, preset, compiled):
    m = model(name)
    kw, transposed = _inputs(name)
    runs = []
    for first in (kw, None):  # used: the other grid first; fresh: the transposed grid alone
        with fastcache_rt.cached(m, preset, num_steps=STEPS, **OVERRIDES.get(preset, {})) as h:
            target = torch.compile(m, fullgraph=True, dynamic=False, backend="aot_eager") if compiled else m
            if first is not None:
                _generate(target, name, first)
                h.new_generation(STEPS)
            runs.append((_generate(target, name, transposed), fastcache_rt.stats(m)["computed"]))
        torch._dynamo.reset()
    (got, got_steps), (want, want_steps) = runs
    assert got_steps == want_steps
    assert torch.equal(got, want), float((got - want).abs().max())
