"""Device-side state of one stream of steps (one CFG branch at one shape): the step counter, the gate's state and
the forecaster's buffers, with the rules that reset them. Every buffer is allocated once per stream; a step only
writes into them, with device ops and no host reads."""

from __future__ import annotations

import math

import torch

from . import ops
from .ops import layout as L
from .policy.forecasters import Chebyshev, FreqCa, Reuse, Taylor
from .policy.gates import EveryStep, FBCacheGate, FixedInterval, MagCacheGate, SpectralCacheGate, SpectrumSchedule
from .policy.gates import TeaCacheGate


def _where_(buf: torch.Tensor, cond: torch.Tensor, value) -> None:
    buf.copy_(torch.where(cond, value, buf))


def _at(vec: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """vec[step] (clamped to the last entry) as a 0-dim tensor, without turning ``step`` into a host int."""
    return vec.gather(0, step.clamp(max=vec.shape[0] - 1).view(1)).reshape(())


# ---------------------------------------------------------------------------------------------------------------
# gates
# ---------------------------------------------------------------------------------------------------------------


class ScheduleGateState:
    """A precomputed compute mask over the run's steps (every step, fixed interval, Spectrum)."""

    probe = None

    def __init__(self, gate, num_steps: int, device):
        self.mask = torch.tensor(gate.schedule(num_steps), dtype=torch.bool, device=device)
        self.last = num_steps - 1

    def decide(self, step: torch.Tensor, probe, has_cache) -> torch.Tensor:
        return _at(self.mask, step)

    def commit(self, compute: torch.Tensor, gate_compute: torch.Tensor) -> None:
        pass

    def reset_where(self, new_gen: torch.Tensor) -> None:
        pass

    def tensors(self):
        return [self.mask]


class SignalGateState:
    """TeaCache / SpectralCache / FBCache through the fused ``gate_step`` op."""

    def __init__(self, gate, num_steps: int, device):
        self.gate = gate
        self.probe = gate.probe
        self.fbcache = isinstance(gate, FBCacheGate)
        if isinstance(gate, SpectralCacheGate):
            tads, max_cached, coeffs, self.gammas = gate.tads, gate.max_cached, gate.coeffs, gate.gammas
        elif isinstance(gate, TeaCacheGate):
            tads, max_cached, coeffs, self.gammas = (1.0, 1.0), math.inf, gate.coeffs, None
        else:  # FBCache: plain relative L1 against the last computed step, no accumulation, last step not forced
            tads, max_cached, coeffs, self.gammas = (1.0, 1.0), math.inf, (1.0, 0.0), None
        self.params = ops.gate_params(gate.threshold, num_steps, tads=tads, max_cached=max_cached,
                                      force_last=not self.fbcache, device=device)
        self.coeffs = torch.tensor(coeffs, dtype=torch.float32, device=device)
        self.gammas_t = None if self.gammas is None else torch.tensor(self.gammas, dtype=torch.float32, device=device)
        self.state = ops.gate_state(device)
        # FBCache has no accumulator: zero it before every decision.
        self.keep = torch.ones(L.STATE_LEN, device=device)
        if self.fbcache:
            self.keep[L.S_ACC] = 0.0
        self.prev: torch.Tensor | None = None
        self.bounds: list[int] | None = None

    def decide(self, step: torch.Tensor, probe: torch.Tensor, has_cache) -> torch.Tensor:
        if self.prev is None:  # a fresh stream: the first probe is its own predecessor (d = 0, step 0 computes)
            self.prev = probe.detach().clone()
            D = probe.shape[-1]
            self.bounds = [0, D] if self.gammas is None else [0, max(1, min(D - 1, round(self.gate.split * D))), D]
        st = self.state * self.keep if self.fbcache else self.state
        compute, new_state, _ = ops.gate_step(probe, self.prev, st, self.params, self.coeffs, bounds=self.bounds,
                                              gammas=self.gammas_t)
        self.state.copy_(new_state)
        if not self.fbcache:  # TeaCache compares with the previous step, cached or not
            self.prev.copy_(probe)
        self._probe = probe
        return compute

    def commit(self, compute: torch.Tensor, gate_compute: torch.Tensor) -> None:
        # A compute forced outside the gate (nothing cached, non-finite forecast) resets the gate like its own would.
        forced = compute & ~gate_compute
        fresh = self.state.clone()
        fresh[L.S_ACC] = 0.0
        fresh[L.S_CONSEC] = 0.0
        fresh[L.S_HAS_CACHE] = 1.0
        fresh[L.S_LAST_COMPUTE] = 1.0
        fresh[L.S_COMPUTED] = self.state[L.S_COMPUTED] + 1.0
        _where_(self.state, forced, fresh)
        if self.fbcache:  # FBCache compares with the last *computed* step
            _where_(self.prev, compute, self._probe)
        self._probe = None

    def reset_where(self, new_gen: torch.Tensor) -> None:
        _where_(self.state, new_gen, torch.zeros_like(self.state))

    def tensors(self):
        out = [self.params, self.coeffs, self.state, self.keep]
        return out + ([self.prev] if self.prev is not None else []) + ([self.gammas_t] if self.gammas_t is not None
                                                                        else [])


class MagCacheGateState:
    """MagCache's rule on the device: [ratio, err, since] accumulators and the calibrated ratio table."""

    probe = None

    def __init__(self, gate: MagCacheGate, num_steps: int, device):
        self.calibrate = gate.calibrate
        self.table = torch.tensor(gate.table(num_steps) if not gate.calibrate else [1.0] * num_steps,
                                  dtype=torch.float32, device=device)
        self.keep_from = int(math.floor(gate.retention * num_steps + 0.5))
        self.threshold, self.max_skip, self.last = float(gate.threshold), float(gate.max_skip), num_steps - 1
        self.acc = torch.tensor([1.0, 0.0, 0.0], device=device)  # ratio, err, steps since the last full step
        self.measured = torch.full((num_steps,), float("nan"), device=device)
        self.prev_norm: torch.Tensor | None = None
        self._active = None

    def decide(self, step: torch.Tensor, probe, has_cache) -> torch.Tensor:
        if self.calibrate:
            return torch.ones((), dtype=torch.bool, device=step.device)
        g = _at(self.table, step)
        active = step >= self.keep_from
        ratio = self.acc[0] * g
        since = self.acc[2] + 1.0
        err = self.acc[1] + (1.0 - ratio).abs()
        skip = active & has_cache & (err <= self.threshold) & (since <= self.max_skip)
        new = torch.stack([ratio, err, since])
        reset = torch.tensor([1.0, 0.0, 0.0], device=step.device)
        self.acc.copy_(torch.where(active, torch.where(skip, new, reset), self.acc))
        self._active = active
        return ~skip

    def commit(self, compute: torch.Tensor, gate_compute: torch.Tensor) -> None:
        if self._active is not None:
            forced = compute & ~gate_compute & self._active
            _where_(self.acc, forced, torch.tensor([1.0, 0.0, 0.0], device=self.acc.device))

    def observe(self, step: torch.Tensor, residual: torch.Tensor) -> None:
        """Calibration: mean over tokens of ||r_s|| / ||r_{s-1}|| (1.0 at the first step)."""
        norm = torch.linalg.vector_norm(residual.float(), dim=-1)
        if self.prev_norm is None:
            ratio = torch.ones((), device=norm.device)
            self.prev_norm = norm.clone()
        else:
            ratio = (norm / (self.prev_norm + 1e-8)).mean()
            self.prev_norm.copy_(norm)
        idx = step.clamp(max=self.last).view(1)
        self.measured.index_copy_(0, idx, ratio.view(1))

    def reset_where(self, new_gen: torch.Tensor) -> None:
        _where_(self.acc, new_gen, torch.tensor([1.0, 0.0, 0.0], device=self.acc.device))

    def tensors(self):
        return [self.table, self.acc, self.measured] + ([self.prev_norm] if self.prev_norm is not None else [])


def make_gate_state(gate, num_steps: int, device):
    if isinstance(gate, (EveryStep, FixedInterval, SpectrumSchedule)):
        return ScheduleGateState(gate, num_steps, device)
    if isinstance(gate, (TeaCacheGate, SpectralCacheGate, FBCacheGate)):
        return SignalGateState(gate, num_steps, device)
    if isinstance(gate, MagCacheGate):
        return MagCacheGateState(gate, num_steps, device)
    raise TypeError(f"unknown gate {gate!r}")


# ---------------------------------------------------------------------------------------------------------------
# forecasters: record(v) after a full step, predict() for any step
# ---------------------------------------------------------------------------------------------------------------


class ReuseState:
    def __init__(self, fc: Reuse, shape, dtype, device, num_steps, grid):
        self.buf = torch.zeros(shape, dtype=dtype, device=device)

    def record(self, st: "StreamState", v: torch.Tensor) -> None:
        self.buf.copy_(v)

    def predict(self, st: "StreamState") -> torch.Tensor:
        return self.buf

    def buffers(self):
        return [self.buf]

    def reset_where(self, new_gen):
        pass


class TaylorState:
    def __init__(self, fc: Taylor, shape, dtype, device, num_steps, grid):
        self.K = fc.order + 1
        self.diffs = torch.zeros((self.K, *shape), dtype=dtype, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, st, v):
        gap = (st.step - st.last_full).clamp(min=1).float()
        ops.taylor_update(self.diffs, v, gap, count=self.count)
        self.count.copy_((self.count + 1).clamp(max=self.K))

    def predict(self, st):
        return ops.taylor_forecast(self.diffs, (st.step - st.last_full).float())

    def buffers(self):
        return [self.diffs, self.count]

    def reset_where(self, new_gen):
        _where_(self.count, new_gen, torch.zeros_like(self.count))


class ChebyshevState:
    def __init__(self, fc: Chebyshev, shape, dtype, device, num_steps, grid):
        self.fc = fc
        cap = min(fc.history, num_steps)
        self.hist = torch.zeros((cap, *shape), dtype=dtype, device=device)
        self.taus = torch.zeros(cap, dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.cap = cap
        self.scale = 2.0 / (num_steps - 1) if num_steps > 1 else 0.0

    def tau(self, step):
        # the run's own step range mapped onto [-1, 1]
        return step.float() * self.scale - (1.0 if self.scale else 0.0)

    def record(self, st, v):
        row = (self.count % self.cap).view(1)
        self.hist.index_copy_(0, row, v.unsqueeze(0))
        self.taus.index_copy_(0, row, self.tau(st.step).view(1))
        self.count.add_(1)

    def predict(self, st):
        fc = self.fc
        cnt = self.count.clamp(min=1)  # before the first record the prediction is unused (and finite)
        return ops.chebyshev_forecast(self.hist, self.taus, self.tau(st.step), fc.degree, fc.lam, count=cnt,
                                      blend=fc.blend, validate=False)

    def buffers(self):
        return [self.hist, self.taus, self.count]

    def reset_where(self, new_gen):
        _where_(self.count, new_gen, torch.zeros_like(self.count))


def dct_matrix(n: int, device, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix C (n x n): X = C x."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(device=device, dtype=dtype)


class FreqCaState:
    """Low band (2-D DCT radial index <= cutoff * max) reused; high band forecast with Hermite-weighted differences."""

    def __init__(self, fc: FreqCa, shape, dtype, device, num_steps, grid):
        B, N, D = shape
        if grid is None:
            side = int(round(math.sqrt(N)))
            if side * side != N:
                raise ValueError(f"FreqCa needs the token grid (H, W) for {N} tokens; pass grid=(H, W) to enable()")
            grid = (side, side)
        H, W = grid
        if H * W != N:
            raise ValueError(f"grid: {H} x {W} != {N} image tokens")
        self.fc, self.H, self.W = fc, H, W
        self.K = fc.order + 1
        self.low = torch.zeros(shape, dtype=dtype, device=device)
        self.diffs = torch.zeros((self.K, *shape), dtype=dtype, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        ch, cw = dct_matrix(H, device), dct_matrix(W, device)
        u = torch.arange(H, dtype=torch.float32).unsqueeze(1)
        v = torch.arange(W, dtype=torch.float32).unsqueeze(0)
        radius = torch.sqrt(u * u + v * v)
        mask = (radius <= fc.cutoff * radius.max()).to(torch.float32).to(device)
        # low-pass projector on the grid, separable pieces: low = Ch^T (M * (Ch X Cw^T)) Cw
        self.ch, self.cw, self.mask = ch, cw, mask

    def lowpass(self, v: torch.Tensor) -> torch.Tensor:
        B, N, D = v.shape
        x = v.float().reshape(B, self.H, self.W, D)
        spec = torch.einsum("uh,bhwd,vw->buvd", self.ch, x, self.cw)
        spec = spec * self.mask[None, :, :, None]
        low = torch.einsum("uh,buvd,vw->bhwd", self.ch, spec, self.cw)
        return low.reshape(B, N, D).to(v.dtype)

    def record(self, st, v):
        lo = self.lowpass(v)
        self.low.copy_(lo)
        gap = (st.step - st.last_full).clamp(min=1).float()
        ops.taylor_update(self.diffs, v - lo, gap, count=self.count)
        self.count.copy_((self.count + 1).clamp(max=self.K))

    def predict(self, st):
        x = (st.step - st.last_full).float()
        return self.low + ops.hermite_forecast(self.diffs, x, scale=self.fc.scale)

    def buffers(self):
        return [self.low, self.diffs, self.count]

    def constants(self):
        return [self.ch, self.cw, self.mask]

    def reset_where(self, new_gen):
        _where_(self.count, new_gen, torch.zeros_like(self.count))


def make_forecaster_state(fc, shape, dtype, device, num_steps, grid):
    table = {Reuse: ReuseState, Taylor: TaylorState, Chebyshev: ChebyshevState, FreqCa: FreqCaState}
    return table[type(fc)](fc, shape, dtype, device, num_steps, grid)


# ---------------------------------------------------------------------------------------------------------------
# one stream
# ---------------------------------------------------------------------------------------------------------------


class StreamState:
    """Everything one stream of steps keeps on the device."""

    def __init__(self, policy, num_steps: int, site_shape, site_dtype, device, grid=None):
        self.num_steps = num_steps
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.last_full = torch.zeros((), dtype=torch.int64, device=device)
        self.last_t = torch.full((), math.inf, dtype=torch.float32, device=device)
        self.has_cache = torch.zeros((), dtype=torch.bool, device=device)
        self.log = torch.zeros(num_steps, dtype=torch.bool, device=device)
        self.events = torch.zeros(2, dtype=torch.int64, device=device)  # [bad forecasts, bad probes]
        self.gate = make_gate_state(policy.gate, num_steps, device)
        self.fc = make_forecaster_state(policy.forecaster, site_shape, site_dtype, device, num_steps, grid)
        self.last_use = 0

    def begin_step(self, t: torch.Tensor) -> None:
        """Device-side reset when the timestep jumps back up (a new generation the host did not announce)."""
        new_gen = t > self.last_t
        self.last_t.copy_(t)
        _where_(self.step, new_gen, torch.zeros_like(self.step))
        _where_(self.has_cache, new_gen, torch.zeros_like(self.has_cache))
        _where_(self.log, new_gen, torch.zeros_like(self.log))
        self.gate.reset_where(new_gen)
        self.fc.reset_where(new_gen)

    def end_step(self, compute: torch.Tensor) -> None:
        self.log.index_copy_(0, self.step.clamp(max=self.num_steps - 1).view(1), compute.view(1))
        _where_(self.last_full, compute, self.step)
        self.has_cache.copy_(self.has_cache | compute)
        self.step.add_(1)

    def cache_bytes(self) -> int:
        seen, total = set(), 0
        tensors = self.fc.buffers() + getattr(self.fc, "constants", list)() + self.gate.tensors() + [self.step, self.last_full, self.last_t, self.has_cache,
                                                             self.log, self.events]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total
