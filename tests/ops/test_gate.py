import math

import pytest
import torch

from fastcache_rt import ops
from fastcache_rt.ops import layout as L
from fastcache_rt.ops._common import bounds_tensor, three_d
from tests.conftest import interpreter_keeps
from tests.ops.helpers import DTYPES, make_view, poison

FLUX_COEFFS = [498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861]


class PyGate:
    """A plain-Python (float64) model of the gate rules, written from the papers (TeaCache + SpectralCache's
    Algorithm 1), independent of the torch reference."""

    def __init__(self, tau, S, coeffs, tads=(1.0, 1.0), max_cached=math.inf, force_last=True, gammas=None):
        self.tau, self.S, self.coeffs, self.tads = tau, S, coeffs, tads
        self.max_cached, self.force_last, self.gammas = max_cached, force_last, gammas
        self.s, self.acc, self.c, self.has = 0, 0.0, 0, False

    def step(self, band_sums):
        num = sum(b[0] for b in band_sums)
        den = sum(b[1] for b in band_sums)
        d = 0.0 if num == 0 and den == 0 else (num / den if den != 0 else math.inf)
        smin, smax = self.tads
        tau_eff = self.tau * (smin + (smax - smin) * (1 - math.cos(2 * math.pi * self.s / self.S)) / 2)
        p = 0.0
        for c in self.coeffs:
            p = p * d + c
        acc = self.acc + p
        fdc = True
        if self.gammas is not None:
            for (n_k, d_k), g in zip(band_sums, self.gammas):
                r = 0.0 if n_k == 0 and d_k == 0 else (n_k / d_k if d_k != 0 else math.inf)
                fdc = fdc and r <= tau_eff * g
        forced = self.s == 0 or (self.force_last and self.s >= self.S - 1) or not self.has or not math.isfinite(d)
        skip = not forced and acc < tau_eff and self.c < self.max_cached and fdc
        self.s += 1
        if skip:
            self.acc, self.c = acc, self.c + 1
        else:
            self.acc, self.c, self.has = 0.0, 0, True
        return not skip


CONFIGS = {
    "teacache": dict(tau=0.6, coeffs=FLUX_COEFFS),
    "identity": dict(tau=0.15, coeffs=[1.0, 0.0]),
    "spectral": dict(tau=0.6, coeffs=FLUX_COEFFS, tads=(0.5, 1.5), max_cached=2, gammas=[0.8, 1.5]),
    "tads_only": dict(tau=0.1, coeffs=[1.0, 0.0], tads=(0.5, 1.5)),
}


def _trajectory(steps, shape, dtype, device, gen, drift=0.05):
    x = torch.randn(shape, generator=gen)
    out = [x]
    for s in range(steps):
        scale = drift * (0.3 + abs(math.sin(s)))  # varying change per step
        x = x + scale * torch.randn(shape, generator=gen)
        out.append(x)
    return [t.to(dtype=dtype, device=device) for t in out]


def _run(backend, traj, cfg, S, bounds, device):
    p = ops.gate_params(cfg["tau"], S, tads=cfg.get("tads", (1.0, 1.0)), max_cached=cfg.get("max_cached", math.inf),
                        device=device)
    st = ops.gate_state(device)
    decisions, states, sums = [], [], []
    for s in range(S):
        prev = traj[s] if s == 0 else traj[s - 1]
        c, st, sm = ops.gate_step(traj[s], prev, st, p, cfg["coeffs"], bounds=bounds, gammas=cfg.get("gammas"),
                                  backend=backend)
        decisions.append(bool(c))
        states.append(st.cpu())
        sums.append(sm.cpu())
    return decisions, states, sums


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_reference_matches_python_model(cfg_name):
    cfg = CONFIGS[cfg_name]
    g = torch.Generator().manual_seed(10)
    S, D = 28, 32
    traj = _trajectory(S, (2, 16, D), torch.float32, "cpu", g)
    bounds = [0, D // 2, D] if cfg.get("gammas") else None
    dec, states, sums = _run("reference", traj, cfg, S, bounds, "cpu")
    model = PyGate(S=S, **cfg)
    expect = [model.step(sm.double().tolist()) for sm in sums]
    assert dec == expect
    assert dec[0] and dec[-1] and not all(dec), f"{cfg_name}: degenerate schedule {dec}"
    assert states[-1][L.S_STEP] == S and states[-1][L.S_COMPUTED] == sum(dec)


def test_ceb_limits_consecutive_cached_steps():
    g = torch.Generator().manual_seed(11)
    S = 20
    traj = _trajectory(S, (4, 16), torch.float32, "cpu", g, drift=1e-4)  # nearly static: caching wants every step
    dec, _, _ = _run("reference", traj, dict(tau=0.5, coeffs=[1.0, 0.0], max_cached=2), S, None, "cpu")
    run = longest = 0
    for d in dec:
        run = 0 if d else run + 1
        longest = max(longest, run)
    assert longest == 2
    dec_free, _, _ = _run("reference", traj, dict(tau=0.5, coeffs=[1.0, 0.0]), S, None, "cpu")
    assert sum(dec_free) == 2  # only the forced first and last steps


def test_nonfinite_probe_forces_compute():
    st = ops.gate_state()
    p = ops.gate_params(10.0, 10)
    x = torch.ones(4, 8)
    c, st, _ = ops.gate_step(x, x, st, p, backend="reference")
    assert bool(c)
    c, st, _ = ops.gate_step(x * 1.001, x, st, p, backend="reference")
    assert not bool(c)
    bad = x.clone()
    bad[0, 0] = float("nan")
    c, st, _ = ops.gate_step(bad, x, st, p, backend="reference")
    assert bool(c) and st[L.S_NONFINITE] == 1
    c, st, _ = ops.gate_step(x, torch.zeros_like(x), st, p, backend="reference")  # x / 0: infinite change
    assert bool(c) and st[L.S_NONFINITE] == 2


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_backend_matches_reference(fast_backend, cfg_name, dtype, layout):
    name, mod, dev = fast_backend
    if not interpreter_keeps(name, cfg_name, str(dtype), layout, every=3):
        pytest.skip("subsampled under the Triton CPU interpreter")
    cfg = CONFIGS[cfg_name]
    g = torch.Generator().manual_seed(12)
    S, D = 16, 40
    base = make_view(layout, (3, 9, D), dtype, "cpu", g)
    traj = []
    x = base.float()
    for s in range(S):
        x = x + 0.04 * (0.3 + abs(math.sin(s))) * torch.randn(x.shape, generator=g)
        view = make_view(layout, (3, 9, D), dtype, dev, g)
        view.copy_(x)
        traj.append(view)
    bounds = [0, 17, D] if cfg.get("gammas") else None
    ref = _run("reference", traj, cfg, S, bounds, dev)
    got = _run(name, traj, cfg, S, bounds, dev)
    assert got[0] == ref[0], f"{name} decisions {got[0]} != reference {ref[0]}"
    for s, (a, b) in enumerate(zip(got[1], ref[1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"state at step {s}: {m}")
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backend_writes_every_output(fast_backend):
    name, mod, dev = fast_backend
    g = torch.Generator().manual_seed(13)
    cur, prev = make_view("contiguous", (2, 5, 12), torch.float32, dev, g), make_view(
        "contiguous", (2, 5, 12), torch.float32, dev, g
    )
    state = torch.tensor([3, 0.1, 1, 1, 0, 0.2, 0, 2], dtype=torch.float32, device=dev)
    params = ops.gate_params(0.5, 10, tads=(0.5, 1.5), max_cached=3, device=dev)
    coeffs = torch.tensor(FLUX_COEFFS, device=dev)
    gammas = torch.tensor([0.8, 1.5], device=dev)
    bounds = bounds_tensor([0, 6, 12], dev)
    outs = [poison(torch.empty((), dtype=torch.bool, device=dev)), poison(torch.empty(8, device=dev)),
            poison(torch.empty(2, 2, device=dev))]
    mod.gate_step(three_d(cur), three_d(prev), bounds, state, params, coeffs, gammas, *outs)
    assert torch.isfinite(outs[1]).all() and torch.isfinite(outs[2]).all()
    ref = [torch.empty((), dtype=torch.bool), torch.empty(8), torch.empty(2, 2)]
    from fastcache_rt.ops import _reference

    _reference.gate_step(three_d(cur.cpu()), three_d(prev.cpu()), bounds.cpu(), state.cpu(), params.cpu(),
                         coeffs.cpu(), gammas.cpu(), *ref)
    assert bool(outs[0]) == bool(ref[0])
    torch.testing.assert_close(outs[1].cpu(), ref[1], rtol=1e-4, atol=1e-5)
    # the epilogue-only entry on the same sums gives the same decision and state
    d2 = poison(torch.empty((), dtype=torch.bool, device=dev))
    s2 = poison(torch.empty(8, device=dev))
    mod.gate_decide(outs[2], state, params, coeffs, gammas, d2, s2)
    assert bool(d2) == bool(outs[0])
    torch.testing.assert_close(s2.cpu(), outs[1].cpu())


def test_gate_decide_on_summed_rank_sums():
    """Two 'ranks' each see half the tokens: summing their band_l1 results and deciding once equals deciding on the
    whole tensor (the context-parallel path)."""
    g = torch.Generator().manual_seed(14)
    cur, prev = torch.randn(1, 64, 16, generator=g), torch.randn(1, 64, 16, generator=g)
    st = torch.tensor([5, 0.05, 0, 1, 0, 0, 0, 3], dtype=torch.float32)
    p = ops.gate_params(3.0, 20)
    whole_c, whole_s, whole_sums = ops.gate_step(cur, prev, st, p, bounds=[0, 8, 16])
    parts = sum(ops.band_l1(cur[:, i * 32:(i + 1) * 32], prev[:, i * 32:(i + 1) * 32], [0, 8, 16]) for i in range(2))
    c, s = ops.gate_decide(parts, st, p)
    assert bool(c) == bool(whole_c)
    torch.testing.assert_close(s, whole_s)
    torch.testing.assert_close(parts, whole_sums)


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: ops.gate_params(-1, 10), ValueError, "tau"),
        (lambda: ops.gate_params(0.5, 0), ValueError, "num_steps"),
        (lambda: ops.gate_params(0.5, 10, tads=(1.5, 0.5)), ValueError, "tads"),
        (lambda: ops.gate_params(0.5, 10, max_cached=0), ValueError, "max_cached"),
        (lambda: ops.gate_step(torch.ones(2, 4), torch.ones(2, 4), torch.zeros(7), ops.gate_params(0.5, 4)),
         ValueError, "state"),
        (lambda: ops.gate_step(torch.ones(2, 4), torch.ones(2, 4), ops.gate_state(), torch.zeros(3)),
         ValueError, "params"),
        (lambda: ops.gate_step(torch.ones(2, 4), torch.ones(2, 4), ops.gate_state(), ops.gate_params(0.5, 4),
                               bounds=[0, 2, 4], gammas=[1.0]), ValueError, "gammas"),
        (lambda: ops.gate_step(torch.ones(2, 4), torch.ones(2, 4), ops.gate_state(), ops.gate_params(0.5, 4),
                               coeffs=[]), ValueError, "coeffs"),
        (lambda: ops.gate_decide(torch.ones(2, 3), ops.gate_state(), ops.gate_params(0.5, 4)), ValueError, "sums"),
    ],
)
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
