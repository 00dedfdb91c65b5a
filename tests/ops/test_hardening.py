"""The GPU path's guarantees, proven where they can be here (CPU, Triton interpreter):

- reproducible: the GPU backends' band sums follow ``_reference.band_l1_gpu_order`` bit for bit, whatever the
  GPU's SM count, the grid or the order in which programs finish;
- concurrency-safe: launches in flight at the same time on different streams never share scratch;
- capturable: nothing in an op uploads a Python value, reads a device value back or zeroes scratch lazily inside a
  CUDA-graph capture;
- the op layer's input checks (found by fuzzing).
"""

import math
import threading

import pytest
import torch

from fastcache_rt import ops
from fastcache_rt.ops import _backend, _common, _reference
from tests.conftest import is_triton
from tests.ops.helpers import poison


def _triton():
    info = _backend.backends()["triton"]
    if not info["available"] or "cpu" not in info["devices"]:
        pytest.skip(f"triton backend does not run on CPU tensors here: {info['reason']}")
    from fastcache_rt.kernels import band_l1 as kb

    return kb


def _gpu_order(cur, prev, bounds, per_sample):
    from fastcache_rt.ops._common import three_d

    c3, p3 = three_d(cur), three_d(prev)
    out = torch.empty((c3.shape[0] if per_sample else 1, len(bounds) - 1, 2))
    _reference.band_l1_gpu_order(c3, p3, torch.tensor(bounds), per_sample, out)
    return out if per_sample else out[0]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---------------------------------------------------------------------------------------------------------------
# the GPU summation order
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 65, 7), (2, 130, 300), (1, 257, 513), (4, 64, 256)], ids=str)
def test_gpu_order_is_accurate(shape):
    g = torch.Generator().manual_seed(3)
    cur = torch.randn(shape, generator=g) * torch.logspace(-6, 6, shape[-1])
    prev = cur + 1e-3 * torch.randn(shape, generator=g)
    D = shape[-1]
    bounds = [0, D] if D < 3 else [0, D // 3, D - 1, D]
    got = _gpu_order(cur, prev, bounds, True).double()
    x, y = cur.double(), prev.double()
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        want_d = (x[..., lo:hi] - y[..., lo:hi]).abs().sum(dim=(1, 2))
        want_m = y[..., lo:hi].abs().sum(dim=(1, 2))
        torch.testing.assert_close(got[:, k, 0], want_d, rtol=1e-5, atol=0)
        torch.testing.assert_close(got[:, k, 1], want_m, rtol=1e-5, atol=0)


def test_exact_group_sum_ignores_order():
    g = torch.Generator().manual_seed(4)
    v = torch.rand(1000, generator=g, dtype=torch.float64) * torch.logspace(-30, 30, 1000, dtype=torch.float64)
    v[::7] = 0.0
    base = _reference.exact_group_sum(v, 0, 10)
    for seed in range(5):
        perm = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(_reference.exact_group_sum(v[perm], 0, 10), base)
    assert math.isclose(base.item(), v.sum().item(), rel_tol=1000 * 2.0 ** (10 - 52))  # the stated bound
    assert math.isnan(_reference.exact_group_sum(torch.tensor([1.0, math.nan, math.inf]), 0, 2).item())
    assert _reference.exact_group_sum(torch.tensor([1.0, math.inf]), 0, 1).item() == math.inf


_SLOW = pytest.mark.slow  # ~2-6 s per SM count under the Triton CPU interpreter
CASES = [
    pytest.param((2, 130, 300), torch.float32, [0, 100, 280, 300], "contiguous", id="(2, 130, 300)", marks=_SLOW),
    pytest.param((3, 64, 256), torch.float16, [0, 256], "contiguous", id="(3, 64, 256)"),
    pytest.param((1, 200, 1000), torch.bfloat16, [0, 17, 500, 1000], "transposed", id="(1, 200, 1000)", marks=_SLOW),
    pytest.param((2, 5, 33), torch.float32, [0, 1, 32, 33], "sliced", id="(2, 5, 33)"),
]


def _inputs(shape, dtype, layout, seed, poison_values=False):
    g = torch.Generator().manual_seed(seed)

    def make():
        if layout == "transposed":
            return torch.randn(shape[0], shape[2], shape[1], generator=g).to(dtype).transpose(1, 2)
        if layout == "sliced":
            return torch.randn(shape[0], shape[1], 2 * shape[2] + 1, generator=g).to(dtype)[..., 1::2]
        return torch.randn(shape, generator=g).to(dtype)

    cur, prev = make(), make()
    if poison_values:
        cur[-1, 0, 0] = math.nan
        prev[0, -1, -1] = math.inf
    return cur, prev


@pytest.mark.parametrize("shape,dtype,bounds,layout", CASES)
@pytest.mark.parametrize("sms", [1, 7, 132])
def test_triton_band_sums_are_the_gpu_order_bitwise(shape, dtype, bounds, layout, sms):
    """The sums are a function of the input alone: the same bits for any SM count (A100: 108, H100: 132 ...) and
    equal to the specification of the GPU order (which the CUDA backend implements too)."""
    _triton()  # the band launcher sizes its grid from (B, R, D) alone (no SM count is read): sms varies the input
    cur, prev = _inputs(shape, dtype, layout, seed=sms, poison_values=layout == "contiguous")
    for per_sample in (False, True):
        got = ops.band_l1(cur, prev, bounds, per_sample=per_sample, backend="triton")
        want = _gpu_order(cur, prev, bounds, per_sample)
        assert _same_bits(got, want), (per_sample, got, want)
    state = torch.tensor([3, 0.1, 1, 1, 0, 0.2, 0, 2], dtype=torch.float32)
    params = ops.gate_params(0.5, 10, tads=(0.5, 1.5), max_cached=3)
    _, _, sums = ops.gate_step(cur, prev, state, params, bounds=bounds, backend="triton")
    assert _same_bits(sums, _gpu_order(cur, prev, bounds, False))


@pytest.mark.parametrize("degree,blend", [(4, 1.0), (16, 0.5)])
def test_triton_chebyshev_forecast_bits_do_not_depend_on_the_persistent_grid(monkeypatch, degree, blend):
    """The forecast's grid is sized from the compiled kernel's registers and the GPU's SMs
    (``launch.persistent_programs``); every column is still one program's work, so the bits are the same for any
    number of programs."""
    _triton()
    from fastcache_rt.kernels import chebyshev as kcheb

    g = torch.Generator().manual_seed(degree)
    hist = torch.randn(7, 5 * kcheb.FORECAST_BLOCK_N + 37, generator=g).to(torch.bfloat16)
    taus = torch.linspace(-1, 0.6, 7)
    outs = []
    for programs in (1, 2, 3, 6):
        monkeypatch.setattr(kcheb, "persistent_programs", lambda *a, _p=programs, **k: _p)
        out = torch.empty(hist.shape[1], dtype=hist.dtype)
        kcheb.chebyshev_forecast(hist, taus, torch.tensor(0.8), torch.tensor(6), degree, 0.1, blend, out)
        outs.append(out)
    assert torch.isfinite(outs[0].float()).all()
    assert all(torch.equal(o.view(torch.int16), outs[0].view(torch.int16)) for o in outs[1:])


def test_triton_gate_decision_equals_reference_on_gpu_order_sums():
    """Given the same sums, the fused epilogue decides and updates the state exactly as gate_decide's reference
    (one cosine for both GPU backends: the float32 angle, cos in float64, rounded)."""
    _triton()
    cur, prev = _inputs((2, 70, 300), torch.bfloat16, "contiguous", seed=5)
    bounds = [0, 150, 300]
    params = ops.gate_params(0.3, 50, tads=(0.5, 1.5), max_cached=3)
    for step in (1, 7, 13, 25, 48):
        state = torch.tensor([step, 0.1, 1, 1, 0, 0.2, 0, 2], dtype=torch.float32)
        dec, new_state, sums = ops.gate_step(cur, prev, state, params, bounds=bounds, gammas=[0.8, 1.5],
                                             backend="triton")
        dec_r, state_r = ops.gate_decide(sums, state, params, gammas=[0.8, 1.5], backend="reference")
        assert bool(dec) == bool(dec_r)
        assert torch.equal(new_state, state_r)


# ---------------------------------------------------------------------------------------------------------------
# concurrency and capture
# ---------------------------------------------------------------------------------------------------------------


def test_triton_launches_on_another_stream_do_not_touch_a_launch_in_flight(monkeypatch):
    """A launch in flight on stream A (its ticket counter part-way, as when some of its programs have finished)
    is not disturbed by a launch on stream B, which gets its own counter and partials and computes the right sums;
    with one counter per device, B's programs would take A's tickets and one of them would finish A's reduction.
    (Streams are simulated by the scratch key: the Triton interpreter itself cannot run two launches at once.)"""
    kb = _triton()
    streams = {"now": "A"}
    monkeypatch.setattr(kb, "_stream_key", lambda device: ("test-stream", streams["now"]))
    cur, prev = _inputs((2, 130, 300), torch.float32, "contiguous", seed=11)
    bounds = [0, 100, 300]
    want = _gpu_order(cur, prev, bounds, True)
    assert _same_bits(ops.band_l1(cur, prev, bounds, per_sample=True, backend="triton"), want)
    ws_a, count_a = kb._SCRATCH[("test-stream", "A")][:2]
    count_a.fill_(5)  # launch A in flight: 5 of its programs have taken their ticket
    streams["now"] = "B"
    for _ in range(2):
        assert _same_bits(ops.band_l1(cur, prev, bounds, per_sample=True, backend="triton"), want)
    ws_b, count_b = kb._SCRATCH[("test-stream", "B")][:2]
    assert int(count_a) == 5 and int(count_b) == 0
    assert ws_a.data_ptr() != ws_b.data_ptr() and count_a.data_ptr() != count_b.data_ptr()
    # and a launch on A's stream after A finished (counter back at 0) reuses A's scratch
    count_a.zero_()
    streams["now"] = "A"
    assert _same_bits(ops.band_l1(cur, prev, bounds, per_sample=True, backend="triton"), want)
    assert kb._SCRATCH[("test-stream", "A")][1].data_ptr() == count_a.data_ptr()


def test_triton_scratch_first_made_inside_a_capture_is_not_kept(monkeypatch):
    """A ticket counter first needed inside a CUDA-graph capture is zeroed by a captured memset, not now: it must
    serve that launch only, never a later eager launch (which would meet an unzeroed counter)."""
    kb = _triton()
    cur, prev = _inputs((1, 70, 40), torch.float32, "contiguous", seed=6)
    want = ops.band_l1(cur, prev, backend="triton")
    key = kb._stream_key(cur.device)

    def in_fresh_thread(fn):
        box = []
        t = threading.Thread(target=lambda: box.append(fn()))
        t.start()
        t.join(timeout=300)
        return box[0]

    monkeypatch.setattr(kb, "_capturing", lambda device: True)

    def captured():
        out = ops.band_l1(cur, prev, backend="triton")
        return out, kb._stream_key(cur.device) in kb._SCRATCH

    out, kept = in_fresh_thread(captured)
    assert _same_bits(out, want) and not kept
    assert key in kb._SCRATCH  # the eager launches of this thread keep theirs


SYNCING = [
    (torch.Tensor, "item"),
    (torch.Tensor, "tolist"),
    (torch.Tensor, "__bool__"),
    (torch.Tensor, "__int__"),
    (torch.Tensor, "__float__"),
    (torch.Tensor, "cpu"),
    (torch.Tensor, "numpy"),
    (torch, "tensor"),
    (torch, "as_tensor"),
]


class HostSyncs:
    """Counts calls of the functions that read a device value back or upload a Python value (each a host sync
    on a GPU, and illegal inside a CUDA-graph capture) while active."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.active = False
        for owner, name in SYNCING:
            orig = getattr(owner, name)

            def wrapper(*a, __orig=orig, __name=name, **k):
                if self.active:
                    self.calls.append(__name)
                return __orig(*a, **k)

            monkeypatch.setattr(owner, name, wrapper)

    def __enter__(self):
        self.calls.clear()
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False


def _op_calls(backend):
    g = torch.Generator().manual_seed(7)
    cur = torch.randn(2, 9, 40, generator=g)
    prev = torch.randn(2, 9, 40, generator=g)
    hist = torch.randn(5, 3, 40, generator=g)
    diffs = torch.randn(3, 3, 40, generator=g)
    out = torch.empty(3, 40)
    err = torch.empty(3, 2)
    w3, w5 = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([0.1, -0.2, 0.3, 0.4, 0.0])
    state = ops.gate_state()
    params = ops.gate_params(0.5, 10)
    sums = torch.rand(2, 2)
    return {
        "band_l1": lambda: ops.band_l1(cur, prev, [0, 13, 40], per_sample=True, backend=backend),
        "gate_step default coeffs": lambda: ops.gate_step(cur, prev, state, params, backend=backend),
        "gate_step lists": lambda: ops.gate_step(cur, prev, state, params, [0.5, 1.0, 0.0], bounds=[0, 20, 40],
                                                 gammas=[0.8, 1.5], backend=backend),
        "gate_decide": lambda: ops.gate_decide(sums, state, params, [1.0, 0.0], gammas=(1.0, 1.0), backend=backend),
        "chebyshev_forecast": lambda: ops.chebyshev_forecast(hist, [-1, -0.5, 0, 0.4, 0.6], 0.8, count=4,
                                                             validate=False, out=out, backend=backend),
        "chebyshev_weights": lambda: ops.chebyshev_weights([-1, -0.5, 0, 0.4, 0.6], 0.8, count=3, blend=0.5,
                                                           validate=False, backend=backend),
        "taylor_forecast": lambda: ops.taylor_forecast(diffs, 2.0, out=out, backend=backend),
        "hermite_forecast": lambda: ops.hermite_forecast(diffs, 1.5, backend=backend),
        "taylor_update": lambda: ops.taylor_update(diffs, hist[0], 2.0, count=1, backend=backend),
        "taylor_update error": lambda: ops.taylor_update(diffs, hist[0], 2.0, count=2, error=err, error_weights=w3,
                                                         backend=backend),
        "history_update": lambda: ops.history_update(hist, diffs[0], 4, weights=w5, count=4, backend=backend),
        "history_update error": lambda: ops.history_update(hist, diffs[0], 3, weights=w5, count=3, error=err,
                                                           backend=backend),
    }


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_ops_never_sync_nor_upload(monkeypatch, backend):
    """With Python numbers for the scalars and Python lists for coeffs / gammas / bounds / taus, no op uploads a
    value or reads one back once its constants are cached (a first call with new list values uploads them without
    blocking). Scalars go to the kernels as arguments."""
    if backend == "triton":
        _triton()
    elif not _backend.backends()[backend]["available"]:
        pytest.skip(f"{backend} unavailable")
    calls = _op_calls(backend)
    for fn in calls.values():
        fn()  # warm: constants of these lists cached
    spy = HostSyncs(monkeypatch)
    for name, fn in calls.items():
        with spy:
            fn()
        assert spy.calls == [], f"{name} on {backend}: {spy.calls}"


# ---------------------------------------------------------------------------------------------------------------
# op-layer defects found by fuzzing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [22, 25, 32, 40, 200])
def test_reference_forecasts_take_many_rows(K):
    """Factorials beyond int64 (21!) no longer overflow; float32 weights beyond 34! are 0."""
    diffs = torch.randn(K, 33, generator=torch.Generator().manual_seed(K))
    assert torch.isfinite(ops.taylor_forecast(diffs, 1.5, backend="reference")).all()
    if K <= 40:  # (H_k grows faster than k!: the float32 Hermite weights overflow far beyond any useful order)
        assert torch.isfinite(ops.hermite_forecast(diffs, 1.5, backend="reference")).all()
    w = _reference.taylor_weights(K, 1.5)
    assert w[-1] == 0.0 or K < 35


@pytest.mark.parametrize("K", [22, 25, 32])
def test_fast_backends_agree_beyond_21_rows(fast_backend, K):
    name, _, dev = fast_backend
    if is_triton(name) and K != 25:
        pytest.skip("interpreter: one size")
    diffs = torch.randn(K, 70, generator=torch.Generator().manual_seed(K)).to(dev)
    for fn in (ops.taylor_forecast, lambda d, x, backend: ops.hermite_forecast(d, x, backend=backend)):
        got = fn(diffs, 1.25, backend=name)
        want = fn(diffs, 1.25, backend="reference")
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=2e-5, atol=1e-5)


def _blend_equal_taus(backend, dev):
    hist = torch.randn(4, 50, generator=torch.Generator().manual_seed(9)).to(dev)
    taus = torch.tensor([-1.0, -0.2, 0.5, 0.5], device=dev)
    return ops.chebyshev_forecast(hist, taus, 0.8, 3, 0.1, blend=0.5, backend=backend), hist, taus


def test_chebyshev_blend_with_equal_last_taus_holds_the_last_row():
    """blend < 1 with the two largest taus equal: no slope to extrapolate; the linear part holds the last row."""
    got, hist, taus = _blend_equal_taus("reference", "cpu")
    assert torch.isfinite(got).all()
    w_cheb = ops.chebyshev_weights(taus, 0.8, 3, 0.1, backend="reference").double()
    w = 0.5 * w_cheb
    w[torch.argmax(taus)] += 0.5
    torch.testing.assert_close(got.double(), (w.unsqueeze(1) * hist.double()).sum(0), rtol=1e-5, atol=1e-5)


def test_chebyshev_blend_equal_taus_fast_backends(fast_backend):
    name, _, dev = fast_backend
    got, _, _ = _blend_equal_taus(name, dev)
    want, _, _ = _blend_equal_taus("reference", "cpu")
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("coeffs", [[1.0, math.inf], (math.nan, 0.0), [-math.inf]], ids=str)
def test_gate_refuses_non_finite_coeffs(coeffs):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="coeffs"):
        ops.gate_step(x, x + 1, ops.gate_state(), ops.gate_params(0.5, 10), coeffs)
    with pytest.raises(ValueError, match="coeffs"):
        ops.gate_decide(torch.ones(1, 2), ops.gate_state(), ops.gate_params(0.5, 10), coeffs)


@pytest.mark.parametrize("bounds", ["038", b"\x00\x08", [False, True], [0, 2.0, 8], [0, None, 8], {0, 8}],
                         ids=repr)
def test_band_l1_refuses_bounds_that_are_not_ints(bounds):
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="bounds"):
        ops.band_l1(x, x, bounds)
    with pytest.raises(TypeError, match="bounds"):
        ops.gate_step(x, x, ops.gate_state(), ops.gate_params(0.5, 10), bounds=bounds)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_registered_op_checks_bounds(backend):
    x = torch.randn(3, 8)
    for bad in ([0, 5, 3, 8], [0, 8, 8], [1, 8], [0, 9]):
        with pytest.raises(ValueError, match="bounds"):
            torch.ops.fastcache_rt.band_l1(x, x, bad, False, backend)
        with pytest.raises(ValueError, match="bounds"):
            torch.ops.fastcache_rt.gate_step(x, x, ops.gate_state(), ops.gate_params(0.5, 10),
                                             torch.tensor([1.0, 0.0]), None, bad, backend)


def test_out_may_be_another_row_of_the_same_storage():
    buf = torch.randn(6, 20)
    diffs = buf[:3]
    out = buf[4]
    want = ops.taylor_forecast(diffs.clone(), 1.5)
    assert ops.taylor_forecast(diffs, 1.5, out=out) is out
    torch.testing.assert_close(buf[4], want)
    hist = buf[:4]
    got = ops.chebyshev_forecast(hist, [-1, -0.3, 0.2, 0.6], 0.9, out=buf[5])
    torch.testing.assert_close(got, ops.chebyshev_forecast(hist.clone(), [-1, -0.3, 0.2, 0.6], 0.9))
    with pytest.raises(ValueError, match="overlaps"):
        ops.taylor_forecast(diffs, 1.5, out=buf[2])
    # interleaved views of one buffer (a column block and the rest of a row): computed, then copied
    want = ops.taylor_forecast(buf[:3, :10].clone(), 1.5)
    torch.testing.assert_close(ops.taylor_forecast(buf[:3, :10], 1.5, out=buf[1, 10:]), want)
    torch.testing.assert_close(buf[1, 10:], want)


def test_bounds_on_an_accelerator_are_refused_not_read_back():
    x = torch.randn(3, 8)
    meta_bounds = torch.tensor([0, 4, 8], device="meta")
    with pytest.raises(TypeError, match="sync"):
        _common.check_bounds(meta_bounds, 8)
    assert _common.check_bounds(torch.tensor([0, 4, 8]), 8) == [0, 4, 8]
    assert ops.band_l1(x, x + 1, torch.tensor([0, 4, 8])).shape == (2, 2)


def test_scalar_arguments_round_like_a_float32_tensor():
    diffs = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    x = 0.1 + 1e-9  # not a float32 value
    a = ops.taylor_forecast(diffs, x, backend="reference")
    b = ops.taylor_forecast(diffs, torch.tensor(x, dtype=torch.float32), backend="reference")
    assert torch.equal(a, b)
