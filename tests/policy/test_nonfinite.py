"""A computed step whose value is not finite is counted and kept out of every forecaster's history: the cached steps
after it forecast from the finite computed steps, exactly as if the bad step had not been recorded; eager (a host
True) and compiled (a device bool) alike."""

from __future__ import annotations

import pytest
import torch

from fastcache_rt.policy import Chebyshev, FixedInterval, FreqCa, Policy, Reuse, StreamSpec, Taylor
from fastcache_rt.stream import StreamState

SHAPE, S, GRID = (1, 12, 5), 12, (1, 3, 4)
COMPUTED = {0, 1, 2, 4, 6, 9}
BAD = 4


def _drive(fc, device_bools: bool, poison: bool):
    """Run S steps; computed steps record a smooth trajectory (step ``BAD`` is NaN when ``poison``, else skipped
    from the record entirely); returns the forecasts of the cached steps and the stream."""
    st = StreamState(Policy(FixedInterval(), fc, "hidden"), StreamSpec(SHAPE, torch.float32, "cpu", S, GRID))
    g = torch.Generator().manual_seed(0)
    base, slope = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    preds = {}
    for s in range(S):
        c = s in COMPUTED
        if not c:
            preds[s] = st.fc.predict(st).clone()
        v = base + slope * s
        if s == BAD:
            if not poison:  # the reference: this step never happened for the forecaster
                st.end_step(False, None) if not device_bools else st.end_step(torch.tensor(False), v)
                continue
            v = v.clone()
            v[0, 3, 1] = float("nan")
        st.end_step(torch.tensor(c) if device_bools else c, v if c or device_bools else None)
    return preds, st


@pytest.mark.parametrize("fc", [Reuse(), Taylor(order=1), Taylor(order=2), Chebyshev(degree=2, history=4),
                                FreqCa(cutoff=0.4)], ids=lambda f: type(f).__name__ + str(getattr(f, "order", "")))
@pytest.mark.parametrize("device_bools", [False, True], ids=["eager", "compiled"])
def test_a_nonfinite_computed_step_stays_out_of_the_history(fc, device_bools):
    got, st = _drive(fc, device_bools, poison=True)
    want, _ = _drive(fc, device_bools, poison=False)
    assert int(st.events[0]) == 1
    for s in got:
        assert torch.isfinite(got[s]).all(), f"step {s}: the forecast is not finite"
        torch.testing.assert_close(got[s], want[s], rtol=0, atol=0, msg=f"step {s}")
