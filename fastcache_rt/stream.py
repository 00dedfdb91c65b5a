"""One stream of steps (one CFG branch at one shape, of one transformer): the step counters, the gate's state and
the forecaster's buffers. Every buffer is allocated once per stream; a step only writes into them.

Steps are counted twice, in step: on the host (``index``, eager mode: schedule gates decide from it with no device
op) and on the device (``step``: the forecasters' distances and times, and every decision under torch.compile,
where a host counter would be a recompilation per step)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .policy.caps import CappedState, with_caps
from .policy.spec import StreamSpec, masked_write_


@dataclass
class Step:
    """What a gate sees of one step."""

    index: int | None  # the host step index (None under torch.compile)
    tensor: torch.Tensor  # the device step index, int64 0-dim
    probe: torch.Tensor | None = None  # what the gate's decision reads
    replicated: bool = False  # the "modulated" probe is whole and identical on every context-parallel rank
    probes: dict = field(default_factory=dict)  # every probe the gate reads, by name ("modulated", "first_blocks")


class StreamState:
    def __init__(self, policy, spec: StreamSpec, tokens: tuple[int, ...] | None = None):
        """``spec``: the cached site tensor's stream (``StreamSpec``); ``tokens``: the shape of the image tokens the
        gate measures (the site's shape where not given). Under context parallelism (``spec.shard``) both are this
        rank's share; the "output" site caches the model's output, which diffusers gathers whole on every rank, so
        its forecaster gets no shard."""
        num_steps, device = spec.num_steps, spec.device
        self.num_steps = num_steps
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.last_full = torch.zeros((), dtype=torch.int64, device=device)
        self.has_cache = torch.zeros((), dtype=torch.bool, device=device)  # compiled mode: a step was computed
        self.log = torch.zeros(num_steps + 1, dtype=torch.bool, device=device)  # compiled mode's record (+ overflow)
        self.events = torch.zeros(1, dtype=torch.int64, device=device)  # computed steps with a non-finite value
        # a generation announced and not ended (the compiled decision computes outside one: a pipeline sharing the
        # transformer without caching calls it); set on the host between calls
        self.live = torch.ones((), dtype=torch.bool, device=device)
        self.spec = spec
        # the gate's own state; ``gate``: the same behind the policy's caps where any is set (every decision handed
        # to the controller is capped, and the gate sees the capped outcome; a mask of another length: ValueError)
        self.gate_state = policy.gate.make_state(spec.replace(shape=tuple(tokens or spec.shape)))
        self.gate = with_caps(self.gate_state, getattr(policy, "caps", None), num_steps, device)
        self.capped = self.gate if isinstance(self.gate, CappedState) else None
        self.shape = tuple(spec.shape)
        self.fc = policy.forecaster.make_state(spec if policy.site != "output" else spec.replace(shard=None))
        # a gate following the forecaster's measured error (ErrorControl): the forecaster measures it on every
        # computed step, summed over a context-parallel group where the site is split (the output is whole)
        self.error_shard = spec.shard if policy.site != "output" else None
        if callable(getattr(self.gate_state, "measured", None)):
            if not callable(getattr(self.fc, "track_error", None)):
                raise ValueError(f"{type(policy.gate).__name__} follows the forecaster's measured error: "
                                 f"{type(policy.forecaster).__name__}'s state has no track_error()")
            self.fc.track_error()
            self.gate_state.bind(policy.forecaster.error_order())
        # eager mode advances the device counters only where a gate or the forecaster reads them
        self.uses_step = bool(self.fc.uses_step or self.gate_state.uses_step)
        self.index = 0  # host step index (eager)
        self.host_log: list[bool | None] = []  # eager mode's record of decisions
        self.compiled = False  # any step of this generation ran under torch.compile
        self.last_use = 0
        # the text tokens' residual over each segment of the cached span, where blocks run after it
        # (``Policy.compute_last``), by (list, first block): allocated by the controller at the first call that needs
        # it (a generation's first step overwrites it)
        self.text: dict = {}

    def reset(self) -> None:
        """A new generation (host side; the buffers stay allocated)."""
        self.step.zero_()
        self.last_full.zero_()
        self.has_cache.zero_()
        self.log.zero_()
        self.events.zero_()
        self.gate.reset()
        self.fc.reset()
        self.index = 0
        self.host_log = []
        self.compiled = False

    def start_at(self, index: int) -> None:
        """The stream's first call comes at step ``index`` of its generation (the second expert of a two-transformer
        pipeline such as Wan 2.2 A14B): count from there, so that the step schedule is the generation's."""
        self.index = index
        self.host_log = [None] * index  # steps of the generation before this stream's first call
        self.step.fill_(index)
        self.gate.start_at(index)

    def end_step(self, compute, value: torch.Tensor | None) -> None:
        """After the branch: the forecaster records a computed value (``value`` is None on a step skipped in eager
        mode); the counters advance. A computed value that is not finite (the model produced NaN/Inf) is counted
        in ``events`` and kept out of the forecaster's history: later cached steps forecast from the last finite
        computed step (the test is on the device: no host read)."""
        if compute is not False:
            finite = torch.isfinite(value).all()
            keep = finite if compute is True else compute & finite
            self.events.add_((~keep if compute is True else compute & ~finite).long())
            self.fc.record(self, value, keep)
            if getattr(self.fc, "error", None) is not None:
                sums = self.fc.error if self.error_shard is None else self.error_shard.sum(self.fc.error)
                self.gate_state.measured(self, sums, compute, keep)
            if compute is not True or self.uses_step:
                masked_write_(self.last_full, self.step, keep)
        if isinstance(compute, torch.Tensor):
            self.has_cache.copy_(self.has_cache | compute)
            self.log.index_copy_(0, self.step.clamp(max=self.num_steps).view(1), compute.view(1))
            self.compiled = True
        if not isinstance(compute, torch.Tensor):
            self.host_log.append(bool(compute))
            self.index += 1
            if not self.uses_step:
                return
        self.step.add_(1)

    @property
    def host_has_cache(self) -> bool:
        return any(c is True for c in self.host_log)

    @property
    def ran(self) -> bool:
        """A step of the current (or just finished) generation ran on this stream."""
        return bool(self.host_log) or self.compiled

    def decisions(self) -> list[bool | None]:
        """The decisions of this generation so far, None for steps before the stream's first call (one read of
        the device log under torch.compile)."""
        if self.compiled:
            n = min(int(self.step), self.num_steps)
            return [bool(v) for v in self.log[:n].tolist()]
        return list(self.host_log)

    def cache_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.fc.tensors() + self.gate.tensors() + [self.step, self.last_full, self.has_cache, self.log,
                                                            self.events, self.live, *self.text.values()]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total



def stream_stats(key: tuple, st: StreamState) -> dict:
    """What ``stats()`` reports of one stream's generation: its branch and shape, computed and cached steps, the
    computed steps with a non-finite result, the steps the policy's caps made compute where the gate would have
    cached (``forced``, where any cap is set), and a calibration gate's measurements."""
    log = st.decisions()
    row = {"branch": key[0][1], "shape": list(key[1]), "computed": [i for i, c in enumerate(log) if c is True],
           "cached": [i for i, c in enumerate(log) if c is False], "nonfinite": int(st.events[0])}
    if st.capped is not None:
        row["forced"] = st.capped.forced_steps(st.compiled, len(log))
    if hasattr(st.gate_state, "report"):  # what an error-controlled gate measured and chose
        row.update(st.gate_state.report(log))
    if hasattr(st.gate_state, "measurements"):  # a calibration run: every signal at every step of the generation
        row["calibration"] = st.gate_state.measurements(len(log))
        if "mag" in row["calibration"]:
            row["mag_ratios"] = row["calibration"]["mag"][sum(c is None for c in log):]  # its own steps
    return row
