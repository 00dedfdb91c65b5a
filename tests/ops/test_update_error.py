"""The error of the forecast, fused into the forecasters' updates: ``taylor_update(..., error=, error_weights=)``
(``torch.ops.fastcache_rt.taylor_update_error``) and ``history_update`` (Spectrum's ring buffer).

Every backend against the reference: the update part bitwise what it was (the same backend without ``error``, and the
reference), the error sums to rtol 1e-6 (every backend forms each fp32 term with the reference's bits and sums in
float64, so only the order of float64 additions and the final rounding to float32 differ: about one float32 ulp,
2^-24 ~ 6e-8 relative), on odd sizes, strided layouts, the three dtypes, count in {0, 1, K-1, K} (rows beyond count
hold NaN), scalars as numbers and as tensors. Determinism: the same call twice, the CPU kernels on 1 and 2 threads
and on both instruction sets, bitwise. Validation, NaN / Inf propagation, compile with fullgraph."""

from __future__ import annotations

import pytest
import torch

from fastcache_rt import ops
from fastcache_rt.ops import _backend
from tests.conftest import available_fast_backends, interpreter_keeps, is_triton
from tests.ops.helpers import DTYPES, assert_close, make_view, out_tol

ERR_TOL = {"rtol": 1e-6, "atol": 0.0}
INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT[t.dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def _shape(B: int, L: int) -> tuple[int, ...]:
    """A feature of B samples: (B, 3, L / 3) (a 3-D feature) when L divides by 3, (L,) for B = 1, else (B, L)."""
    if B == 1:
        return (L,)
    return (B, 3, L // 3) if L % 3 == 0 else (B, L)


def ref_rand(shape, dtype, dev, g):
    return torch.randn(shape, generator=g).to(dtype=dtype, device=dev)


def _rows(kind: str, n: int, shape: tuple[int, ...], dtype, dev, g) -> torch.Tensor:
    """(n, *shape) rows laid out as kind (helpers.make_view); "split": padded last dim, so that the trailing dims
    do not collapse for a feature of >= 2 dims (the op updates a copy and writes it back)."""
    if kind == "split":
        return ref_rand((n, *shape[:-1], shape[-1] + 3), dtype, dev, g)[..., 1:-2]
    return make_view(kind, (n, *shape), dtype, dev, g)


def _feature(kind: str, shape, dtype, dev, g) -> torch.Tensor:
    if kind == "contiguous":
        return ref_rand(shape, dtype, dev, g)
    return ref_rand((*shape[:-1], 2 * shape[-1]), dtype, dev, g)[..., ::2]  # every other element


def _counts(K: int) -> list[int]:
    return sorted({0, 1, K - 1, K})


# ---------------------------------------------------------------------------------------------------------------
# the reference: its formulas
# ---------------------------------------------------------------------------------------------------------------


def test_reference_error_formulas():
    g = torch.Generator().manual_seed(0)
    diffs = torch.randn(3, 2, 5, generator=g)
    diffs[2] = float("nan")  # not valid: count = 2
    feat = torch.randn(2, 5, generator=g)
    w = torch.tensor([1.0, 0.5, 7.0])
    err = torch.full((2, 2), float("nan"))
    expect_pred = diffs[0] + 0.5 * diffs[1]
    old = diffs.clone()
    ops.taylor_update(diffs, feat, 2.0, count=2, error=err, error_weights=w, backend="reference")
    e = (expect_pred - feat).double()
    torch.testing.assert_close(err, torch.stack([(e * e).sum(1), (feat.double() ** 2).sum(1)], 1).float())
    plain = old.clone()
    ops.taylor_update(plain, feat, 2.0, count=2, backend="reference")
    assert same_bits(diffs, plain)
    # history: pred from the rows before the write, row 1 is overwritten (and was valid: read first)
    hist = torch.randn(4, 2, 5, generator=g)
    hist[3] = float("inf")
    w4 = torch.tensor([0.25, -1.0, 2.0, float("nan")])
    before = hist.clone()
    ops.history_update(hist, feat, 1, weights=w4, count=3, error=err, backend="reference")
    pred = 0.25 * before[0] - before[1] + 2.0 * before[2]
    e = (pred - feat).double()
    torch.testing.assert_close(err, torch.stack([(e * e).sum(1), (feat.double() ** 2).sum(1)], 1).float())
    assert same_bits(hist[1], feat) and same_bits(hist[[0, 2, 3]], before[[0, 2, 3]])


def test_count_zero_forecasts_zero_and_never_reads_stale_rows():
    diffs = torch.full((3, 4), float("nan"))
    feat = torch.arange(4.0)
    err = torch.empty(1, 2)
    ops.taylor_update(diffs, feat, 1.0, count=0, error=err, error_weights=torch.full((3,), float("nan")),
                      backend="reference")
    assert err.tolist() == [[14.0, 14.0]]
    hist = torch.full((2, 4), float("nan"))
    ops.history_update(hist, feat, 0, weights=torch.full((2,), float("nan")), count=0, error=err,
                       backend="reference")
    assert err.tolist() == [[14.0, 14.0]] and torch.equal(hist[0], feat)


# ---------------------------------------------------------------------------------------------------------------
# every backend against the reference
# ---------------------------------------------------------------------------------------------------------------


def like(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with t's strides (the same layout, its own memory)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _run_taylor(backend, start, feat, gap, count, w, with_error):
    d = like(start)
    B = feat.shape[0] if feat.dim() >= 2 else 1
    err = torch.full((B, 2), float("nan"), device=feat.device) if with_error else None
    kw = {"error": err, "error_weights": w} if with_error else {}
    ops.taylor_update(d, feat, gap, count=count, backend=backend, **kw)
    return d, err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("B, L", [(3, 1001), (1, 1001), (2, 2500)])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "split"])
def test_taylor_update_error_matches_reference(fast_backend, dtype, K, B, L, layout):
    name, _, dev = fast_backend
    if is_triton(name) and (L > 1001 and layout != "contiguous"):
        pytest.skip("interpreter: the multi-chunk case on the contiguous layout only")
    if not interpreter_keeps(name, K, B, L, layout, str(dtype), every=2):
        pytest.skip("subsampled under the Triton CPU interpreter")
    g = torch.Generator().manual_seed(K * 1000 + B * 10 + L)
    shape = _shape(B, L)
    w = torch.randn(K, generator=g).to(dev)
    for count in _counts(K):
        start = _rows(layout, K, shape, dtype, dev, g)
        if count < K:
            start[count:] = float("nan")  # stale rows: never read
        feat = _feature("contiguous" if layout == "contiguous" else "sliced", shape, dtype, dev, g)
        for gap, cnt in ((1.5, count), (torch.tensor(3.0, device=dev), torch.tensor(count, device=dev))):
            got, err = _run_taylor(name, start, feat, gap, cnt, w, True)
            plain, _ = _run_taylor(name, start, feat, gap, cnt, w, False)
            want, err_ref = _run_taylor("reference", start, feat, gap, cnt, w, True)
            what = f"{name} taylor_update error count={count} {layout}"
            assert same_bits(got, plain), f"{what}: the update changed with error="
            assert_close(got, want, **out_tol(dtype), what=what)
            if not is_triton(name):  # the interpreter rounds to bf16 by truncation
                assert same_bits(got, want), f"{what}: not bitwise the reference"
            assert_close(err, err_ref, **ERR_TOL, what=what + " error sums")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("B, L", [(3, 1001), (1, 1001), (2, 2500)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "split"])
def test_history_update_matches_reference(fast_backend, dtype, n, B, L, layout):
    name, _, dev = fast_backend
    if is_triton(name) and (L > 1001 and layout != "contiguous"):
        pytest.skip("interpreter: the multi-chunk case on the contiguous layout only")
    if not interpreter_keeps(name, n, B, L, layout, str(dtype), every=2):
        pytest.skip("subsampled under the Triton CPU interpreter")
    g = torch.Generator().manual_seed(n * 1000 + B * 10 + L)
    shape = _shape(B, L)
    if layout == "transposed":
        shape = (B, L) if B > 1 else (L,)
    w = torch.randn(n, generator=g).to(dev)
    for count in _counts(n):
        start = _rows(layout, n, shape, dtype, dev, g)
        if count < n:
            start[count:] = float("nan")
        value = _feature("contiguous" if layout == "contiguous" else "sliced", shape, dtype, dev, g)
        for row in sorted({0, n - 1, min(count, n - 1)}):
            for r, cnt in ((row, count), (torch.tensor(row, device=dev), torch.tensor(count, device=dev))):
                results = {}
                for bk, with_error in ((name, True), (name, False), ("reference", True)):
                    h = like(start)
                    B_ = value.shape[0] if value.dim() >= 2 else 1
                    err = torch.full((B_, 2), float("nan"), device=dev) if with_error else None
                    ops.history_update(h, value, r, weights=w, count=cnt, error=err, backend=bk)
                    results[(bk, with_error)] = (h, err)
                what = f"{name} history_update count={count} row={row} {layout}"
                got, err = results[(name, True)]
                plain, _ = results[(name, False)]
                want, err_ref = results[("reference", True)]
                assert same_bits(got, plain), f"{what}: the update changed with error="
                assert same_bits(got, want), f"{what}: not a bit copy (or another row changed)"
                assert same_bits(got[row], value), what
                assert_close(err, err_ref, **ERR_TOL, what=what + " error sums")


@pytest.mark.parametrize("op", ["taylor", "history"])
def test_nan_and_inf_propagate_per_sample(fast_backend, op):
    name, _, dev = fast_backend
    feat = torch.ones(3, 40, device=dev)
    feat[1, 7] = float("inf")
    feat[2, 3] = float("nan")
    err = torch.empty(3, 2, device=dev)
    if op == "taylor":
        diffs = torch.zeros(2, 3, 40, device=dev)
        ops.taylor_update(diffs, feat, 1.0, count=2, error=err, error_weights=torch.ones(2, device=dev),
                          backend=name)
    else:
        hist = torch.zeros(2, 3, 40, device=dev)
        ops.history_update(hist, feat, 1, weights=torch.ones(2, device=dev), count=2, error=err, backend=name)
    err = err.cpu()
    assert err[0].tolist() == [40.0, 40.0]
    assert err[1].tolist() == [float("inf"), float("inf")]
    assert err[2].isnan().all()


def test_empty_samples_give_zero_sums():
    for backend in ["reference", *[b for b in available_fast_backends() if b != "cuda"]]:
        err = torch.full((3, 2), float("nan"))
        ops.taylor_update(torch.zeros(2, 3, 0), torch.zeros(3, 0), 1.0, error=err, error_weights=torch.ones(2),
                          backend=backend)
        assert err.tolist() == [[0.0, 0.0]] * 3, backend
        err.fill_(float("nan"))
        ops.history_update(torch.zeros(2, 3, 0), torch.zeros(3, 0), 0, weights=torch.ones(2), error=err,
                           backend=backend)
        assert err.tolist() == [[0.0, 0.0]] * 3, backend


# ---------------------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------------------


def _big(dev, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    # 2 samples of 600 001 columns: 37 chunks of 16384 per sample on the CPU, and enough work (> 2^21 elements
    # read and written) for 2 threads (common.h: threads_for)
    diffs = ref_rand((3, 2, 600001), dtype, dev, g)
    feat = ref_rand((2, 600001), dtype, dev, g) + 0.1 * diffs[0].float().to(dtype)
    hist = ref_rand((5, 2, 600001), dtype, dev, g)
    return diffs, feat, hist


def _both(backend, diffs, feat, hist):
    d, h = diffs.clone(), hist.clone()
    e1, e2 = torch.empty(2, 2, device=d.device), torch.empty(2, 2, device=d.device)
    ops.taylor_update(d, feat, 2.0, count=3, error=e1, error_weights=torch.tensor([1.0, 2.0, 2.0], device=d.device),
                      backend=backend)
    ops.history_update(h, feat, 2, weights=torch.tensor([0.1, -0.5, 0.7, 0.9, 0.2], device=d.device), count=4,
                       error=e2, backend=backend)
    return d, h, e1, e2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_is_bitwise_on_one_or_two_threads_and_both_isas(dtype):
    if "cpu" not in available_fast_backends():
        pytest.skip("cpu backend unavailable")
    from fastcache_rt import _C

    diffs, feat, hist = _big("cpu", dtype)
    n0, isa0 = torch.get_num_threads(), _C.isa()
    try:
        runs = {}
        for isa in {"generic", _C.best_isa()}:
            _C.set_isa(isa)
            for nt in (1, 2, 2):
                torch.set_num_threads(nt)
                runs.setdefault(isa, []).append(_both("cpu", diffs, feat, hist))
    finally:
        torch.set_num_threads(n0)
        _C.set_isa(isa0)
    want = _both("reference", diffs, feat, hist)
    for isa, rs in runs.items():
        for r in rs[1:]:
            assert all(same_bits(a, b) for a, b in zip(rs[0], r)), f"{isa}: differs between thread counts / runs"
        assert same_bits(rs[0][0], want[0]) and same_bits(rs[0][1], want[1]), isa
        assert_close(rs[0][2], want[2], **ERR_TOL, what=f"{isa} taylor error")
        assert_close(rs[0][3], want[3], **ERR_TOL, what=f"{isa} history error")
    a, b = runs.values() if len(runs) == 2 else (runs["generic"], runs["generic"])
    assert_close(a[0][2], b[0][2], **ERR_TOL, what="isa")


@pytest.mark.slow
def test_triton_is_bitwise_run_to_run():
    if "triton" not in available_fast_backends():
        pytest.skip("triton unavailable")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(2)
    diffs = ref_rand((3, 2, 3001), torch.float32, dev, g)  # 3 chunks of 1024 per sample
    feat = ref_rand((2, 3001), torch.float32, dev, g)
    hist = ref_rand((5, 2, 3001), torch.float32, dev, g)
    r1 = _both("triton", diffs, feat, hist)
    r2 = _both("triton", diffs, feat, hist)
    assert all(same_bits(a, b) for a, b in zip(r1, r2))
    want = _both("reference", diffs, feat, hist)
    assert_close(r1[2], want[2], **ERR_TOL, what="triton taylor error")
    assert_close(r1[3], want[3], **ERR_TOL, what="triton history error")


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------

D = torch.zeros(3, 2, 5)
F = torch.zeros(2, 5)
W3 = torch.ones(3)


def _error_in_diffs(d):
    ops.taylor_update(d, F, 1.0, error=d.view(-1)[:4].view(2, 2), error_weights=W3)


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: ops.taylor_update(D.clone(), F, 1.0, error=torch.empty(2, 2)), ValueError, "error and error_weights"),
        (lambda: ops.taylor_update(D.clone(), F, 1.0, error_weights=W3), ValueError, "^error:"),
        (lambda: ops.taylor_update(D.clone(), F, 1.0, error=torch.empty(2, 2), error_weights=torch.ones(2)),
         ValueError, "error_weights: shape"),
        (lambda: ops.taylor_update(D.clone(), F, 1.0, error=torch.empty(2, 2), error_weights=W3.double()),
         TypeError, "error_weights: dtype"),
        (lambda: ops.taylor_update(D.clone(), F, 1.0, error=torch.empty(2, 2), error_weights=[1.0, 1.0, 1.0]),
         TypeError, "error_weights"),
        (lambda: ops.taylor_update(D.clone(), F, 1.0, error=torch.empty(1, 2), error_weights=W3), ValueError,
         r"error: shape \(1, 2\), expected \(2, 2\)"),
        (lambda: ops.taylor_update(D.clone(), F, 1.0, error=torch.empty(2, 2, dtype=torch.float64),
                                   error_weights=W3), TypeError, "error: dtype"),
        (lambda: ops.taylor_update(D.clone(), F, 1.0, error=torch.empty(2, 4)[:, ::2], error_weights=W3),
         ValueError, "error: must be contiguous"),
        (lambda: ops.taylor_update(D.clone(), F, 1.0, error="x", error_weights=W3), TypeError, "error"),
        (lambda: _error_in_diffs(D.clone()), ValueError, "error: overlaps diffs"),
        (lambda: ops.history_update(D.clone(), F, 3, weights=W3), ValueError, r"row: must be in \[0, 3\)"),
        (lambda: ops.history_update(D.clone(), F, -1, weights=W3), ValueError, "row"),
        (lambda: ops.history_update(D.clone(), F, torch.tensor(3), weights=W3), ValueError, "row"),
        (lambda: ops.history_update(D.clone(), F, True, weights=W3), TypeError, "row"),
        (lambda: ops.history_update(D.clone(), F, 1.0, weights=W3), TypeError, "row"),
        (lambda: ops.history_update(D.clone(), F, torch.tensor(1.0), weights=W3), TypeError, "row"),
        (lambda: ops.history_update(D.clone(), F, 0, weights=torch.ones(2)), ValueError, "weights: shape"),
        (lambda: ops.history_update(D.clone(), F, 0, weights=W3.half()), TypeError, "weights: dtype"),
        (lambda: ops.history_update(D.clone(), F, 0, weights=W3, count=-1), ValueError, "count"),
        (lambda: ops.history_update(D.clone(), F, 0, weights=W3, count=1.5), TypeError, "count"),
        (lambda: ops.history_update(D.clone(), torch.zeros(2, 4), 0, weights=W3), ValueError, "value: shape"),
        (lambda: ops.history_update(D.clone(), F.half(), 0, weights=W3), TypeError, "value: dtype"),
        (lambda: ops.history_update(D.clone(), F, 0, weights=W3, error=torch.empty(3, 2)), ValueError,
         "error: shape"),
        (lambda: ops.history_update(torch.zeros(0, 5), torch.zeros(5), 0, weights=torch.ones(0)), ValueError,
         "history"),
        (lambda: ops.history_update(torch.zeros(1, 2, 5).expand(3, 2, 5), F, 0, weights=W3), ValueError,
         "history: its elements overlap"),
        (lambda: ops.history_update(D.clone().int(), F, 0, weights=W3), TypeError, "history"),
    ],
)
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


# ---------------------------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------------------------


def _steps(diffs, hist, feat, w3, w5, gap, count, row, err_t, err_h):
    ops.taylor_update(diffs, feat, gap, count=count, error=err_t, error_weights=w3)
    ops.history_update(hist, feat, row, weights=w5, count=count, error=err_h)
    ops.history_update(hist, feat * 2.0, 4, weights=w5)
    return diffs.sum(), err_t * 2.0, err_h + 1.0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fullgraph_compile(backend, monkeypatch):
    if backend != "reference" and backend not in available_fast_backends():
        pytest.skip(f"{backend} unavailable")
    monkeypatch.setenv("FASTCACHE_RT_BACKEND", backend)
    _backend.reset()
    g = torch.Generator().manual_seed(3)
    args = {"diffs": torch.randn(3, 2, 7, generator=g), "hist": torch.randn(5, 2, 7, generator=g),
            "feat": torch.randn(2, 7, generator=g), "w3": torch.tensor([1.0, 2.0, 2.0]),
            "w5": torch.randn(5, generator=g), "gap": torch.tensor(2.0), "count": torch.tensor(2),
            "row": torch.tensor(2), "err_t": torch.empty(2, 2), "err_h": torch.empty(2, 2)}
    try:
        torch._dynamo.reset()
        explain = torch._dynamo.explain(_steps)(**{k: v.clone() for k, v in args.items()})
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(_steps, fullgraph=True, backend="aot_eager")
        eager_args = {k: v.clone() for k, v in args.items()}
        comp_args = {k: v.clone() for k, v in args.items()}
        expect = _steps(**eager_args)
        got = compiled(**comp_args)
        for a, b in zip(got, expect):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for k in ("diffs", "hist", "err_t", "err_h"):  # the mutations happened
            assert torch.equal(comp_args[k], eager_args[k]), k
    finally:
        _backend.reset()
