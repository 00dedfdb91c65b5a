"""Hooks on the blocks (profilers, a user's ``register_forward_hook``) see each block run exactly once per real
execution, and never on a step where it does not run: while a cached call is in progress the blocks' forward hooks
are held aside, and the controller fires them around each block it really runs. Every preset eager, on families
that take a list over (FLUX, SD3, Wan) and ones whose model runs block by block (Chroma, HiDream); compiled, one of
each kind (FLUX, Chroma) with presets that trace every preset's step path; and a value a hook returns reaches the
output as without caching (a NaN: counted)."""

from __future__ import annotations

import pytest
import torch

import fastcache_rt
from fastcache_rt.families import family_for
from fastcache_rt.models import SAMPLE_DEFAULTS, load_default
from fastcache_rt.policy.gates import first_blocks
from fastcache_rt.testing.families import TINY, denoise, model
from fastcache_rt.testing.presets import COMPILED_PRESETS, step_path, tiny_overrides

STEPS = 6
PRESETS = [p for p in sorted(fastcache_rt.PRESETS) if p != "none"]
# settings that cache some steps and compute others on the tiny models (FLUX's token grid comes from its img_ids,
# which a compiled call cannot read: FreqCa gets it below): the table as it is
OVERRIDES = tiny_overrides(STEPS)


class Counting:
    """Counts every block's pre- and forward-hook calls in tensors (traced as in-place updates under
    torch.compile, no Python value for a guard), and makes one block's hook return NaN while ``poison`` is set."""

    def __init__(self, blocks):
        n = len(blocks)
        self.pre, self.post = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
        self.poison = torch.zeros(n, dtype=torch.bool)
        for i, b in enumerate(blocks):
            b.register_forward_pre_hook(self._before(i))
            b.register_forward_hook(self._after(i), with_kwargs=True)

    def _before(self, i):
        def before(m, args):
            self.pre[i].add_(1)
        return before

    def _after(self, i):
        def after(m, args, kwargs, out):
            self.post[i].add_(1)
            nan = self.poison[i].clone()
            self.poison[i].fill_(False)
            bad = [torch.where(nan, torch.full_like(o, float("nan")), o) if isinstance(o, torch.Tensor) else o
                   for o in (out if isinstance(out, tuple) else (out,))]
            return tuple(bad) if isinstance(out, tuple) else bad[0]
        return after

    def clear(self):
        self.pre.zero_(), self.post.zero_(), self.poison.zero_()


def _expected(m, handle, steps) -> list[int]:
    """How many times each block really ran: FBCache's probe blocks on every step, the others on computed steps."""
    n = sum(len(getattr(m, b.attr)) for b in family_for(m).lists)
    probe = first_blocks(handle.policy.gate)
    ran = len(handle.stats()["computed"])
    return [steps if i < probe else ran for i in range(n)]


def _blocks(m):
    return [b for spec in family_for(m).lists for b in getattr(m, spec.attr)]


# Compiled keeps FLUX (lists taken over) and Chroma (block by block) x COMPILED_PRESETS (every gate state class, probe,
# forecaster); SD3/Wan take one list over as FLUX does, the other presets trace a COMPILED_PRESETS path: eager only.
# HiDream is eager only: its mixture-of-experts routing loops over a data-dependent count (no fullgraph=True).
FAMILIES = ["flux", "sd3", "wan", "chroma", "hidream"]
COMPILED_FAMILIES = ["flux", "chroma"]


def _params():
    eager = [pytest.param(name, preset, False, id=f"{name}-{preset}-eager") for name in FAMILIES for preset in PRESETS]
    compiled = [pytest.param(name, preset, True, id=f"{name}-{preset}-compiled", marks=pytest.mark.slow)
                for name in COMPILED_FAMILIES for preset in PRESETS if preset in COMPILED_PRESETS]
    return eager + compiled


def test_the_compiled_presets_cover_every_step_path():
    """The compiled matrices' presets (``COMPILED_PRESETS``, "adaptive" among them) trace every gate state class,
    probe, forecaster and site that any preset does."""
    assert "adaptive" in COMPILED_PRESETS and set(COMPILED_PRESETS) <= set(PRESETS)
    paths = {p: step_path(p) for p in fastcache_rt.PRESETS}
    for part in range(4):
        want = {path[part] for path in paths.values()}
        assert {paths[p][part] for p in COMPILED_PRESETS} == want, (part, paths)


@pytest.mark.parametrize(("name", "preset", "compiled"), _params())
def test_block_hooks_fire_once_per_real_run(name, preset, compiled):
    m = model(name)
    blocks = _blocks(m)
    counting = Counting(blocks)
    kw = dict(OVERRIDES.get(preset, {}))
    if name == "chroma" and preset in ("fbcache", "dbcache"):  # Chroma's first block changes more between steps
        kw["threshold"] = 1.0
    if preset == "freqca" and name == "flux":
        kw["grid"] = TINY[name].grid(TINY[name].inputs(0, 1, 0)) if TINY[name].grid else None
    try:
        ref = denoise(m, name, STEPS)
        assert counting.pre.tolist() == counting.post.tolist() == [STEPS] * len(blocks)  # uncached: every step
        counting.clear()
        with fastcache_rt.cached(m, preset, num_steps=STEPS, **{k: v for k, v in kw.items() if v is not None}) as h:
            target = torch.compile(m, fullgraph=True, dynamic=False, backend="aot_eager") if compiled else m
            out = denoise(target, name, STEPS)
            st = fastcache_rt.stats(m)
            want = _expected(m, h, STEPS)
            assert 0 < len(st["computed"]) < STEPS, st["computed"]  # the check below sees cached steps
            assert counting.pre.tolist() == want, (counting.pre.tolist(), want)
            assert counting.post.tolist() == want, (counting.post.tolist(), want)
            assert torch.isfinite(out).all()
            # a NaN the last block's hook returns on the first step's real run reaches the output and is counted
            counting.clear()
            counting.poison[-1] = True
            h.new_generation(STEPS)
            out = denoise(target, name, STEPS)
            assert not torch.isfinite(out).all()
            assert fastcache_rt.stats(m)["nonfinite"] >= 1
        # disabled: the hooks are in place and fire on every call again
        counting.clear()
        assert torch.equal(denoise(m, name, STEPS), ref)
        assert counting.pre.tolist() == counting.post.tolist() == [STEPS] * len(blocks)
    finally:
        torch._dynamo.reset()
        for b in blocks:
            b._forward_pre_hooks.clear(), b._forward_hooks.clear(), b._forward_hooks_with_kwargs.clear()


@pytest.mark.parametrize("preset", ["spectrum", "teacache", "fbcache"])
def test_block_hooks_on_the_shipped_pipeline(preset):
    """The same through a pipeline (its scheduler announces the steps, its cache context names the call)."""
    pipe = load_default()
    pipe.set_progress_bar_config(disable=True)
    m = pipe.transformer
    counting = Counting(_blocks(m))
    handle = fastcache_rt.enable(pipe, preset, **({"threshold": 0.4} if preset == "fbcache" else {}))
    kw = dict(SAMPLE_DEFAULTS, num_inference_steps=10)
    with torch.no_grad():
        pipe("red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    st = fastcache_rt.stats(pipe)
    assert 0 < len(st["computed"]) < 10
    want = _expected(m, handle, 10)
    assert counting.pre.tolist() == counting.post.tolist() == want, (counting.pre.tolist(), want)
    fastcache_rt.disable(pipe)
