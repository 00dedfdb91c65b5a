"""The conformance suite every family declaration passes, on its tiny model (random weights from a config):
the every-step policy is bitwise the unpatched model, ``disable`` restores it bitwise, every preset runs with
finite outputs, schedules give their exact NFE, and signal gates decide exactly as a plain-Python replay of their
rules on the probes the runtime saw."""

from __future__ import annotations

import math

import pytest
import torch

import fastcache_rt
from fastcache_rt.families import family_for
from fastcache_rt.families.base import Family
from fastcache_rt.policy import Policy, SpectralCacheGate, TeaCacheGate
from fastcache_rt.testing.families import TINY, denoise, model
from tests.ops.test_gate import PyGate

FAMILIES = sorted(TINY)
S = 10

# settings that give a non-degenerate schedule on random tiny models
PRESETS = {
    "spectrum": {},
    "teacache": {"threshold": 0.3, "coeffs": (1.0, 0.0)},
    "spectralcache": {"threshold": 0.3, "coeffs": (1.0, 0.0)},
    "freqca": {"interval": 3},
    "taylorseer": {"interval": 3},
    "fora": {},
    "fbcache": {"threshold": 0.5},
    "adaptive": {"tol": 1.0, "warmup": 2},
}


def _hooks_state(m) -> tuple:
    return ("forward" in m.__dict__, hasattr(m, "_diffusers_hook") and bool(m._diffusers_hook.hooks))


@pytest.mark.parametrize("name", FAMILIES)
def test_declaration_matches_the_model(name):
    m = model(name)
    fam = family_for(m)
    assert fam.name == name
    tiny = TINY[name]
    if tiny.grid is not None and fam.grid is not None:
        for size in (0, 1):
            assert fam.grid(m, tiny.inputs(0, 1, size)) == tiny.grid(size)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_step_is_bitwise_and_disable_restores(name):
    m = model(name)
    before = _hooks_state(m)
    ref = denoise(m, name, 6)
    with fastcache_rt.cached(m, "none", num_steps=6):
        out = denoise(m, name, 6)
        st = fastcache_rt.stats(m)
    assert torch.equal(out, ref)
    assert st["computed"] == list(range(6)) and st["family"] == name
    assert _hooks_state(m) == before
    with fastcache_rt.cached(m, "fora", num_steps=6):
        denoise(m, name, 6)
    assert torch.equal(denoise(m, name, 6), ref)


@pytest.mark.parametrize("preset", ["teacache", "spectralcache", "fbcache"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_signal_gate_that_computes_every_step_is_bitwise(name, preset):
    """At a threshold no step stays under, a signal gate computes every step, and the run is bitwise the
    unpatched model's: the probe, the first blocks FBCache runs for it, and the blocks after them are each run
    exactly once, in order."""
    m = model(name)
    ref = denoise(m, name, 6)
    kw = {"threshold": 1e-12} if preset == "fbcache" else {"threshold": 1e-12, "coeffs": (1.0, 0.0)}
    with fastcache_rt.cached(m, preset, num_steps=6, **kw):
        out = denoise(m, name, 6)
        assert fastcache_rt.stats(m)["computed"] == list(range(6))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", FAMILIES)
def test_every_preset_runs(name, preset):
    m = model(name)
    ref = denoise(m, name, S)
    with fastcache_rt.cached(m, preset, num_steps=S, **PRESETS[preset]):
        out = denoise(m, name, S)
        st = fastcache_rt.stats(m)
    assert torch.isfinite(out).all()
    assert st["computed"][0] == 0 and len(st["computed"]) + len(st["cached"]) == S
    if preset in ("spectrum", "freqca", "taylorseer", "fora"):  # schedules: their exact NFE
        sched = fastcache_rt.policy.PRESETS[preset].with_overrides(**PRESETS[preset]).gate.schedule(S)
        assert st["computed"] == [s for s in range(S) if sched[s]]
    assert st["cache_bytes"] > 0
    rel = ((out - ref).norm() / ref.norm()).item()
    assert math.isfinite(rel)


@pytest.mark.parametrize("name", FAMILIES)
def test_magcache_calibrates_then_runs(name):
    m = model(name)
    with fastcache_rt.cached(m, "magcache", num_steps=S, calibrate=True):
        denoise(m, name, S)
        ratios = fastcache_rt.stats(m)["mag_ratios"]
    assert len(ratios) == S and ratios[0] == 1.0 and all(math.isfinite(r) and r > 0 for r in ratios)
    pol = fastcache_rt.policy.MagCacheGate(ratios=ratios, threshold=0.5, retention=0.2)
    with fastcache_rt.cached(m, "magcache", num_steps=S, ratios=ratios, threshold=0.5, retention=0.2):
        out = denoise(m, name, S)
        got = fastcache_rt.stats(m)["computed"]
    assert torch.isfinite(out).all()
    assert got == [s for s, c in enumerate(pol.schedule(S)) if c]


@pytest.mark.parametrize("name", FAMILIES)
def test_calibration_measures_every_signal_and_changes_nothing(name):
    """The calibration gate (``fastcache_rt.calibrate``'s) on every family: each signal measured at every step after
    the first, the output bitwise the uncached run's, and a TeaCache polynomial fitted from one run."""
    from fastcache_rt.profiles import _fit_model
    from fastcache_rt.policy.gates import Calibrate

    m = model(name)
    ref = denoise(m, name, S)
    with fastcache_rt.cached(m, Policy(Calibrate()), num_steps=S):
        out = denoise(m, name, S)
        st = fastcache_rt.stats(m)
    assert torch.equal(out, ref)
    assert st["computed"] == list(range(S))
    for row in st["per_stream"]:
        cal = row["calibration"]
        for signal in ("input", "output", "first_block"):
            vals = cal[signal]
            assert vals[0] is None and all(v is not None and math.isfinite(v) and v >= 0 for v in vals[1:]), signal
        assert cal["mag"][0] == 1.0 and all(math.isfinite(v) and v > 0 for v in cal["mag"])
    fit = _fit_model([r["calibration"] for r in st["per_stream"]], S)
    assert len(fit["teacache"]["coeffs"]) == fit["teacache"]["degree"] + 1 and len(fit["magcache"]["ratios"]) == S


def _band_sums(cur, prev, bounds):
    c, p = cur.double(), prev.double()
    return [((c[..., a:b] - p[..., a:b]).abs().sum().item(), p[..., a:b].abs().sum().item())
            for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("kind", ["teacache", "spectralcache"])
@pytest.mark.parametrize("name", FAMILIES)
def test_signal_gate_decisions_match_python_replay(name, kind, monkeypatch):
    m = model(name)
    steps = 16
    gate = TeaCacheGate(threshold=0.25, coeffs=(1.0, 0.0)) if kind == "teacache" else \
        SpectralCacheGate(threshold=0.25, coeffs=(1.0, 0.0), max_cached=3)
    probes = []
    orig = Family.probe_of  # what the runtime's signal gates read at the first block

    def record(self, first_block, kw, hidden):
        p = orig(self, first_block, kw, hidden)
        probes.append(p.detach().clone())
        return p

    monkeypatch.setattr(Family, "probe_of", record)
    with fastcache_rt.cached(m, Policy(gate=gate), num_steps=steps):
        denoise(m, name, steps)
        got = fastcache_rt.stats(m)["computed"]
    assert len(probes) == steps
    D = probes[0].shape[-1]
    bounds = [0, max(1, min(D - 1, round(gate.split * D))), D] if kind == "spectralcache" else [0, D]
    kw = dict(tau=gate.threshold, S=steps, coeffs=list(gate.coeffs))
    if kind == "spectralcache":
        kw.update(tads=gate.tads, max_cached=gate.max_cached, gammas=list(gate.gammas))
    py = PyGate(**kw)
    expect = [s for s in range(steps) if py.step(_band_sums(probes[s], probes[max(s - 1, 0)], bounds))]
    assert got == expect
