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
from tests.ops.test_gate import PyGate
from tests.runtime.helpers import call, denoise, denoise_cfg, inputs, tiny_flux


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


@pytest.mark.parametrize("gate", [
    TeaCacheGate(threshold=0.08, coeffs=(1.0, 0.0)),
    TeaCacheGate(threshold=0.3),
    SpectralCacheGate(threshold=0.15, coeffs=(1.0, 0.0)),
    SpectralCacheGate(threshold=0.12, coeffs=(1.0, 0.0), max_cached=4, gammas=(0.9, 1.3), tads=(0.6, 1.4)),
], ids=["teacache-identity", "teacache-flux-poly", "spectralcache", "spectralcache-custom"])
def test_signal_gate_decisions_match_python_model(model, gate):
    S = 30
    handle = fastcache_rt.enable(model, Policy(gate=gate), num_steps=S)
    probes = []
    orig = handle.controller.adapter.probe

    def record(m, inp):
        p = orig(m, inp)
        probes.append(p.detach().clone())
        return p

    handle.controller.adapter.probe = record
    try:
        denoise(model, S)
        got = fastcache_rt.stats(model)["computed"]
    finally:
        fastcache_rt.disable(model)
    D = probes[0].shape[-1]
    split = getattr(gate, "split", None)
    bounds = [0, round(split * D), D] if split else [0, D]
    kw = dict(tau=gate.threshold, S=S, coeffs=list(gate.coeffs))
    if isinstance(gate, SpectralCacheGate):
        kw.update(tads=gate.tads, max_cached=gate.max_cached, gammas=list(gate.gammas))
    py = PyGate(**kw)
    expect = [s for s in range(S) if py.step(_band_sums(probes[s], probes[max(s - 1, 0)], bounds))]
    assert got == expect
    assert 2 < len(got) < S - 2, f"threshold gives a degenerate schedule {got}"


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


def test_timestep_jump_starts_a_new_generation_on_the_device(model):
    """Without any announcement, a second run with the same step count (timestep back at 1) starts clean."""
    with fastcache_rt.cached(model, "spectrum", num_steps=16):
        a = denoise(model, 16, seed=3)
    with fastcache_rt.cached(model, "spectrum", num_steps=16):
        denoise(model, 16, seed=5)
        b = denoise(model, 16, seed=3)
        st = fastcache_rt.stats(model)
    assert torch.equal(a, b)
    assert st["computed"] == [0, 1, 2, 3, 4, 6, 8, 11, 15]


def test_cfg_branches_keep_separate_state(model):
    S = 16
    with fastcache_rt.cached(model, "teacache", num_steps=S, threshold=0.08, coeffs=(1.0, 0.0)):
        denoise_cfg(model, S)
        st = fastcache_rt.stats(model)
    assert st["streams"] == 2
    per = st["per_stream_computed"]
    assert all(p[0] == 0 and p[-1] == S - 1 for p in per)
    # the cond branch decides exactly as a run that has only the cond calls
    x, enc, pooled = inputs(0)
    with fastcache_rt.cached(model, "teacache", num_steps=S, threshold=0.08, coeffs=(1.0, 0.0)):
        ref_st = fastcache_rt.stats(model)
        assert ref_st["streams"] == 0
    # a batch of 2 (cond and uncond stacked) is one stream with per-sample caches
    with fastcache_rt.cached(model, "spectrum", num_steps=S):
        out = denoise(model, S, B=2)
        assert fastcache_rt.stats(model)["streams"] == 1
    assert out.shape[0] == 2


def test_nan_probe_forces_full_step_and_warns_once(model, caplog):
    S = 16
    pol = Policy(gate=TeaCacheGate(threshold=5.0, coeffs=(1.0, 0.0)))  # would cache every middle step
    with fastcache_rt.cached(model, pol, num_steps=S) as h:
        x, enc, pooled = inputs(0)
        for s in range(S):
            xs = x.clone()
            if s in (6, 9):
                xs[0, 0, 0] = float("nan")
            with torch.no_grad():
                call(model, xs, enc, pooled, 1.0 - s / S, 8, 8)
        st = fastcache_rt.stats(model)
        assert st["nonfinite_probes"] == 4  # steps 6, 9 and the two after them (compared with a NaN probe)
        assert st["computed"] == [0, 6, 7, 9, 10, 15]  # after a NaN probe, the next relative change is NaN too
        with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
            h.new_generation(S)
            h.new_generation(S)
        assert sum("non-finite probe" in r.message for r in caplog.records) == 1


def test_nan_forecast_forces_full_step(model):
    S = 12
    with fastcache_rt.cached(model, "fora", num_steps=S, interval=4) as h:
        x, enc, pooled = inputs(0)
        computed = []
        for s in range(S):
            if s == 2:  # poison the cache: the next cached step must compute instead
                st = next(iter(h.controller.streams.values()))
                st.fc.buf.fill_(float("inf"))
            with torch.no_grad():
                out = call(model, x, enc, pooled, 1.0 - s / S, 8, 8)
            assert torch.isfinite(out).all()
        st = fastcache_rt.stats(model)
    assert st["computed"] == [0, 2, 4, 8] and st["nonfinite_forecasts"] == 1


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
        (lambda m: fastcache_rt.enable(m, "spectrum", num_steps=0), "num_steps"),
        (lambda m: fastcache_rt.enable(m, "spectrum", site="middle"), "site"),
        (lambda m: fastcache_rt.enable(torch.nn.Linear(2, 2), "spectrum"), "adapter"),
        (lambda m: fastcache_rt.enable(object(), "spectrum"), "target"),
    ],
)
def test_bad_configuration_raises_naming_the_field(model, call_, word):
    with pytest.raises((ValueError, TypeError), match=word):
        call_(model)
    assert "forward" not in model.__dict__


def test_unknown_step_count_is_a_clear_error(model):
    with fastcache_rt.cached(model, "spectrum"):
        with pytest.raises(ValueError, match="num_steps"):
            denoise(model, 4)


@pytest.mark.parametrize("policy, overrides", [
    ("spectrum", {}), ("teacache", {"threshold": 0.1, "coeffs": (1.0, 0.0)}), ("spectralcache", {"threshold": 0.2,
     "coeffs": (1.0, 0.0)}), ("freqca", {"interval": 3}), ("taylorseer", {"interval": 3}), ("fbcache",
     {"threshold": 0.5}), ("fora", {}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_at_most_one_host_read_per_step(model, policy, overrides, monkeypatch):
    """Eager: the branch is the only device-to-host read of a step (counted through every Tensor method that reads
    data back: __bool__, item, tolist, __int__, __float__, numpy, cpu)."""
    S = 12
    H, W = 6, 10  # non-square: FreqCa takes the grid from the image ids (read once, when the stream is created)
    x, enc, pooled = inputs(0, 1, H, W)
    with fastcache_rt.cached(model, policy, num_steps=S, **overrides):
        with torch.no_grad():  # the stream is created at the first call (its one-time setup may read the ids)
            call(model, x, enc, pooled, 1.0, H, W)
        reads = []
        for name in ("__bool__", "item", "tolist", "__int__", "__float__", "numpy", "cpu", "__index__"):
            orig = getattr(torch.Tensor, name)

            def counting(self, *a, _orig=orig, _name=name, **k):
                reads.append(_name)
                return _orig(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counting)
        calls = 0
        for s in range(1, S):
            with torch.no_grad():
                call(model, x, enc, pooled, 1.0 - s / S, H, W)
            calls += 1
        monkeypatch.undo()
        st = fastcache_rt.stats(model)
    assert len(reads) <= calls, reads[:20]
    assert len(st["computed"]) < S


def test_output_site_every_step_is_bitwise(model):
    ref = denoise(model, 10)
    with fastcache_rt.cached(model, "none", num_steps=10, site="output"):
        assert torch.equal(denoise(model, 10), ref)


def test_output_site_caches_the_model_output(model):
    """site="output": a skipped step returns the forecast of the model's output itself (reuse: the last computed
    step's output, bitwise), the head does not run, and the cache holds one output-sized tensor."""
    outs = []

    def keep(s, v):
        outs.append(v.clone())
        return v

    head_calls = []
    handle = model.proj_out.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        with fastcache_rt.cached(model, "fora", num_steps=9, interval=3, warmup=1, site="output"):
            denoise(model, 9, hook=keep)
            st = fastcache_rt.stats(model)
    finally:
        handle.remove()
    assert st["computed"] == [0, 3, 6]
    assert len(head_calls) == 3  # the output head ran on computed steps only
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
