"""The command line: generate against a saved pipeline folder, and bad input (one line on stderr, exit status 2, no
traceback, nothing written)."""

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from fastcache_rt.cli import main  # noqa: E402
from tests.cli_helpers import expect_usage_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_from_a_saved_pipeline_folder(tiny_folder, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    out = tmp_path / "sub" / "img.png"
    main(["generate", "--model", str(tiny_folder), "--policy", "fora", "--set", "interval=2", "--prompt", "red circle",
          "--steps", "6", "--height", "32", "--width", "32", "--guidance-scale", "1.0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert Image.open(out).size == (32, 32)
    # interval 2 with the preset's warm-up of 1: full iff s < 1 or s % 2 == 0 -> steps 0, 2, 4
    assert "NFE 3/6 (cached 3)" in printed, printed
    assert [p.name for p in out.parent.iterdir()] == ["img.png"]


def test_generate_shipped_model_folder(tmp_path, capsys):
    """The shipped model's architecture (randomly initialised, so no weights file is needed), saved as a pipeline
    folder and loaded by path."""
    models = pytest.importorskip("fastcache_rt.models")
    folder = tmp_path / "shipped"
    models.build_pipeline(seed=0).save_pretrained(folder)
    out = tmp_path / "x.png"
    main(["generate", "--model", str(folder), "--policy", "spectrum", "--prompt", models.CLASSES[0], "--steps", "8",
          "--height", str(models.SAMPLE_DEFAULTS["height"]), "--width", str(models.SAMPLE_DEFAULTS["width"]),
          "--guidance-scale", "1.0", "--out", str(out)])
    assert Image.open(out).size == (models.SAMPLE_DEFAULTS["width"], models.SAMPLE_DEFAULTS["height"])
    assert "policy spectrum: NFE 6/8" in capsys.readouterr().out  # 5 warm-up steps, then the gap of 2


_bad = expect_usage_error


@pytest.fixture
def blocked(tmp_path):
    """A path that cannot be a folder: its parent is a regular file (unwritable even for root)."""
    f = tmp_path / "file"
    f.write_text("x")
    return f / "out"


def test_generate_bad_input(tiny_folder, tmp_path, capsys, blocked):
    out = tmp_path / "o.png"
    base = ["generate", "--model", str(tiny_folder), "--prompt", "red circle", "--height", "32", "--width", "32",
            "--out", str(out)]
    _bad(base + ["--policy", "warpcache"], capsys, "policy", "warpcache", "spectrum")
    _bad(base + ["--steps", "1"], capsys, "--steps", ">= 2")
    _bad(base + ["--steps", "many"], capsys, "--steps")
    _bad(base + ["--policy", "teacache", "--set", "threshold"], capsys, "--set", "FIELD=VALUE")
    _bad(base + ["--policy", "teacache", "--set", "thresh=0.3"], capsys, "thresh", "TeaCacheGate")
    _bad(base + ["--policy", "teacache", "--set", "threshold=-1"], capsys, "threshold", "> 0")
    _bad(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(out)], capsys,
         "--model", "nowhere")
    _bad(["generate", "--model", str(tiny_folder), "--prompt", "x", "--out", str(blocked / "o.png")], capsys,
         "--out", "cannot write")
    _bad(["generate", "--model", str(tiny_folder), "--prompt", "x", "--out", str(tmp_path / "o.jpg")], capsys,
         "--out", ".png")
    assert not out.exists() and not list(tmp_path.glob("*.png"))


def test_generate_unknown_class_of_the_shipped_model(tmp_path, capsys):
    pytest.importorskip("fastcache_rt.models")
    _bad(["generate", "--prompt", "purple elephant", "--out", str(tmp_path / "o.png")], capsys,
         "--prompt", "purple elephant", "red circle")
    assert not list(tmp_path.iterdir())


def test_bench_bad_input(tiny_folder, tmp_path, capsys, blocked):
    out = tmp_path / "out"
    base = ["bench", "--quick", "--model", str(tiny_folder), "--classes", "red circle", "--out", str(out)]
    _bad(base + ["--methods", "warpcache"], capsys, "--methods", "warpcache")
    _bad(base + ["--steps", "1"], capsys, "--steps", ">= 2")
    _bad(["bench", "--model", str(tmp_path / "nowhere"), "--classes", "a", "--out", str(out)], capsys, "nowhere")
    _bad(["bench", "--model", str(tiny_folder), "--out", str(out)], capsys, "--classes", "required")
    _bad(["bench", "--model", str(tiny_folder), "--classes", "a", "--out", str(blocked)], capsys,
         "--out", "cannot write")
    _bad(["bench", "--frobnicate"], capsys, "unrecognized")
    pytest.importorskip("fastcache_rt.models")
    _bad(["bench", "--classes", "purple elephant", "--out", str(out)], capsys, "--classes", "purple elephant")
    _bad(["bench", "--classes", "purple elephant", "--out", str(tmp_path / "a" / "b")], capsys, "purple elephant")
    _bad(base + ["--rounds", "0"], capsys, "--rounds", ">= 1")
    _bad(base + ["--height", "-32"], capsys, "--height", ">= 1")
    _bad(base + ["--true-cfg", "1"], capsys, "--true-cfg", "> 1")
    _bad(base + ["--true-cfg", "nan"], capsys, "--true-cfg", "finite")
    _bad(base + ["--true-cfg", "strong"], capsys, "--true-cfg", "expected a number")
    _bad(base + ["--negative-prompt", "blue dots"], capsys, "--negative-prompt", "only with --true-cfg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no output folder made by a failed run


def test_true_cfg_needs_a_pipeline_that_has_it():
    from fastcache_rt.cli import UsageError, check_true_cfg

    class NoTrueCfg:  # e.g. SD3 / Wan: CFG through guidance_scale only
        def __call__(self, prompt, negative_prompt=None, guidance_scale=7.0):
            pass

    class TrueCfg:
        def __call__(self, prompt, negative_prompt=None, true_cfg_scale=1.0):
            pass

    with pytest.raises(UsageError, match="--true-cfg: NoTrueCfg has no true classifier-free guidance"):
        check_true_cfg(NoTrueCfg(), dict(true_cfg_scale=4.0, negative_prompt=""))
    check_true_cfg(TrueCfg(), dict(true_cfg_scale=4.0, negative_prompt=""))
    check_true_cfg(NoTrueCfg(), {})  # off: nothing to check


def test_bench_with_true_cfg_states_the_setting(tiny_folder, tmp_path, capsys):
    """--true-cfg with a negative prompt: the quick adaptive sweep (three tolerances), the setting in the printed
    header, table.json, table.csv and analysis.md, the quality spread and the timing ranges in the table."""
    import csv
    import json

    out = tmp_path / "out"
    main(["bench", "--quick", "--model", str(tiny_folder), "--classes", "red circle", "--seeds", "0", "--steps", "4",
          "--height", "32", "--width", "32", "--true-cfg", "4", "--negative-prompt", "blue dots", "--methods",
          "adaptive", "--rounds", "2", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "4 steps, true CFG 4 (negative prompt 'blue dots', 2 transformer calls per step)" in printed
    table = json.loads((out / "table.json").read_text())
    assert table["meta"]["true_cfg_scale"] == 4.0 and table["meta"]["negative_prompt"] == "blue dots"
    rows = table["rows"]
    assert [r["config"] for r in rows[1:]] == ["tol=0.1", "tol=0.3", "tol=0.5"]
    assert rows[0]["nfe"] == rows[0]["calls"] == 8
    with open(out / "table.csv") as f:
        got = list(csv.DictReader(f))
    assert {"psnr_min", "psnr_std", "ssim_min", "rel_l2_max", "speedup_min", "speedup_max", "true_cfg_scale"} <= \
        set(got[0])
    assert all(r["true_cfg_scale"] == "4.0" for r in got)
    md = (out / "analysis.md").read_text()
    assert "Setting: **4 steps, true CFG 4" in md and "## Quality over prompts x seeds" in md


def test_generate_bad_sizes_devices_and_folders(tiny_folder, tmp_path, capsys):
    """Sizes below 1, devices this torch cannot use, an output folder that does not exist: one line, exit 2, and
    nothing created (not even the folder)."""
    import torch

    out = tmp_path / "o.png"
    base = ["generate", "--model", str(tiny_folder), "--prompt", "red circle", "--steps", "2", "--out", str(out)]
    _bad(base + ["--height", "-32", "--width", "32"], capsys, "--height", ">= 1", "-32")
    _bad(base + ["--width", "0"], capsys, "--width", ">= 1")
    _bad(base + ["--height", "1", "--width", "1"], capsys, "--height", "smallest size")  # no latent token
    _bad(base + ["--num-frames", "0"], capsys, "--num-frames", ">= 1")
    _bad(base + ["--max-sequence-length", "-1"], capsys, "--max-sequence-length", ">= 1")
    _bad(base + ["--device", "nonsense"], capsys, "--device", "nonsense")
    _bad(base + ["--device", "meta"], capsys, "--device", "meta")
    if not torch.cuda.is_available():
        _bad(base + ["--device", "cuda"], capsys, "--device", "cuda", "no usable cuda device")
        _bad(base + ["--device", "cuda:3"], capsys, "--device", "cuda:3")
    missing = tmp_path / "newdir" / "a.png"
    _bad(["generate", "--model", str(tiny_folder), "--prompt", "red circle", "--out", str(missing)], capsys,
         "--out", "newdir", "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_generate_bad_prompt_leaves_no_folder(tmp_path, capsys):
    models = pytest.importorskip("fastcache_rt.models")
    del models
    _bad(["generate", "--prompt", "purple elephant", "--out", str(tmp_path / "newdir" / "a.png")], capsys,
         "newdir")
    assert not (tmp_path / "newdir").exists()


@pytest.mark.parametrize("kind", ["sd3", "wan"])
def test_generate_with_other_pipeline_folders(kind, tmp_path, capsys):
    """``--model FOLDER`` with any supported pipeline: SD3 (three text encoders, CFG) and Wan (video: the frames
    side by side in one PNG), saved as diffusers folders and loaded by path."""
    from fastcache_rt.testing.pipelines import tiny_sd3_pipeline, tiny_wan_pipeline

    folder = tmp_path / kind
    (tiny_sd3_pipeline if kind == "sd3" else tiny_wan_pipeline)().save_pretrained(folder)
    out = tmp_path / f"{kind}.png"
    extra = ["--num-frames", "5"] if kind == "wan" else []
    main(["generate", "--model", str(folder), "--policy", "fora", "--prompt", "red circle", "--steps", "6",
          "--height", "32", "--width", "32", "--max-sequence-length", "8", "--out", str(out), *extra])
    printed = capsys.readouterr().out
    assert Image.open(out).size == ((5 * 32, 32) if kind == "wan" else (32, 32))
    assert "NFE 2/6 (cached 4)" in printed, printed  # FORA interval 3: steps 0 and 3
