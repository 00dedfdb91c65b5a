"""Bad input to the public ops is refused with a message naming the argument, before any kernel runs, on every
backend: aliased output memory, unbounded sizes, integers beyond int64, queries whose forecast would overflow, and
malformed gate parameters."""

from __future__ import annotations

import pytest
import torch

import fastcache_rt.ops as ops
from fastcache_rt.ops.chebyshev import MAX_ABS_TAU, MAX_DEGREE

BACKENDS = ["reference", "cpu", "triton"]
TAUS = [0.0, 0.1, 0.2, 0.3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_taylor_update_refuses_overlapping_diffs(backend):
    diffs = torch.zeros(3, 1, 4).expand(3, 5, 4)  # stride 0: five rows share one
    with pytest.raises(ValueError, match="diffs: its elements overlap"):
        ops.taylor_update(diffs, torch.ones(5, 4), 1.0, count=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chebyshev_bounds_degree_count_and_query(backend):
    hist = torch.zeros(4, 2, 3)
    with pytest.raises(ValueError, match=f"degree: must be in \\[0, {MAX_DEGREE}\\]"):
        ops.chebyshev_forecast(hist, TAUS, 0.5, 10**6, backend=backend)
    with pytest.raises(ValueError, match="degree"):
        ops.chebyshev_weights(TAUS, 0.5, 2**40, backend=backend)
    with pytest.raises(ValueError, match="count: .* int64"):
        ops.chebyshev_forecast(hist, TAUS, 0.5, 2, count=2**64, backend=backend)
    for q in (1e30, -2 * MAX_ABS_TAU, MAX_ABS_TAU * 1.5):
        with pytest.raises(ValueError, match="tau_query"):
            ops.chebyshev_forecast(hist, TAUS, q, 2, backend=backend)
    with pytest.raises(ValueError, match="tau_query"):
        ops.chebyshev_forecast(hist, TAUS, torch.tensor(1e30), 2, validate=True, backend=backend)
    ok = ops.chebyshev_forecast(hist + 1, TAUS, MAX_ABS_TAU, 4, backend=backend)
    assert torch.isfinite(ok).all()


@pytest.mark.parametrize("kw, field", [
    (dict(tads=None), "tads"), (dict(tads="ab"), "tads"), (dict(tads=(True, 1.0)), "tads"),
    (dict(tads=(1.0,)), "tads"), (dict(max_cached="x"), "max_cached"), (dict(max_cached=None), "max_cached"),
    (dict(max_cached=True), "max_cached"),
])
def test_gate_params_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        ops.gate_params(0.1, 4, **kw)
