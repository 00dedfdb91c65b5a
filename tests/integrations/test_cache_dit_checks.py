"""The cache-dit integration checks what it can before cache-dit patches anything: a calibrator that needs the
step count without one, bad config fields; it warns when a run outlasts the steps it was told; and it refuses
cache-dit and fastcache_rt stacked on one pipeline, in either order."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

cache_dit = pytest.importorskip("cache_dit")

import fastcache_rt  # noqa: E402
from fastcache_rt.bench import methods as M  # noqa: E402

with M.quiet_peers():
    C = importlib.import_module("fastcache_rt.integrations.cache_dit")


@pytest.fixture()
def pipe():
    from fastcache_rt.models import load_default

    p = load_default()
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, steps):
    from fastcache_rt.models import SAMPLE_DEFAULTS

    kw = dict(SAMPLE_DEFAULTS, num_inference_steps=steps)
    with torch.no_grad():
        return pipe("red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images


def test_a_missing_step_count_is_refused_before_cache_dit_patches_anything(pipe):
    cls_call = type(pipe).__call__
    with pytest.raises(ValueError, match="num_inference_steps"), M.quiet_peers():
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(), calibrator_config=C.spectrum_calibrator_config())
    assert type(pipe).__call__ is cls_call
    assert not getattr(pipe.transformer, "_is_cached", False)
    _run(pipe, 4)  # the pipeline (and its class) still run


@pytest.mark.parametrize("kw, field", [
    (dict(calibrator_cache_type="bogus"), "calibrator_cache_type"), (dict(enable_calibrator="no"), "enable_calibrator"),
    (dict(enable_encoder_calibrator=1), "enable_encoder_calibrator"),
])
def test_config_fields_are_checked_when_made(kw, field):
    with pytest.raises(ValueError, match=field):
        C.spectrum_calibrator_config(num_inference_steps=10, **kw)
    with pytest.raises(ValueError, match="grid"):
        C.freqca_calibrator_config(grid=(3,))


def test_running_past_the_told_steps_is_warned(caplog):
    cal = C.SpectrumCalibrator(num_inference_steps=3)
    with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
        for _ in range(5):
            cal.mark_step_begin()
    assert sum("past the 3 steps" in r.getMessage() for r in caplog.records) == 1


def test_stacking_the_two_libraries_is_refused_in_either_order(pipe):
    cfg = cache_dit.DBCacheConfig(num_inference_steps=6)
    fastcache_rt.enable(pipe, "spectrum")
    with pytest.raises(ValueError, match="fastcache_rt caching is enabled"), M.quiet_peers():
        cache_dit.enable_cache(pipe, cache_config=cfg, calibrator_config=C.spectrum_calibrator_config())
    fastcache_rt.disable(pipe)
    saved = M._instance_attrs(pipe)
    with M.quiet_peers():
        cache_dit.enable_cache(pipe, cache_config=cfg, calibrator_config=C.spectrum_calibrator_config())
    try:
        with pytest.raises(ValueError, match="cache-dit caching is enabled"):
            fastcache_rt.enable(pipe, "spectrum")
    finally:
        with M.quiet_peers():
            cache_dit.disable_cache(pipe)
        M._restore_instance_attrs(saved)
