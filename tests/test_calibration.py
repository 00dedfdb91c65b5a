"""Calibration: the measured signals against an independent computation, the profile (fit, R^2, resume, shards and
merge), ``enable(..., profile=)``, the command line (and its bad input), and a two-expert Wan 2.2-style pipeline
(one fit per expert)."""

import json
import math

import pytest
import torch

import fastcache_rt
from fastcache_rt import calibration as C
from fastcache_rt import profiles as P
from fastcache_rt.cli import main
from fastcache_rt.policy import Policy
from fastcache_rt.policy.gates import Calibrate
from tests.cli_helpers import expect_usage_error

models = pytest.importorskip("fastcache_rt.models")

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    return models.load_default()


def _kw():
    kw = dict(models.SAMPLE_DEFAULTS)
    kw.pop("num_inference_steps")
    return kw


def _rel_l1(a, b):
    return float((a.double() - b.double()).abs().sum() / b.double().abs().sum())


def test_measured_signals_equal_an_independent_computation(pipe):
    """input = rel. L1 change of the first block's norm1 output (FLUX's modulated input), output = that of the
    transformer's output, first_block = that of the first block's image-token residual, mag = MagCache's
    calibration ratio: each recomputed here from plain forward hooks."""
    tr = pipe.transformer
    block = tr.transformer_blocks[0]
    seen = {"norm1": [], "out": [], "block_kw": []}
    hooks = [
        block.norm1.register_forward_hook(lambda m, a, o: seen["norm1"].append(o[0].detach().clone())),
        tr.register_forward_hook(lambda m, a, o: seen["out"].append((o[0] if isinstance(o, tuple) else o.sample)
                                                                    .detach().clone())),
        block.register_forward_pre_hook(lambda m, a, kw: seen["block_kw"].append(dict(kw)), with_kwargs=True),
    ]
    h = fastcache_rt.enable(pipe, Policy(Calibrate()))
    try:
        pipe(prompt=["red circle", "blue square"], num_inference_steps=STEPS, output_type="latent",
             generator=torch.Generator().manual_seed(0), **_kw())
        cal = h.stats()["per_stream"][0]["calibration"]
        mag = h.stats()["mag_ratios"]
    finally:
        h.disable()
        for x in hooks:
            x.remove()
    # fastcache_rt's probe calls norm1 once, then the block itself: every other call is the probe
    probe = seen["norm1"][::2]
    # the first block's residual: the block's own forward (no hook) on the inputs the model gave it
    with torch.no_grad():
        res = [type(block).forward(block, **kw)[1] - kw["hidden_states"] for kw in seen["block_kw"]]
    assert len(probe) == len(seen["out"]) == STEPS
    assert cal["input"][0] is None and cal["output"][0] is None and cal["first_block"][0] is None
    for s in range(1, STEPS):
        assert cal["input"][s] == pytest.approx(_rel_l1(probe[s], probe[s - 1]), rel=1e-4)
        assert cal["output"][s] == pytest.approx(_rel_l1(seen["out"][s], seen["out"][s - 1]), rel=1e-4)
        assert cal["first_block"][s] == pytest.approx(_rel_l1(res[s], res[s - 1]), rel=1e-4)
    assert cal["mag"] == pytest.approx(mag)
    # the calibration gate computes every step and leaves the output as uncached
    assert h.stats()["computed"] == list(range(STEPS))


def test_mag_ratios_equal_magcache_calibration(pipe):
    runs = {}
    for name, pol in (("calibrate", Policy(Calibrate())), ("magcache", "magcache")):
        h = fastcache_rt.enable(pipe, pol, **({"calibrate": True} if pol == "magcache" else {}))
        try:
            pipe(prompt="red circle", num_inference_steps=STEPS, output_type="latent",
                 generator=torch.Generator().manual_seed(3), **_kw())
            runs[name] = h.stats()["mag_ratios"]
        finally:
            h.disable()
    assert runs["calibrate"] == pytest.approx(runs["magcache"], rel=1e-6)


@pytest.fixture(scope="module")
def full(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "full.json"
    prof = C.calibrate(pipe, ["red circle", "blue square"], steps=STEPS, seeds=[0, 1], call_kwargs=_kw(), out=out,
                       progress=False)
    return prof, out


def test_profile_fit(full, pipe):
    prof, out = full
    assert json.loads(out.read_text())["runs"] == prof["runs"]  # written after the last run
    assert len(prof["runs"]) == 4 and prof["prompts"] == 2 and prof["seeds"] == [0, 1]
    entry = prof["models"]["transformer"]
    assert entry["class"] == "FluxTransformer2DModel" and entry["config_hash"] == P.config_hash(pipe.transformer)
    tc = prof["fit"]["transformer"]["teacache"]
    assert len(tc["coeffs"]) == tc["degree"] + 1 and tc["points"] == 4 * (STEPS - 1)
    # the fit is numpy.polyfit of the measured pairs at the highest degree (4 down to 1) that stays positive and
    # does not fall within 4x the largest measured change, and R^2 is computed from its residuals
    import numpy as np

    xs, ys = P._pairs([b for r in prof["runs"] for b in r["models"]["transformer"].values()])
    assert len(xs) == tc["points"] and tc["input_range"] == [min(xs), max(xs)]
    np.testing.assert_allclose(tc["coeffs"], np.polyfit(xs, ys, tc["degree"]), rtol=1e-9)
    for d in range(4, 0, -1):
        c = np.polyfit(xs, ys, d)
        ok = P.nonpositive_from(c, min(xs), max(xs)) is None and not P._turns_down(c, max(xs))
        if ok or d == 1:
            break
    assert tc["degree"] == (d if ok else 4) and (tc["nonpositive_from"] is None) == ok
    pred = np.polyval(tc["coeffs"], xs)
    r2 = 1 - ((np.array(ys) - pred) ** 2).sum() / ((np.array(ys) - np.mean(ys)) ** 2).sum()
    assert tc["r2"] == pytest.approx(r2) and 0 < tc["r2"] <= 1
    ratios = prof["fit"]["transformer"]["magcache"]["ratios"]
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(0.5 < r < 1.5 for r in ratios)


def test_enable_with_a_profile(full, pipe):
    prof, out = full
    fit = prof["fit"]["transformer"]
    for preset in ("teacache", "spectralcache"):
        h = fastcache_rt.enable(pipe, preset, profile=out)
        assert h.policy.gate.coeffs == tuple(fit["teacache"]["coeffs"])
        h.disable()
    h = fastcache_rt.enable(pipe, "magcache", profile=prof)
    assert h.policy.gate.ratios == tuple(fit["magcache"]["ratios"])
    h.disable()
    with pytest.raises(ValueError, match="reads nothing from a profile"):
        fastcache_rt.enable(pipe, "fbcache", profile=out)
    with pytest.raises(ValueError, match="already has coeffs"):
        fastcache_rt.enable(pipe, "teacache", profile=out, coeffs=(1.0, 0.0))
    other = json.loads(json.dumps(prof))
    other["models"]["transformer"]["class"] = "SD3Transformer2DModel"
    with pytest.raises(C.ProfileError, match="made for SD3Transformer2DModel"):
        fastcache_rt.enable(pipe, "teacache", profile=other)
    with pytest.raises(C.ProfileError, match="no such file"):
        fastcache_rt.enable(pipe, "teacache", profile=out.with_name("missing.json"))
    assert getattr(pipe.transformer, "_fastcache_rt", None) is None  # nothing left enabled by the failures


def test_a_polynomial_turning_down_past_the_measured_range_is_warned_about(full, pipe, caplog):
    from fastcache_rt.policy import FLUX_TEACACHE_COEFFS

    prof, _ = full
    other = json.loads(json.dumps(prof))
    tc = other["fit"]["transformer"]["teacache"]
    tc["coeffs"] = [-100.0, 0.0, 0.0, 0.0, 1.0]  # 1 - 100 x^4: zero at x = 0.316
    tc["input_range"] = [0.02, 0.1]
    tc["nonpositive_from"] = P.nonpositive_from(tc["coeffs"], 0.02, 0.1)
    assert tc["nonpositive_from"] == pytest.approx(0.1 ** 0.5, abs=2e-3)
    with caplog.at_level("WARNING", logger="fastcache_rt"):
        fastcache_rt.enable(pipe, "teacache", profile=other).disable()
    assert "is <= 0 from an input change of 0.316" in caplog.text
    assert P.nonpositive_from(FLUX_TEACACHE_COEFFS, 0.02, 0.15) is None  # the published polynomial stays positive
    # the shipped profile: degree 4 reaches 0 at 0.160 just past its largest change (0.148), degree 2 is kept
    shipped = C.load_profile(models.DEFAULT_PATH / "profile.json")["fit"]["transformer"]["teacache"]
    assert shipped["degree"] < 4 and shipped["nonpositive_from"] is None
    assert P.nonpositive_from(shipped["coeffs"], *shipped["input_range"]) is None


def test_resume_shards_and_merge_give_the_full_profile(full, pipe, tmp_path):
    prof, _ = full
    parts = []
    for i in range(2):
        p = tmp_path / f"part{i}.json"
        C.calibrate(pipe, ["red circle", "blue square"], steps=STEPS, seeds=[0, 1], call_kwargs=_kw(), out=p,
                    shard=(i, 2), progress=False)
        parts.append(p)
    merged = C.merge_profiles(parts)
    key = lambda r: (r["prompt"], r["seed"])
    assert sorted(map(key, merged["runs"])) == sorted(map(key, prof["runs"]))
    for a in merged["runs"]:
        b = next(r for r in prof["runs"] if key(r) == key(a))
        assert _close(a["models"], b["models"])
    assert merged["fit"]["transformer"]["teacache"]["coeffs"] == pytest.approx(
        prof["fit"]["transformer"]["teacache"]["coeffs"], rel=1e-6)
    # resume: a finished profile runs nothing more (the runs stay as they were)
    before = json.loads(parts[0].read_text())
    again = C.calibrate(pipe, ["red circle", "blue square"], steps=STEPS, seeds=[0, 1], call_kwargs=_kw(),
                        out=parts[0], shard=(0, 2), resume=True, progress=False)
    assert again["runs"] == before["runs"]
    # ... and a profile of another step count is refused
    with pytest.raises(C.ProfileError, match="another steps"):
        C.calibrate(pipe, ["red circle"], steps=STEPS + 1, call_kwargs=_kw(), out=parts[0], resume=True,
                    progress=False)
    with pytest.raises(C.ProfileError, match="another steps"):
        bad = json.loads(parts[1].read_text())
        bad["steps"] = STEPS + 1
        C.merge_profiles([parts[0], bad])


def _close(a, b):
    for name in a:
        for branch in a[name]:
            for sig, vals in a[name][branch].items():
                other = b[name][branch][sig]
                for x, y in zip(vals, other):
                    assert (x is None and y is None) or math.isclose(x, y, rel_tol=1e-5)
    return True


def test_calibrate_arguments(pipe):
    with pytest.raises(ValueError, match="prompts"):
        C.calibrate(pipe, [], steps=STEPS)
    with pytest.raises(ValueError, match="seeds"):
        C.calibrate(pipe, ["red circle"], seeds=[-1], steps=STEPS)
    with pytest.raises(ValueError, match="shard"):
        C.calibrate(pipe, ["red circle"], steps=STEPS, shard=(2, 2))
    with pytest.raises(ValueError, match="steps"):
        C.calibrate(pipe, ["red circle"], steps=1)
    with pytest.raises(ValueError, match="set by calibrate"):
        C.calibrate(pipe, ["red circle"], steps=STEPS, call_kwargs={"num_inference_steps": 3})


def test_cli_calibrate_and_plot(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two classes\nred circle\n\ngreen triangle\n")
    out = tmp_path / "p.json"
    assert main(["calibrate", "--prompts", str(prompts), "--steps", str(STEPS), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated 2 runs" in printed and "R^2" in printed
    prof = C.load_profile(out)
    assert [r["prompt"] for r in prof["runs"]] == ["red circle", "green triangle"]
    png = tmp_path / "p_fit.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    merged = tmp_path / "m.json"
    assert main(["calibrate", "--merge", str(out), str(out), "--out", str(merged)]) == 0
    assert len(C.load_profile(merged)["runs"]) == 2


_bad = expect_usage_error


def test_cli_calibrate_bad_input(tmp_path, capsys):
    out = str(tmp_path / "p.json")
    _bad(["calibrate", "--out", str(tmp_path / "p.txt")], capsys, "--out", ".json")
    _bad(["calibrate", "--out", str(tmp_path / "new" / "p.json")], capsys, "does not exist")
    _bad(["calibrate", "--out", out, "--prompts", str(tmp_path / "none.txt")], capsys, "--prompts", "cannot read")
    (tmp_path / "odd.txt").write_text("purple hexagon\n")
    _bad(["calibrate", "--out", out, "--prompts", str(tmp_path / "odd.txt")], capsys, "--prompts", "purple hexagon")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    _bad(["calibrate", "--out", out, "--prompts", str(tmp_path / "empty.txt")], capsys, "no prompts")
    _bad(["calibrate", "--out", out, "--shard", "2/2"], capsys, "--shard")
    _bad(["calibrate", "--out", out, "--shard", "x"], capsys, "--shard")
    _bad(["calibrate", "--out", out, "--seeds", "-3"], capsys, "--seeds")
    _bad(["calibrate", "--out", out, "--steps", "1"], capsys, "--steps")
    (tmp_path / "junk.json").write_text("{}")
    _bad(["calibrate", "--out", out, "--merge", str(tmp_path / "junk.json")], capsys, "--merge", "not a fastcache_rt")
    _bad(["calibrate", "--out", out, "--device", "nonsense"], capsys, "--device")
    _bad(["calibrate", "--out", out, "--height", "1"], capsys, "--height", "smallest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "junk.json", "odd.txt"]  # nothing written


def test_two_expert_pipeline_gets_one_fit_per_expert():
    """A Wan 2.2 A14B-style pipeline (two transformers switched at a boundary), with the shipped model's T5 as its
    text encoder so that it takes text prompts: each expert gets its own polynomial from its own steps, and MagCache
    ratios for the steps it ran (1 elsewhere)."""
    from fastcache_rt.testing.pipelines import tiny_wan_shipped_t5

    pipe = tiny_wan_shipped_t5(two_experts=True)
    kw = dict(height=16, width=16, num_frames=5, guidance_scale=4.0, max_sequence_length=16)
    prof = C.calibrate(pipe, ["red circle", "blue square"], steps=10, call_kwargs=kw, progress=False)
    assert set(prof["fit"]) == {"transformer", "transformer_2"}
    runs = prof["runs"][0]["models"]
    assert set(runs["transformer"]) == {"cond", "uncond"}  # per CFG branch
    first = runs["transformer"]["cond"]["input"]
    second = runs["transformer_2"]["cond"]["input"]
    switch = next(i for i, v in enumerate(second) if v is not None) - 1  # its first step has no predecessor
    assert all(v is None for v in first[switch + 1:]) and all(v is not None for v in first[1:switch])
    for name in ("transformer", "transformer_2"):
        fit = prof["fit"][name]
        assert len(fit["teacache"]["coeffs"]) == fit["teacache"]["degree"] + 1
        ratios = fit["magcache"]["ratios"]
        assert len(ratios) == 10 and 0 < fit["magcache"]["steps_measured"] < 10
    assert prof["fit"]["transformer"]["teacache"]["coeffs"] != prof["fit"]["transformer_2"]["teacache"]["coeffs"]
    h = fastcache_rt.enable(pipe, "teacache", profile=prof)
    try:
        assert h.controllers["transformer"].policy.gate.coeffs == tuple(prof["fit"]["transformer"]["teacache"]["coeffs"])
        assert h.controllers["transformer_2"].policy.gate.coeffs == \
            tuple(prof["fit"]["transformer_2"]["teacache"]["coeffs"])
        out = pipe(prompt="red circle", num_inference_steps=10, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **kw)
        assert torch.isfinite(out.frames).all()
    finally:
        h.disable()
