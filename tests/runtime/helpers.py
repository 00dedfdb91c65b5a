"""Test-only helpers of the runtime tests (the tiny FLUX model and its loop: ``fastcache_rt.testing.tiny_flux``):
host-read counting, and the pipelines of two families with what the every-preset pipeline tests need of them."""

import dataclasses
from collections.abc import Callable

import torch

import fastcache_rt
from fastcache_rt.testing.presets import COMPILED_PRESETS, tiny_overrides


def count_host_reads(monkeypatch) -> list:
    """From now on (until ``monkeypatch.undo()``), every Tensor method that reads data back to the host and every
    ``torch.tensor`` / ``torch.as_tensor`` upload appends its name to the returned list."""
    reads: list = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "numpy", "cpu", "__index__"):
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, _name=name, **k):
            reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for name in ("tensor", "as_tensor"):
        orig = getattr(torch, name)

        def uploading(*a, _orig=orig, _name=name, **k):
            reads.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(torch, name, uploading)
    return reads


# ------------------------------------------------------------------------------------------------------------------
# Pipelines of two families for the tests that run every preset through a real diffusers pipeline (sharing, copies,
# non-finite steps): the shipped model (a FluxPipeline) and the tiny SD3 pipeline (CFG batched as one call of
# batch 2), each with the per-preset settings that make every preset cache some steps on it at STEPS.
# ------------------------------------------------------------------------------------------------------------------
PRESET_NAMES = [p for p in sorted(fastcache_rt.PRESETS) if p != "none"]
STEPS = (6, 8)  # two step counts at which every preset caches (and computes) some steps on both models
# the compiled variants of the tests run these presets (every gate state class, probe and forecaster between them)
COMPILED_PRESET_NAMES = [p for p in PRESET_NAMES if p in COMPILED_PRESETS]


@dataclasses.dataclass(frozen=True)
class PipelineCase:
    name: str
    build: Callable  # () -> a new pipeline (progress bar off)
    call: Callable  # (pipe, steps, **pipeline kwargs) -> the final latents
    overrides: dict  # preset -> enable() keywords for this model
    # (module path, batch, token, channel): the last block's sub-module whose output feeds the cached site, and
    # the element of it test_nonfinite_pipeline.py poisons (an image token; one sample of a CFG batch)
    poison: tuple

    def enable(self, pipe, preset: str):
        return fastcache_rt.enable(pipe, preset, **self.overrides.get(preset, {}))


def _flux_build():
    from fastcache_rt.models import load_default

    return load_default()


def _flux_call(pipe, steps, **kw):
    from fastcache_rt.models import SAMPLE_DEFAULTS

    args = dict(SAMPLE_DEFAULTS, num_inference_steps=steps)
    with torch.no_grad():
        return pipe("red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **args,
                    **kw).images


def _sd3_build():
    from fastcache_rt.testing.pipelines import tiny_sd3_embeds_pipeline

    pipe = tiny_sd3_embeds_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3_call(pipe, steps, **kw):
    g = torch.Generator().manual_seed(100)
    pe, ne = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    pp, npp = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
    with torch.no_grad():
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
                    negative_pooled_prompt_embeds=npp, guidance_scale=4.0, height=16, width=16,
                    num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                    **kw).images


# Per-preset settings: the table (fastcache_rt.testing.presets) for 8 steps (MagCache's 8 ratios serve both step
# counts), FORA, TaylorSeer and FreqCa at their presets' intervals (which cache at 6 and 8 steps here), and:
CASES = {
    # FreqCa: FLUX's token grid comes from img_ids only in eager mode; given here for both modes (32x32 images:
    # 16x16 tokens). FBCache: the preset's 0.05 computes every step of the shipped model; so does the error-
    # controlled gate's tolerance at 6 and 8 steps (its forecasts' relative error is larger here). The signal
    # gates with FLUX's published TeaCache coefficients at their presets' thresholds.
    "flux": PipelineCase("flux", _flux_build, _flux_call,
                         tiny_overrides(8, fora=None, taylorseer=None, freqca={"grid": (16, 16)}, teacache=None,
                                        spectralcache=None, adaptive={"tol": 5.0, "warmup": 2}),
                         ("single_transformer_blocks.5.proj_out", 0, -1, 0)),
    # no published TeaCache coefficients for SD3: the identity polynomial with a threshold that caches here
    "sd3": PipelineCase("sd3", _sd3_build, _sd3_call,
                        tiny_overrides(8, fora=None, taylorseer=None, freqca=None,
                                       teacache={"threshold": 0.3, "coeffs": (1.0, 0.0)},
                                       spectralcache={"threshold": 0.3, "coeffs": (1.0, 0.0)}),
                        ("transformer_blocks.1.ff", 0, -1, 0)),
}


class References:
    """Reference outputs, each made once on a pipeline built for it: the uncached pipeline's, and a fresh pipeline's
    with a preset enabled (output and stats of its first generation)."""

    def __init__(self):
        self._plain: dict = {}
        self._cached: dict = {}

    def plain(self, case: PipelineCase, steps: int) -> torch.Tensor:
        key = (case.name, steps)
        if key not in self._plain:
            self._plain[key] = case.call(case.build(), steps)
        return self._plain[key]

    def cached(self, case: PipelineCase, preset: str, steps: int) -> tuple[torch.Tensor, dict]:
        key = (case.name, preset, steps)
        if key not in self._cached:
            pipe = case.build()
            case.enable(pipe, preset)
            out = case.call(pipe, steps)
            st = fastcache_rt.stats(pipe)
            fastcache_rt.disable(pipe)
            assert st["nonfinite"] == 0 and st["num_steps"] == steps and st["policy"] == preset, st
            assert 0 < len(st["computed"]) < steps, (case.name, preset, steps, st["computed"])  # it caches
            assert not torch.equal(out, self.plain(case, steps)), (case.name, preset, steps)
            self._cached[key] = (out, st)
        return self._cached[key]


def check_cached_generation(case: PipelineCase, refs: References, pipe, preset: str, steps: int, out) -> None:
    """``out`` (the generation ``pipe`` just ran) is a fresh pipeline's with ``preset`` at ``steps``: the same output
    bitwise, the same decisions; and ``pipe``'s stats report it."""
    ref, ref_st = refs.cached(case, preset, steps)
    st = fastcache_rt.stats(pipe)
    assert torch.equal(out, ref), f"{preset} at {steps} steps is not a fresh {preset} pipeline's output"
    assert (st["policy"], st["num_steps"]) == (preset, steps)
    assert st["computed"] == ref_st["computed"] and st["cached"] == ref_st["cached"], (st["computed"], ref_st)
    assert st["nonfinite"] == 0


def no_hooks_left(transformer) -> None:
    """fastcache_rt's hooks and handle are gone from the transformer."""
    reg = transformer.__dict__.get("_diffusers_hook")
    assert reg is None or not reg.hooks, list(reg.hooks)
    assert "_fastcache_rt" not in transformer.__dict__


def compile_transformer(pipe) -> None:
    """torch.compile(fullgraph=True) on AOTAutograd without code generation (what is checked is tracing); the graph
    count (``compiled_graphs``) starts from 0."""
    from torch._dynamo.utils import counters

    pipe.transformer.compile(fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()


def compiled_graphs() -> int:
    """Graphs compiled since ``compile_transformer``."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def uncompile_transformer(pipe) -> None:
    pipe.transformer._compiled_call_impl = None
    torch._dynamo.reset()


def one_thread_module():
    """For an autouse module fixture: the models here gain nothing from intra-op threads, and on a shared 2-core
    machine their waiting costs far more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
