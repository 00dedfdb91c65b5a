"""ErrorControl ("adaptive"): the next gap follows the forecaster's measured error as an ODE solver's step size
follows its local error estimate (the docstring's formula, checked against a float64 transcription of it); eager
and compiled take the same decisions; a smooth trajectory grows the gap to its bound, a rough one keeps it at 1; a
non-finite value computes the next step; stats report every computed step's estimate and the chosen gap."""

from __future__ import annotations

import math

import pytest
import torch

import fastcache_rt
from fastcache_rt.policy import Chebyshev, FreqCa, Policy, Reuse, StreamSpec, Taylor
from fastcache_rt.policy.gates import ErrorControl
from fastcache_rt.stream import StreamState, stream_stats

S = 40
SHAPE = (2, 12, 5)


def _drive(gate, fc, traj, device_bools: bool):
    """Run S steps of ``traj(step) -> value`` through a stream; returns the decisions and the stream."""
    st = StreamState(Policy(gate, fc, "hidden"), StreamSpec(SHAPE, torch.float32, "cpu", S, (1, 3, 4)))
    decisions = []
    for s in range(S):
        step = type("Step", (), {})()
        step.index = None if device_bools else s
        step.tensor = st.step
        c = st.gate.decide(step)
        c = c if isinstance(c, bool) else (c if device_bools else bool(c))
        if not device_bools:
            c = c or not st.host_has_cache
        else:
            c = c | ~st.has_cache
        decisions.append(bool(c))
        # a cached step records nothing in eager mode, and a value masked out under compile
        value = traj(s) if decisions[-1] else (torch.zeros(SHAPE) if device_bools else None)
        st.end_step(c, value)
    return decisions, st


def _smooth(s):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    return a + 0.01 * s * b


def _rough(s):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(s))


def _curved(s):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    return a + torch.sin(torch.tensor(s / 6.0)) * b


@pytest.mark.parametrize("fc", [Taylor(order=1), Taylor(order=2), Chebyshev(degree=2, history=6), FreqCa(cutoff=0.4),
                                Reuse()], ids=lambda f: type(f).__name__ + str(getattr(f, "order", "")))
def test_eager_and_compiled_take_the_same_decisions(fc):
    # Chebyshev's ridge and FreqCa's reused low band make larger errors on this trajectory
    gate = ErrorControl(tol=0.5 if isinstance(fc, (Chebyshev, FreqCa)) else 0.05, warmup=2)
    eager, st_e = _drive(gate, fc, _curved, False)
    compiled, st_c = _drive(gate, fc, _curved, True)
    assert eager == compiled
    assert 2 < sum(eager) < S  # it cached and computed
    computed = [i for i, c in enumerate(eager) if c]
    assert st_e.gate.report(eager) == st_c.gate.report(compiled)
    assert len(st_e.gate.report(eager)["gaps"]) == len(computed)


def test_a_smooth_trajectory_grows_the_gap_and_a_rough_one_does_not():
    gate = ErrorControl(tol=0.05, warmup=2, max_gap=6, last=False)
    smooth, _ = _drive(gate, Taylor(order=1), _smooth, False)  # linear in the step: order 1 forecasts it exactly
    gaps = [b - a for a, b in zip([i for i, c in enumerate(smooth) if c], [i for i, c in enumerate(smooth) if c][1:])]
    assert max(gaps) == 6 and sum(smooth) <= 12, gaps
    rough, _ = _drive(gate, Taylor(order=1), _rough, False)
    assert all(rough), rough


def test_the_gap_follows_the_formula():
    """The gaps chosen along a run equal a float64 transcription of the docstring's controller, fed the stream's
    own error estimates."""
    gate = ErrorControl(tol=0.1, warmup=3, max_gap=7, last=True, pi=(0.7, 0.4), safety=0.9, shrink=0.2, grow=2.0)
    dec, st = _drive(gate, Taylor(order=1), _curved, False)
    rep = st.gate.report(dec)
    computed = [i for i, c in enumerate(dec) if c]
    k_i, k_p = gate.pi
    p1 = 2.0
    h, prev, want = 1.0, None, []
    for s, e in zip(computed, rep["error_estimates"]):
        if s < gate.warmup - 1:
            want.append(1)
            continue
        fac = gate.safety * (gate.tol / e) ** (k_i / p1) * (1.0 if prev is None else (prev / gate.tol) ** (k_p / p1))
        h = min(max(h * min(max(fac, gate.shrink), gate.grow), 1.0), gate.max_gap)
        nxt = s + math.floor(h)
        if s < S - 1:
            nxt = min(nxt, S - 1)
        want.append(nxt - s)
        prev = e
    assert rep["gaps"] == want
    assert computed[-1] == S - 1  # last=True
    assert len(set(rep["gaps"])) > 2  # the gap moved


def test_a_nonfinite_value_computes_the_next_step():
    for device_bools in (False, True):
        poisoned = []

        def traj(s):  # the first computed step from 10 on is not finite
            v = _smooth(s)
            if s >= 10 and not poisoned:
                poisoned.append(s)
                v = v.clone()
                v[0, 0, 0] = float("nan")
            return v

        dec, st = _drive(ErrorControl(tol=0.05, warmup=2, max_gap=6, last=False), Taylor(order=1), traj,
                         device_bools)
        computed = [i for i, c in enumerate(dec) if c]
        bad = poisoned[0]
        assert bad + 1 in computed, (device_bools, bad, computed)
        assert int(st.events[0]) == 1
        assert torch.isfinite(st.fc.predict(st)).all()


def test_stats_report_the_estimates_and_gaps():
    dec, st = _drive(ErrorControl(tol=0.05, warmup=3), Taylor(order=1), _curved, False)
    row = stream_stats((("default", 0), SHAPE), st)
    assert len(row["error_estimates"]) == len(row["computed"]) == len(row["gaps"])
    assert row["error_estimates"][:2] == [None, None]  # before the history can forecast
    assert all(isinstance(e, float) and e >= 0 for e in row["error_estimates"][2:])


@pytest.mark.parametrize("field,value", [("tol", 0), ("tol", float("nan")), ("tol", "x"), ("order", -1),
                                         ("safety", 1.5), ("shrink", 0), ("grow", 0.5), ("pi", (0, 0.4)),
                                         ("pi", (1,)), ("warmup", 0), ("max_gap", 0), ("last", "yes")])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ErrorControl(**{field: value})


def test_the_preset_takes_tol_and_any_forecaster():
    p = fastcache_rt.PRESETS["adaptive"].with_overrides(tol=0.1, forecaster=Chebyshev(blend=0.5))
    assert p.gate.tol == 0.1 and isinstance(p.forecaster, Chebyshev)
    with pytest.raises(ValueError, match="tol"):
        fastcache_rt.PRESETS["adaptive"].with_overrides(tol=-1)


@pytest.mark.parametrize("fc", [Taylor(order=1), Chebyshev(degree=2, history=6), Reuse()],
                         ids=lambda f: type(f).__name__)
@pytest.mark.parametrize("device_bools", [False, True], ids=["eager", "compiled"])
def test_the_error_is_measured_in_the_update_pass(fc, device_bools):
    """On a computed step the only ops that read the whole cached tensor are the finiteness check and the
    forecaster's one fused update (``taylor_update_error`` / ``history_update``): no extra pass for the error."""
    from torch.utils._python_dispatch import TorchDispatchMode

    big = math.prod(SHAPE)

    class Passes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if any(isinstance(a, torch.Tensor) and a.numel() >= big for a in (*args, *kwargs.values())):
                self.ops.append(func.__name__.split(".")[0])
            return func(*args, **kwargs)

    gate = ErrorControl(tol=0.05, warmup=2)
    st = StreamState(Policy(gate, fc, "hidden"), StreamSpec(SHAPE, torch.float32, "cpu", S, (1, 3, 4)))
    for s in range(4):  # warm: a few computed steps
        st.end_step(torch.tensor(True) if device_bools else True, _curved(s))
    v = _curved(4)
    with Passes() as p:
        st.end_step(torch.tensor(True) if device_bools else True, v)
    fused = {"taylor_update_error", "history_update"}
    assert fused & set(p.ops), p.ops
    # the finiteness check of every computed step (isfinite: abs, ne, eq, mul on CPU; all), views, and the
    # masked writes of the compiled path
    allowed = {"isfinite", "abs", "ne", "eq", "mul", "all", "unsqueeze", "select", "view", "clone", "where", "copy_",
               "index_select"}
    extra = [o for o in p.ops if o not in fused | allowed]
    assert not extra, p.ops
    assert sum(o in fused for o in p.ops) == 1, p.ops
