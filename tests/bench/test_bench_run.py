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
