import logging
import math

import pytest
import torch

import fastcache_rt
from fastcache_rt.policy import (
    Chebyshev,
    FixedInterval,
    Policy,
    SpectralCacheGate,
    SpectrumSchedule,
    TeaCacheGate,
)
from fastcache_rt.testing.tiny_flux import call, denoise, inputs, tiny_flux
from tests.runtime.helpers import count_host_reads


@pytest.fixture(scope="module")
def model():
    return tiny_flux()


def test_every_step_is_bitwise_and_disable_restores(model):
    ref = denoise(model, 12)
    assert "forward" not in model.__dict__
    with fastcache_rt.cached(model, "none", num_steps=12):
        assert "forward" in model.__dict__
        out = denoise(model, 12)
        assert fastcache_rt.stats(model)["computed"] == list(range(12))
    assert torch.equal(out, ref)
    assert "forward" not in model.__dict__
    h = fastcache_rt.enable(model, "spectrum", num_steps=12)
    denoise(model, 12)
    fastcache_rt.disable(model)
    assert torch.equal(denoise(model, 12), ref)
    with pytest.raises(ValueError, match="not enabled"):
        fastcache_rt.stats(model)
    assert h.policy.name == "spectrum"


def test_disable_restores_a_previous_instance_forward(model):
    sentinel = model.forward  # a bound method stored as an instance attribute, as other hook libraries do
    model.forward = sentinel
    try:
        fastcache_rt.enable(model, "fora", num_steps=4)
        assert model.forward is not sentinel
        fastcache_rt.disable(model)
        assert model.__dict__["forward"] is sentinel
    finally:
        del model.forward


def test_disable_keeps_a_later_wrapping_hook_working(model):
    """A hook registered after fastcache_rt's on the same module and wrapping with ``new_forward`` (as diffusers'
    own cache hooks do) still runs after ``disable``: fastcache_rt's hook is unwound from the outside, not cut out
    of the middle of the chain (diffusers' ``remove_hook`` of an inner hook would bypass it)."""
    from diffusers.hooks import HookRegistry, ModelHook

    calls = []

    class Counter(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            calls.append(1)
            return self.fn_ref.original_forward(*args, **kwargs)

    ref = denoise(model, 4)
    fastcache_rt.enable(model, "fora", num_steps=4)
    block = model.transformer_blocks[1]
    HookRegistry.check_if_exists_or_initialize(block).register_hook(Counter(), "counter")
    denoise(model, 4)
    fastcache_rt.disable(model)
    calls.clear()
    out = denoise(model, 4)
    assert len(calls) == 4, "the later hook was bypassed after disable"
    assert block._diffusers_hook._hook_order == ["counter"]
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "policy, overrides, steps, expect",
    [
        ("spectrum", {}, 50, [0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 25, 31, 38, 46]),
        ("spectrum", {"alpha": 3.0}, 50, [0, 1, 2, 3, 4, 6, 11, 19, 30, 44]),
        ("fora", {"interval": 3}, 10, [0, 3, 6, 9]),
        ("taylorseer", {}, 28, [0, 1, 2, 8, 14, 20, 26]),
        ("freqca", {"interval": 9}, 28, [0, 1, 2, 11, 20]),
    ],
)
def test_schedules_are_exact(model, policy, overrides, steps, expect):
    with fastcache_rt.cached(model, policy, num_steps=steps, **overrides):
        denoise(model, steps)
        st = fastcache_rt.stats(model)
    assert st["computed"] == expect
    assert st["cached"] == [s for s in range(steps) if s not in expect]
    assert st["num_steps"] == steps and st["cache_bytes"] > 0


def _band_sums(cur, prev, bounds):
    c, p = cur.double(), prev.double()
    return [((c[..., a:b] - p[..., a:b]).abs().sum().item(), p[..., a:b].abs().sum().item())
            for a, b in zip(bounds, bounds[1:])]


def _py_magcache(ratios, S, thr, K, retention):
    keep = int(math.floor(retention * S + 0.5))
    ratio, err, since, has = 1.0, 0.0, 0, False
    out = []
    for s in range(S):
        compute = True
        if s >= keep:
            ratio *= ratios[s]
            since += 1
            err += abs(1.0 - ratio)
            if has and err <= thr and since <= K:
                compute = False
            else:
                ratio, err, since = 1.0, 0.0, 0
        has = has or compute
        if compute:
            out.append(s)
    return out


def test_magcache_calibration_and_decisions(model):
    S = 24
    with fastcache_rt.cached(model, "magcache", num_steps=S, calibrate=True):
        denoise(model, S)
        st = fastcache_rt.stats(model)
    ratios = st["mag_ratios"]
    assert st["computed"] == list(range(S)) and len(ratios) == S and ratios[0] == 1.0
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    for thr, K in ((0.05, 2), (0.3, 5)):
        with fastcache_rt.cached(model, "magcache", num_steps=S, ratios=ratios, threshold=thr, max_skip=K,
                                 retention=0.2):
            denoise(model, S)
            got = fastcache_rt.stats(model)["computed"]
        assert got == _py_magcache(ratios, S, thr, K, 0.2)
    # ratios calibrated at 24 steps are interpolated to another step count
    with fastcache_rt.cached(model, "magcache", num_steps=12, ratios=ratios):
        denoise(model, 12)
    with pytest.raises(ValueError, match="ratios"):
        with fastcache_rt.cached(model, "magcache", num_steps=12):
            denoise(model, 12)


@pytest.mark.parametrize("policy", ["spectrum", "teacache", "taylorseer", "freqca", "spectralcache"])
def test_consecutive_generations_equal_fresh_runs(model, policy):
    runs = [(20, 1, 8, 8, 0), (12, 2, 6, 10, 1), (20, 1, 8, 8, 2)]
    fresh = []
    for S, B, H, W, seed in runs:
        with fastcache_rt.cached(model, policy, num_steps=S, grid=(H, W)):
            fresh.append((denoise(model, S, seed, B, H, W), fastcache_rt.stats(model)["computed"]))
    h = fastcache_rt.enable(model, policy, grid=None)
    try:
        for (S, B, H, W, seed), (ref, ref_computed) in zip(runs, fresh):
            h.controller.grid = (H, W)
            h.new_generation(S)
            out = denoise(model, S, seed, B, H, W)
            assert torch.equal(out, ref), (policy, S, B, H, W)
            assert fastcache_rt.stats(model)["computed"] == ref_computed
    finally:
        h.disable()


def test_running_past_the_announced_steps_computes_and_warns(model, caplog):
    """A bare transformer driven past ``num_steps``: every further step computes (no clamped schedule), with one
    warning; ``new_generation`` starts clean."""
    with fastcache_rt.cached(model, "spectrum", num_steps=8) as h:
        a = denoise(model, 8, seed=3)
        with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
            denoise(model, 4, seed=5)  # steps 8..11 of a generation announced with 8
        st = fastcache_rt.stats(model)
        assert st["computed"] == [0, 1, 2, 3, 4, 6, 8, 9, 10, 11]
        assert sum("computing every further step" in r.message for r in caplog.records) == 1
        h.new_generation(8)
        b = denoise(model, 8, seed=3)
        assert fastcache_rt.stats(model)["computed"] == [0, 1, 2, 3, 4, 6]
    assert torch.equal(a, b)


def test_cfg_branches_keep_separate_state(model):
    """Branches called separately are told apart by the pipeline's cache context, never by tensor identity: the
    same embedding tensor object in both branches still gives two streams, each deciding as it would alone."""
    S = 16
    kw = dict(num_steps=S, threshold=0.08, coeffs=(1.0, 0.0))
    x, enc, pooled = inputs(0)

    def run(neg, names):
        with fastcache_rt.cached(model, "teacache", **kw):
            xs = x.clone()
            for s in range(S):
                t = 1.0 - s / S
                with model.cache_context(names[0]):
                    vc = call(model, xs, enc, pooled, t, 8, 8)
                with model.cache_context(names[1]):
                    vu = call(model, xs, neg, pooled, t, 8, 8)
                xs = xs - (vu + 3.0 * (vc - vu)) / S
            return xs, fastcache_rt.stats(model)

    same, st_same = run(enc, ("cond", "uncond"))  # the negative embeddings ARE the positive tensor object
    copy, st_copy = run(enc.clone(), ("cond", "uncond"))
    assert st_same["streams"] == 2 and {p["branch"] for p in st_same["per_stream"]} == {"cond", "uncond"}
    assert torch.equal(same, copy) and st_same["per_stream"] == st_copy["per_stream"]
    # a batch of 2 (cond and uncond stacked) is one stream with per-sample caches
    with fastcache_rt.cached(model, "spectrum", num_steps=S):
        out = denoise(model, S, B=2)
        assert fastcache_rt.stats(model)["streams"] == 1
    assert out.shape[0] == 2


def test_nan_probe_forces_full_step_and_warns_at_the_end_of_its_generation(model, caplog):
    """A NaN in the input: the signal gate computes that step (its relative change is not finite), the model's
    non-finite result is counted when it is recorded, and the warning comes when that generation ends."""
    S = 16
    pol = Policy(gate=TeaCacheGate(threshold=5.0, coeffs=(1.0, 0.0)))  # would cache every middle step
    with fastcache_rt.cached(model, pol, num_steps=S) as h:
        x, enc, pooled = inputs(0)
        with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
            for s in range(S):
                xs = x.clone()
                if s == 6:
                    xs[0, 0, 0] = float("nan")
                with torch.no_grad():
                    call(model, xs, enc, pooled, 1.0 - s / S, 8, 8)
            st = fastcache_rt.stats(model)
            assert 6 in st["computed"] and 7 in st["computed"]  # NaN probe, then a change from a NaN probe
            assert st["nonfinite"] >= 1
            assert not any("non-finite" in r.message for r in caplog.records)  # not inside the generation
            h.new_generation(S)
            assert sum("non-finite" in r.message for r in caplog.records) == 1
            h.new_generation(S)  # a clean generation does not warn again
            assert sum("non-finite" in r.message for r in caplog.records) == 1


def test_any_gate_with_any_forecaster(model):
    S = 20
    combos = [
        Policy(SpectralCacheGate(threshold=0.2, coeffs=(1.0, 0.0)), Chebyshev(degree=2), "hidden"),
        Policy(TeaCacheGate(threshold=0.1, coeffs=(1.0, 0.0)), fastcache_rt.policy.Taylor(order=2), "residual"),
        Policy(SpectrumSchedule(), fastcache_rt.policy.FreqCa(), "residual"),
        Policy(FixedInterval(4, 2), Chebyshev(blend=0.5), "residual"),
    ]
    ref = denoise(model, S)
    for pol in combos:
        with fastcache_rt.cached(model, pol, num_steps=S):
            out = denoise(model, S)
            st = fastcache_rt.stats(model)
        assert torch.isfinite(out).all()
        assert len(st["computed"]) < S
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 0.2, (pol, rel)


@pytest.mark.parametrize(
    "call_, word",
    [
        (lambda m: fastcache_rt.enable(m, "nope"), "policy"),
        (lambda m: fastcache_rt.enable(m, "teacache", threshold=-1), "threshold"),
        (lambda m: fastcache_rt.enable(m, "spectrum", alpha=float("nan")), "alpha"),
        (lambda m: fastcache_rt.enable(m, "spectrum", degree=-1), "degree"),
        (lambda m: fastcache_rt.enable(m, "spectrum", typo=1), "typo"),
        (lambda m: fastcache_rt.enable(m, "spectralcache", split=1.5), "split"),
        (lambda m: fastcache_rt.enable(m, "fbcache", blocks=4), "blocks"),
        # booleans are not numbers
        (lambda m: fastcache_rt.enable(m, "spectrum", alpha=True), "alpha"),
        (lambda m: fastcache_rt.enable(m, "fora", interval=True), "interval"),
        (lambda m: fastcache_rt.enable(m, "spectrum", degree=True), "degree"),
        (lambda m: fastcache_rt.enable(m, "taylorseer", order=False), "order"),
        (lambda m: fastcache_rt.enable(m, "teacache", threshold=True), "threshold"),
        # every error names its field
        (lambda m: fastcache_rt.enable(m, "spectralcache", tads=5), "tads"),
        (lambda m: fastcache_rt.enable(m, "spectralcache", gammas=None), "gammas"),
        (lambda m: fastcache_rt.enable(m, "magcache", ratios="abc"), "ratios"),
        (lambda m: fastcache_rt.enable(m, "teacache", coeffs="12"), "coeffs"),
        (lambda m: fastcache_rt.enable(m, "spectrum", gate="teacache"), "gate"),
        (lambda m: fastcache_rt.enable(m, "spectrum", forecaster="taylor"), "forecaster"),
        (lambda m: fastcache_rt.enable(m, "freqca", grid=5), "grid"),
        (lambda m: fastcache_rt.enable(m, "freqca", grid=(4, True)), "grid"),
        # MagCache without ratios fails at enable, saying how to calibrate
        (lambda m: fastcache_rt.enable(m, "magcache"), "calibrate=True"),
        (lambda m: fastcache_rt.enable(m, "spectrum", num_steps=0), "num_steps"),
        (lambda m: fastcache_rt.enable(m, "spectrum", site="middle"), "site"),
        (lambda m: fastcache_rt.enable(torch.nn.Linear(2, 2), "spectrum"), "family declaration for Linear"),
        (lambda m: fastcache_rt.enable(object(), "spectrum"), "target"),
    ],
)
def test_bad_configuration_raises_naming_the_field(model, call_, word):
    with pytest.raises((ValueError, TypeError), match=word):
        call_(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_fastcache_rt")


def test_enable_on_a_compiled_module(model):
    """``enable(torch.compile(transformer))`` caches the module inside the compiled wrapper."""
    compiled = torch.compile(model, fullgraph=True)
    ref = denoise(model, 8)
    with fastcache_rt.cached(compiled, "none", num_steps=8):
        assert fastcache_rt.stats(compiled)["family"] == "flux"
        out = denoise(model, 8)
    assert torch.equal(out, ref)


def test_unknown_step_count_is_a_clear_error(model):
    with fastcache_rt.cached(model, "spectrum"):
        with pytest.raises(ValueError, match="num_steps"):
            denoise(model, 4)


@pytest.mark.parametrize("policy, overrides", [
    ("spectrum", {}), ("teacache", {"threshold": 0.1, "coeffs": (1.0, 0.0)}), ("spectralcache", {"threshold": 0.2,
     "coeffs": (1.0, 0.0)}), ("freqca", {"interval": 3}), ("taylorseer", {"interval": 3}), ("fbcache",
     {"threshold": 0.5}), ("fora", {}), ("magcache", {"ratios": [1.0] + [0.98] * 11, "threshold": 0.3}),
    ("teacache", {"threshold": 5.0}),  # the family's published coefficients
], ids=lambda v: v if isinstance(v, str) else "")
def test_host_reads_per_step(model, policy, overrides, monkeypatch):
    """Eager: schedule gates decide on the host and read nothing back; a signal gate's branch is the one
    device-to-host read of its step (counted through every Tensor method that reads data back: __bool__, item,
    tolist, __int__, __float__, numpy, cpu), and no step uploads a Python value (torch.tensor / as_tensor: a
    host-to-device copy, a sync on a GPU and illegal inside a CUDA-graph capture)."""
    S = 12
    H, W = 6, 10  # non-square: FreqCa takes the grid from the image ids (read once, when the stream is created)
    x, enc, pooled = inputs(0, 1, H, W)
    with fastcache_rt.cached(model, policy, num_steps=S, **overrides):
        with torch.no_grad():  # the stream is created at the first call (its one-time setup may read the ids)
            call(model, x, enc, pooled, 1.0, H, W)
        reads = count_host_reads(monkeypatch)
        calls = 0
        for s in range(1, S):
            with torch.no_grad():
                call(model, x, enc, pooled, 1.0 - s / S, H, W)
            calls += 1
        monkeypatch.undo()
        st = fastcache_rt.stats(model)
    signal = fastcache_rt.policy.PRESETS[policy].gate.probe is not None
    assert len(reads) == (calls if signal else 0), reads[:20]
    assert len(st["computed"]) < S


def test_output_site_every_step_is_bitwise(model):
    ref = denoise(model, 10)
    with fastcache_rt.cached(model, "none", num_steps=10, site="output"):
        assert torch.equal(denoise(model, 10), ref)


def test_output_site_caches_the_model_output(model):
    """site="output": a skipped step returns the forecast of the model's output itself (reuse: the last computed
    step's output, bitwise), and the cache holds one output-sized tensor."""
    outs = []

    def keep(s, v):
        outs.append(v.clone())
        return v

    with fastcache_rt.cached(model, "fora", num_steps=9, interval=3, warmup=1, site="output"):
        denoise(model, 9, hook=keep)
        st = fastcache_rt.stats(model)
    assert st["computed"] == [0, 3, 6]
    for s in range(9):
        last = max(c for c in st["computed"] if c <= s)
        assert torch.equal(outs[s], outs[last]), s
    x, _, _ = inputs(0)
    assert st["cache_bytes"] >= x.numel() * 4 and st["cache_bytes"] < 2 * x.numel() * 4 + 4096


@pytest.mark.parametrize("policy", ["taylorseer", "spectrum", "freqca"])
def test_output_site_forecasts_stay_close(model, policy):
    ref = denoise(model, 20)
    with fastcache_rt.cached(model, policy, num_steps=20, site="output"):
        out = denoise(model, 20)
        assert len(fastcache_rt.stats(model)["computed"]) < 20
    assert torch.isfinite(out).all()
    assert (out - ref).norm() < 0.2 * ref.norm()


def test_composes_with_diffusers_layerwise_casting():
    """diffusers' layerwise casting (weights stored in bf16, cast to fp32 for each layer's compute: hooks on the
    layers inside the blocks) together with fastcache_rt's hooks on the blocks: the every-step policy is bitwise the
    casting model alone, a cached run stays close to it, and each can be removed without disturbing the other."""
    from diffusers.hooks import apply_layerwise_casting

    m = tiny_flux(seed=1)
    apply_layerwise_casting(m, storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert m.transformer_blocks[0].ff.net[2].weight.dtype == torch.bfloat16
    ref = denoise(m, 12)
    with fastcache_rt.cached(m, "none", num_steps=12):
        assert torch.equal(denoise(m, 12), ref)
    with fastcache_rt.cached(m, "taylorseer", num_steps=12, interval=3):
        out = denoise(m, 12)
        assert len(fastcache_rt.stats(m)["computed"]) < 12
    assert torch.isfinite(out).all() and (out - ref).norm() < 0.2 * ref.norm()
    assert torch.equal(denoise(m, 12), ref)  # fastcache_rt removed, the casting hooks still in place
    assert m.transformer_blocks[0].ff.net[2].weight.dtype == torch.bfloat16
