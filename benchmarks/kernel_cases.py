"""The kernel-op benchmark cases, shared by the pytest-benchmark suite (``benchmarks/test_kernels.py``) and the
interleaved timer (``benchmarks/bench_ops.py``), so that both time exactly the same calls.

A ``Workload`` holds the inputs of every op at one (device, dtype, feature shape): FLUX-like (1, 4096, 3072) by
default, a 14-row history for the Chebyshev forecast, order-2 finite differences (3 rows) for Taylor / Hermite.
Each op is a ``Case`` with, side by side:

- ``op``: our op through one backend, the callable that is timed. It passes device tensors for every scalar
  (tau_query, distance, gap, state, params, coeffs, gammas), ``bounds`` as a Python list (the op caches its device
  copy) and a preallocated ``out=`` for the forecasts: nothing is created from a Python value and nothing is read
  back to the host in the timed call (the Chebyshev forecast and weights are called with ``validate=False``, whose
  default on the CPU reads the taus back to check them).
- ``alloc`` (forecasts, fast backends): the same op allocating its result.
- ``copy``: a same-bytes tensor copy into a preallocated tensor: the memory-bandwidth roof. Its bytes are what the
  op must read + write (half read, half written).
- ``peer``: the eager way peer libraries compute the same thing: FBCache's relative L1 read back with ``.item()``
  beside ``band_l1`` / ``gate_step``, TaylorSeer's per-order Python loop beside ``taylor_forecast`` (and FreqCa's
  Hermite loop, TaylorSeer's derivative update), a ridge least-squares fit of Chebyshev coefficients over every
  feature by ``torch.linalg.solve`` beside ``chebyshev_forecast``.

Every op's result is checked against the ``reference`` backend, and every peer's against the reference result,
before anything is timed (``Case.check``): a benchmark of something that computes another thing is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from kernel_meta import (  # noqa: F401 - re-exported: the pure-Python half of the cases (no torch import)
    ALL_OPS,
    DEGREE,
    FLUX_SHAPE,
    FORECASTS,
    HERMITE_SCALE,
    HISTORY,
    HOST,
    LAM,
    OPTIONS,
    ORDER,
    PEERS,
    QUICK_SHAPE,
    SMALL,
    STREAMING,
    TARGET_OPS,
    TARGET_ROOF,
    TARGET_SPEEDUP,
    TAU,
    TEACACHE_FLUX,
    must_move_bytes,
    op_label,
    option,
    parse_shape,
    quick,
    ratios,
    shape_str,
    targets,
)

from fastcache_rt import ops


def default_backends(device: str) -> list[str]:
    """Backends benchmarked on ``device`` when none are asked for: every available one that runs there, except the
    Triton CPU interpreter unless TRITON_INTERPRET=1 is set (it is slow: a debugging aid, not a fast path)."""
    info = ops.backends()
    order = ("cpu", "reference") if device == "cpu" else ("cuda", "triton", "reference")
    names = [b for b in order if info[b]["available"] and device in info[b]["devices"]]
    interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    if device == "cpu" and interpret and info["triton"]["available"] and "cpu" in info["triton"]["devices"]:
        names.insert(1, "triton")
    return names


# ---------------------------------------------------------------------------------------------------------------
# peers: the eager ways other libraries compute the same quantities
# ---------------------------------------------------------------------------------------------------------------


def fbcache_rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """diffusers' FirstBlockCache / ParaAttention's FBCache: relative mean-abs change, read back to the host."""
    return ((a - b).abs().mean() / a.abs().mean()).item()


def taylorseer_forecast(diffs: torch.Tensor, x: float) -> torch.Tensor:
    """TaylorSeer's forecast: a Python loop over the orders, one new tensor per term."""
    out = diffs[0]
    for i in range(1, diffs.shape[0]):
        out = out + diffs[i] * x**i / math.factorial(i)
    return out


def hermite_coefficients(k_rows: int, x: float, scale: float) -> list[float]:
    y = scale * x
    h = [1.0, 2.0 * y]
    for k in range(2, k_rows):
        h.append(2.0 * y * h[-1] - 2.0 * (k - 1) * h[-2])
    return [h[k] * scale**k / math.factorial(k) for k in range(k_rows)]


def freqca_hermite_forecast(diffs: torch.Tensor, x: float, scale: float) -> torch.Tensor:
    """FreqCa's high-band forecast the eager way: host coefficients, one tensor op chain per order."""
    c = hermite_coefficients(diffs.shape[0], x, scale)
    out = diffs[0]
    for k in range(1, diffs.shape[0]):
        out = out + diffs[k] * c[k]
    return out


def taylorseer_update(diffs: torch.Tensor, feature: torch.Tensor, gap: float) -> list[torch.Tensor]:
    """TaylorSeer's derivative update: new finite differences as fresh tensors (the old ones are then dropped)."""
    new = [feature]
    for i in range(diffs.shape[0] - 1):
        new.append((new[i] - diffs[i]) / gap)
    return new


class RidgeChebyshev:
    """A plain-torch Chebyshev forecast: fit the coefficients of every feature by ridge least squares
    (``torch.linalg.solve`` of the normal equations, fp32), evaluate them at the query time."""

    def __init__(self, history: torch.Tensor, taus: torch.Tensor, tau_query: torch.Tensor, degree: int,
                 lam: float):
        self.history, self.taus, self.q, self.degree = history, taus, tau_query, degree
        self.ridge = lam * torch.eye(degree + 1, dtype=torch.float32, device=history.device)

    @staticmethod
    def basis(t: torch.Tensor, degree: int) -> torch.Tensor:
        cols = [torch.ones_like(t), t]
        for _ in range(2, degree + 1):
            cols.append(2.0 * t * cols[-1] - cols[-2])
        return torch.stack(cols[: degree + 1], dim=-1)

    def __call__(self) -> torch.Tensor:
        n = self.history.shape[0]
        h = self.history.reshape(n, -1).float()
        phi = self.basis(self.taus.float(), self.degree)  # (n, M+1)
        phi_q = self.basis(self.q.float().reshape(1), self.degree)  # (1, M+1)
        coef = torch.linalg.solve(phi.T @ phi + self.ridge, phi.T @ h)  # (M+1, N)
        return (phi_q @ coef).to(self.history.dtype).view(self.history.shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    label: str
    nbytes: int | None
    timed: Callable[[str], Callable[[], object]]  # backend -> the timed call (preallocated out=, device scalars)
    result: Callable[[str], tuple]  # backend -> fresh outputs, for the checks
    alloc: Callable[[str], Callable[[], object]] | None = None  # backend -> the call allocating its result
    peer: tuple[str, str, Callable[[], object]] | None = None  # (name, expression, call)
    peer_check: Callable[[tuple], None] | None = None  # reference outputs -> raises if the peer disagrees
    _checked: set = field(default_factory=set)

    def check(self, backend: str, *, peer: bool = False) -> None:
        """Raise AssertionError when ``backend`` (or the peer) disagrees with the reference on these inputs."""
        key = ("peer" if peer else backend)
        if key in self._checked:
            return
        ref = self.result("reference")
        if peer:
            if self.peer_check is not None:
                self.peer_check(ref)
        elif backend != "reference":
            got = self.result(backend)
            for a, b in zip(got, ref):
                assert_close(a, b, f"{self.label} backend {backend}")
        self._checked.add(key)


def _tol(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def assert_close(a, b, what: str, tol: float | None = None) -> None:
    if isinstance(a, torch.Tensor) and a.dtype == torch.bool:
        assert torch.equal(a, b), f"{what}: decision {a} != reference {b}"
        return
    if not isinstance(a, torch.Tensor):
        a, b = torch.tensor(float(a)), torch.tensor(float(b))
    t = _tol(a.dtype) if tol is None else tol
    x, y = a.double().cpu(), b.double().cpu()
    assert x.shape == y.shape, f"{what}: shape {tuple(x.shape)} != reference {tuple(y.shape)}"
    scale = max(float(y.abs().max()) if y.numel() else 0.0, 1e-30)
    err = float((x - y).abs().max()) if y.numel() else 0.0
    assert err <= t * scale + 1e-6, f"{what}: max |diff| {err:.3g} > {t:g} x max |reference| {scale:.3g}"


class Workload:
    """Inputs of every op at one (device, dtype, shape); large tensors are made once and shared by the cases."""

    def __init__(self, shape=FLUX_SHAPE, dtype=torch.float32, device="cpu", history: int = HISTORY,
                 order: int = ORDER, seed: int = 0):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.history, self.order = history, order
        dev, dt = self.device, dtype
        g = torch.Generator(device=dev).manual_seed(seed)

        def randn(*s):
            return torch.randn(s, generator=g, device=dev, dtype=torch.float32).to(dt)

        self.cur = randn(*self.shape)
        self.prev = (self.cur.float() + 0.05 * torch.randn(self.shape, generator=g, device=dev)).to(dt)
        self.hist = randn(history, *self.shape)
        self.taus = torch.linspace(-1, 0.7, history, device=dev)
        self.tau_query = torch.tensor(0.75, device=dev)
        self.diffs = randn(order + 1, *self.shape)
        self.upd_diffs = self.diffs.clone()
        self.feature = randn(*self.shape)
        self.distance = torch.tensor(2.0, device=dev)
        self.gap = torch.tensor(1.0, device=dev)
        self.state = torch.tensor([5, 0.1, 0, 1, 1, 0.1, 0, 3], dtype=torch.float32, device=dev)
        self.params = ops.gate_params(TAU, 50, tads=(0.5, 1.5), max_cached=2, device=dev)
        self.coeffs = torch.tensor(TEACACHE_FLUX, dtype=torch.float32, device=dev)
        self.gammas = torch.tensor([0.8, 1.5], device=dev)
        D = self.shape[-1]
        self.bounds = [0, D // 2, D]
        self.sums = torch.tensor([[10.0, 200.0], [30.0, 250.0]], device=dev)
        self.out = torch.empty(self.shape, dtype=dt, device=dev)
        self.numel = self.cur.numel()
        self.elsize = self.cur.element_size()
        self._cases: dict[str, Case] = {}

    def key(self) -> tuple:
        return (str(self.device), str(self.dtype), self.shape, self.history, self.order)

    def nbytes(self, op: str) -> int | None:
        rows = self.history if op.startswith("chebyshev") else self.order + 1
        return must_move_bytes(op, self.numel, self.elsize, rows)

    def cases(self, names=ALL_OPS) -> dict[str, Case]:
        for op in names:
            if op not in self._cases:
                self._cases[op] = getattr(self, f"_case_{op}")()
        return {op: self._cases[op] for op in names}

    # --- streaming ops ---------------------------------------------------------------------------------------

    def _case_band_l1(self) -> Case:
        w = self

        def timed(b):
            return lambda: ops.band_l1(w.cur, w.prev, w.bounds, backend=b)

        def result(b):
            return (ops.band_l1(w.cur, w.prev, w.bounds, backend=b),)

        def peer_check(ref):
            s = ref[0].double()
            assert_close(fbcache_rel_l1(w.prev, w.cur), float(s[:, 0].sum() / s[:, 1].sum()),
                          "band_l1 peer FBCache", tol=_tol(w.dtype))

        name, expr = PEERS["band_l1"]
        return Case("band_l1", op_label("band_l1"), self.nbytes("band_l1"), timed, result,
                    peer=(name, expr, lambda: fbcache_rel_l1(w.prev, w.cur)), peer_check=peer_check)

    def _case_gate_step(self) -> Case:
        w = self

        def call(b):
            return ops.gate_step(w.cur, w.prev, w.state, w.params, w.coeffs, bounds=w.bounds, gammas=w.gammas,
                                 backend=b)

        def peer_check(ref):
            s = ref[2].double()
            assert_close(fbcache_rel_l1(w.prev, w.cur), float(s[:, 0].sum() / s[:, 1].sum()),
                          "gate_step peer FBCache", tol=_tol(w.dtype))

        name, expr = PEERS["gate_step"]
        return Case("gate_step", op_label("gate_step"), self.nbytes("gate_step"), lambda b: (lambda: call(b)),
                    lambda b: tuple(call(b)), peer=(name, expr, lambda: fbcache_rel_l1(w.prev, w.cur) < TAU),
                    peer_check=peer_check)

    def _case_chebyshev_forecast(self) -> Case:
        w = self

        def timed(b):
            return lambda: ops.chebyshev_forecast(w.hist, w.taus, w.tau_query, DEGREE, LAM, validate=False,
                                                  out=w.out, backend=b)

        def alloc(b):
            return lambda: ops.chebyshev_forecast(w.hist, w.taus, w.tau_query, DEGREE, LAM, validate=False,
                                                  backend=b)

        peer = RidgeChebyshev(w.hist, w.taus, w.tau_query, DEGREE, LAM)

        def peer_check(ref):
            assert_close(peer(), ref[0], "chebyshev_forecast peer ridge solve")

        name, expr = PEERS["chebyshev_forecast"]
        return Case("chebyshev_forecast", op_label("chebyshev_forecast", self.history),
                    self.nbytes("chebyshev_forecast"), timed, lambda b: (alloc(b)(),), alloc=alloc,
                    peer=(name, expr, peer), peer_check=peer_check)

    def _forecast_case(self, op, fn, peer_name_expr, peer_call) -> Case:
        w = self

        def timed(b):
            return lambda: fn(w.diffs, w.distance, out=w.out, backend=b)

        def alloc(b):
            return lambda: fn(w.diffs, w.distance, backend=b)

        def peer_check(ref):
            assert_close(peer_call(), ref[0], f"{op} peer {peer_name_expr[0]}")

        return Case(op, op_label(op, order=self.order), self.nbytes(op), timed, lambda b: (alloc(b)(),),
                    alloc=alloc, peer=(*peer_name_expr, peer_call), peer_check=peer_check)

    def _case_taylor_forecast(self) -> Case:
        x = float(self.distance)
        return self._forecast_case("taylor_forecast", ops.taylor_forecast, PEERS["taylor_forecast"],
                                   lambda: taylorseer_forecast(self.diffs, x))

    def _case_hermite_forecast(self) -> Case:
        x = float(self.distance)
        return self._forecast_case("hermite_forecast", ops.hermite_forecast, PEERS["hermite_forecast"],
                                   lambda: freqca_hermite_forecast(self.diffs, x, HERMITE_SCALE))

    def _case_taylor_update(self) -> Case:
        w = self
        gap = float(self.gap)

        def timed(b):  # in place on a buffer of its own: the values evolve call by call, the work does not
            return lambda: ops.taylor_update(w.upd_diffs, w.feature, w.gap, backend=b)

        def result(b):
            d = w.diffs.clone()
            ops.taylor_update(d, w.feature, w.gap, backend=b)
            return (d,)

        def peer_check(ref):
            assert_close(torch.stack(taylorseer_update(w.diffs, w.feature, gap)), ref[0], "taylor_update peer")

        name, expr = PEERS["taylor_update"]
        return Case("taylor_update", op_label("taylor_update", order=self.order), self.nbytes("taylor_update"),
                    timed, result, peer=(name, expr, lambda: taylorseer_update(w.diffs, w.feature, gap)),
                    peer_check=peer_check)

    # --- small device ops, host packers ------------------------------------------------------------------------

    def _case_gate_decide(self) -> Case:
        w = self

        def call(b):
            return ops.gate_decide(w.sums, w.state, w.params, w.coeffs, gammas=w.gammas, backend=b)

        return Case("gate_decide", op_label("gate_decide"), None, lambda b: (lambda: call(b)),
                    lambda b: tuple(call(b)))

    def _case_chebyshev_weights(self) -> Case:
        w = self

        def call(b):
            return ops.chebyshev_weights(w.taus, w.tau_query, DEGREE, LAM, validate=False, backend=b)

        return Case("chebyshev_weights", op_label("chebyshev_weights", self.history), None,
                    lambda b: (lambda: call(b)), lambda b: (call(b),))

    def _case_gate_params(self) -> Case:
        dev = self.device

        def call():
            return ops.gate_params(TAU, 50, tads=(0.5, 1.5), max_cached=2, device=dev)

        return Case("gate_params", "gate_params", None, lambda b: call, lambda b: (call(),))

    def _case_gate_state(self) -> Case:
        dev = self.device
        return Case("gate_state", "gate_state", None, lambda b: (lambda: ops.gate_state(dev)),
                    lambda b: (ops.gate_state(dev),))


def copy_roof(nbytes: int, device) -> Callable[[], object]:
    """A same-bytes copy into a preallocated tensor: reads nbytes / 2, writes nbytes / 2."""
    half = max(nbytes // 2, 1)
    src = torch.empty(half, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def synced(fn: Callable[[], object], device) -> Callable[[], object]:
    """On an accelerator, wait for the call's work to finish (so a wall-clock timer measures it)."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        r = fn()
        torch.cuda.synchronize()
        return r

    return run
