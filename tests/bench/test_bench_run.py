"""A tiny end-to-end benchmark: the table, JSON, CSV, Markdown and PNGs are written; peers' disable restores the
uncached output exactly."""

import csv
import json

import pytest
import torch

import fastcache_rt
from fastcache_rt.bench import methods as M
from fastcache_rt.bench.harness import BenchError, Harness, Settings
from fastcache_rt.cli import main
from fastcache_rt.testing.pipelines import CALL, tiny_pipeline

STEPS = 6


def _latents(pipe, steps=STEPS):
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    with torch.no_grad():
        return pipe(prompt=["red circle", "blue dots"], num_inference_steps=steps, generator=gens,
                    output_type="latent", **CALL).images


@pytest.mark.slow  # the bench command end to end
def test_bench_command_writes_every_output(tiny_folder, tmp_path, capsys):
    out, img = tmp_path / "out", tmp_path / "img"
    main(["bench", "--quick", "--model", str(tiny_folder), "--classes", "red circle", "blue dots", "--seeds", "0",
          "--steps", str(STEPS), "--height", "32", "--width", "32", "--methods", "fora", "spectrum",
          "diffusers-fbcache", "--out", str(out), "--images", str(img), "--no-progress"])
    printed = capsys.readouterr().out
    assert "PSNR dB" in printed and "## (a)" in printed
    table = json.loads((out / "table.json").read_text())
    rows = table["rows"]
    keys = [r["key"] for r in rows]
    assert keys[0] == "uncached" and len(rows) == 1 + 2 + 3 + 2  # spectrum: its two settings + apply_fastcache
    assert {r["library"] for r in rows[1:]} == {"fastcache_rt", "diffusers"}
    by = {r["key"]: r for r in rows}
    # the diffusers-style entry point takes the same decisions and makes the same images as enable
    applied, direct = by["fastcache_rt/spectrum/alpha=0.75 via apply_fastcache"], by["fastcache_rt/spectrum/alpha=0.75"]
    assert applied["computed"] == direct["computed"] and applied["rel_l2"] == direct["rel_l2"]
    fora = by["fastcache_rt/fora/interval=4 warmup=3"]
    # FixedInterval(4, warm-up 3): steps 0, 1, 2, then every 4th counted from step 2
    assert fora["computed"] == [s for s in range(STEPS) if s < 3 or (s - 2) % 4 == 0]
    assert fora["settings"] == {"interval": 4, "warmup": 3}  # the knob values, for plots by knob
    assert fora["nfe"] == len(fora["computed"]) and fora["ideal_speedup"] == pytest.approx(STEPS / fora["nfe"])
    for r in rows[1:]:
        assert r["speedup"] > 0 and r["time_s"] > 0 and 0 < r["ssim"] <= 1 and r["rel_l2"] >= 0
        assert r["cache_bytes"] > 0, r["key"]
        if r["library"] == "fastcache_rt":
            assert r["cache_bytes_walked"] >= r["cache_bytes"]  # the walk sees the cache plus small state
    with open(out / "table.csv") as f:
        assert [r["key"] for r in csv.DictReader(f)] == keys
    analysis = json.loads((out / "analysis.json").read_text())
    assert set(analysis) >= {"overhead", "budgets", "pareto", "memory"}
    assert "(b)" in (out / "analysis.md").read_text()
    from PIL import Image

    grid = Image.open(img / "bench_grid.png")
    assert grid.height >= 3 * 32  # uncached + one row per method shown
    assert Image.open(img / "bench_pareto.png").width > 200
    assert not (img / "bench_tolerance.png").exists()  # no adaptive rows here: no tolerance plot
    assert not list(out.glob(".*")) and not list(img.glob(".*"))  # no temporary files left


def test_peers_disable_restores_the_uncached_output():
    pipe = tiny_pipeline()
    ref = _latents(pipe)
    ctx = M.Context(steps=STEPS)
    ctx.ratios["diffusers_mag"] = M.diffusers_magcache_calibration(pipe, lambda: _latents(pipe), STEPS)
    assert len(ctx.ratios["diffusers_mag"]) == STEPS
    assert torch.equal(_latents(pipe), ref)
    configs = [M.diffusers_fbcache(0.5), M.diffusers_taylorseer(2), M.diffusers_magcache(0.5)]
    ok, _ = M.cache_dit_available()
    if ok:
        configs += [M.cache_dit_dbcache(0.5, False), M.cache_dit_dbcache(0.5, True),
                    M.cache_dit_dbcache(0.5, "spectrum")]
    # twice over, so that every peer also runs after every other one (cache-dit used to leave the transformer's
    # children reordered, which broke diffusers' FirstBlockCache afterwards)
    for c in configs + configs:
        c.enable(pipe, ctx)
        try:
            got = _latents(pipe)
        finally:
            c.disable(pipe)
        assert torch.isfinite(got).all()
        assert torch.equal(_latents(pipe), ref), f"{c.key} left the pipeline changed"
    assert list(pipe.transformer._modules)[4:6] == ["transformer_blocks", "single_transformer_blocks"]


def test_harness_stops_when_a_method_leaves_a_hook_behind():
    pipe = tiny_pipeline()
    leaky = M.Config("leaky", "test", "x", enable=lambda p, ctx: fastcache_rt.enable(p, "fora"),
                     disable=lambda p: None)
    h = Harness(pipe, Settings(prompts=["red circle"], seeds=[0], steps=4, height=32, width=32,
                               call_kwargs=dict(guidance_scale=1.0, max_sequence_length=8)), progress=False)
    try:
        with pytest.raises(BenchError, match="after test/leaky/x was disabled differs from the reference"):
            h.run([leaky])
    finally:
        h.close()


def test_settings_validation():
    with pytest.raises(ValueError, match="steps"):
        Settings(prompts=["a"], seeds=[0], steps=1)
    with pytest.raises(ValueError, match="prompts"):
        Settings(prompts=[], seeds=[0])


# ---------------------------------------------------------------------------------------------------- true CFG
def _cfg_settings(**kw):
    base = dict(prompts=["red circle"], seeds=[0], steps=4, height=32, width=32,
                call_kwargs=dict(guidance_scale=1.0, max_sequence_length=8), rounds=2, uncached_every=2,
                true_cfg_scale=4.0, negative_prompt="")
    return Settings(**dict(base, **kw))


def test_harness_with_true_cfg_two_calls_per_step_spread_and_ranges():
    """True CFG: the reference makes two transformer calls per step (cond, uncond) and differs from the unguided
    output; NFE counts calls, each branch's computed steps are kept; quality spread and timing ranges are in every
    row."""
    pipe = tiny_pipeline()
    h = Harness(pipe, _cfg_settings(), progress=False)
    try:
        res = h.run([M.ours("fora", dict(interval=2, warmup=1)), M.ours("adaptive", dict(tol=0.5))])
    finally:
        h.close()
    meta, rows = res.meta, res.rows
    assert meta["calls_per_step"] == 2 and meta["calls"] == 8 and meta["true_cfg_scale"] == 4.0
    assert meta["setting"]["negative_prompt"] == ""
    gens = [torch.Generator().manual_seed(0)]
    with torch.no_grad():
        plain = pipe(prompt=["red circle"], num_inference_steps=4, generator=gens, output_type="latent", **CALL).images
    assert not torch.allclose(plain, res.latents["uncached"])  # the guidance was applied
    ref, fora, adaptive = rows
    assert ref["nfe"] == ref["calls"] == 8 and ref["true_cfg_scale"] == 4.0
    # FixedInterval(2, warm-up 1): steps 0 and 2 in both branches, 4 of 8 calls
    assert fora["computed_streams"] == [[0, 2], [0, 2]] and fora["nfe"] == 4
    assert fora["ideal_speedup"] == pytest.approx(2.0) and "!=" not in fora["note"]  # stats agree per branch
    assert len(adaptive["computed_streams"]) == 2 and adaptive["nfe"] == sum(map(len, adaptive["computed_streams"]))
    for r in (fora, adaptive):
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"] and len(r["speedup_rounds"]) == 2
        assert r["time_s_min"] <= r["time_s"] <= r["time_s_max"]
        assert r["psnr_min"] <= r["psnr"] <= r["psnr_max"] and r["psnr_std"] == 0.0  # one image
        assert r["per_image"] == [dict(prompt="red circle", seed=0, psnr=r["psnr"], ssim=r["ssim"],
                                       rel_l2=pytest.approx(r["rel_l2"]))]
        if r["nfe"] < r["calls"]:  # a skipped call's cost: given only where the rounds agree
            measurable = r["skipped_step_cost"] is not None
            assert measurable == (r["skipped_step_cost_max"] - r["skipped_step_cost_min"]
                                  < r["skipped_step_cost_median"])


def test_settings_validation_true_cfg():
    for bad in (1.0, 0.5, float("nan"), float("inf"), True, "4"):
        with pytest.raises(ValueError, match="true_cfg_scale"):
            _cfg_settings(true_cfg_scale=bad)
    with pytest.raises(ValueError, match="negative_prompt"):
        _cfg_settings(negative_prompt=None)
    assert _cfg_settings(true_cfg_scale=None).calls_per_step == 1


@pytest.mark.slow  # every method and peer at 28 steps with true CFG (~20 s)
def test_every_method_at_28_steps_with_true_cfg(tmp_path):
    from fastcache_rt.bench import analysis as A
    from fastcache_rt.bench import report as R

    pipe = tiny_pipeline()
    ours, peers = M.select_methods(None)
    configs = M.our_configs(28, True, ours) + M.peer_configs(peers, True, lambda msg: None)
    assert [c.config for c in configs if c.method == "adaptive"] == ["tol=0.1", "tol=0.3", "tol=0.5"]
    assert not any(c.tags for c in configs)  # the 50-step budgets do not apply
    h = Harness(pipe, _cfg_settings(steps=28, rounds=1, uncached_every=6), progress=False)
    try:
        res = h.run(configs)
    finally:
        h.close()
    rows = res.rows[1:]
    assert [r["key"] for r in rows] == [c.key for c in configs]
    for r in rows:
        assert r["calls"] == 56 and 0 < r["nfe"] <= 56 and len(r["computed_streams"]) == 2, r["key"]
        assert r["skipped_step_cost"] is None  # one round: not measurable
        if r["library"] == "fastcache_rt":
            assert "!=" not in r["note"], r["key"]
    an = A.analyse(res.rows, res.meta)
    md = A.markdown(an, res.meta)
    assert "28 steps, true CFG 4" in md and "skipped" in an["budgets"]
    assert set(an["spread"]) == {c.key for c in configs}
    assert [r["settings"]["tol"] for r in R.tolerance_rows(res.rows)] == [0.1, 0.3, 0.5]
    written = R.write_outputs(tmp_path, res.rows, an, md, res.meta, res.images, tolerance_path=tmp_path / "tol.png")
    assert tmp_path / "tol.png" in written and (tmp_path / "tol.png").read_bytes()[:4] == b"\x89PNG"


def test_adaptive_sweeps():
    quick = [c for c in M.our_configs(50, True, {"adaptive"})]
    full = [c for c in M.our_configs(28, False, {"adaptive"})]
    assert [c.config for c in quick] == ["tol=0.1", "tol=0.3", "tol=0.5"]
    assert [c.config for c in full] == [f"tol={t:g}" for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0)]
    assert [c.default for c in quick] == [False, True, False]  # the picture grid shows tol 0.3
    assert "adaptive" in M.select_methods(["adaptive"])[0]
