"""fastcache_rt's forecasters inside cache-dit (``fastcache_rt.integrations.cache_dit``): the calibrators forecast
exactly what fastcache_rt's own stream does on the same history; DBCache + the Spectrum calibrator skips steps on the
shipped model, stays near the uncached output and disable leaves the pipeline exactly as it was; the version guard
names the installed version."""

import importlib
import re
import subprocess
import sys

import pytest
import torch

cache_dit = pytest.importorskip("cache_dit")

pytestmark = pytest.mark.usefixtures("one_thread")

from fastcache_rt.bench import methods as M
from fastcache_rt.bench.harness import Harness, Settings
from fastcache_rt.policy import Chebyshev, FixedInterval, FreqCa, Policy, StreamSpec, Taylor
from fastcache_rt.stream import StreamState

with M.quiet_peers():
    C = importlib.import_module("fastcache_rt.integrations.cache_dit")

STEPS = 12
PROMPTS = ["red circle", "blue square"]


def _replay(cal, fc, shape, computed, num_steps, grid=None, seed=0, name="Bn_residual"):
    """Drive ``cal`` the way cache-dit does and fastcache_rt's own ``StreamState`` the way its hooks do, with the
    same computed steps and values; return how many skipped steps were compared."""
    st = StreamState(Policy(FixedInterval(), fc, "hidden"), StreamSpec(shape, torch.float32, "cpu", num_steps, grid))
    st.reset()
    cal.reset_cache()
    g = torch.Generator().manual_seed(seed)
    compared = 0
    for step in range(num_steps):
        cal.mark_step_begin()
        if step in computed:
            v = torch.randn(shape, generator=g) * (1 + 0.1 * step) + step
            cal.update(v, name=name)
            st.end_step(True, v)
        else:
            want = st.fc.predict(st)
            got = cal.approximate(name=name)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, want), f"step {step}: max diff {(got - want).abs().max()}"
            st.end_step(False, None)
            compared += 1
    return compared


@pytest.mark.parametrize("make,fc,shape,grid", [
    (lambda n: C.SpectrumCalibrator(num_inference_steps=n), C.PRESETS["spectrum"].forecaster, (2, 7, 5), None),
    (lambda n: C.SpectrumCalibrator(degree=3, lam=0.5, blend=1.0, history=4, num_inference_steps=n),
     Chebyshev(degree=3, lam=0.5, blend=1.0, history=4), (3, 1, 11), None),
    (lambda n: C.TaylorCalibrator(order=1), Taylor(order=1), (3, 5, 7), None),
    (lambda n: C.TaylorCalibrator(order=3), Taylor(order=3), (13,), None),
    (lambda n: C.FreqCaCalibrator(), FreqCa(), (2, 9, 5), None),  # a 3 x 3 token grid
    (lambda n: C.FreqCaCalibrator(cutoff=0.3, order=1, grid=(3, 5)), FreqCa(cutoff=0.3, order=1), (1, 15, 6),
     (3, 5)),
], ids=["spectrum", "spectrum-knobs", "taylor1", "taylor3", "freqca", "freqca-grid"])
def test_forecasts_equal_fastcache_rt_own_state(make, fc, shape, grid):
    n = 20
    cal = make(n)
    computed = {0, 1, 2, 3, 5, 6, 9, 10, 14, 15, 19}
    assert _replay(cal, fc, shape, computed, n, grid) == n - len(computed)
    # a second generation on the same calibrator: its states restart (and are reused, not reallocated)
    held = [t.data_ptr() for t in cal.tensors()]
    assert _replay(cal, fc, shape, {0, 1, 2, 4, 7, 8, 12, 16}, n, grid, seed=1) == n - 8
    assert [t.data_ptr() for t in cal.tensors()] == held
    # another shape: a state of its own, allocated on its first computed step
    if grid is None:
        other = (*shape[:-1], shape[-1] + 2)
        _replay(cal, fc, other, {0, 1, 2, 6, 7, 11}, n, grid, seed=2, name="other")
        assert len(cal.tensors()) == 2 * len(held)


def test_calibrator_edge_cases():
    cal = C.SpectrumCalibrator()
    cal.mark_step_begin()
    assert cal.approximate("Bn_residual") is None  # nothing recorded yet: cache-dit falls back / asserts itself
    with pytest.raises(ValueError, match="num_inference_steps"):
        cal.update(torch.zeros(1, 4, 3), name="Bn_residual")
    with pytest.raises(ValueError, match="grid"):
        C.FreqCaCalibrator().update(torch.zeros(1, 7, 3))
    with pytest.raises(ValueError, match="history"):
        C.spectrum_calibrator_config(history=0)
    cfg = C.spectrum_calibrator_config(blend=0.8, calibrator_cache_type="hidden_states")
    assert isinstance(cfg, cache_dit.CalibratorConfig) and cfg.calibrator_cache_type == "hidden_states"
    from cache_dit.caching.cache_contexts.calibrators import Calibrator

    built = Calibrator(cfg)  # cache-dit's own factory builds it
    assert isinstance(built, C.SpectrumCalibrator) and built.forecaster.blend == 0.8
    assert type(Calibrator(cache_dit.TaylorSeerCalibratorConfig())).__name__ == "TaylorSeerCalibrator"  # its own
    assert not C.freqca_calibrator_config().enable_encoder_calibrator  # text tokens have no grid


@pytest.fixture(scope="module")
def pipe():
    from fastcache_rt.models import load_default

    return load_default()


def _spectrum_dbcache(threshold, warmup):
    saved = {}

    def enable(pipe, ctx):
        cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                                      max_warmup_steps=warmup, num_inference_steps=ctx.steps)
        saved.update(M._instance_attrs(pipe))
        with M.quiet_peers():
            cache_dit.enable_cache(pipe, cache_config=cfg, calibrator_config=C.spectrum_calibrator_config())

    def disable(pipe):
        with M.quiet_peers():
            cache_dit.disable_cache(pipe)
        M._restore_instance_attrs(saved)

    return M.Config("DBCache + Spectrum", M.CACHE_DIT, f"threshold={threshold} warmup={warmup}", enable, disable)


@pytest.mark.slow
def test_dbcache_with_the_spectrum_calibrator_on_the_shipped_model(pipe, monkeypatch):
    calls = {"update": 0, "approximate": 0, "cals": set()}
    upd, app = C.ForecasterCalibrator.update, C.ForecasterCalibrator.approximate

    def update(self, Y, name="default"):
        calls["update"] += 1
        calls["cals"].add(type(self))
        return upd(self, Y, name)

    def approximate(self, name="default"):
        calls["approximate"] += 1
        return app(self, name)

    monkeypatch.setattr(C.ForecasterCalibrator, "update", update)
    monkeypatch.setattr(C.ForecasterCalibrator, "approximate", approximate)
    tr = pipe.transformer
    before = dict(call=type(pipe).__call__, forward=tr.__dict__.get("forward"), children=list(tr._modules),
                  params={k: v.clone() for k, v in tr.state_dict().items()})
    configs = [_spectrum_dbcache(0.2, 3), M.cache_dit_dbcache(0.2, "spectrum")]
    h = Harness(pipe, Settings(prompts=PROMPTS, seeds=[0], steps=STEPS, height=32, width=32, rounds=1,
                               uncached_every=1, call_kwargs=dict(guidance_scale=1.0, max_sequence_length=8)),
                progress=False)
    try:
        res = h.run(configs)  # raises if an uncached call after a disable differs from the reference
        ref = res.latents["uncached"]
        after, _, flags = h.call()
    finally:
        h.close()
    ours, row = res.rows[1], res.rows[2]
    # (a) steps skipped, the forecast used on them, the output finite and near the uncached one
    cached = STEPS - len(ours["computed"])
    assert 2 <= cached <= STEPS - 4, ours["computed"]
    assert ours["nfe"] == pytest.approx(len(ours["computed"]) + cached / 8)  # (the first of the 8 blocks runs on a cached step)
    assert calls["cals"] == {C.SpectrumCalibrator}
    assert calls["approximate"] >= 2 * cached  # image and text streams on every skipped step
    lat = res.latents[ours["key"]]
    assert torch.isfinite(lat).all()
    assert 0 < ours["rel_l2"] < 0.1 and ours["psnr"] > 25, (ours["rel_l2"], ours["psnr"])
    assert ours["repeatable"]
    # the bench row (cache-dit's default warm-up of 8 steps: at 12 steps it may skip none) enables and disables too
    assert row["method"] == "DBCache F1B0 + Spectrum (fastcache_rt)" and row["library"] == M.CACHE_DIT
    assert torch.isfinite(res.latents[row["key"]]).all()
    # (b) disable (+ the bench's attribute restore) leaves the pipeline bitwise as before
    assert torch.equal(after, ref) and sum(flags) == STEPS
    assert type(pipe).__call__ is before["call"] and tr.__dict__.get("forward") is before["forward"]
    assert list(tr._modules) == before["children"]
    assert all(torch.equal(v, before["params"][k]) for k, v in tr.state_dict().items())


def test_version_guard(monkeypatch):
    assert C.check_cache_dit_version() == cache_dit.__version__
    for fake in ("1.6.0", "1.5.2", "99.0"):
        monkeypatch.setattr(cache_dit, "__version__", fake)
        with pytest.raises(RuntimeError, match=re.escape(f"installed cache-dit is {fake},")) as e:
            C.spectrum_calibrator_config()
        assert f"tested with cache-dit {C.TESTED_CACHE_DIT}" in str(e.value)
        with pytest.raises(RuntimeError, match=fake):
            C.TaylorCalibrator()
    # importing the module under an untested cache-dit fails before it patches anything
    monkeypatch.delitem(sys.modules, "fastcache_rt.integrations.cache_dit")
    with pytest.raises(RuntimeError, match="installed cache-dit is 99.0"):
        importlib.import_module("fastcache_rt.integrations.cache_dit")


@pytest.mark.slow  # a fresh interpreter importing diffusers
def test_importing_fastcache_rt_does_not_import_cache_dit():
    code = "import sys, fastcache_rt, fastcache_rt.integrations; assert 'cache_dit' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("last", [0, 1])
def test_dbcache_presets_decide_as_cache_dit_on_the_shipped_model(pipe, last):
    """fastcache_rt's "dbcache" preset (F1B0) and "dbcache-f1b1" against cache-dit's DBCache at the same settings:
    the same computed steps, the same full-step equivalents (a cached step runs 1 + last of the 8 blocks) and the
    same images to float rounding (cache-dit caches the middle blocks' residual of the image and text tokens, as
    fastcache_rt does)."""
    steps = 20
    configs = [M.ours("dbcache", dict(threshold=0.25, warmup=4, compute_last=last)),
               M.cache_dit_dbcache(0.25, None, last=last)]
    configs[1].enable = _with_warmup(configs[1].enable, 4)
    h = Harness(pipe, Settings(prompts=PROMPTS, seeds=[0], steps=steps, height=32, width=32, rounds=1,
                               uncached_every=1, call_kwargs=dict(guidance_scale=1.0, max_sequence_length=8)),
                progress=False)
    try:
        res = h.run(configs)
    finally:
        h.close()
    ours, peer = res.rows[1], res.rows[2]
    cached = steps - len(ours["computed"])
    assert 3 <= cached <= steps - 6, ours["computed"]
    assert ours["computed"] == peer["computed"]
    assert ours["nfe"] == peer["nfe"] == pytest.approx(len(ours["computed"]) + cached * (1 + last) / 8)
    torch.testing.assert_close(res.latents[ours["key"]], res.latents[peer["key"]], rtol=1e-4, atol=1e-4)


def _with_warmup(enable, warmup):
    """A cache-dit config's ``enable`` with ``max_warmup_steps`` set (the bench's rows use cache-dit's 8)."""
    def run(pipe, ctx):
        real = cache_dit.DBCacheConfig

        def config(**kw):
            return real(**{**kw, "max_warmup_steps": warmup})

        cache_dit.DBCacheConfig = config
        try:
            enable(pipe, ctx)
        finally:
            cache_dit.DBCacheConfig = real

    return run
