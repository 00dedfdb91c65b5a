"""torch.library registration: schemas, fake kernels, opcheck, fullgraph compile, and backend selection."""

import os

import pytest
import torch

from fastcache_rt import ops
from fastcache_rt.ops import _backend
from tests.conftest import available_fast_backends

OPS = ["band_l1", "gate_step", "gate_decide", "chebyshev_forecast", "chebyshev_weights", "taylor_forecast",
       "hermite_forecast", "taylor_update", "chebyshev_forecast_out", "taylor_forecast_out", "hermite_forecast_out",
       "taylor_update_error", "history_update"]


def test_every_op_is_registered():
    for name in OPS:
        assert hasattr(torch.ops.fastcache_rt, name), name


def _samples(backend):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    st = torch.tensor([3, 0.1, 1, 1, 0, 0.2, 0, 2], dtype=torch.float32)
    p = ops.gate_params(0.5, 10, tads=(0.5, 1.5), max_cached=3)
    coeffs = torch.tensor([2.0, 1.0, 0.0])
    gam = torch.tensor([0.8, 1.5])
    hist = torch.randn(6, 3, 4, generator=g)
    taus = torch.linspace(-1, 0.5, 6)
    q = torch.tensor(0.7)
    cnt = torch.tensor(4)
    diffs = torch.randn(3, 3, 4, generator=g)
    dist = torch.tensor(2.0)
    T = torch.ops.fastcache_rt
    return [
        (T.band_l1, (x, y, [0, 6, 12], True, backend)),
        (T.band_l1, (x, y, [0, 12], False, backend)),
        (T.gate_step, (x, y, st, p, coeffs, gam, [0, 6, 12], backend)),
        (T.gate_step, (x, y, st, p, coeffs, None, [0, 12], backend)),
        (T.gate_decide, (torch.rand(2, 2), st, p, coeffs, gam, backend)),
        # scalars as (tensor, value) pairs: a device tensor read by the kernel, or a number passed as an argument
        (T.chebyshev_forecast, (hist, taus, q, 0.0, cnt, None, 4, 0.1, 0.5, backend)),
        (T.chebyshev_forecast, (hist, taus, None, 0.7, None, 4, 2, 0.0, 1.0, backend)),
        (T.chebyshev_forecast, (hist, taus, q, 0.0, None, None, 2, 0.0, 1.0, backend)),
        (T.chebyshev_weights, (taus, q, 0.0, cnt, None, 4, 0.1, 1.0, backend)),
        (T.chebyshev_weights, (taus, None, 0.7, None, 3, 4, 0.1, 0.5, backend)),
        (T.taylor_forecast, (diffs, dist, 0.0, backend)),
        (T.taylor_forecast, (diffs, None, 2.0, backend)),
        (T.hermite_forecast, (diffs, dist, 0.0, 0.71, backend)),
        (T.hermite_forecast, (diffs, None, 1.5, 0.71, backend)),
        (T.taylor_update, (diffs.clone(), hist[0].clone(), dist, 0.0, torch.tensor(1), None, backend)),
        (T.taylor_update, (diffs.clone(), hist[0].clone(), None, 2.0, None, 1, backend)),
        # the error of the forecast, fused into the updates (error: float32 (B, 2), B = the feature's first dim)
        (T.taylor_update_error, (diffs.clone(), hist[0].clone(), dist, 0.0, torch.tensor(2), None,
                                 torch.tensor([1.0, 2.0, 2.0]), backend, torch.empty(3, 2))),
        (T.taylor_update_error, (diffs.clone(), hist[0].clone(), None, 2.0, None, 3, torch.tensor([1.0, 2.0, 2.0]),
                                 backend, torch.empty(3, 2))),
        (T.history_update, (hist.clone(), diffs[0].clone(), torch.tensor(5), None, torch.rand(6), cnt, None, backend,
                            torch.empty(3, 2))),
        (T.history_update, (hist.clone(), diffs[0].clone(), None, 2, torch.rand(6), None, 2, backend, None)),
        (T.chebyshev_forecast_out, (hist, taus, q, 0.0, cnt, None, 4, 0.1, 1.0, backend, torch.empty(3, 4))),
        (T.taylor_forecast_out, (diffs, dist, 0.0, backend, torch.empty(3, 4))),
        (T.hermite_forecast_out, (diffs, None, 2.0, 0.71, backend, torch.empty(3, 4))),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    if backend != "reference" and backend not in available_fast_backends():
        pytest.skip(f"{backend} unavailable: {_backend.backends()[backend]['reason']}")
    for op, args in _samples(backend):
        torch.library.opcheck(op, args)


def _all_ops(x, prev, state, params, hist, taus, q, diffs, feat):
    sums = ops.band_l1(x, prev, [0, 6, 12])
    compute, state2, sums2 = ops.gate_step(x, prev, state, params, [1.0, 0.0], bounds=[0, 6, 12], gammas=[0.8, 1.5])
    c2, state3 = ops.gate_decide(sums2, state2, params, [1.0, 0.0])
    f = ops.chebyshev_forecast(hist, taus, q, 4, 0.1, count=torch.tensor(4), validate=False)
    w = ops.chebyshev_weights(taus, q, 4, 0.1, validate=False)
    t = ops.taylor_forecast(diffs, q)
    h = ops.hermite_forecast(diffs, q)
    ops.taylor_update(diffs, feat, q, count=torch.tensor(1))
    f_out = ops.chebyshev_forecast(hist, taus, q, 4, 0.1, validate=False, out=torch.empty_like(feat))
    t_out = ops.taylor_forecast(diffs, q, out=torch.empty_like(feat))
    h_out = ops.hermite_forecast(diffs, q, out=torch.empty_like(feat))
    # the branch a runtime takes on the device decision
    y = torch.cond(compute, lambda a: a * 2.0, lambda a: a - 1.0, (f,))
    return sums, compute, state3, c2, y, w, t, h, diffs.clone(), f_out, t_out, h_out


# aot_eager: the ops' fake kernels, schemas and declared mutations through AOTAutograd's functionalised graph (fast);
# inductor: its code generation around them too (slow)
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fullgraph_compile_no_graph_breaks(backend, compiler, monkeypatch):
    if backend != "reference" and backend not in available_fast_backends():
        pytest.skip(f"{backend} unavailable: {_backend.backends()[backend]['reason']}")
    monkeypatch.setenv("FASTCACHE_RT_BACKEND", backend)
    _backend.reset()
    g = torch.Generator().manual_seed(1)
    args = dict(
        x=torch.randn(2, 5, 12, generator=g), prev=torch.randn(2, 5, 12, generator=g),
        state=torch.tensor([3, 0.1, 1, 1, 0, 0.2, 0, 2], dtype=torch.float32),
        params=ops.gate_params(0.5, 10), hist=torch.randn(6, 3, 4, generator=g),
        taus=torch.linspace(-1, 0.5, 6), q=torch.tensor(0.7), diffs=torch.randn(3, 3, 4, generator=g),
        feat=torch.randn(3, 4, generator=g),
    )
    torch._dynamo.reset()
    explain = torch._dynamo.explain(_all_ops)(**{k: v.clone() for k, v in args.items()})
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(_all_ops, fullgraph=True, backend=compiler)
    eager_args = {k: v.clone() for k, v in args.items()}
    comp_args = {k: v.clone() for k, v in args.items()}
    expect = _all_ops(**eager_args)
    got = compiled(**comp_args)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(comp_args["diffs"], eager_args["diffs"])  # the in-place update happened
    _backend.reset()


def test_backends_report():
    info = ops.backends()
    assert set(info) == {"reference", "cpu", "triton", "cuda"}
    assert info["reference"]["available"] and info["reference"]["reason"] is None
    for name, row in info.items():
        assert row["available"] == (row["reason"] is None), name
    if not torch.cuda.is_available():
        assert not info["cuda"]["available"] and info["cuda"]["reason"]


def test_explicit_unavailable_backend_raises_with_reason():
    info = ops.backends()
    missing = [n for n, r in info.items() if not r["available"]]
    if not missing:
        pytest.skip("every backend is available here")
    name = missing[0]
    with pytest.raises(RuntimeError, match=name):
        ops.band_l1(torch.ones(3), torch.ones(3), backend=name)
    # and through the environment variable
    _backend.reset()
    os.environ["FASTCACHE_RT_BACKEND"] = name
    try:
        with pytest.raises(RuntimeError, match="not available|does not run"):
            ops.taylor_forecast(torch.ones(2, 3), 1.0)
    finally:
        del os.environ["FASTCACHE_RT_BACKEND"]
        _backend.reset()


def test_env_override_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTCACHE_RT_BACKEND", "reference")
    _backend.reset()
    assert _backend.resolve(torch.device("cpu"), None) == "reference"
    monkeypatch.delenv("FASTCACHE_RT_BACKEND")
    _backend.reset()
    auto = _backend.resolve(torch.device("cpu"), None)
    assert auto == ("cpu" if "cpu" in available_fast_backends() else "reference")
