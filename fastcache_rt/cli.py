"""The ``fastcache-rt`` command line: ``bench`` (every method and the peers on the shipped model, one table),
``generate`` (one image from any diffusers pipeline with a policy on), ``calibrate`` (a model's profile: TeaCache
polynomial, MagCache ratios) and ``tune`` (the fastest policy meeting a quality target).

Bad input (an unknown policy, model, prompt class, field, device, a step count below 2, a size below 1, an output
that cannot be written) ends with one line on stderr and exit status 2, before any long work starts and without
leaving files or folders behind.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import math
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2

QUICK = dict(classes=4, seeds=(0,), rounds=2, uncached_every=4)
FULL = dict(classes=8, seeds=(0,), rounds=3, uncached_every=4)


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(message)


def _int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer, got {s!r}") from None
        return v

    return parse


def _positive(name):
    def parse(s):
        v = _int(name)(s)
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name}: must be >= 1, got {v}")
        return v

    return parse


DEFAULT_NEGATIVE_PROMPT = ""  # true CFG's negative prompt unless given: the empty prompt (plain CFG)


def _cfg_scale(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--true-cfg: expected a number, got {s!r}") from None
    if not math.isfinite(v) or v <= 1:
        raise argparse.ArgumentTypeError(f"--true-cfg: must be a finite number > 1 (1 is no guidance), got {s}")
    return v


def _true_cfg_args(p) -> None:
    """True classifier-free guidance (bench and tune): FluxPipeline's ``true_cfg_scale`` with a negative prompt,
    two transformer calls per step."""
    p.add_argument("--true-cfg", type=_cfg_scale, default=None, metavar="SCALE",
                   help="true classifier-free guidance at this scale (> 1; e.g. 4): the pipeline's true_cfg_scale "
                        "with a negative prompt, two transformer calls per step (default: off)")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="the negative prompt of --true-cfg (default: the empty prompt)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastcache-rt", description="Feature caching for diffusion transformers: benchmark and generate.")
    sub = p.add_subparsers(dest="command", metavar="{bench,generate,calibrate,tune}")
    sub.required = True

    b = sub.add_parser("bench", help="run every method and the peers on the shipped model and print one table")
    b.add_argument("--quick", action="store_true", help="fewer prompts, settings and timing rounds (a few minutes)")
    b.add_argument("--out", default="fastcache_rt_bench", help="output folder (default: ./fastcache_rt_bench)")
    b.add_argument("--images", default=None, help="folder for bench_grid.png / bench_pareto.png (default: --out)")
    b.add_argument("--steps", type=_int("--steps"), default=50, help="denoising steps (default 50)")
    b.add_argument("--seeds", type=_int("--seeds"), nargs="+", default=None, help="noise seeds")
    b.add_argument("--classes", nargs="+", default=None, help="prompts (class names of the shipped model)")
    b.add_argument("--methods", nargs="+", default=None,
                   help="restrict to these methods: preset names, diffusers[-fbcache|-taylorseer|-magcache|-seacache], "
                        "cache-dit[-dbcache|-taylorseer|-spectrum] (-spectrum: DBCache with fastcache_rt's Spectrum "
                        "forecaster as its calibrator)")
    b.add_argument("--no-peers", action="store_true", help="leave out diffusers' hooks and cache-dit")
    b.add_argument("--policy", nargs="+", default=[], metavar="FILE",
                   help="also run these policy files (from fastcache-rt tune) as rows \"tuned\"")
    b.add_argument("--rounds", type=_positive("--rounds"), default=None, help="timing rounds (median over them)")
    b.add_argument("--model", default=None, help="a FLUX diffusers pipeline folder or hub id (default: shipped)")
    b.add_argument("--height", type=_positive("--height"), default=None)
    b.add_argument("--width", type=_positive("--width"), default=None)
    b.add_argument("--max-sequence-length", type=_positive("--max-sequence-length"), default=None,
                   help="text tokens per prompt (default: the shipped model's, or the pipeline's)")
    b.add_argument("--threads", type=_int("--threads"), default=1,
                   help="torch intra-op threads (default 1: on a shared machine, waiting threads make timings erratic)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _true_cfg_args(b)

    g = sub.add_parser("generate", help="generate one image with a caching policy on")
    g.add_argument("--model", default=None, help="diffusers pipeline folder or hub id (default: the shipped model)")
    g.add_argument("--policy", default="spectrum", help="preset name (default spectrum)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--steps", type=_int("--steps"), default=50)
    g.add_argument("--out", default="fastcache_rt.png", help="PNG file to write")
    g.add_argument("--seed", type=_int("--seed"), default=0)
    g.add_argument("--height", type=_positive("--height"), default=None)
    g.add_argument("--width", type=_positive("--width"), default=None)
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--max-sequence-length", type=_positive("--max-sequence-length"), default=None,
                   help="text tokens per prompt (default: the shipped model's, or the pipeline's)")
    g.add_argument("--num-frames", type=_positive("--num-frames"), default=None,
                   help="video pipelines: frames to generate (the PNG shows them side by side)")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...; default cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the policy's gate or forecaster, e.g. --set threshold=0.3 (repeatable)")

    c = sub.add_parser("calibrate", help="measure a model's signals over prompts and fit a profile (TeaCache "
                                         "polynomial, MagCache ratios, FBCache changes)")
    c.add_argument("--model", default=None, help="diffusers pipeline folder or hub id (default: the shipped model)")
    c.add_argument("--prompts", default=None, help="a text file, one prompt per line (default for the shipped model: "
                                                   "its classes)")
    c.add_argument("--steps", type=_int("--steps"), default=50)
    c.add_argument("--seeds", type=_int("--seeds"), nargs="+", default=[0], help="noise seeds (default 0)")
    c.add_argument("--out", required=True, help="the profile (.json) to write")
    c.add_argument("--plot", default=None, help="a PNG of the TeaCache fit (default: next to --out)")
    c.add_argument("--resume", action="store_true",
                   help="continue the profile in --out, or an interrupted one (<out>.partial): runs there are kept")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (it stays in place until the new profile is complete)")
    c.add_argument("--shard", default=None, metavar="I/N", help="only every N-th run from the I-th (0-based)")
    c.add_argument("--merge", nargs="+", default=None, metavar="PROFILE",
                   help="merge partial profiles (shards) into --out instead of running")
    _pipeline_args(c)

    t = sub.add_parser("tune", help="find the fastest policy meeting a quality target against the uncached output")
    t.add_argument("--model", default=None, help="diffusers pipeline folder or hub id (default: the shipped model)")
    what = t.add_mutually_exclusive_group(required=True)
    what.add_argument("--target-psnr", type=float, nargs="+", help="PSNR of the images in dB (one or more targets)")
    what.add_argument("--target-ssim", type=float, nargs="+", help="SSIM of the images")
    what.add_argument("--target-rel-l2", type=float, nargs="+", help="relative L2 of the final latents")
    t.add_argument("--prompts", default=None, help="search prompts, one per line (default for the shipped model: "
                                                   "its classes)")
    t.add_argument("--seeds", type=_int("--seeds"), nargs="+", default=[0], help="search seeds (default 0)")
    t.add_argument("--holdout-prompts", default=None, help="verification prompts (default: the search prompts)")
    t.add_argument("--holdout-seeds", type=_int("--holdout-seeds"), nargs="+", default=[1],
                   help="verification seeds (default 1)")
    t.add_argument("--steps", type=_int("--steps"), default=50)
    t.add_argument("--profile", default=None, help="a calibration profile of this model (adds its arms)")
    t.add_argument("--budget-minutes", type=float, default=None, help="stop searching after this long")
    t.add_argument("--quick", action="store_true", help="2 prompts and 20 steps unless given (a smoke run)")
    t.add_argument("--out", required=True, help="output folder: tune.json, tune.md, tune_front.png and one "
                                                "policy_<metric><target>.json per target met")
    _pipeline_args(t)
    _true_cfg_args(t)
    return p


def _pipeline_args(p) -> None:
    """What a pipeline call takes beside prompt and steps (calibrate and tune)."""
    p.add_argument("--height", type=_positive("--height"), default=None)
    p.add_argument("--width", type=_positive("--width"), default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--max-sequence-length", type=_positive("--max-sequence-length"), default=None)
    p.add_argument("--num-frames", type=_positive("--num-frames"), default=None, help="video pipelines: frames")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=_positive("--threads"), default=None, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------------
def parse_overrides(items) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--set: expected FIELD=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out[key] = value
    return out


def true_cfg_kwargs(a) -> dict:
    """The pipeline arguments of ``--true-cfg`` / ``--negative-prompt`` ({} when off); a negative prompt without
    true CFG is refused (it would be silently ignored)."""
    if a.true_cfg is None:
        if a.negative_prompt is not None:
            raise UsageError("--negative-prompt: only with --true-cfg SCALE (true classifier-free guidance)")
        return {}
    neg = DEFAULT_NEGATIVE_PROMPT if a.negative_prompt is None else a.negative_prompt
    return dict(true_cfg_scale=float(a.true_cfg), negative_prompt=neg)


def check_true_cfg(pipe, cfg: dict) -> None:
    """True CFG needs a pipeline that takes ``true_cfg_scale`` and ``negative_prompt`` (FluxPipeline does)."""
    if not cfg:
        return
    import inspect

    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        params = {}
    if not {"true_cfg_scale", "negative_prompt"} <= set(params):
        raise UsageError(f"--true-cfg: {type(pipe).__name__} has no true classifier-free guidance (true_cfg_scale=); "
                         f"its guidance is --guidance-scale")


def _check_steps(steps: int) -> None:
    if steps < 2:
        raise UsageError(f"--steps: must be >= 2, got {steps}")


def _is_local(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model) or model.count("/") != 1


def is_shipped(model: str | None) -> bool:
    return model in (None, "default")


def shipped_module():
    try:
        from fastcache_rt import models
    except ImportError as e:
        raise UsageError(f"--model: the shipped model is not available in this installation ({e})") from None
    return models


def sample_defaults(models) -> dict:
    kw = dict(models.SAMPLE_DEFAULTS)
    kw.pop("num_inference_steps", None)  # the command's --steps decides
    return kw


@contextlib.contextmanager
def _quiet_loading():
    """No loading progress bars (diffusers' components, transformers' weights): stderr keeps the generation's bar
    and, on bad input, the one error line."""
    from diffusers.utils import logging as dlog

    tlog = None
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as tlog
    dlog.disable_progress_bar()
    if tlog is not None:
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.enable_progress_bar()
        if tlog is not None:
            tlog.enable_progress_bar()


def load_pipeline(model: str | None, device: str = "cpu", dtype=None):
    """(pipeline, shipped module or None). The shipped model when ``model`` is None or "default"."""
    import torch

    dtype = dtype or torch.float32
    if is_shipped(model):
        models = shipped_module()
        try:
            with _quiet_loading():
                return models.load_default(device=device, dtype=dtype), models
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"--model: cannot load the shipped model: {e}") from None
    path = os.path.expanduser(model)
    if _is_local(model) and not os.path.isdir(path):
        raise UsageError(f"--model: no such pipeline folder: {model}")
    try:
        from diffusers import DiffusionPipeline
    except ImportError as e:
        raise UsageError(f"--model: diffusers is needed to load a pipeline ({e})") from None
    try:
        import torch as _torch

        # float32 is what from_pretrained loads by default; other dtypes are asked for while loading
        extra = {} if dtype == _torch.float32 else {"torch_dtype": dtype}
        with _quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(path if _is_local(model) else model, **extra)
    except Exception as e:  # noqa: BLE001 - from_pretrained raises many types (OSError, ValueError, HTTP errors)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model: cannot load {model!r}: {msg}") from None
    return pipe.to(device), None


def _check_out_file(path, suffix: str = ".png", option: str = "--out") -> Path:
    """A ``suffix`` file in an existing, writable folder (nothing is created before the file is written)."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise UsageError(f"{option}: must be a {suffix} file, got {str(path)!r}")
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder")
    try:
        from ._files import check_writable

        check_writable(path.parent if str(path.parent) else Path("."), must_exist=True, option=option)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return path


def check_size(pipe, kw: dict) -> None:
    """Height and width a multiple of the pipeline's spatial step: its VAE's downscale times the 2 x 2 token patch
    (FLUX packs latents in 2 x 2, SD3 / Wan patchify by 2). Below it the latent has no token and the pipeline
    fails deep inside; between multiples the pipeline silently rounds the size down. The guidance scale is a
    finite number."""
    g = kw.get("guidance_scale")
    if g is not None and not math.isfinite(g):
        raise UsageError(f"--guidance-scale: must be a finite number, got {g}")
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        return
    step = 2 * factor
    for name in ("height", "width"):
        v = kw.get(name)
        if v is not None and v < step:
            raise UsageError(f"--{name}: {v} is below this pipeline's smallest size {step}")
        if v is not None and v % step:
            raise UsageError(f"--{name}: {v} is not a multiple of {step} (this pipeline would round it down to "
                             f"{v - v % step}); pass a multiple")


def check_device(name: str):
    """A torch device this torch can use: ``torch.device`` parses it, its backend is available, the index exists."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"--device: {str(e).strip().splitlines()[0]}") from None
    if dev.type in ("cpu", "meta"):
        if dev.type == "meta":
            raise UsageError("--device: meta tensors hold no data; use cpu or an accelerator")
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise UsageError(f"--device: {name}: this torch ({torch.__version__}) has no usable {dev.type} device")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise UsageError(f"--device: {name}: only {count()} {dev.type} device(s)")
    return dev


# ---------------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------------
def _picture(result):
    """The first image of an image pipeline's result, or the first video's frames side by side."""
    images = getattr(result, "images", None)
    if images is not None:
        return images[0]
    frames = getattr(result, "frames", None)
    if frames is None:
        raise UsageError(f"--model: the pipeline returned {type(result).__name__} with neither images nor frames")
    from PIL import Image

    video = list(frames[0])
    strip = Image.new("RGB", (sum(f.width for f in video), max(f.height for f in video)))
    x = 0
    for f in video:
        strip.paste(f.convert("RGB"), (x, 0))
        x += f.width
    return strip


def cmd_generate(a) -> int:
    import torch

    import fastcache_rt
    from fastcache_rt.policy import resolve_policy

    _check_steps(a.steps)
    check_device(a.device)
    overrides = parse_overrides(a.overrides)
    try:  # the policy and its fields before any loading
        resolve_policy(a.policy, **overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    out = _check_out_file(Path(a.out))
    kw = {}
    if is_shipped(a.model):  # the prompt before loading
        models = shipped_module()
        try:
            models.check_prompt(a.prompt)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--prompt: {e}") from None
        kw.update(sample_defaults(models))
    dtype = getattr(torch, a.dtype)
    pipe, _ = load_pipeline(a.model, a.device, dtype)
    kw = call_kwargs(a, pipe, kw)
    try:
        fastcache_rt.enable(pipe, a.policy, **overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        try:
            result = pipe(prompt=a.prompt, num_inference_steps=a.steps, generator=gen, output_type="pil", **kw)
        except ValueError as e:  # the pipeline's own input checks (sizes, sequence length)
            raise UsageError(str(e).strip().splitlines()[0]) from None
    seconds = time.perf_counter() - t0
    st = fastcache_rt.stats(pipe)
    fastcache_rt.disable(pipe)
    image = _picture(result)
    import io

    from ._files import write_atomic

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(out, buf.getvalue())
    frames = getattr(result, "frames", None)
    what = f", {len(frames[0])} frames side by side" if frames is not None else ""
    print(f"wrote {out} ({image.width}x{image.height}{what})")
    print(f"policy {st['policy']}: NFE {len(st['computed'])}/{st['num_steps']} (cached {len(st['cached'])}), "
          f"{seconds:.2f} s, cache {st['cache_bytes'] / 2**20:.2f} MiB, controller "
          f"{1e3 * st['controller_seconds_per_call']:.2f} ms/step")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------------
def cmd_bench(a) -> int:
    from .bench import analysis as A
    from .bench import methods as M
    from .bench import report as R
    from .bench.harness import BenchError, Harness, Settings

    _check_steps(a.steps)
    if a.threads is not None:
        if a.threads < 1:
            raise UsageError(f"--threads: must be >= 1, got {a.threads}")
        import torch

        torch.set_num_threads(a.threads)
    mode = QUICK if a.quick else FULL
    cfg = true_cfg_kwargs(a)
    try:
        ours, peers = M.select_methods(a.methods)
    except ValueError as e:
        raise UsageError(f"--methods: {e}") from None
    tuned = []
    for path in a.policy:
        try:
            tuned.append(M.policy_file(path))
        except ValueError as e:
            raise UsageError(f"--policy: {e}") from None
    if a.no_peers:
        peers = set()
    try:
        out = R.check_writable(Path(a.out))
        images_dir = R.check_writable(Path(a.images)) if a.images else out
    except ValueError as e:
        raise UsageError(str(e)) from None

    def warn(msg):
        print(f"fastcache-rt: note: {msg}", file=sys.stderr)

    kw = {}
    if is_shipped(a.model):  # the prompts before loading
        models = shipped_module()
        classes = list(a.classes) if a.classes else list(models.CLASSES)[: mode["classes"]]
        for c in classes:
            try:
                models.check_prompt(c)
            except (ValueError, TypeError) as e:
                raise UsageError(f"--classes: {e}") from None
        kw.update(sample_defaults(models))
    else:
        if not a.classes:
            raise UsageError("--classes: prompts are required with --model")
        classes = list(a.classes)
        kw.update(height=64, width=64, guidance_scale=1.0)
    pipe, _ = load_pipeline(a.model)
    kw = call_kwargs(a, pipe, kw)
    height, width = kw.pop("height"), kw.pop("width")
    from diffusers import FluxPipeline

    if not isinstance(pipe, FluxPipeline):
        raise UsageError(f"--model: the benchmark runs FLUX pipelines, got {type(pipe).__name__}")
    check_true_cfg(pipe, cfg)
    settings = Settings(prompts=classes, seeds=list(a.seeds or mode["seeds"]), steps=a.steps, height=height,
                        width=width, call_kwargs=kw, rounds=a.rounds or mode["rounds"],
                        uncached_every=mode["uncached_every"], true_cfg_scale=cfg.get("true_cfg_scale"),
                        negative_prompt=cfg.get("negative_prompt", DEFAULT_NEGATIVE_PROMPT))
    configs = M.our_configs(a.steps, a.quick, ours) + tuned + M.peer_configs(peers, a.quick, warn)
    if not configs:
        raise UsageError("--methods: nothing left to run")
    print(f"fastcache-rt bench: {len(configs)} configurations, {len(settings.batch)} images per call "
          f"({len(classes)} prompts x {len(settings.seeds)} seeds), {A.setting_line(settings.describe())}, "
          f"{height}x{width}, {settings.rounds} round(s)", flush=True)
    h = Harness(pipe, settings, progress=not a.no_progress)
    try:
        res = h.run(configs)
    except BenchError as e:
        raise UsageError(str(e)) from None
    finally:
        h.close()
    an = A.analyse(res.rows, res.meta)
    md = A.markdown(an, res.meta)
    print()
    print(R.format_table(res.rows))
    print()
    print(md)
    written = R.write_outputs(out, res.rows, an, md, res.meta, res.images,
                              grid_path=images_dir / "bench_grid.png", pareto_path=images_dir / "bench_pareto.png",
                              tolerance_path=images_dir / "bench_tolerance.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# calibrate and tune
# ---------------------------------------------------------------------------------------------------------------------
def read_prompts(path: str | None, option: str, shipped) -> list[str]:
    """Prompts from a text file (one per line; blank lines and lines starting with # skipped), else the shipped
    model's classes; for the shipped model each must be one of its classes."""
    if path is None:
        if shipped is None:
            raise UsageError(f"{option}: a prompts file is required with --model")
        return list(shipped.CLASSES)
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{option}: cannot read {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise UsageError(f"{option}: {path} has no prompts")
    if shipped is not None:
        for q in prompts:
            try:
                shipped.check_prompt(q)
            except (ValueError, TypeError) as e:
                raise UsageError(f"{option}: {e}") from None
    return prompts


def _seeds(seeds, option: str) -> list[int]:
    for s in seeds:
        if s < 0:
            raise UsageError(f"{option}: seeds are >= 0, got {s}")
    return list(dict.fromkeys(seeds))


def _prepare(a):
    """Check the common arguments, load the pipeline: (pipe, call kwargs, shipped module or None)."""
    import torch

    _check_steps(a.steps)
    check_device(a.device)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    shipped = shipped_module() if is_shipped(a.model) else None
    return shipped


CALL_OPTIONS = ("height", "width", "guidance_scale", "max_sequence_length", "num_frames")


def call_kwargs(a, pipe, base: dict) -> dict:
    """The pipeline call's arguments, assembled in one place for every command: ``base`` (the shipped model's
    sampling defaults, or a command's own) with the call options given on the command line (those the command
    has) on top, checked against the pipeline's sizes."""
    kw = dict(base)
    for name in CALL_OPTIONS:
        v = getattr(a, name, None)
        if v is not None:
            kw[name] = v
    check_size(pipe, kw)
    return kw


def _load_for(a, shipped):
    import torch

    pipe, _ = load_pipeline(a.model, a.device, getattr(torch, a.dtype))
    kw = call_kwargs(a, pipe, sample_defaults(shipped) if shipped is not None else {})
    try:
        import fastcache_rt.families as F
        from fastcache_rt._targets import split as _split

        for m in _split(pipe)[1].values():
            F.family_for(m)
    except TypeError as e:
        raise UsageError(f"--model: {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)  # the command's own bar counts the runs
    return pipe, kw


def _shard(text: str | None):
    if text is None:
        return None
    i, sep, n = text.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        raise UsageError(f"--shard: expected I/N, got {text!r}") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard: expected I/N with 0 <= I < N, got {text!r}")
    return i, n


def cmd_calibrate(a) -> int:
    from . import calibration as C
    from ._files import write_atomic
    from .policy import FLUX_TEACACHE_COEFFS

    out = _check_out_file(a.out, ".json")
    # every output path is checked before the first generation
    plot = _check_out_file(Path(a.plot) if a.plot else out.with_name(out.stem + "_fit.png"), ".png", "--plot")
    if out.exists() and not (a.resume or a.overwrite):
        raise UsageError(f"--out: {out} exists; add --resume to continue it or --overwrite to replace it once the "
                         f"new profile is complete")
    if a.merge:
        try:
            profile = C.merge_profiles(a.merge)
        except C.ProfileError as e:
            raise UsageError(f"--merge: {e}") from None
    else:
        for source in (C.partial_path(out), out) if a.resume else ():
            if source.exists():
                try:
                    C.load_profile(source)
                except C.ProfileError as e:
                    raise UsageError(f"--resume: {e}") from None
        shard = _shard(a.shard)
        shipped = _prepare(a)
        prompts = read_prompts(a.prompts, "--prompts", shipped)
        seeds = _seeds(a.seeds, "--seeds")
        pipe, kw = _load_for(a, shipped)
        try:
            profile = C.calibrate(pipe, prompts, steps=a.steps, seeds=seeds, call_kwargs=kw, out=out, resume=a.resume,
                                  overwrite=a.overwrite, shard=shard, progress=not a.no_progress)
        except C.ProfileError as e:
            raise UsageError(str(e)) from None
    C.save_profile(profile, out)
    written = [out]
    if any("teacache" in f for f in profile["fit"].values()):
        write_atomic(plot, C.fit_plot_png(profile, {"FLUX.1 coefficients (TeaCache)": FLUX_TEACACHE_COEFFS}))
        written.append(plot)
    print(f"calibrated {len(profile['runs'])} runs ({profile['prompts']} prompts x {len(profile['seeds'])} seeds, "
          f"{profile['steps']} steps)")
    for name, fit in profile["fit"].items():
        tc = fit.get("teacache")
        if tc:
            print(f"{name}: TeaCache coeffs [{', '.join(f'{c:.6g}' for c in tc['coeffs'])}], R^2 {tc['r2']:.3f} over "
                  f"{tc['points']} steps")
        if "magcache" in fit:
            print(f"{name}: MagCache ratios over {len(fit['magcache']['ratios'])} steps")
    print("wrote " + ", ".join(map(str, written)))
    return 0


def cmd_tune(a) -> int:
    from . import tuning as T
    from ._files import check_writable, json_bytes, write_atomic
    from .policy import save_policy

    metric, targets = next((m, v) for m, v in (("psnr", a.target_psnr), ("ssim", a.target_ssim),
                                               ("rel_l2", a.target_rel_l2)) if v is not None)
    try:
        out = check_writable(Path(a.out))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.budget_minutes is not None and not a.budget_minutes > 0:
        raise UsageError(f"--budget-minutes: must be > 0, got {a.budget_minutes}")
    cfg = true_cfg_kwargs(a)
    if a.quick and a.steps == 50:
        a.steps = 20
    profile = None
    if a.profile is not None:
        from .profiles import ProfileError, load_profile

        try:
            profile = load_profile(a.profile)
        except ProfileError as e:
            raise UsageError(f"--profile: {e}") from None
    shipped = _prepare(a)
    prompts = read_prompts(a.prompts, "--prompts", shipped)
    if a.quick and a.prompts is None:
        prompts = prompts[:2]
    holdout = read_prompts(a.holdout_prompts, "--holdout-prompts", shipped) if a.holdout_prompts else prompts
    seeds = _seeds(a.seeds, "--seeds")
    hseeds = _seeds(a.holdout_seeds, "--holdout-seeds")
    try:  # the targets before loading
        T.check_targets(metric, targets)
    except ValueError as e:
        raise UsageError(f"--target-{metric.replace('_', '-')}: {e}") from None
    pipe, kw = _load_for(a, shipped)
    check_true_cfg(pipe, cfg)
    kw.update(cfg)
    try:
        res = T.tune(pipe, targets, metric=metric, prompts=prompts, seeds=seeds, holdout_prompts=holdout,
                     holdout_seeds=hseeds, steps=a.steps, call_kwargs=kw, profile=profile,
                     budget_minutes=a.budget_minutes, progress=not a.no_progress)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for e in res["targets"]:
        if e.get("met"):
            path = out / f"policy_{metric}{e['target']:g}.json"
            save_policy(e["policy"], path)
            e["policy_file"] = str(path)
            written.append(path)
    data = dict(res)
    data["targets"] = [{k: v for k, v in e.items() if k != "policy"} for e in res["targets"]]
    write_atomic(out / "tune.json", json_bytes(data))
    md = T.markdown(res)
    write_atomic(out / "tune.md", md.encode())
    write_atomic(out / "tune_front.png", T.front_png(res))
    written += [out / "tune.json", out / "tune.md", out / "tune_front.png"]
    print()
    print(md)
    print("wrote " + ", ".join(map(str, written)))
    return 0


def main(argv=None) -> int:
    # transformers logs notes at import (e.g. that torchvision is missing for image processors the pipelines never
    # use here); stderr keeps the generation's progress and, on bad input, the one error line. A user's own
    # TRANSFORMERS_VERBOSITY wins; transformers reads it when first imported.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        with contextlib.suppress(ImportError, AttributeError):
            sys.modules["transformers"].utils.logging.set_verbosity_error()
    parser = build_parser()
    commands = {"bench": cmd_bench, "generate": cmd_generate, "calibrate": cmd_calibrate, "tune": cmd_tune}
    try:
        a = parser.parse_args(argv)
        code = commands[a.command](a)
    except UsageError as e:
        print(f"fastcache-rt: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        print("fastcache-rt: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    return code


if __name__ == "__main__":
    sys.exit(main())
