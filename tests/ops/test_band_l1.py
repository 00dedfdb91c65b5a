import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcache_rt import ops
from fastcache_rt.ops import _reference
from fastcache_rt.ops._common import bounds_tensor, three_d
from tests.conftest import interpreter_keeps, is_triton
from tests.ops.helpers import DTYPES, assert_close, make_view, poison

SHAPES = [(1,), (7,), (63,), (1000,), (4097,), (3, 7, 63), (2, 33, 17), (5, 1000)]
# the backends' matrix: the "sliced" view of a 1-D shape is N x N, 4097 x 4097 here, and (5, 1000) costs the Triton
# CPU interpreter 5-8 s: both in the full suite only
BACKEND_SHAPES = [pytest.param(s, marks=pytest.mark.slow) if s in ((4097,), (5, 1000)) else s for s in SHAPES]
BAND_SETS = {"one": None, "halves": "halves", "three": "three"}


def _bounds(kind, D):
    if kind is None or D < 3:
        return [0, D]
    if kind == "halves":
        return [0, D // 2, D]
    return [0, D // 3, D - D // 3, D]


def _call_backend(mod, cur, prev, bounds, per_sample):
    c3, p3 = three_d(cur), three_d(prev)
    out = poison(torch.empty((c3.shape[0] if per_sample else 1, len(bounds) - 1, 2), device=cur.device))
    mod.band_l1(c3, p3, bounds_tensor(bounds, cur.device), per_sample, out)
    return out if per_sample else out[0]


def _fp64_band_l1(cur, prev, bounds, per_sample):
    x, y = cur.double().cpu(), prev.double().cpu()
    if x.dim() == 1:
        x, y = x[None], y[None]
    B = x.shape[0]
    x, y = x.reshape(B, -1, x.shape[-1]), y.reshape(B, -1, y.shape[-1])
    res = []
    for b in range(B):
        row = []
        for lo, hi in zip(bounds, bounds[1:]):
            row.append([(x[b, :, lo:hi] - y[b, :, lo:hi]).abs().sum(), y[b, :, lo:hi].abs().sum()])
        res.append(row)
    t = torch.tensor(res, dtype=torch.float64)
    return t if per_sample else t.sum(0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bands", list(BAND_SETS.values()), ids=list(BAND_SETS))
def test_reference_matches_fp64(shape, dtype, bands):
    g = torch.Generator().manual_seed(1)
    cur, prev = make_view("contiguous", shape, dtype, "cpu", g), make_view("contiguous", shape, dtype, "cpu", g)
    b = _bounds(bands, shape[-1])
    for per_sample in ([False, True] if len(shape) > 1 else [False]):
        got = ops.band_l1(cur, prev, b, per_sample=per_sample, backend="reference")
        assert_close(got, _fp64_band_l1(cur, prev, b, per_sample), rtol=1e-5, atol=1e-6, what="reference vs fp64")


@pytest.mark.parametrize("shape", BACKEND_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_backend_matches_reference(fast_backend, shape, dtype, layout):
    name, mod, dev = fast_backend
    if not interpreter_keeps(name, shape, str(dtype), layout, every=3):
        pytest.skip("subsampled under the Triton CPU interpreter")
    g = torch.Generator().manual_seed(hash((shape, str(dtype), layout)) % 2**31)
    cur = make_view(layout, shape, dtype, dev, g)
    prev = make_view(layout, shape, dtype, dev, g)
    if is_triton(name) and cur.numel() > 50_000:  # ("sliced" of a 1-D shape is a 1000 x 1000 view)
        pytest.skip("too many programs for the Triton CPU interpreter; the layout is covered on smaller shapes")
    for bands in BAND_SETS.values():
        b = _bounds(bands, shape[-1])
        for per_sample in ([False, True] if len(shape) > 1 else [False]):
            got = _call_backend(mod, cur, prev, b, per_sample)
            ref = ops.band_l1(cur, prev, b, per_sample=per_sample, backend="reference")
            assert_close(got, ref, rtol=1e-5, atol=1e-5, what=f"{name} {layout} bounds={b} per_sample={per_sample}")
            # the public entry with the backend named agrees too
            pub = ops.band_l1(cur, prev, b, per_sample=per_sample, backend=name)
            assert_close(pub, ref, rtol=1e-5, atol=1e-5, what=f"{name} public")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.slow  # FLUX-size inputs
def test_flux_size(fast_backend, dtype):
    name, mod, dev = fast_backend
    if is_triton(name):
        pytest.skip("FLUX-size inputs are too slow for the Triton CPU interpreter; covered on small sizes")
    g = torch.Generator().manual_seed(3)
    cur = make_view("contiguous", (1, 4096, 3072), dtype, dev, g)
    prev = make_view("contiguous", (1, 4096, 3072), dtype, dev, g)
    b = [0, 1536, 3072]
    got = _call_backend(mod, cur, prev, b, False)
    assert_close(got, _fp64_band_l1(cur, prev, b, False), rtol=1e-5, atol=0, what=f"{name} FLUX-size vs fp64")


@pytest.mark.slow  # 2^24 elements
def test_accuracy_2_pow_24(fast_backend):
    """Relative error against an fp64 sum stays under 1e-5 at 2^24 elements (fp32 data with a large mean, the
    case where naive fp32 accumulation drifts)."""
    name, mod, dev = fast_backend
    if is_triton(name):
        pytest.skip("2^24 elements are too slow for the Triton CPU interpreter")
    g = torch.Generator().manual_seed(4)
    n = 1 << 24
    prev = (torch.rand(n, generator=g) + 1.0).view(4096, 4096).to(dev)
    cur = prev + 0.01 * torch.rand(n, generator=g).view(4096, 4096).to(dev)
    got = _call_backend(mod, cur, prev, [0, 4096], False).double().cpu()
    exact = _fp64_band_l1(cur, prev, [0, 4096], False)
    rel = ((got - exact).abs() / exact.abs()).max().item()
    assert rel < 1e-5, f"{name}: relative error {rel:.3g} at 2^24 elements"


def test_nan_inf_propagate(fast_backend):
    name, mod, dev = fast_backend
    g = torch.Generator().manual_seed(5)
    cur = make_view("contiguous", (3, 10, 8), torch.float32, dev, g)
    prev = make_view("contiguous", (3, 10, 8), torch.float32, dev, g)
    cur[1, 2, 1] = float("nan")  # band 0 of sample 1
    prev[2, 3, 6] = float("inf")  # band 1 of sample 2
    got = _call_backend(mod, cur, prev, [0, 4, 8], True).cpu()
    assert torch.isnan(got[1, 0, 0]) and torch.isfinite(got[1, 0, 1])
    assert torch.isinf(got[2, 1, 1])
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1, 1]).all() and torch.isfinite(got[2, 0]).all()


@settings(max_examples=25, deadline=None)
@given(
    D=st.integers(1, 70),
    rows=st.integers(1, 9),
    cuts=st.lists(st.floats(0.01, 0.99), min_size=0, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.slow  # 25 examples x every backend, the Triton interpreter's among them
def test_bands_add_up_to_one_band(D, rows, cuts, seed):
    """Property: the band sums add up to the one-band sum, on every available backend."""
    from tests.conftest import _device_for, available_fast_backends

    g = torch.Generator().manual_seed(seed)
    cur, prev = torch.randn(rows, D, generator=g), torch.randn(rows, D, generator=g)
    inner = sorted({int(c * D) for c in cuts} - {0, D})
    b = [0, *inner, D]
    for name in ["reference", *available_fast_backends()]:
        dev = _device_for(name) if name != "reference" else "cpu"
        banded = ops.band_l1(cur.to(dev), prev.to(dev), b, backend=name).double().sum(0)
        whole = ops.band_l1(cur.to(dev), prev.to(dev), None, backend=name).double()[0]
        assert torch.allclose(banded.cpu(), whole.cpu(), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(cur=torch.zeros(4, 3), prev=torch.zeros(4, 4)), ValueError, "prev"),
        (dict(cur=torch.zeros(4, 3, dtype=torch.int32), prev=torch.zeros(4, 3, dtype=torch.int32)), TypeError, "cur"),
        (dict(cur=torch.zeros(4, 3), prev=torch.zeros(4, 3, dtype=torch.float16)), TypeError, "prev"),
        (dict(cur=torch.zeros(()), prev=torch.zeros(())), ValueError, "cur"),
        (dict(cur=torch.zeros(4, 6), prev=torch.zeros(4, 6), bounds=[0, 4, 2, 6]), ValueError, "bounds"),
        (dict(cur=torch.zeros(4, 6), prev=torch.zeros(4, 6), bounds=[0, 3, 5]), ValueError, "bounds"),
        (dict(cur=torch.zeros(4, 6), prev=torch.zeros(4, 6), bounds=[1, 6]), ValueError, "bounds"),
        (dict(cur=torch.zeros(4, 6), prev=torch.zeros(4, 6), bounds=[0, 3, 3, 6]), ValueError, "bounds"),
        (dict(cur=torch.zeros(4, 6), prev=torch.zeros(4, 6), bounds=["a", 6]), TypeError, "bounds"),
        (dict(cur=torch.zeros(6), prev=torch.zeros(6), per_sample=True), ValueError, "per_sample"),
        (dict(cur=torch.zeros(4, 6), prev=torch.zeros(4, 6), backend="nope"), ValueError, "backend"),
        (dict(cur=[1.0], prev=[1.0]), TypeError, "cur"),
    ],
)
def test_bad_input(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        ops.band_l1(**kwargs)


def test_reference_is_not_silent_on_empty_band_data():
    # All-zero previous probe: sums are exact zeros (the gate turns 0/0 into 0, x/0 into inf).
    got = ops.band_l1(torch.zeros(2, 4), torch.zeros(2, 4), backend="reference")
    assert got.tolist() == [[0.0, 0.0]]
    assert math.isfinite(_reference._rel(torch.tensor(0.0), torch.tensor(0.0)).item())
