import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcache_rt import ops
from tests.conftest import interpreter_keeps, is_triton
from tests.ops.helpers import DTYPES, assert_close, make_view, out_tol, poison


def _np_weights(taus, q, degree, lam):
    """Independent fp64 oracle: numpy's Chebyshev Vandermonde + a dense solve."""
    phi = np.polynomial.chebyshev.chebvander(np.asarray(taus, dtype=np.float64), degree)
    phi_q = np.polynomial.chebyshev.chebvander(np.array([q], dtype=np.float64), degree)[0]
    gram = phi.T @ phi + lam * np.eye(degree + 1)
    return phi @ np.linalg.solve(gram, phi_q)


@pytest.mark.parametrize("n, degree, lam", [(1, 4, 0.1), (3, 4, 0.1), (14, 4, 0.1), (14, 2, 1e-3), (40, 6, 0.5),
                                            (5, 0, 0.1), (2, 7, 1e-2)])
def test_reference_weights_match_numpy(n, degree, lam):
    rng = np.random.default_rng(n * 31 + degree)
    taus = np.sort(rng.uniform(-1, 0.6, n))
    q = 0.8
    w = ops.chebyshev_weights(torch.tensor(taus, dtype=torch.float32), q, degree, lam, backend="reference")
    expect = _np_weights(np.float32(taus).astype(np.float64), q, degree, lam)
    np.testing.assert_allclose(w.numpy(), expect, rtol=1e-5, atol=1e-6)


def test_reference_ring_buffer_and_blend():
    taus = torch.tensor([-1.0, -0.6, -0.2, 0.1, float("nan"), float("nan")])
    hist = torch.randn(6, 5)
    hist[4:] = float("nan")  # garbage beyond count: never read
    count = torch.tensor(4)
    f = ops.chebyshev_forecast(hist, taus, 0.3, 4, 0.1, count=count, backend="reference")
    w = _np_weights(taus[:4].numpy(), 0.3, 4, 0.1)
    np.testing.assert_allclose(f.numpy(), (torch.tensor(w, dtype=torch.float32) @ hist[:4]).numpy(), rtol=1e-5,
                               atol=1e-5)
    # blend 0 is pure linear extrapolation from the two rows of largest tau
    lin = ops.chebyshev_forecast(hist, taus, 0.3, 4, 0.1, count=count, blend=0.0, backend="reference")
    k = (0.3 - 0.1) / (0.1 - (-0.2))
    torch.testing.assert_close(lin, hist[3] + k * (hist[3] - hist[2]))
    mid = ops.chebyshev_forecast(hist, taus, 0.3, 4, 0.1, count=count, blend=0.5, backend="reference")
    torch.testing.assert_close(mid, 0.5 * lin + 0.5 * f, rtol=1e-5, atol=1e-5)


def test_no_valid_row_gives_nan_not_zeros():
    w = ops.chebyshev_weights(torch.zeros(3), 0.5, count=torch.tensor(0), validate=False, backend="reference")
    assert torch.isnan(w).all()


@settings(max_examples=30, deadline=None)
@given(
    degree=st.integers(0, 5),
    extra=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
    q=st.floats(-1.0, 1.0),
)
@pytest.mark.slow  # 30 examples x every backend
def test_reproduces_polynomial_trajectories(degree, extra, seed, q):
    """Property: with a tiny ridge, a degree-M forecaster reproduces any degree-M polynomial trajectory (on the
    reference and on every available backend)."""
    from tests.conftest import _device_for, available_fast_backends

    n = degree + 1 + extra
    g = torch.Generator().manual_seed(seed)
    taus = torch.sort(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).values
    # keep the nodes apart so that the fp32 taus give a well-posed fit
    taus = torch.linspace(-1, 1, n, dtype=torch.float64) * 0.5 + taus * 0.5 / max(n, 1)
    coef = torch.randn(degree + 1, 3, generator=g, dtype=torch.float64)
    hist = torch.stack([sum(coef[m] * t**m for m in range(degree + 1)) for t in taus]).float()
    expect = sum(coef[m] * q**m for m in range(degree + 1)).float()
    for name in ["reference", *available_fast_backends()]:
        dev = _device_for(name) if name != "reference" else "cpu"
        got = ops.chebyshev_forecast(hist.to(dev), taus.float().to(dev), q, degree, 1e-9, backend=name).cpu()
        scale = float(hist.abs().max()) + 1.0
        assert torch.allclose(got, expect, rtol=0, atol=2e-3 * scale), (name, got, expect)


CASES = [
    # (n, count, degree, lam, blend)
    (1, None, 4, 0.1, 1.0),
    (7, None, 4, 0.1, 1.0),
    (14, None, 4, 0.1, 1.0),
    (14, 5, 4, 0.1, 1.0),
    (9, 3, 6, 0.05, 0.5),
    (6, None, 2, 0.0, 1.0),
    (3, None, 5, 0.0, 1.0),  # degree > n - 1 with lam = 0: the jitter path
    (10, 10, 4, 0.1, 0.25),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("N", [1, 7, 63, 1000, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_backend_matches_reference(fast_backend, case, N, dtype, layout):
    name, mod, dev = fast_backend
    n, count, degree, lam, blend = case
    if (is_triton(name) and N > 1000) or not interpreter_keeps(name, case, N, str(dtype), layout, every=6):
        pytest.skip("subsampled under the Triton CPU interpreter")
    g = torch.Generator().manual_seed(n * 7 + N)
    hist = make_view(layout, (n, N), dtype, dev, g)
    if count is not None and count < n:
        hist[count:] = float("nan")  # the ring buffer's unused rows
    taus = torch.sort(torch.rand(n, generator=g) * 1.6 - 1).values.to(dev)
    cnt = None if count is None else torch.tensor(count, device=dev)
    q = torch.tensor(0.7, device=dev)
    ref = ops.chebyshev_forecast(hist, taus, q, degree, lam, count=cnt, blend=blend, backend="reference")
    out = poison(torch.empty(N, dtype=dtype, device=dev))
    mod.chebyshev_forecast(hist, taus, q, cnt, degree, lam, blend, out)
    assert_close(out, ref, **out_tol(dtype), what=f"{name} forecast")
    w_out = poison(torch.empty(n, device=dev))
    mod.chebyshev_weights(taus, q, cnt, degree, lam, blend, w_out)
    w_ref = ops.chebyshev_weights(taus, q, degree, lam, count=cnt, blend=blend, backend="reference")
    assert_close(w_out, w_ref, rtol=1e-5, atol=1e-6, what=f"{name} weights")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.slow  # FLUX-size inputs (~10 s on the CPU backend)
def test_flux_size(fast_backend, dtype):
    name, mod, dev = fast_backend
    if is_triton(name):
        pytest.skip("FLUX-size inputs are too slow for the Triton CPU interpreter; covered on small sizes")
    g = torch.Generator().manual_seed(21)
    hist = make_view("contiguous", (14, 1, 4096, 3072), dtype, dev, g)
    taus = torch.linspace(-1, 0.8, 14, device=dev)
    got = ops.chebyshev_forecast(hist, taus, 0.85, backend=name)
    ref = ops.chebyshev_forecast(hist, taus, 0.85, backend="reference")
    assert got.shape == (1, 4096, 3072)
    assert_close(got, ref, **out_tol(dtype), what=f"{name} FLUX-size")


def test_count_as_device_tensor_larger_than_n_means_full_ring(fast_backend):
    name, mod, dev = fast_backend
    g = torch.Generator().manual_seed(22)
    hist = torch.randn(5, 33, generator=g).to(dev)
    taus = torch.linspace(-1, 0.5, 5, device=dev)
    a = ops.chebyshev_forecast(hist, taus, 0.6, count=torch.tensor(17, device=dev), backend=name)
    b = ops.chebyshev_forecast(hist, taus, 0.6, backend="reference")
    assert_close(a, b, rtol=1e-5, atol=1e-5, what=name)


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: ops.chebyshev_forecast(torch.zeros(0, 4), torch.zeros(0), 0.5), ValueError, "history"),
        (lambda: ops.chebyshev_forecast(torch.zeros(3, 4), torch.zeros(2), 0.5), ValueError, "taus"),
        (lambda: ops.chebyshev_forecast(torch.zeros(2, 4), torch.tensor([0.1, float("nan")]), 0.5), ValueError,
         "taus"),
        (lambda: ops.chebyshev_forecast(torch.zeros(2, 4), torch.zeros(2), float("nan")), ValueError, "tau_query"),
        (lambda: ops.chebyshev_forecast(torch.zeros(2, 4), torch.zeros(2), 0.5, degree=-1), ValueError, "degree"),
        (lambda: ops.chebyshev_forecast(torch.zeros(2, 4), torch.zeros(2), 0.5, lam=-0.1), ValueError, "lam"),
        (lambda: ops.chebyshev_forecast(torch.zeros(2, 4), torch.zeros(2), 0.5, count=0), ValueError, "count"),
        (lambda: ops.chebyshev_forecast(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2), 0.5), TypeError,
         "history"),
        (lambda: ops.chebyshev_forecast(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), 0.5), TypeError, "taus"),
        (lambda: ops.chebyshev_forecast(torch.zeros(2, 4), torch.zeros(2), 0.5, degree=2.0), TypeError, "degree"),
        (lambda: ops.chebyshev_weights(torch.zeros(2, 2), 0.5), ValueError, "taus"),
        (lambda: ops.chebyshev_weights(torch.zeros(2), torch.zeros(3)), ValueError, "tau_query"),
    ],
)
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


@pytest.mark.parametrize("N", [1, 63, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_layout", ["contiguous", "strided"])
def test_out_matches_reference(fast_backend, N, dtype, out_layout):
    """out=: the result lands in the given (poisoned, possibly strided) tensor, equal to the allocating call's."""
    name, mod, dev = fast_backend
    if not interpreter_keeps(name, N, str(dtype), out_layout, every=3):
        pytest.skip("subsampled under the Triton CPU interpreter")
    g = torch.Generator().manual_seed(N + 5)
    hist = make_view("sliced", (9, 3, N), dtype, dev, g)
    taus = torch.linspace(-1, 0.6, 9, device=dev)
    ref = ops.chebyshev_forecast(hist, taus, 0.8, 3, 0.05, count=torch.tensor(7, device=dev), backend="reference")
    if out_layout == "contiguous":
        out = poison(torch.empty(3, N, dtype=dtype, device=dev))
    else:  # every other element of a wider buffer: a 1-D stride of 2 after collapsing
        out = poison(torch.empty(3 * N * 2, dtype=dtype, device=dev))[::2].view(3, N)
    got = ops.chebyshev_forecast(hist, taus, 0.8, 3, 0.05, count=torch.tensor(7, device=dev), out=out, backend=name)
    assert got is out
    assert_close(out, ref, **out_tol(dtype), what=f"{name} out=")


@pytest.mark.parametrize(
    "out, exc, word",
    [
        (torch.empty(4, 5), ValueError, "out: shape"),
        (torch.empty(4, dtype=torch.float64), TypeError, "out: dtype"),
        (torch.empty(1, 4), ValueError, "out: shape"),
        ("not a tensor", TypeError, "out"),
    ],
)
def test_out_bad_input(out, exc, word):
    with pytest.raises(exc, match=word):
        ops.chebyshev_forecast(torch.zeros(3, 4), torch.linspace(-1, 0, 3), 0.5, out=out)


def test_out_must_not_overlap_history():
    hist = torch.randn(3, 4)
    with pytest.raises(ValueError, match="out: overlaps history"):
        ops.chebyshev_forecast(hist, torch.linspace(-1, 0, 3), 0.5, out=hist[2])
    ok = torch.empty(2, 4, 6)[:, :, :2]  # (2, 4, 2): the last two dims do not collapse into one stride
    h = torch.randn(3, 2, 4, 2)
    got = ops.chebyshev_forecast(h, torch.linspace(-1, 0, 3), 0.5, out=ok)  # computed, then copied into it
    assert got is ok
    torch.testing.assert_close(ok, ops.chebyshev_forecast(h, torch.linspace(-1, 0, 3), 0.5))
