"""fastcache_rt.integrations.diffusers: ``apply_fastcache(pipe.transformer, FastCacheConfig(...))`` is
``fastcache_rt.enable(pipe.transformer, ...)`` (bitwise the same images, the same decisions), and the same as enabling
on the pipeline, whose scheduler announces the steps; ``remove_fastcache`` restores the pipeline bitwise; bad config
values are clear errors."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import fastcache_rt
from fastcache_rt import models
from fastcache_rt.integrations.diffusers import FastCacheConfig, apply_fastcache, remove_fastcache

STEPS = 12
KW = {k: v for k, v in models.SAMPLE_DEFAULTS.items() if k != "num_inference_steps"}
PROFILE = models.DEFAULT_PATH / "profile.json"


@pytest.fixture(scope="module")
def pipe():
    return models.load_default()


def _generate(pipe, prompt, steps=STEPS, seed=0):
    with torch.no_grad():
        return pipe(prompt=prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="pt", **KW).images


def _run(pipe, target):
    """Two generations in a row (the second must start clean); images and each one's decisions."""
    out = []
    for i, prompt in enumerate(("red circle", "blue square")):
        img = _generate(pipe, prompt, seed=i)
        st = fastcache_rt.stats(target)
        out.append((img, st["computed"], st["cached"], st["per_stream"]))
    return out


def _same(a, b):
    for (ia, ca, ka, da), (ib, cb, kb, db) in zip(a, b):
        assert torch.equal(ia, ib)
        assert (ca, ka, da) == (cb, kb, db)


CASES = [
    ("spectrum", {}, None),
    ("teacache", {}, None),
    ("teacache", {"threshold": 0.3}, PROFILE),  # the shipped model's calibration profile
    ("fbcache", {"threshold": 0.25}, None),
    ("fora", {"interval": 2}, None),
]


@pytest.mark.parametrize("policy, overrides, profile", CASES, ids=[c[0] + ("+profile" if c[2] else "") for c in CASES])
def test_apply_is_enable(pipe, policy, overrides, profile):
    cfg = FastCacheConfig(policy, num_steps=STEPS, profile=profile, overrides=overrides)
    handle = apply_fastcache(pipe.transformer, cfg)
    assert isinstance(handle, fastcache_rt.Handle)
    if profile is None:
        assert handle.policy == cfg.resolved_policy()
    try:
        applied = _run(pipe, pipe.transformer)
    finally:
        remove_fastcache(pipe.transformer)
    fastcache_rt.enable(pipe.transformer, policy, num_steps=STEPS, profile=profile, **overrides)
    try:
        enabled = _run(pipe, pipe.transformer)
    finally:
        fastcache_rt.disable(pipe.transformer)
    _same(applied, enabled)
    for _, computed, cached, _ in applied:  # caching happened, and every generation had its own steps
        assert cached and len(computed) + len(cached) == STEPS and 0 in computed
    # the pipeline announcing the steps itself (its scheduler) decides the same
    fastcache_rt.enable(pipe, policy, profile=profile, **overrides)
    try:
        on_pipe = _run(pipe, pipe)
    finally:
        fastcache_rt.disable(pipe)
    _same(applied, on_pipe)


def test_apply_to_the_pipeline(pipe):
    """A pipeline as the module: no num_steps needed (its scheduler announces them), same as enable(pipe)."""
    apply_fastcache(pipe, FastCacheConfig("teacache"))
    try:
        applied = _run(pipe, pipe)
    finally:
        remove_fastcache(pipe)
    with fastcache_rt.cached(pipe, "teacache"):
        enabled = _run(pipe, pipe)
    _same(applied, enabled)


def test_policy_file_and_policy_object(pipe, tmp_path):
    pol = fastcache_rt.PRESETS["teacache"].with_overrides(threshold=0.5)
    path = tmp_path / "policy.json"
    fastcache_rt.save_policy(pol, path)
    outs = []
    for p in (path, str(path), pol):  # a pathlib.Path, a str, a Policy
        apply_fastcache(pipe.transformer, FastCacheConfig(p, num_steps=STEPS))
        try:
            outs.append(_run(pipe, pipe.transformer))
        finally:
            remove_fastcache(pipe.transformer)
    _same(outs[0], outs[1])
    _same(outs[0], outs[2])


def test_remove_restores_bitwise(pipe):
    tr = pipe.transformer
    ref = _generate(pipe, "green triangle")
    before = (set(tr.__dict__), dict(tr.__dict__.get("_diffusers_hook").hooks) if "_diffusers_hook" in tr.__dict__
              else None)
    apply_fastcache(tr, FastCacheConfig("fora", num_steps=STEPS))
    cached = _generate(pipe, "green triangle")
    assert not torch.equal(cached, ref)
    remove_fastcache(tr)
    assert torch.equal(_generate(pipe, "green triangle"), ref)
    after = (set(tr.__dict__), dict(tr.__dict__.get("_diffusers_hook").hooks) if "_diffusers_hook" in tr.__dict__
             else None)
    assert after == before
    with pytest.raises(ValueError, match="not applied"):
        remove_fastcache(tr)
    # applying twice replaces the first (one set of hooks), and one remove restores
    apply_fastcache(tr, FastCacheConfig("fora", num_steps=STEPS))
    apply_fastcache(tr, FastCacheConfig("teacache", num_steps=STEPS))
    assert fastcache_rt.stats(tr)["policy"] == "teacache"
    remove_fastcache(tr)
    assert torch.equal(_generate(pipe, "green triangle"), ref)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"policy": "nope"}, ValueError, "unknown preset 'nope'"),
    ({"policy": 3}, TypeError, "FastCacheConfig.policy"),
    ({"policy": "missing.json"}, ValueError, "cannot read"),
    ({"num_steps": 0}, ValueError, "num_steps"),
    ({"num_steps": True}, ValueError, "num_steps"),
    ({"num_steps": 12.0}, ValueError, "num_steps"),
    ({"overrides": {"thresh": 0.1}}, ValueError, "thresh: not a field of SpectrumSchedule"),
    ({"policy": "teacache", "overrides": {"threshold": -1}}, ValueError, "threshold"),
    ({"overrides": [("threshold", 0.1)]}, TypeError, "overrides"),
    ({"overrides": {"num_steps": 12}}, ValueError, "FastCacheConfig\\(num_steps=...\\)"),
    ({"overrides": {1: 2}}, TypeError, "overrides"),
    ({"profile": 5}, TypeError, "FastCacheConfig.profile"),
    ({"grid": (0, 4)}, ValueError, "grid"),
])
def test_bad_config_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FastCacheConfig(**kwargs)


def test_bad_apply_arguments(pipe):
    from diffusers.hooks import FirstBlockCacheConfig

    with pytest.raises(ValueError, match="num_steps"):  # the transformer alone is not told the step count
        apply_fastcache(pipe.transformer, FastCacheConfig())
    with pytest.raises(TypeError, match="enable_cache"):
        apply_fastcache(pipe.transformer, FirstBlockCacheConfig())
    with pytest.raises(TypeError, match="FastCacheConfig"):
        apply_fastcache(pipe.transformer, {"policy": "teacache"})
    with pytest.raises(TypeError, match="module"):
        apply_fastcache(object(), FastCacheConfig(num_steps=4))
    with pytest.raises(TypeError):  # not a supported family: fastcache_rt.enable's own error, nothing touched
        apply_fastcache(torch.nn.Linear(2, 2), FastCacheConfig(num_steps=4))
    with pytest.raises(ValueError, match="fbcache|FBCache|profile|reads nothing"):
        apply_fastcache(pipe.transformer, FastCacheConfig("fbcache", num_steps=4, profile=PROFILE))
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    try:
        with pytest.raises(ValueError, match="disable_cache"):
            apply_fastcache(pipe.transformer, FastCacheConfig(num_steps=4))
    finally:
        pipe.transformer.disable_cache()
    assert getattr(pipe.transformer, "_fastcache_rt", None) is None
