"""A calibration never destroys a finished profile: an existing output is refused without an explicit flag (the
message names both), an interrupted run leaves the old profile untouched and its progress in ``<out>.partial``
(which ``resume`` continues), and every output path of the command line is checked before the first generation."""

from __future__ import annotations

import json

import pytest

from fastcache_rt import calibration as C
from tests.cli_helpers import expect_usage_error

models = pytest.importorskip("fastcache_rt.models")
STEPS = 6
PROMPTS = ["red circle", "blue square"]


@pytest.fixture(scope="module")
def pipe():
    p = models.load_default()
    p.set_progress_bar_config(disable=True)
    return p


def _kw():
    kw = dict(models.SAMPLE_DEFAULTS)
    kw.pop("num_inference_steps")
    return kw


def test_an_existing_profile_is_refused_then_replaced_only_when_complete(pipe, tmp_path, monkeypatch):
    out = tmp_path / "profile.json"
    done = C.calibrate(pipe, PROMPTS, steps=STEPS, seeds=[0, 1], call_kwargs=_kw(), out=out, progress=False)
    assert len(done["runs"]) == 4 and not C.partial_path(out).exists()
    finished = out.read_bytes()

    with pytest.raises(C.ProfileError, match="resume=True.*overwrite=True"):
        C.calibrate(pipe, PROMPTS, steps=STEPS, call_kwargs=_kw(), out=out, progress=False)
    assert out.read_bytes() == finished

    # interrupted after one run of an overwrite: the finished profile is untouched, the run is in .partial
    real, calls = pipe.__class__.__call__, []

    def interrupted(self, *a, **k):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(pipe.__class__, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        C.calibrate(pipe, PROMPTS, steps=STEPS, seeds=[0, 1], call_kwargs=_kw(), out=out, overwrite=True,
                    progress=False)
    monkeypatch.setattr(pipe.__class__, "__call__", real)
    assert out.read_bytes() == finished
    partial = json.loads(C.partial_path(out).read_text())
    assert len(partial["runs"]) == 1

    # resume continues the interrupted one and replaces the profile when complete
    again = C.calibrate(pipe, PROMPTS, steps=STEPS, seeds=[0, 1], call_kwargs=_kw(), out=out, resume=True,
                        progress=False)
    assert len(again["runs"]) == 4 and not C.partial_path(out).exists()
    assert json.loads(out.read_text())["runs"] == again["runs"]


def test_command_line_checks_every_output_before_running(tmp_path, capsys):
    out = tmp_path / "p.json"
    out.write_text("{}")
    expect_usage_error(["calibrate", "--out", str(out), "--steps", str(STEPS)], capsys, "--resume", "--overwrite")
    assert out.read_text() == "{}"
    expect_usage_error(["calibrate", "--out", str(tmp_path / "q.json"), "--plot", str(tmp_path / "nodir" / "fit.png"),
                        "--steps", str(STEPS)], capsys, "--plot", "nodir")
    assert not (tmp_path / "q.json").exists()
