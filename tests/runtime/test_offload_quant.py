"""Caching composed with what users run big models with: diffusers' group offloading (block and leaf level), diffusers'
layerwise casting (bf16 storage, fp32 compute) and an int8 weight-only quantized transformer (torchao's ``quantize_``
and diffusers' own quantizer path), on the shipped model (a FluxPipeline) and two tiny families (SD3, image;
HunyuanVideo, video), with a schedule preset (Spectrum) and two signal gates (FBCache, TeaCache), caching enabled
before and after the other feature.

Each eager cell checks: the decisions and the output are bitwise those of the same caching on a reference with the
same numerics (the plain model for offloading, onload = offload = CPU; the plain model with the cast layers'
weights rounded to bf16 for layerwise casting; the quantized model cached in the other order for int8), Spectrum's
schedule decides as on the plain model whatever the numerics; ``stats()["cache_bytes"]`` is the plain model's (the
forecaster state lives in the hidden states' compute dtype, fp32, not in the weights' storage dtype: checked on the
stream states' tensors); ``fastcache_rt.disable`` leaves the model bitwise as it runs with only the other feature.

Compiled (``fullgraph=True``, aot_eager): group offloading and layerwise casting do not trace with or without caching
(their own hooks break the graph: the documented errors are asserted); an int8 transformer compiles alone but not
with caching (``torch.cond`` over blocks whose weights are tensor subclasses), and does with torchao's
``unwrap_tensor_subclass`` first. Known defect pinned below: diffusers' ``_maybe_remove_and_reapply_group_offloading``
(LoRA load / unload with group offloading on) bypasses fastcache_rt's hooks when they were registered after the
offloading hooks."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from diffusers.hooks import apply_group_offloading, apply_layerwise_casting

import fastcache_rt
from fastcache_rt.testing.families import TINY, denoise
from fastcache_rt.testing.presets import tiny_overrides
from tests.runtime.helpers import CASES, _flux_call, one_thread_module

S = 8  # steps: every preset below caches some steps and computes others on the three models at 8 steps
PRESETS = ("spectrum", "fbcache", "teacache")
SCHEDULES = ("spectrum",)  # gates deciding from the step index alone: the numerics cannot change their decisions
CPU = torch.device("cpu")
SUBJECTS = ("flux", "sd3", "hunyuanvideo")
# the shipped pipeline's cells of the matrices are an end-to-end pipeline matrix (the slow marker's definition)
SUBJECT_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n == "flux" else n for n in SUBJECTS]
# the tiny families: the table for 8 steps; TeaCache with the identity polynomial (a threshold that caches here)
TINY_OV = tiny_overrides(S, teacache={"threshold": 0.3, "coeffs": (1.0, 0.0)})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread_module()


# ------------------------------------------------------------------------------------------------------------------
# the other features
# ------------------------------------------------------------------------------------------------------------------
def _offload(kind: str, tr) -> None:
    kw = {"num_blocks_per_group": 1} if kind == "block_level" else {}
    apply_group_offloading(tr, onload_device=CPU, offload_device=CPU, offload_type=kind, **kw)


def _cast(tr) -> None:
    apply_layerwise_casting(tr, storage_dtype=torch.bfloat16, compute_dtype=torch.float32)


def _int8(tr) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(tr, Int8WeightOnlyConfig())


FEATURES = {
    "offload_block": functools.partial(_offload, "block_level"),
    "offload_leaf": functools.partial(_offload, "leaf_level"),
    "layerwise_casting": _cast,
    "torchao_int8": _int8,
}
OFFLOAD = ("offload_block", "offload_leaf")


def _needs(feature: str) -> None:
    if feature == "torchao_int8":
        pytest.importorskip("torchao", reason="torchao (the test extra) is not installed")


def _hook_names(tr) -> set[str]:
    return {n for m in tr.modules() if m.__dict__.get("_diffusers_hook") is not None
            for n in m._diffusers_hook.hooks}


def _assert_feature_on(tr, feature: str) -> None:
    """The other feature is in place (and fastcache_rt did not undo it)."""
    params = list(tr.parameters())
    if feature in OFFLOAD:
        assert "group_offloading" in _hook_names(tr)
    elif feature == "layerwise_casting":
        assert "layerwise_casting" in _hook_names(tr)
        assert any(p.dtype == torch.bfloat16 for p in params)  # weights stored in bf16 between calls
    else:
        assert any(type(p).__name__ == "Int8Tensor" for p in params)


def _no_caching_left(tr) -> None:
    """fastcache_rt's hooks and handle are gone (the other feature's hooks stay)."""
    assert not _hook_names(tr) & {"fastcache_rt", "fastcache_rt_block"}, _hook_names(tr)
    assert "_fastcache_rt" not in tr.__dict__ and "_fastcache_rt_install" not in tr.__dict__


def _decisions(st: dict) -> list:
    return [(p["branch"], p["shape"], p["computed"], p["cached"]) for p in st["per_stream"]]


def _assert_state_in_compute_dtype(streams) -> None:
    """Every stream's forecaster state is on the hidden states' device, its floating tensors in their compute dtype
    (fp32): never the weights' storage dtype (bf16 under layerwise casting) or an int8 weight dtype."""
    assert streams
    for st in streams:
        assert st.spec.dtype == torch.float32 and st.spec.device == CPU
        tensors = [t for t in st.fc.tensors() if t is not None]
        floats = [t for t in tensors if t.is_floating_point()]
        assert floats, type(st.fc).__name__
        assert all(t.device == CPU for t in tensors)
        assert {t.dtype for t in floats} == {torch.float32}, {t.dtype for t in floats}


# ------------------------------------------------------------------------------------------------------------------
# the models: the shipped FLUX pipeline (its transformer swapped for a fresh copy per case) and tiny transformers
# ------------------------------------------------------------------------------------------------------------------
class Flux:
    """The shipped pipeline, built once; each case gets a fresh copy of its untouched transformer."""

    def __init__(self):
        from fastcache_rt.models import load_default

        self.pipe = load_default()
        self.base = copy.deepcopy(self.pipe.transformer)

    def transformer(self):
        return copy.deepcopy(self.base)

    def target(self, tr):
        self.pipe.transformer = tr
        return self.pipe

    def run(self, target):
        return _flux_call(target, S)

    def enable(self, target, preset):
        return CASES["flux"].enable(target, preset)


class Tiny:
    def __init__(self, name: str):
        self.name = name
        self.base = TINY[name].build()

    def transformer(self):
        return copy.deepcopy(self.base)

    def target(self, tr):
        return tr

    def run(self, target):
        return denoise(target, self.name, S)

    def enable(self, target, preset):
        return fastcache_rt.enable(target, preset, num_steps=S, **TINY_OV.get(preset, {}))


def _rounded_twin(subj, tr_cast):
    """The plain model with the weights of the layers that layerwise casting casts rounded to bf16 (kept in fp32):
    the casting model's numerics exactly (a bf16 weight cast back to fp32 is the rounded fp32 weight)."""
    twin = subj.transformer()
    mods = dict(twin.named_modules())
    n = 0
    for name, mod in tr_cast.named_modules():
        reg = mod.__dict__.get("_diffusers_hook")
        if reg is not None and "layerwise_casting" in reg.hooks:
            for p in mods[name].parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16).to(torch.float32)
                n += 1
    assert n > 0
    return twin


class Refs:
    """Reference runs, each made once (module scope)."""

    def __init__(self):
        self._subjects: dict = {}
        self._memo: dict = {}

    def subject(self, name: str):
        if name not in self._subjects:
            self._subjects[name] = Flux() if name == "flux" else Tiny(name)
        return self._subjects[name]

    def _once(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def plain(self, name):
        subj = self.subject(name)
        return self._once(("plain", name), lambda: subj.run(subj.target(subj.transformer())))

    def _cached_run(self, name, tr, preset):
        subj = self.subject(name)
        target = subj.target(tr)
        subj.enable(target, preset)
        try:
            out = subj.run(target)
            st = fastcache_rt.stats(target)
        finally:
            fastcache_rt.disable(target)
        assert st["nonfinite"] == 0 and st["num_steps"] == S
        assert all(0 < len(p["computed"]) < S for p in st["per_stream"]), (name, preset, _decisions(st))
        return out, st

    def cached(self, name, preset):
        """Caching on the plain fp32 model."""
        subj = self.subject(name)
        return self._once(("cached", name, preset), lambda: self._cached_run(name, subj.transformer(), preset))

    def feature_only(self, name, feature):
        """The model with only the other feature applied."""

        def make():
            subj = self.subject(name)
            tr = subj.transformer()
            FEATURES[feature](tr)
            out = subj.run(subj.target(tr))
            if feature in OFFLOAD:  # onload = offload = CPU: offloading changes nothing of the numerics
                assert torch.equal(out, self.plain(name))
            else:
                assert not torch.equal(out, self.plain(name))  # (the feature does change the numerics)
            return out

        return self._once(("feature", name, feature), make)

    def same_numerics(self, name, feature, preset):
        """The same caching on a reference with the other feature's numerics: the plain model for offloading, the
        bf16-rounded twin for layerwise casting, the quantized model (quantized, then caching enabled) for int8."""
        subj = self.subject(name)
        if feature in OFFLOAD:
            return self.cached(name, preset)
        if feature == "layerwise_casting":
            def make():
                cast = subj.transformer()
                _cast(cast)
                return self._cached_run(name, _rounded_twin(subj, cast), preset)

            return self._once(("twin", name, preset), make)

        def make_int8():
            tr = subj.transformer()
            _int8(tr)
            return self._cached_run(name, tr, preset)

        return self._once(("int8", name, preset), make_int8)


@pytest.fixture(scope="module")
def refs():
    r = Refs()
    yield r
    if "flux" in r._subjects:  # the shared pipeline gets its own transformer back
        r._subjects["flux"].pipe.transformer = r._subjects["flux"].base


# ------------------------------------------------------------------------------------------------------------------
# eager: the matrix
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["enable_first", "enable_last"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("name", SUBJECT_PARAMS)
def test_eager(refs, name, feature, preset, order):
    """Caching with the other feature: the same-numerics reference's decisions and output bitwise, the plain
    model's cache memory, state in fp32 on the CPU; disable gives back the model with only the other feature."""
    _needs(feature)
    subj = refs.subject(name)
    ref_out, ref_st = refs.same_numerics(name, feature, preset)
    fp32_out, fp32_st = refs.cached(name, preset)
    alone = refs.feature_only(name, feature)

    tr = subj.transformer()
    target = subj.target(tr)
    if order == "enable_last":
        FEATURES[feature](tr)
    handle = subj.enable(target, preset)
    try:
        if order == "enable_first":
            FEATURES[feature](tr)
        _assert_feature_on(tr, feature)
        out = subj.run(target)
        st = fastcache_rt.stats(target)
        streams = list(handle.controller.gens.streams.values())
    finally:
        fastcache_rt.disable(target)

    # decisions and output: those of the same caching on the same numerics
    assert _decisions(st) == _decisions(ref_st), (_decisions(st), _decisions(ref_st))
    assert torch.equal(out, ref_out)
    if preset in SCHEDULES or feature in OFFLOAD:  # numerics-independent (or the same numerics): the fp32 model's
        assert _decisions(st) == _decisions(fp32_st)
    if feature in OFFLOAD:  # onload = offload = CPU: bitwise caching without offloading
        assert torch.equal(out, fp32_out)
    assert st["nonfinite"] == 0

    # cache memory: the forecaster state is sized by the fp32 hidden states, whatever the weights' storage
    assert st["cache_bytes"] == fp32_st["cache_bytes"] == sum(s.cache_bytes() for s in streams) > 0
    _assert_state_in_compute_dtype(streams)

    # disable: the model with only the other feature, bitwise
    _no_caching_left(tr)
    _assert_feature_on(tr, feature)
    assert torch.equal(subj.run(target), alone)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("name", SUBJECT_PARAMS)
def test_every_step_policy_is_the_feature_alone(refs, name, feature):
    """The every-step policy ("none") adds nothing to the other feature: bitwise the model with only that feature."""
    _needs(feature)
    subj = refs.subject(name)
    alone = refs.feature_only(name, feature)
    tr = subj.transformer()
    FEATURES[feature](tr)
    target = subj.target(tr)
    if name == "flux":
        fastcache_rt.enable(target, "none")
    else:
        fastcache_rt.enable(target, "none", num_steps=S)
    try:
        out = subj.run(target)
        assert fastcache_rt.stats(target)["computed"] == list(range(S))
    finally:
        fastcache_rt.disable(target)
    assert torch.equal(out, alone)


# ------------------------------------------------------------------------------------------------------------------
# group offloading specifics
# ------------------------------------------------------------------------------------------------------------------
ONLOAD_DEFECT = (
    "known defect: with caching enabled first, diffusers' offloading hook is registered outside fastcache_rt's block "
    "hook; the model's own loop calls every block, and the offloading hook onloads (and offloads) block j before "
    "fastcache_rt's hook hands the input on without running it: every block is onloaded on every step, cached or "
    "not, and on a computed step the blocks after the first twice (once run from the first block's hook, once in "
    "the model's loop). Measured on the shipped model, 8 steps: Spectrum 108 onloads against 72 without caching "
    "(56 with offloading applied first); FBCache 90 (37)")


@pytest.mark.parametrize("order", ["enable_first", "enable_last"])
@pytest.mark.parametrize("preset", ["spectrum", "fbcache"])
@pytest.mark.parametrize("kind", ["block_level", "leaf_level"])
def test_offloading_onloads_only_the_blocks_that_run(refs, monkeypatch, request, kind, preset, order):
    """Group offloading on the shipped model: a cached step onloads none of the groups inside the blocks it skips,
    a computed step each group once (fastcache_rt runs the blocks through their module calls, so the offloading
    hooks fire exactly for what runs): caching saves the transfers of the steps it skips."""
    if kind == "block_level" and order == "enable_first":
        request.applymarker(pytest.mark.xfail(strict=True, reason=ONLOAD_DEFECT))
    from diffusers.hooks.group_offloading import ModuleGroup

    moves: dict = {"on": 0, "off": 0}
    onload, offload = ModuleGroup.onload_, ModuleGroup.offload_

    def counting_on(self):
        moves["on"] += 1
        return onload(self)

    def counting_off(self):
        moves["off"] += 1
        return offload(self)

    monkeypatch.setattr(ModuleGroup, "onload_", counting_on)
    monkeypatch.setattr(ModuleGroup, "offload_", counting_off)
    subj = refs.subject("flux")
    tr = subj.transformer()
    target = subj.target(tr)
    _offload(kind, tr)
    moves.update(on=0, off=0)
    subj.run(target)
    per_generation = moves["on"]
    # the offloading groups inside each block (its onload leaders: the block itself, or its leaf layers)
    groups = [sum(1 for m in b.modules() if "group_offloading" in getattr(m.__dict__.get("_diffusers_hook"), "hooks", ()))
              for b in [*tr.transformer_blocks, *tr.single_transformer_blocks]]
    assert all(g >= 1 for g in groups) and per_generation == moves["off"] >= S * sum(groups)

    tr = subj.transformer()
    target = subj.target(tr)
    if order == "enable_last":
        _offload(kind, tr)
    subj.enable(target, preset)
    try:
        if order == "enable_first":
            _offload(kind, tr)
        moves.update(on=0, off=0)
        subj.run(target)
        cached = fastcache_rt.stats(target)["cached"]
    finally:
        fastcache_rt.disable(target)
    assert cached
    # a cached step skips the blocks after FBCache's probe block (all of them under Spectrum)
    skipped = sum(groups) - (groups[0] if preset == "fbcache" else 0)
    assert moves["on"] == moves["off"] == per_generation - len(cached) * skipped, (moves, per_generation, cached)


def test_streamed_offloading_needs_an_accelerator(refs):
    """``use_stream=True`` on the CPU: diffusers refuses before touching the model (with caching enabled or not);
    the cached model runs on, bitwise as before."""
    subj = refs.subject("sd3")
    ref_out, ref_st = refs.cached("sd3", "fbcache")
    tr = subj.transformer()
    with pytest.raises(ValueError, match="use_stream=False"):
        apply_group_offloading(tr, onload_device=CPU, offload_device=CPU, offload_type="block_level",
                               num_blocks_per_group=1, use_stream=True)
    subj.enable(tr, "fbcache")
    try:
        with pytest.raises(ValueError, match="use_stream=False"):
            apply_group_offloading(tr, onload_device=CPU, offload_device=CPU, offload_type="leaf_level",
                                   use_stream=True)
        assert "group_offloading" not in _hook_names(tr)
        out = subj.run(tr)
        assert _decisions(fastcache_rt.stats(tr)) == _decisions(ref_st)
    finally:
        fastcache_rt.disable(tr)
    assert torch.equal(out, ref_out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streamed group offloading (use_stream=True) needs an "
                    "accelerator with streams; diffusers refuses it on the CPU (test_streamed_offloading_needs_an_"
                    "accelerator)")
@pytest.mark.parametrize("kind", ["block_level", "leaf_level"])
def test_streamed_offloading_on_cuda(kind):
    """Onload to the GPU on a side stream, offload to the CPU: the same decisions as caching on the GPU without
    offloading, the output close (the prefetch changes no numerics, but the GPU's kernels may differ run to run)."""
    name, dev = "sd3", torch.device("cuda")
    base = TINY[name].build()
    kw = TINY_OV["fbcache"]

    def run(m):
        tiny = TINY[name]
        x = tiny.inputs(0, 1, 0)
        x = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
        with torch.no_grad():
            for s in range(S):
                out = m(**x, **{tiny.timestep_arg: tiny.timestep(1.0 - s / S, 1).to(dev)})[0]
                x[tiny.latent] = x[tiny.latent] - out / S
        return x[tiny.latent]

    ref_m = copy.deepcopy(base).to(dev)
    with fastcache_rt.cached(ref_m, "fbcache", num_steps=S, **kw):
        ref = run(ref_m)
        ref_st = fastcache_rt.stats(ref_m)
    m = copy.deepcopy(base)
    extra = {"num_blocks_per_group": 1} if kind == "block_level" else {}
    apply_group_offloading(m, onload_device=dev, offload_device=CPU, offload_type=kind, use_stream=True, **extra)
    with fastcache_rt.cached(m, "fbcache", num_steps=S, **kw):
        out = run(m)
        st = fastcache_rt.stats(m)
    assert _decisions(st) == _decisions(ref_st)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", ["enable_first", pytest.param("offload_first", marks=pytest.mark.xfail(
    strict=True, reason=(
        "known defect: with fastcache_rt's hooks registered after diffusers' offloading hooks, diffusers' "
        "HookRegistry.remove_hook('group_offloading') (called by _maybe_remove_and_reapply_group_offloading on LoRA "
        "load / unload) points the next hook's fn_ref.forward at the plain forward; fastcache_rt's hooks wrap with "
        "new_forward, which that replaces, so they are bypassed: the model runs uncached (stats: no steps)")))])
def test_offloading_reapplied_keeps_caching(refs, order):
    """diffusers re-applies group offloading when it changes the model in place (LoRA load / unload, fused
    projections: ``_maybe_remove_and_reapply_group_offloading``): caching survives it."""
    from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

    subj = refs.subject("sd3")
    ref_out, ref_st = refs.cached("sd3", "fbcache")
    tr = subj.transformer()
    steps = [lambda: subj.enable(tr, "fbcache"), lambda: FEATURES["offload_block"](tr)]
    for step in steps if order == "enable_first" else steps[::-1]:
        step()
    try:
        _maybe_remove_and_reapply_group_offloading(tr)
        out = subj.run(tr)
        st = fastcache_rt.stats(tr)
    finally:
        fastcache_rt.disable(tr)
    assert _decisions(st) == _decisions(ref_st)
    assert torch.equal(out, ref_out)
    assert "group_offloading" in _hook_names(tr)


# ------------------------------------------------------------------------------------------------------------------
# diffusers' own quantizer path
# ------------------------------------------------------------------------------------------------------------------
def test_diffusers_torchao_quantizer(refs):
    """The shipped pipeline loaded with diffusers' ``PipelineQuantizationConfig`` (torchao int8 weight-only on the
    transformer, fp32 elsewhere): bitwise the ``quantize_`` path's caching (same decisions, same output), fp32
    state, and disable restores the quantized model."""
    pytest.importorskip("torchao", reason="torchao (the test extra) is not installed")
    from diffusers import FluxPipeline, TorchAoConfig
    from diffusers.quantizers import PipelineQuantizationConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from fastcache_rt.models import DEFAULT_PATH

    ref_out, ref_st = refs.same_numerics("flux", "torchao_int8", "teacache")
    alone = refs.feature_only("flux", "torchao_int8")
    quant = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    pipe = FluxPipeline.from_pretrained(DEFAULT_PATH, quantization_config=quant, dtype=torch.float32,
                                        local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    _assert_feature_on(pipe.transformer, "torchao_int8")
    handle = CASES["flux"].enable(pipe, "teacache")
    try:
        out = _flux_call(pipe, S)
        st = fastcache_rt.stats(pipe)
        _assert_state_in_compute_dtype(list(handle.controller.gens.streams.values()))
    finally:
        fastcache_rt.disable(pipe)
    assert _decisions(st) == _decisions(ref_st)
    assert torch.equal(out, ref_out)
    assert torch.equal(_flux_call(pipe, S), alone)


def test_diffusers_quanto_quantizer(refs):
    """diffusers' (deprecated) optimum-quanto path, where optimum-quanto is installed (not in the test extra):
    int8 weights, eager caching with fp32 state; disable restores the quantized model."""
    pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (not in the test extra)")
    from diffusers import FluxTransformer2DModel, QuantoConfig

    from fastcache_rt.models import DEFAULT_PATH

    subj = refs.subject("flux")
    fp32_out, fp32_st = refs.cached("flux", "spectrum")
    tr = FluxTransformer2DModel.from_pretrained(DEFAULT_PATH, subfolder="transformer", local_files_only=True,
                                                quantization_config=QuantoConfig(weights_dtype="int8"))
    assert any(type(p).__name__ == "WeightQBytesTensor" for p in tr.parameters())
    target = subj.target(tr)
    alone = subj.run(target)
    handle = subj.enable(target, "spectrum")
    try:
        out = subj.run(target)
        st = fastcache_rt.stats(target)
        _assert_state_in_compute_dtype(list(handle.controller.gens.streams.values()))
    finally:
        fastcache_rt.disable(target)
    assert _decisions(st) == _decisions(fp32_st) and st["cache_bytes"] == fp32_st["cache_bytes"]
    assert not torch.equal(out, alone) and (out - fp32_out).norm() < 0.2 * fp32_out.norm()
    assert torch.equal(subj.run(target), alone)


# ------------------------------------------------------------------------------------------------------------------
# compiled (fullgraph, aot_eager: what is checked is tracing)
# ------------------------------------------------------------------------------------------------------------------
# the errors dynamo raises on the other feature's own hooks, with caching or without
NO_FULLGRAPH = {
    # ModuleGroup.onload_ / offload_ are wrapped in torch.compiler.disable
    "offload_block": r"(?s)torch\.compiler\.disable.*onload_",
    "offload_leaf": r"(?s)torch\.compiler\.disable.*onload_",
    # the casting hook's module.to(dtype) constructs nn.Parameter inside the graph
    "layerwise_casting": r"torch\.nn\.Parameter\(\)",
}


@pytest.mark.parametrize("feature", list(NO_FULLGRAPH))
def test_compiled_offloading_and_casting_do_not_trace(refs, feature):
    """Not supported compiled: diffusers' offloading and casting hooks break a fullgraph trace by themselves; with
    caching enabled the same error is raised (fastcache_rt adds no other)."""
    subj = refs.subject("flux")
    for cached in (False, True):
        tr = subj.transformer()
        target = subj.target(tr)
        FEATURES[feature](tr)
        if cached:
            subj.enable(target, "spectrum")
        tr.compile(fullgraph=True, backend="aot_eager")
        torch._dynamo.reset()
        try:
            with pytest.raises(torch._dynamo.exc.Unsupported, match=NO_FULLGRAPH[feature]):
                subj.run(target)
        finally:
            tr._compiled_call_impl = None
            torch._dynamo.reset()
            if cached:
                fastcache_rt.disable(target)


def _compiled_run(m, name):
    m.compile(fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    try:
        return denoise(m, name, S)
    finally:
        m._compiled_call_impl = None
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_int8_fails_under_caching(refs):
    """Not supported compiled as is: an int8 (torchao) transformer compiles alone, but caching's ``torch.cond``
    over the blocks lifts their weights (tensor subclasses) into the branch, which AOTAutograd cannot functionalize
    (PyTorch has no rule for ``cond`` with subclass operands)."""
    pytest.importorskip("torchao", reason="torchao (the test extra) is not installed")
    subj = refs.subject("sd3")
    alone = refs.feature_only("sd3", "torchao_int8")
    tr = subj.transformer()
    _int8(tr)
    torch.testing.assert_close(_compiled_run(tr, "sd3"), alone, rtol=1e-5, atol=1e-5)  # alone: compiles
    subj.enable(tr, "fbcache")
    try:
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="no rule registered for HOP cond"):
            _compiled_run(tr, "sd3")
    finally:
        fastcache_rt.disable(tr)


@pytest.mark.slow
def test_compiled_int8_with_unwrapped_subclasses(refs):
    """The workaround: torchao's ``unwrap_tensor_subclass`` (weights as plain tensors behind parametrizations)
    before compiling: the cached int8 model compiles fullgraph with the eager decisions and output."""
    pytest.importorskip("torchao", reason="torchao (the test extra) is not installed")
    from torchao.utils import unwrap_tensor_subclass

    subj = refs.subject("sd3")
    ref_out, ref_st = refs.same_numerics("sd3", "torchao_int8", "fbcache")
    tr = subj.transformer()
    _int8(tr)
    unwrap_tensor_subclass(tr)
    handle = subj.enable(tr, "fbcache")
    try:
        eager = subj.run(tr)
        eager_st = fastcache_rt.stats(tr)
        compiled = _compiled_run(tr, "sd3")
        st = fastcache_rt.stats(tr)
        streams = list(handle.controller.gens.streams.values())
    finally:
        fastcache_rt.disable(tr)
    assert _decisions(eager_st) == _decisions(ref_st) and torch.equal(eager, ref_out)
    assert _decisions(st) == _decisions(eager_st)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    _assert_state_in_compute_dtype(streams)
