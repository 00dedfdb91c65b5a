"""Partial-block caching (``compute_first`` / ``compute_last``, cache-dit's DBCache Fn / Bn) on every family's tiny
model: the first and last blocks run on every step and a skipped step skips only the span between them.

- computing every step with the span split off is bitwise the unpatched model (the blocks run once each, in order);
- on a cached step exactly the blocks outside the span run (counted by forward hooks on every block);
- a cached step given the same inputs as the computed step before it reproduces that step's output: the span's
  residual of the image tokens *and of the text tokens* (which the blocks after the span attend to) is cached;
- every gate x forecaster runs with a span on both ends; compiled (fullgraph) decides as eager.

Families whose tiny model has one list of two blocks get a third block (a copy of the first), so that one block
can run on each side of the span."""

from __future__ import annotations

import copy

import pytest
import torch

import fastcache_rt
from fastcache_rt.families import family_for
from fastcache_rt.policy import PRESETS
from fastcache_rt.policy.presets import dbcache, policy_from_dict, policy_to_dict, resolve_policy
from fastcache_rt.testing.families import TINY, call, denoise, model
from fastcache_rt.testing.presets import tiny_overrides

FAMILIES = sorted(TINY)
STEPS = 6
_MODELS: dict = {}


def tall(name: str):
    """The family's tiny model with at least three blocks (a copy of its first block inserted where it has two)."""
    if name not in _MODELS:
        m = model(name)
        fam = family_for(m)
        if sum(len(getattr(m, b.attr)) for b in fam.lists) < 3:
            m = copy.deepcopy(m)
            blocks = getattr(m, fam.lists[-1].attr)
            blocks.insert(1, copy.deepcopy(blocks[0]))  # (SD3's last block differs: it returns no text tokens)
        _MODELS[name] = m
    return _MODELS[name]


def _sizes(m):
    return [len(getattr(m, b.attr)) for b in family_for(m).lists]


class _Ran:
    """Which blocks (by position over every list) ran in each model call."""

    def __init__(self, m):
        blocks = [b for li in family_for(m).lists for b in getattr(m, li.attr)]
        self.calls: list[list[int]] = []
        self.handles = [m.register_forward_pre_hook(lambda *a: self.calls.append([]))]
        self.handles += [b.register_forward_hook(lambda mod, a, o, i=i: self.calls[-1].append(i))
                         for i, b in enumerate(blocks)]

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------
def test_policy_fields_are_checked_and_kept():
    pol = PRESETS["fbcache"].with_overrides(compute_first=2, compute_last=1)
    assert pol.blocks() == (2, 1) and "compute_first=2, compute_last=1" in repr(pol)
    assert policy_from_dict(policy_to_dict(pol)) == pol
    assert "compute_first" not in policy_to_dict(PRESETS["fbcache"])
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="compute_last"):
            PRESETS["teacache"].with_overrides(compute_last=bad)
    with pytest.raises(ValueError, match="site"):
        PRESETS["spectrum"].with_overrides(site="output", compute_last=1)
    # the gate's probe blocks and compute_first: the larger runs
    assert PRESETS["fbcache"].with_overrides(blocks=3, compute_first=2).blocks() == (3, 0)


def test_dbcache_presets():
    assert resolve_policy("dbcache") == PRESETS["dbcache"] and PRESETS["dbcache"].blocks() == (1, 0)
    p = resolve_policy("DBCache-F8B0")
    assert p.name == "dbcache-f8b0" and p.blocks() == (8, 0) and p.gate.threshold == 0.08 and p.caps.warmup == 8
    assert resolve_policy("dbcache-f1b1", threshold=0.2) == dbcache(1, 1).with_overrides(threshold=0.2)
    with pytest.raises(ValueError, match="blocks"):
        resolve_policy("dbcache-f0b1")  # the probe is the first blocks' residual
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_policy("dbcache-f1")


def test_a_span_with_no_block_is_refused_before_anything_is_touched():
    m = model("flux")
    with pytest.raises(ValueError, match="2 \\+ 2 blocks"):
        fastcache_rt.enable(m, "dbcache-f2b2", num_steps=4)
    with pytest.raises(ValueError, match="leave none"):
        fastcache_rt.enable(m, "teacache", num_steps=4, compute_first=3, compute_last=1)
    assert "forward" not in m.__dict__ and not getattr(m, "_diffusers_hook", None)


@pytest.mark.parametrize("name", FAMILIES)
def test_computing_every_step_around_a_span_is_bitwise(name):
    m = tall(name)
    ref = denoise(m, name, 3)
    with fastcache_rt.cached(m, "none", num_steps=3, compute_first=1, compute_last=1):
        out = denoise(m, name, 3)
        assert fastcache_rt.stats(m)["computed"] == [0, 1, 2]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_cached_step_runs_only_the_blocks_outside_the_span(name):
    m = tall(name)
    total = sum(_sizes(m))
    ran = _Ran(m)
    try:
        with fastcache_rt.cached(m, "fora", num_steps=STEPS, interval=2, compute_first=1, compute_last=1):
            out = denoise(m, name, STEPS)
            st = fastcache_rt.stats(m)
    finally:
        ran.remove()
    assert st["computed"] == [0, 2, 4] and st["cached"] == [1, 3, 5]
    assert torch.isfinite(out).all()
    for s in range(STEPS):
        assert ran.calls[s] == (list(range(total)) if s in st["computed"] else [0, total - 1]), s


@pytest.mark.parametrize("name", FAMILIES)
def test_a_cached_step_on_the_computed_steps_inputs_reproduces_it(name):
    """Two calls with the same inputs, the second cached: the first block gives the same tokens, the span's cached
    residuals (image and text tokens) rebuild what the span made, and the last block gives the computed output
    again (to rounding)."""
    m = tall(name)
    tiny = TINY[name]
    kw = tiny.inputs(0, 1, 0)
    with fastcache_rt.cached(m, "fora", num_steps=2, interval=99, warmup=1, compute_first=1, compute_last=1):
        with torch.no_grad():
            a = call(m, tiny, kw, 0.7, 1)
            b = call(m, tiny, kw, 0.7, 1)
        assert fastcache_rt.stats(m)["cached"] == [1]
    a = torch.cat([x.flatten() for x in a]) if isinstance(a, (list, tuple)) else a
    b = torch.cat([x.flatten() for x in b]) if isinstance(b, (list, tuple)) else b
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


PAIRS = [("fbcache", "hidden"), ("teacache", "residual"), ("spectrum", "hidden"), ("taylorseer", "hidden"),
         ("freqca", "hidden"), ("adaptive", "hidden"), ("magcache", "residual"), ("spectralcache", "residual")]


@pytest.mark.parametrize("preset,site", PAIRS)
@pytest.mark.parametrize("name", ["flux", "flux2", "hidream", "wan"])
def test_every_gate_and_forecaster_with_a_span_on_both_ends(name, preset, site):
    m = tall(name)
    kw = dict(tiny_overrides(8)[preset] if preset in tiny_overrides(8) else {})
    if preset == "fbcache":
        site = "residual"  # (the first blocks' gate caches the residual)
    if preset in ("teacache", "spectralcache"):
        kw["threshold"] = 1.0  # (the tiny models' probes change more than at the table's 6 steps)
    with fastcache_rt.cached(m, preset, num_steps=8, site=site, compute_first=1, compute_last=1, **kw):
        out = denoise(m, name, 8)
        st = fastcache_rt.stats(m)
    assert torch.isfinite(out).all()
    assert st["cached"] and st["computed"][0] == 0


@pytest.mark.slow
# two lists (FLUX), a joined text-first list after the span's end (FLUX.2), block-by-block lists (Chroma; HiDream's
# MoE does not compile), one list (Qwen-Image); a signal gate and a schedule with a forecaster
@pytest.mark.parametrize("name,preset", [("flux", "fbcache"), ("flux2", "spectrum"), ("chroma", "fbcache"),
                                         ("qwenimage", "spectrum")])
def test_compiled_decides_as_eager(name, preset):
    m = tall(name)
    kw = dict(tiny_overrides(STEPS).get(preset, {}))
    kw.update(num_steps=STEPS, compute_first=1, compute_last=1)
    if preset == "spectrum":
        kw["warmup"] = 2
    else:
        kw["threshold"] = 2.0
    with fastcache_rt.cached(m, preset, **kw):
        eager = denoise(m, name, STEPS)
        want = fastcache_rt.stats(m)["computed"]
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="eager")
    with fastcache_rt.cached(cm, preset, **kw):
        out = denoise(cm, name, STEPS)
        assert fastcache_rt.stats(cm)["computed"] == want
    assert 0 < len(want) < STEPS
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
