"""A deep copy of an enabled pipeline is a plain pipeline: it runs uncached (with a warning), its own weights, and
never touches the original, which keeps its caching, its stats, and can still be disabled; enabled, the copy is
cached on its own; pickling an enabled pipeline says to disable first.

Every preset on two families (the shipped FLUX model and the tiny SD3 pipeline) eager, and with the original's
transformer compiled after the copy ran for presets that trace every preset's step path."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch

import fastcache_rt
from fastcache_rt.models import SAMPLE_DEFAULTS, load_default
from tests.runtime.helpers import (
    CASES,
    COMPILED_PRESET_NAMES,
    PRESET_NAMES,
    STEPS,
    References,
    check_cached_generation,
    compile_transformer,
    compiled_graphs,
    no_hooks_left,
    one_thread_module,
    uncompile_transformer,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread_module()


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
    fastcache_rt.enable(twin, preset)  # the copy is a plain pipeline: cached on its own
    assert torch.equal(_run(twin, 12), _run(cached, 12))
    fastcache_rt.disable(twin)
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


# ------------------------------------------------------------------------------------------------------------------
# Every preset, two families (the shipped FLUX model and the tiny SD3 pipeline), eager and compiled
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refs():
    return References()


def _copy_warned(records) -> bool:
    return any("copy" in r.getMessage() and "uncached" in r.getMessage() and "original keeps its caching"
               in r.getMessage() for r in records if r.name == "fastcache_rt")


# Compiled keeps COMPILED_PRESET_NAMES on both families (every gate state class, probe, forecaster); the copy itself
# runs eager in every case, the other presets' compiled step path is one of theirs (fastcache_rt/testing/presets.py).
def _params():
    return [pytest.param(preset, case, mode, id=f"{preset}-{case}-{mode}")
            for preset in PRESET_NAMES for case in CASES for mode in ("eager", "compiled")
            if mode == "eager" or preset in COMPILED_PRESET_NAMES]


@pytest.mark.parametrize(("preset", "case", "mode"), _params())
def test_a_copy_of_a_pipeline_with_every_preset(refs, preset, case, mode, caplog):
    """The copy (made after a cached generation) runs uncached, with the warning, at another step count; the original
    then generates as a fresh cached pipeline does (compiled: its transformer compiled after the copy ran, compared
    with the fresh eager pipeline bitwise), reports its stats, and disables back to the plain model."""
    case = CASES[case]
    a, b = STEPS
    pipe = case.build()
    case.enable(pipe, preset)
    try:
        check_cached_generation(case, refs, pipe, preset, a, case.call(pipe, a))
        with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
            twin = copy.deepcopy(pipe)
            got = case.call(twin, b)
        assert torch.equal(got, refs.plain(case, b)), "the copy is not the uncached model"
        assert _copy_warned(caplog.records), [r.getMessage() for r in caplog.records]
        with pytest.raises(ValueError, match="not enabled"):
            fastcache_rt.disable(twin)
        case.enable(twin, preset)  # the copy is a plain pipeline: enabled, it is cached on its own
        try:
            check_cached_generation(case, refs, twin, preset, b, case.call(twin, b))
        finally:
            fastcache_rt.disable(twin)
        if mode == "compiled":
            compile_transformer(pipe)
            try:
                check_cached_generation(case, refs, pipe, preset, a, case.call(pipe, a))
                assert compiled_graphs() >= 1
            finally:
                uncompile_transformer(pipe)
        else:
            for steps in (b, a):
                check_cached_generation(case, refs, pipe, preset, steps, case.call(pipe, steps))
    finally:
        fastcache_rt.disable(pipe)
    no_hooks_left(pipe.transformer)
    for steps in (a, b):
        assert torch.equal(case.call(pipe, steps), refs.plain(case, steps)), "disable did not restore the model"


# diffusers' hook registry gives a hooked module its instance `forward` = partial(<closure over the registry's
# function references>, module); a deep copy shares the closure (functions are atomic), whose references are bound to
# the original module, so a copy made with the hooks on would run the original module. fastcache_rt makes the copy
# with its hooks taken off (hooks._CopyPlain): the tests below fail if the copy reaches the original in any way.
@pytest.mark.parametrize("case", list(CASES))
def test_a_copys_generation_leaves_the_originals_stats(refs, case):
    case = CASES[case]
    a, b = STEPS
    pipe = case.build()
    case.enable(pipe, "fora")
    try:
        case.call(pipe, a)
        before = fastcache_rt.stats(pipe)
        assert before["computed"] == refs.cached(case, "fora", a)[1]["computed"]
        twin = copy.deepcopy(pipe)
        assert torch.equal(case.call(twin, b), refs.plain(case, b))
        after = fastcache_rt.stats(pipe)
        assert after["per_stream"] == before["per_stream"], (before["per_stream"], after["per_stream"])
    finally:
        fastcache_rt.disable(pipe)


@pytest.mark.parametrize("case", list(CASES))
def test_a_copy_runs_its_own_weights(refs, case):
    case = CASES[case]
    a, b = STEPS
    pipe, plain = case.build(), case.build()
    case.enable(pipe, "fora")
    try:
        case.call(pipe, a)
        twin = copy.deepcopy(pipe)
        with torch.no_grad():
            twin.transformer.proj_out.weight.mul_(2.0)
            plain.transformer.proj_out.weight.mul_(2.0)
        want = case.call(plain, b)
        assert not torch.equal(want, refs.plain(case, b))  # the change shows in a plain pipeline's output
        assert torch.equal(case.call(twin, b), want)
    finally:
        fastcache_rt.disable(pipe)


@pytest.mark.parametrize("case", list(CASES))
def test_a_copy_made_before_any_generation_runs_uncached(refs, case):
    case = CASES[case]
    pipe = case.build()
    case.enable(pipe, "fora")
    try:
        twin = copy.deepcopy(pipe)
        assert torch.equal(case.call(twin, STEPS[0]), refs.plain(case, STEPS[0]))
    finally:
        fastcache_rt.disable(pipe)


def test_a_copy_of_an_enabled_transformer_or_of_its_blocks_is_plain():
    """A transformer enabled by itself, and its blocks, copy as a pipeline's do: plain modules (no fastcache_rt hook,
    uncached, their own weights), which ``enable`` caches on their own; the original keeps its caching and stats."""
    from fastcache_rt.testing.tiny_flux import denoise, tiny_flux

    def hookless(module):
        reg = module.__dict__.get("_diffusers_hook")
        return (reg is None or not reg.hooks) and "__deepcopy__" not in module.__dict__

    S = 6
    plain = denoise(tiny_flux(), S)
    m = tiny_flux()
    with fastcache_rt.cached(m, "fora", num_steps=S, interval=2) as handle:
        cached = denoise(m, S)
        st = fastcache_rt.stats(m)
        assert 0 < len(st["computed"]) < S and not torch.equal(cached, plain)
        twin = copy.deepcopy(m)
        blocks = copy.deepcopy(m.transformer_blocks)
        block = copy.deepcopy(m.single_transformer_blocks[0])
        assert all(hookless(x) for x in [twin, *twin.transformer_blocks, *twin.single_transformer_blocks, *blocks,
                                         block])
        assert all(b is not o for b, o in zip(blocks, m.transformer_blocks)) and not hookless(m)
        assert torch.equal(denoise(twin, S), plain), "the copy is not the uncached model"
        with pytest.raises(ValueError, match="not enabled"):
            fastcache_rt.disable(twin)
        with fastcache_rt.cached(twin, "fora", num_steps=S, interval=2):
            assert torch.equal(denoise(twin, S), cached)
        assert hookless(twin)
        assert fastcache_rt.stats(m)["per_stream"] == st["per_stream"]
        handle.new_generation(S)
        assert torch.equal(denoise(m, S), cached)
    assert hookless(m) and torch.equal(denoise(m, S), plain)


def test_a_compiled_copy_runs_uncached(refs):
    case = CASES["sd3"]
    a = STEPS[0]
    pipe = case.build()
    case.enable(pipe, "fora")
    try:
        case.call(pipe, a)
        before = fastcache_rt.stats(pipe)
        twin = copy.deepcopy(pipe)
        compile_transformer(twin)
        try:
            got = case.call(twin, 3)
            graphs = compiled_graphs()
        finally:
            uncompile_transformer(twin)
        assert torch.equal(got, refs.plain(case, 3))
        assert fastcache_rt.stats(pipe)["per_stream"] == before["per_stream"]
        assert graphs <= 2, f"the copy's 3 calls compiled {graphs} graphs"
    finally:
        fastcache_rt.disable(pipe)
