"""Gates and forecasters on their own (no diffusers model): the host and device decisions of schedule gates agree,
a record masked by a device decision equals the conditional record, and FreqCa's separable 3-D DCT split is the
exact low-pass projection on any (frames, height, width) grid."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastcache_rt.policy import Chebyshev, FixedInterval, FreqCa, MagCacheGate, SpectrumSchedule, Taylor
from fastcache_rt.policy import StreamSpec
from fastcache_rt.policy.forecasters import dct_matrix
from fastcache_rt.stream import Step


@pytest.mark.parametrize("gate", [FixedInterval(3, 2), SpectrumSchedule(alpha=1.5),
                                  MagCacheGate(ratios=(1.0, 0.99, 0.97, 1.02, 0.9), threshold=0.1)])
def test_schedule_gates_decide_alike_on_host_and_device(gate):
    S = 23
    st = gate.make_state(StreamSpec((1, 4, 8), num_steps=S))
    for s in range(S + 3):  # past the end: compute
        host = st.decide(Step(s, torch.tensor(s)))
        dev = st.decide(Step(None, torch.tensor(s)))
        assert isinstance(host, bool) and isinstance(dev, torch.Tensor)
        assert host == bool(dev) == (s >= S or gate.schedule(S)[s])


class _Stream:
    def __init__(self, step, last_full):
        self.step, self.last_full = torch.tensor(step), torch.tensor(last_full)


@pytest.mark.parametrize("fc", [Taylor(order=2), Chebyshev(degree=3, history=4), FreqCa(cutoff=0.4)],
                         ids=["taylor", "chebyshev", "freqca"])
def test_masked_record_equals_conditional_record(fc):
    """The compiled path records every step masked by the decision; the eager path records computed steps only."""
    shape, S = (2, 12, 5), 12
    a = fc.make_state(StreamSpec(shape, torch.float32, "cpu", S, (1, 3, 4)))
    b = fc.make_state(StreamSpec(shape, torch.float32, "cpu", S, (1, 3, 4)))
    g = torch.Generator().manual_seed(0)
    decisions = [True, True, False, True, False, False, True, False, True, True, False, True]
    last = 0
    for s, c in enumerate(decisions):
        st = _Stream(s, last)
        v = torch.randn(shape, generator=g)
        if c:
            a.record(st, v, True)
        b.record(st, v, torch.tensor(c))
        if c:
            last = s
        if s + 1 < S:
            nxt = _Stream(s + 1, last)
            torch.testing.assert_close(a.predict(nxt), b.predict(nxt), rtol=0, atol=0)


def _kron_lowpass(v, grid, cutoff):
    """Reference: the explicit 3-D DCT matrix (Kronecker product) and radial mask."""
    F, H, W = grid
    C = torch.kron(torch.kron(dct_matrix(F, "cpu", torch.float64), dct_matrix(H, "cpu", torch.float64)),
                   dct_matrix(W, "cpu", torch.float64))
    idx = torch.tensor(list(itertools.product(range(F), range(H), range(W))), dtype=torch.float64)
    r = idx.norm(dim=1)
    m = (r <= cutoff * r.max()).double()
    return (C.t() @ (m[:, None] * (C @ v.double()))).float()


@pytest.mark.parametrize("grid", [(1, 5, 7), (3, 4, 5), (2, 1, 6), (4, 3, 3)])
def test_freqca_split_is_the_3d_low_pass_projection(grid):
    N = grid[0] * grid[1] * grid[2]
    st = FreqCa(cutoff=0.3).make_state(StreamSpec((N, 6), torch.float32, "cpu", 10, grid))
    v = torch.randn(N, 6, generator=torch.Generator().manual_seed(1))
    low = st.lowpass(v)
    torch.testing.assert_close(low, _kron_lowpass(v, grid, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.lowpass(low), low, rtol=1e-5, atol=1e-5)  # a projection


def test_freqca_grid_must_cover_the_tokens():
    with pytest.raises(ValueError, match="grid"):
        FreqCa().make_state(StreamSpec((1, 10, 4), torch.float32, "cpu", 10, (1, 3, 4)))
    with pytest.raises(ValueError, match="grid"):
        FreqCa().make_state(StreamSpec((1, 10, 4), torch.float32, "cpu", 10, None))  # not square: needs grid=
