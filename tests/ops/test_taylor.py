import math

import pytest
import torch

from fastcache_rt import ops
from tests.conftest import interpreter_keeps, is_triton
from tests.ops.helpers import DTYPES, assert_close, make_view, out_tol, poison


def test_reference_formulas():
    d = torch.randn(3, 11)
    x = 2.5
    torch.testing.assert_close(ops.taylor_forecast(d, x, backend="reference"), d[0] + x * d[1] + x * x / 2 * d[2])
    s = 0.71
    y = s * x
    herm = d[0] + (2 * y) * s * d[1] + (4 * y * y - 2) * s * s / 2 * d[2]
    torch.testing.assert_close(ops.hermite_forecast(d, x, backend="reference"), herm)
    # FreqCa's approximation F0 + x D1 + (x^2 - 1)/2 D2 holds to within the 0.71^2 ~ 1/2 rounding
    approx = d[0] + x * d[1] + (x * x - 1) / 2 * d[2]
    assert (herm - approx).abs().max() < 0.05 * (d.abs().max() * x * x)


def test_reference_update_builds_finite_differences():
    f = [torch.randn(6) for _ in range(4)]
    buf = torch.full((3, 6), float("nan"))
    ops.taylor_update(buf, f[0], 2.0, count=0, backend="reference")
    torch.testing.assert_close(buf, torch.stack([f[0], torch.zeros(6), torch.zeros(6)]))
    ops.taylor_update(buf, f[1], 2.0, count=1, backend="reference")
    d1 = (f[1] - f[0]) / 2
    torch.testing.assert_close(buf, torch.stack([f[1], d1, torch.zeros(6)]))
    ops.taylor_update(buf, f[2], 4.0, count=2, backend="reference")
    d1b = (f[2] - f[1]) / 4
    torch.testing.assert_close(buf, torch.stack([f[2], d1b, (d1b - d1) / 4]))


def test_taylor_reproduces_quadratics():
    # exact finite differences of a quadratic with equal gaps: the order-2 Taylor forecast is exact up to the
    # backward-difference bias D2 * gap / 2 in D1, which we add back here to check the update + forecast chain.
    a, b, c = torch.randn(3, 5).unbind(0)

    def f(t):
        return a + b * t + c * t * t

    buf = torch.zeros(3, 5)
    for i, t in enumerate([0.0, 1.0, 2.0]):
        ops.taylor_update(buf, f(t), 1.0, count=i, backend="reference")
    # D1 = f(2) - f(1) = b + 3c ; D2 = 2c ; forecast at x: f(2) + x D1 + x^2 c
    x = 3.0
    got = ops.taylor_forecast(buf, x, backend="reference")
    torch.testing.assert_close(got, f(2.0) + x * (b + 3 * c) + x * x * c)


@pytest.mark.parametrize("K", [1, 2, 3, 5])
@pytest.mark.parametrize("N", [1, 7, 63, 1000, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_backend_matches_reference(fast_backend, K, N, dtype, layout):
    name, mod, dev = fast_backend
    if (is_triton(name) and N > 1000) or not interpreter_keeps(name, K, N, str(dtype), layout, every=5):
        pytest.skip("subsampled under the Triton CPU interpreter")
    g = torch.Generator().manual_seed(K * 100 + N)
    diffs = make_view(layout, (K, N), dtype, dev, g)
    dist = torch.tensor(2.5, device=dev)
    for fn, extra in (("taylor_forecast", ()), ("hermite_forecast", (0.71,))):
        out = poison(torch.empty(N, dtype=dtype, device=dev))
        getattr(mod, fn)(diffs, dist, *extra, out)
        ref = getattr(ops, fn)(diffs, dist, backend="reference")
        assert_close(out, ref, **out_tol(dtype), what=f"{name} {fn}")
    # in-place update, for each count (including rows that hold NaN beyond count)
    for count in range(K + 1):
        start = make_view(layout, (K, N), dtype, dev, g)
        if count < K:
            start[count:] = float("nan")
        feat = make_view("sliced" if layout == "sliced" else "contiguous", (1, N), dtype, dev, g)[0]
        a, b = start.clone(), start.clone()
        if layout == "transposed":
            a, b = a.t().contiguous().t(), b.t().contiguous().t()
        gap = torch.tensor(3.0, device=dev)
        cnt = torch.tensor(count, device=dev)
        mod.taylor_update(a, feat, gap, cnt)
        ops.taylor_update(b, feat, gap, count=cnt, backend="reference")
        assert_close(a, b, **out_tol(dtype), what=f"{name} taylor_update count={count}")


@pytest.mark.parametrize("N", [1, 63, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_matches_reference(fast_backend, N, dtype):
    """Public taylor_forecast / hermite_forecast with out= (strided, poisoned) equal the reference."""
    name, mod, dev = fast_backend
    if not interpreter_keeps(name, N, str(dtype), every=3):
        pytest.skip("subsampled under the Triton CPU interpreter")
    g = torch.Generator().manual_seed(N + 11)
    diffs = make_view("transposed", (3, 2, N), dtype, dev, g)
    for fn, kw in (("taylor_forecast", {}), ("hermite_forecast", {"scale": 0.71})):
        out = poison(torch.empty(2 * N * 3, dtype=dtype, device=dev))[::3].view(2, N)
        got = getattr(ops, fn)(diffs, 1.5, out=out, backend=name, **kw)
        assert got is out
        ref = getattr(ops, fn)(diffs, 1.5, backend="reference", **kw)
        assert_close(out, ref, **out_tol(dtype), what=f"{name} {fn} out=")


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: ops.taylor_forecast(torch.zeros(0, 3), 1.0), ValueError, "diffs"),
        (lambda: ops.taylor_forecast(torch.zeros(2, 3, dtype=torch.int32), 1.0), TypeError, "diffs"),
        (lambda: ops.taylor_forecast(torch.zeros(2, 3), float("inf")), ValueError, "distance"),
        (lambda: ops.taylor_forecast(torch.zeros(2, 3), "1"), TypeError, "distance"),
        (lambda: ops.hermite_forecast(torch.zeros(2, 3), 1.0, scale=math.nan), ValueError, "scale"),
        (lambda: ops.taylor_forecast(torch.zeros(2, 3), 1.0, out=torch.zeros(2, 3)), ValueError, "out: shape"),
        (lambda: ops.hermite_forecast(torch.zeros(2, 3), 1.0, out=torch.zeros(3, dtype=torch.bfloat16)), TypeError,
         "out: dtype"),
        (lambda: (lambda d: ops.taylor_forecast(d, 1.0, out=d[1]))(torch.zeros(2, 3)), ValueError, "overlaps"),
        (lambda: ops.taylor_update(torch.zeros(2, 3), torch.zeros(4), 1.0), ValueError, "feature"),
        (lambda: ops.taylor_update(torch.zeros(2, 3), torch.zeros(3), 0.0), ValueError, "gap"),
        (lambda: ops.taylor_update(torch.zeros(2, 3), torch.zeros(3), 1.0, count=-1), ValueError, "count"),
        (lambda: ops.taylor_update(torch.zeros(2, 3), torch.zeros(3, dtype=torch.float16), 1.0), TypeError,
         "feature"),
    ],
)
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
