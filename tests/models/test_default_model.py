"""The shipped model: its folder, data generator, sampling, prompt checks, the training script and a quality check
that an untrained model fails."""

import itertools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import FluxPipeline, FluxTransformer2DModel

import fastcache_rt
from fastcache_rt import models
from fastcache_rt.models import data, train

KW = {k: v for k, v in models.SAMPLE_DEFAULTS.items() if k != "num_inference_steps"}


@pytest.fixture(scope="module")
def pipe():
    return models.load_default()


def _sample(p, prompts, steps, seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    with torch.no_grad():
        return p(prompt=list(prompts), num_inference_steps=steps, generator=gens, output_type="pt", **KW).images


def test_folder_loads_offline_as_a_flux_pipeline():
    p = FluxPipeline.from_pretrained(models.DEFAULT_PATH, local_files_only=True)
    assert isinstance(p.transformer, FluxTransformer2DModel)
    cfg = p.transformer.config
    assert cfg.num_layers >= 2 and cfg.num_single_layers >= 4 and not cfg.guidance_embeds
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert p.vae_scale_factor == 1 and p.vae.config.latent_channels * 4 == cfg.in_channels
    # the saved tokenizers spell every class word as one token
    for c in models.CLASSES:
        assert len(p.tokenizer.tokenize(c)) == 2 and len(p.tokenizer_2.tokenize(c)) == 2


def test_weights_are_safetensors_within_20_mb():
    files = [f for f in models.DEFAULT_PATH.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20


def test_generator_is_deterministic_and_seeded():
    labels = torch.arange(len(models.CLASSES)).repeat(3)
    a, b = data.generate(labels, seed=5), data.generate(labels, seed=5)
    assert torch.equal(a, b)
    assert a.shape == (len(labels), 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, data.generate(labels, seed=6))
    # a class's images do not depend on which other classes share the batch
    assert torch.equal(data.generate([0, 0, 0], seed=3), data.generate([0, 0, 0], seed=3))


def test_classes_are_distinct():
    n = 40
    labels = torch.arange(len(models.CLASSES)).repeat_interleave(n)
    imgs = (data.generate(labels, seed=99) + 1) / 2
    assert (data.nearest_class(imgs) == labels).float().mean() > 0.97
    # within a class the samples vary (position / size / background), between classes the colour centroids differ
    per = imgs.reshape(len(models.CLASSES), n, -1)
    assert (per.std(dim=1).mean(dim=1) > 0.05).all()
    c = data.class_centroids()
    d = torch.cdist(c, c) + torch.eye(len(c)) * 10
    assert d.min() > 0.15


def test_bad_generator_input():
    with pytest.raises(ValueError, match="labels"):
        data.generate([len(models.CLASSES)], seed=0)
    with pytest.raises(TypeError, match="seed"):
        data.generate([0], seed=1.5)
    with pytest.raises(ValueError, match="size"):
        data.generate([0], seed=0, size=4)


def test_check_prompt():
    models.check_prompt(models.CLASSES[0])
    models.check_prompt(list(models.CLASSES))
    with pytest.raises(ValueError, match="red circle") as e:
        models.check_prompt("purple elephant")
    assert "purple elephant" in str(e.value) and all(c in str(e.value) for c in models.CLASSES)
    with pytest.raises(ValueError):
        models.check_prompt([models.CLASSES[0], "Red Circle"])
    with pytest.raises(TypeError):
        models.check_prompt(3)
    with pytest.raises(TypeError):
        models.check_prompt([])


def test_load_default_missing_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "DEFAULT_PATH", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="python -m fastcache_rt.models.train"):
        models.load_default()


def test_sampling_is_finite_and_the_trajectory_moves(pipe):
    outs = []
    h = pipe.transformer.register_forward_hook(lambda m, i, o: outs.append(o[0].detach().clone()))
    try:
        img = _sample(pipe, models.CLASSES[:2], steps=8)
    finally:
        h.remove()
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
    assert len(outs) == 8
    rel = [((b - a).abs().mean() / a.abs().mean()).item() for a, b in itertools.pairwise(outs)]
    assert min(rel) > 1e-3
    with torch.no_grad():
        lat = pipe(prompt=[models.CLASSES[0]], num_inference_steps=2, output_type="latent", **KW).images
    assert lat.shape == (1, 256, 12)


def test_enable_spectrum_runs_on_the_shipped_model(pipe):
    fastcache_rt.enable(pipe, "spectrum")
    try:
        img = _sample(pipe, models.CLASSES[:1], steps=20)
        st = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)
    assert torch.isfinite(img).all()
    assert st["num_steps"] == 20 and len(st["cached"]) > 0 and len(st["computed"]) < 20


@pytest.mark.slow
def test_trained_samples_look_like_their_class_and_an_untrained_model_does_not(pipe):
    """Samples of each class, classified by foreground colour and area against the training images' class
    centroids. The same check on the randomly initialised architecture must fail, so the check is meaningful."""
    prompts = list(models.CLASSES)
    labels = torch.arange(len(models.CLASSES))
    acc = (data.nearest_class(_sample(pipe, prompts, steps=12, seed=100)) == labels).float().mean().item()
    assert acc >= 7 / 8, acc
    untrained = models.build_pipeline(seed=0)
    acc0 = (data.nearest_class(_sample(untrained, prompts, steps=12, seed=100)) == labels).float().mean().item()
    assert acc0 <= 3 / 8, acc0


@pytest.mark.slow  # training
def test_training_smoke_run_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "pipe"
    rc = train.main(["--out", str(out), "--steps", "2", "--batch", "2", "--vae-steps", "1", "--warmup", "1",
                     "--no-report"])
    assert rc == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps_done"] == 2 and summary["seed"] == 0
    assert len((out / "training_log.csv").read_text().strip().splitlines()) == 3
    p = FluxPipeline.from_pretrained(out, local_files_only=True)
    img = _sample(p, models.CLASSES[:1], steps=2)
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


@pytest.mark.parametrize("argv, msg", [
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--minutes", "0"], "--minutes"),
])
def test_training_rejects_bad_arguments(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "x")] + argv)
    assert e.value.code != 0
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_training_rejects_an_out_path_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SystemExit):
        train.main(["--out", str(f)])
    assert "not a directory" in capsys.readouterr().err


def test_report_figures_exist():
    docs = Path(__file__).resolve().parents[2] / "docs" / "images"
    for name in ("model_samples.png", "model_loss.png", "model_rel_l1.png"):
        assert (docs / name).is_file(), name
    rel = json.loads((docs / "model_rel_l1.json").read_text())["rel_l1"]
    assert len(rel) == 49 and min(rel) > 0


@pytest.mark.slow  # training (twice)
def test_training_is_deterministic_from_its_seed(tmp_path):
    """Same seed (and thread count): bitwise the same weights; another seed: different ones."""
    from safetensors.torch import load_file

    def weights(name, seed):
        out = tmp_path / name
        assert train.main(["--out", str(out), "--steps", "3", "--batch", "2", "--vae-steps", "2", "--warmup", "1",
                           "--seed", str(seed), "--no-report"]) == 0
        return load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")

    a, b, c = weights("a", 1), weights("b", 1), weights("c", 2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
