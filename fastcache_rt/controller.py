"""One cached denoising step, read top to bottom. The controller knows policies and nothing of models (the adapter
does the model); the ops know tensors and nothing of either."""

from __future__ import annotations

import inspect
import logging
import time

import torch

from .adapters import Adapter
from .policy import Policy
from .ops import layout as L
from .state import MagCacheGateState, SignalGateState, StreamState

logger = logging.getLogger("fastcache_rt")

# Streams of one transformer at once: a CFG pair (or triple) at a few shapes.
MAX_STREAMS = 8


class Controller:
    def __init__(self, model, adapter: Adapter, policy: Policy, num_steps: int | None = None,
                 grid: tuple[int, int] | None = None):
        self.model = model
        self.adapter = adapter
        self.policy = policy
        self.num_steps = num_steps
        self.grid = grid
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]  # without self
        self.arg_names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.accepts = {p.name for p in params}
        self.streams: dict[tuple, StreamState] = {}
        self.probe_blocks = getattr(policy.gate, "blocks", 0) if getattr(policy.gate, "probe", None) == "first_blocks" \
            else 0
        self.controller_seconds = 0.0
        self.calls = 0
        self._warned: set[str] = set()
        # Under torch.compile a CFG branch is told apart by its position among the calls of one step: calls since the
        # scheduler's last step() (a host int, so each branch traces its own graph once and selects its own state).
        # Only when a pipeline's scheduler announces the steps; a bare transformer keeps one stream per shape there.
        self.track_branches = False
        self.calls_this_step = 0

    # ----------------------------------------------------------------------------------------------------------
    # generations
    # ----------------------------------------------------------------------------------------------------------
    def new_generation(self, num_steps: int | None = None) -> None:
        """Announced by the pipeline (its scheduler's set_timesteps) or by the user: reset every stream."""
        if num_steps is not None:
            if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
                raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
        self.report_events()
        if num_steps is not None and num_steps != self.num_steps:
            self.num_steps = num_steps
            self.streams.clear()  # buffers sized by the step count are allocated anew
        # Eager streams are keyed by their text-embedding tensor, which a pipeline makes anew for every call: drop
        # them. Streams of compiled callers (keyed by shape and call position) are kept and reset: nothing recompiles.
        for key in [k for k in self.streams if k[-1][0] == "eager"]:
            del self.streams[key]
        self.calls_this_step = 0
        for st in self.streams.values():
            st.begin_step(torch.full((), float("inf"), device=st.step.device))  # a jump up: reset on the device
            st.last_t.fill_(float("inf"))
        self.controller_seconds = 0.0
        self.calls = 0

    def report_events(self) -> None:
        """One-time warnings for non-finite probes / forecasts seen by the device (read at generation boundaries,
        never inside a step)."""
        for st in self.streams.values():
            bad_fc, bad_probe = (int(v) for v in st.events.tolist())
            if bad_fc and "forecast" not in self._warned:
                self._warned.add("forecast")
                logger.warning("fastcache_rt: %d non-finite forecast(s) replaced by full steps", bad_fc)
            if bad_probe and "probe" not in self._warned:
                self._warned.add("probe")
                logger.warning("fastcache_rt: %d step(s) with a non-finite probe were computed in full", bad_probe)

    def step_done(self) -> None:
        """The pipeline's scheduler finished a step: the next transformer call is the first branch of the next."""
        self.calls_this_step = 0

    def _stream(self, inp) -> StreamState:
        h = inp.hidden
        if not torch.compiler.is_compiling() and "branch_key" in inp.extra:
            branch = ("eager", inp.extra["branch_key"])
        else:
            position = 0
            if self.track_branches:
                position = self.calls_this_step
                self.calls_this_step = position + 1
            branch = ("position", position)
        key = (tuple(h.shape), h.dtype, h.device, branch)
        st = self.streams.get(key)
        if st is None:
            if self.num_steps is None:
                raise ValueError(
                    "num_steps: the number of denoising steps is unknown; enable caching on the pipeline, or pass "
                    "num_steps= to fastcache_rt.enable() / handle.new_generation()"
                )
            if len(self.streams) >= MAX_STREAMS:  # unannounced generations: keep memory bounded (LRU)
                del self.streams[min(self.streams, key=lambda k: self.streams[k].last_use)]
            grid = self.grid or self.adapter.token_grid(self.model, inp)
            shape, dtype = (tuple(h.shape), h.dtype) if self.policy.site != "output" else \
                self.adapter.output_like(self.model, inp)
            st = StreamState(self.policy, self.num_steps, tuple(shape), dtype, h.device, grid)
            self.streams[key] = st
        if not torch.compiler.is_compiling():
            st.last_use = self.calls
        return st

    # ----------------------------------------------------------------------------------------------------------
    # one step
    # ----------------------------------------------------------------------------------------------------------
    def forward(self, model, *args, **kwargs):
        a = self._arguments(args, kwargs)
        compiling = torch.compiler.is_compiling()
        adapter = self.adapter

        # 1. the inputs of the blocks (model code, not counted as controller time)
        inp = adapter.embed(model, a)
        if not compiling and a.get("encoder_hidden_states") is not None:
            inp.extra["branch_key"] = a["encoder_hidden_states"].data_ptr()
        base, enc = inp.hidden, inp.encoder
        probe = None
        if self.probe_blocks:  # FBCache: the first blocks always run (model time); their residual is the probe
            base, enc = adapter.run_blocks(model, inp, base, enc, 0, self.probe_blocks)
        t0 = self._clock(compiling)
        if self.probe_blocks:
            probe = base - inp.hidden
        elif getattr(self.policy.gate, "probe", None) == "modulated":  # an extra norm1: controller time
            probe = adapter.probe(model, inp)
        st = self._stream(inp)
        t = inp.timestep.reshape(-1)[0].float()
        st.begin_step(t)

        # 2. the gate: a device bool, state updated on the device
        gate_compute = st.gate.decide(st.step, probe, st.has_cache)
        if probe is not None and isinstance(st.gate, SignalGateState):
            bad_probe = ~torch.isfinite(st.gate.state[L.S_REL_L1])
        else:
            bad_probe = torch.zeros((), dtype=torch.bool, device=base.device)

        # 3. the forecast for this step (used when skipping; a non-finite forecast forces a full step)
        pred = st.fc.predict(st)
        site = self.policy.site
        y_pred = base + pred if site == "residual" else pred  # the hidden tokens, or the output for site "output"
        pred_ok = torch.isfinite(y_pred).all()
        compute = gate_compute | ~st.has_cache | ~pred_ok
        st.events.add_(torch.stack([(st.has_cache & ~gate_compute & ~pred_ok), bad_probe]).to(torch.int64))

        # 4. the branch: y is the hidden tokens after the last block, or the model's output for site "output"
        start = self.probe_blocks
        if compiling:
            if enc is None:  # torch.cond takes tensors: make the text tokens before the branch
                enc = adapter.context(model, inp)

            def full_fn(b, e, yp):
                y = adapter.run_blocks(model, inp, b, e, start, None)[0]
                if site == "output":
                    y = adapter.head(model, inp, y)
                # a fresh tensor: both branches must return the same layout (block outputs may be offset views)
                return y.clone(memory_format=torch.contiguous_format)

            def skip_fn(b, e, yp):
                return yp.clone(memory_format=torch.contiguous_format)

            y = torch.cond(compute, full_fn, skip_fn, (base, enc, y_pred))
            t1 = 0.0
            value = y - base if site == "residual" else y
            snapshot = [b.clone() for b in st.fc.buffers()]
            st.fc.record(st, value)
            for buf, old in zip(st.fc.buffers(), snapshot):
                buf.copy_(torch.where(compute, buf, old))
        else:
            do_compute = bool(compute)  # the one host read of the step
            self.controller_seconds += time.perf_counter() - t0
            if do_compute:
                h, _ = adapter.run_blocks(model, inp, base, enc, start, None)
                y = adapter.head(model, inp, h) if site == "output" else h
                t1 = self._clock(compiling)
                st.fc.record(st, y - base if site == "residual" else y)
                if isinstance(st.gate, MagCacheGateState) and st.gate.calibrate:
                    st.gate.observe(st.step, h - base)
            else:
                t1 = self._clock(compiling)
                y = y_pred
        st.gate.commit(compute, gate_compute)
        st.end_step(compute)
        if not compiling:
            self.controller_seconds += time.perf_counter() - t1
            self.calls += 1

        # 5. the output head with this step's conditioning (already applied for site "output")
        return adapter.wrap(inp, y) if site == "output" else adapter.finish(model, inp, y)

    def _arguments(self, args, kwargs) -> dict:
        if len(args) > len(self.arg_names):
            raise TypeError(f"forward() takes {len(self.arg_names)} positional arguments, got {len(args)}")
        a = dict(self.defaults)
        a.update(zip(self.arg_names, args))
        for k, v in kwargs.items():
            if k not in self.accepts:
                raise TypeError(f"forward() got an unexpected keyword argument {k!r}")
            a[k] = v
        return a

    @staticmethod
    def _clock(compiling: bool) -> float:
        return 0.0 if compiling else time.perf_counter()

    # ----------------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        streams = list(self.streams.values())
        out = {
            "policy": self.policy.name,
            "policy_spec": repr(self.policy),
            "num_steps": self.num_steps,
            "streams": len(streams),
            "cache_bytes": sum(s.cache_bytes() for s in streams),
            "controller_seconds": self.controller_seconds,
            "calls": self.calls,
        }
        if streams:
            st = streams[0]
            n = min(int(st.step), st.num_steps)
            log = st.log[:n].tolist()
            out["computed"] = [i for i, c in enumerate(log) if c]
            out["cached"] = [i for i, c in enumerate(log) if not c]
            out["per_stream_computed"] = [[i for i, c in enumerate(s.log[: min(int(s.step), s.num_steps)].tolist())
                                           if c] for s in streams]
            bad_fc, bad_probe = (int(v) for v in st.events.tolist())
            out["nonfinite_forecasts"], out["nonfinite_probes"] = bad_fc, bad_probe
            if isinstance(st.gate, MagCacheGateState) and st.gate.calibrate:
                out["mag_ratios"] = [float(v) for v in st.gate.measured[:n].tolist()]
        else:
            out.update(computed=[], cached=[], per_stream_computed=[])
        steps = max(self.calls, 1)
        out["controller_seconds_per_call"] = self.controller_seconds / steps
        return out
