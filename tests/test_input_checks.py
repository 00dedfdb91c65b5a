"""Profiles, policy files, the command line and the tuner refuse what they cannot honour, with a message naming
the field (one line on the command line), instead of a KeyError deep inside or a silently different result."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import fastcache_rt
from fastcache_rt.policy import PRESETS, MagCacheGate, StreamSpec, policy_from_dict, policy_to_dict
from fastcache_rt.profiles import ProfileError, load_profile
from tests.cli_helpers import expect_usage_error

PROFILE = Path(fastcache_rt.__file__).parent / "models" / "default" / "profile.json"


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["models"].__setitem__("transformer", {}), "models.transformer"),
    (lambda d: d.__setitem__("runs", "abc"), "runs"),
    (lambda d: d["runs"].__setitem__(0, {"prompt": 1}), "runs\\[0\\]"),
    (lambda d: d.__setitem__("steps", "x"), "steps"),
    (lambda d: d.__setitem__("models", []), "models"),
    (lambda d: d.__setitem__("fit", [1]), "fit"),
])
def test_malformed_profile_names_the_field(mutate, field):
    data = json.loads(PROFILE.read_text())
    mutate(data)
    with pytest.raises(ProfileError, match=f"profile: {field}"):
        load_profile(data)


def test_hand_edited_polynomial_negative_over_its_range_is_warned(caplog):
    data = json.loads(PROFILE.read_text())
    tc = data["fit"]["transformer"]["teacache"]
    tc["coeffs"], tc["nonpositive_from"] = [-1.0, 0.0], None  # negative everywhere, the stored check says fine
    pipe = pytest.importorskip("fastcache_rt.models").load_default()
    with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
        fastcache_rt.enable(pipe, "teacache", profile=data)
    fastcache_rt.disable(pipe)
    assert any("<= 0" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("part", ["gate", "forecaster"])
@pytest.mark.parametrize("bad", [[1, 2], "teacache", None, 3])
def test_policy_file_parts_must_be_objects(part, bad):
    data = policy_to_dict(PRESETS["spectrum"])
    data[part] = bad
    with pytest.raises(ValueError, match=f"{part} must be an object"):
        policy_from_dict(data)


def test_magcache_ratios_of_another_step_count_are_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
        MagCacheGate(ratios=(1.0,) * 50).make_state(StreamSpec((1, 4, 8), num_steps=10))
    assert any("50 steps are interpolated to a 10-step" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("argv, fragments", [
    (["generate", "--prompt", "red circle", "--height", "33", "--steps", "2"], ("--height", "multiple")),
    (["generate", "--prompt", "red circle", "--width", "41", "--steps", "2"], ("--width", "multiple")),
    (["generate", "--prompt", "red circle", "--guidance-scale", "nan", "--steps", "2"], ("--guidance-scale", "finite")),
    (["calibrate", "--height", "31", "--steps", "2"], ("--height",)),
])
def test_command_line_sizes_and_scales(argv, fragments, capsys, tmp_path):
    out = ["--out", str(tmp_path / ("x.png" if argv[0] == "generate" else "x.json"))]
    expect_usage_error(argv + out, capsys, *fragments)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_tune_says_when_no_caching_policy_meets_the_target():
    models = pytest.importorskip("fastcache_rt.models")
    pipe = models.load_default()
    pipe.set_progress_bar_config(disable=True)
    kw = {k: v for k, v in models.SAMPLE_DEFAULTS.items() if k != "num_inference_steps"}
    res = fastcache_rt.tune(pipe, 99.9, prompts=["red circle"], steps=4, call_kwargs=kw, progress=False, verify=2)
    (entry,) = res["targets"]
    assert entry["met"] is False
    assert "no caching policy meets it" in entry["reason"]
