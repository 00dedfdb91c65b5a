"""Caps: limits on caching that hold whatever the gate and the forecaster (what cache-dit users set on any cache).

    Caps(max_cached_steps=20, max_consecutive=3, mask="fast", refresh=8, warmup=4)

- ``max_cached_steps``: at most this many cached steps per generation (per stream: each CFG branch, each shape);
  once reached, every further step computes.
- ``max_consecutive``: at most this many cached steps in a row; the step after such a run computes.
- ``mask``: an explicit computation mask over the generation's steps, 1 = must compute, 0 = the gate decides (a
  sequence of bools or 0/1 ints, a string of 0s and 1s, or a preset name resolved for the run's step count:
  ``MASK_PRESETS``, ``steps_mask``). A mask of another length than the generation's step count is a ValueError
  naming both lengths when the generation is announced (on the host, before any call, compiled or not); a preset
  fits any step count.
- ``refresh``: every ``refresh``-th step computes, counted from step 0 (steps 0, k, 2k, ...).
- ``warmup``: the first ``warmup`` steps compute (cache-dit's ``max_warmup_steps``).

Caps only add computed steps: a step any cap forces is ORed into the gate's decision, at the one place that
decision is made (``CappedState.decide``), so the forecaster's record, the gate's own update (``after``,
``measured``), the decision log and ``stats()`` all see the capped decision. A cap that never binds changes
nothing. A gate that counts from its last computed step is told of a step the caps computed: the signal gates'
accumulator and SpectralCache's run of cached steps start again from it (``SignalState.forced``), as after a step
the gate computed itself; a schedule gate's mask is fixed before the run. In eager mode the caps decide on the host from host counters (a schedule gate's step still reads nothing
back); under torch.compile on the device, from counters allocated with the stream (no host read, no guard)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validate import check, is_int

# name -> (warm-up fraction, computed fraction), for a run of S steps: step 0 and the last step compute; the first
# max(1, round(warm * S)) steps compute (warm-up: the early steps shape the image); in all round(2 + computed *
# (S - 2)) steps compute, the ones after the warm-up spread over the rest with gaps growing towards the end (late
# denoising steps change least). A mask only forces computes (its 0s leave the step to the gate), so a preset is a
# floor on the computed steps: "slow" forces the most, "ultra" the fewest. At 28 steps the counts (19, 15, 11, 8)
# are about those of cache-dit's presets of the same names (18, 15, 11, 8); one rule serves every step count, and
# few-step runs (8, 16: distilled models) keep a larger share computed through the "2 +" (first and last step).
MASK_PRESETS: dict[str, tuple[float, float]] = {
    "slow": (0.30, 0.65),
    "medium": (0.25, 0.50),
    "fast": (0.20, 0.35),
    "ultra": (0.15, 0.25),
}

CAP_FIELDS = ("max_cached_steps", "max_consecutive", "mask", "refresh", "warmup")


def steps_mask(num_steps: int, preset: str) -> tuple[bool, ...]:
    """The computation mask of preset ``preset`` (``MASK_PRESETS``) for a run of ``num_steps`` steps (True: the
    step must compute). The presets at 8, 16, 28 and 50 steps (1: computes, 0: the gate decides; computed steps)::

         8 slow   11110101 (6)
         8 medium 11101001 (5)
         8 fast   11010001 (4)
         8 ultra  11001001 (4)

        16 slow   1111111010101001 (11)
        16 medium 1111101001001001 (9)
        16 fast   1110100100100001 (7)
        16 ultra  1101001000100001 (6)

        28 slow   1111111111101101010100101001 (19)
        28 medium 1111111101010010100010010001 (15)
        28 fast   1111110100010001000001000001 (11)
        28 ultra  1111001000001000001000000001 (8)

        50 slow   11111111111111111101101101010101010010100101001001 (33)
        50 medium 11111111111110101010101001001001001000100100010001 (26)
        50 fast   11111111110100100010001000100001000010000010000001 (19)
        50 ultra  11111111000100001000001000000010000000010000000001 (14)

    A run of 1 or 2 steps computes every step."""
    if not is_int(num_steps) or num_steps < 1:
        raise ValueError(f"steps_mask: num_steps must be an int >= 1, got {num_steps!r}")
    key = preset.strip().lower() if isinstance(preset, str) else None
    if key not in MASK_PRESETS:
        raise ValueError(f"steps_mask: unknown preset {preset!r}; one of {', '.join(MASK_PRESETS)}")
    warm_frac, frac = MASK_PRESETS[key]
    S = num_steps
    warm = min(S, max(1, round(warm_frac * S)))
    total = min(S, max(warm + 1, round(2 + frac * (S - 2))))
    out = [i < warm for i in range(S)]
    out[-1] = True
    m = total - sum(out)  # computed steps between the warm-up and the last step
    if m > 0:
        # gaps between the warm-up's last step and the last step grow linearly: the j-th is (m + 1) / 2 + j
        span = S - warm
        weights = [(m + 1) / 2 + j for j in range(m + 1)]
        whole, acc = sum(weights), 0.0
        for j in range(m):
            acc += weights[j]
            p = min(max(warm - 1 + round(span * acc / whole), warm), S - 2)
            while out[p] and p < S - 2:
                p += 1
            out[p] = True
        while sum(out) < total:  # a rounding collision: the middle of the widest gap
            ones = [i for i, v in enumerate(out) if v]
            a, b = max(zip(ones, ones[1:]), key=lambda ab: ab[1] - ab[0])
            out[(a + b) // 2] = True
    return tuple(out)


def _mask_value(mask):
    """The mask as stored: None, a preset name, or a tuple of bools; ``_BAD`` where it is none of these."""
    if mask is None:
        return None
    if isinstance(mask, str):
        s = mask.strip().lower()
        if s in MASK_PRESETS:
            return s
        if s and set(s) <= {"0", "1"}:
            return tuple(c == "1" for c in s)
        return _BAD
    if isinstance(mask, (list, tuple)) and mask:
        if all(isinstance(v, bool) or (is_int(v) and v in (0, 1)) for v in mask):
            return tuple(bool(v) for v in mask)
    return _BAD


_BAD = object()


@dataclass(frozen=True)
class Caps:
    """Limits on caching that hold under every gate x forecaster (see the module's docstring). Every field None
    (the default): no caps."""

    max_cached_steps: int | None = None
    max_consecutive: int | None = None
    mask: tuple[bool, ...] | str | None = None
    refresh: int | None = None
    warmup: int | None = None

    def __post_init__(self):
        check(self, "max_cached_steps", self.max_cached_steps is None or
              (is_int(self.max_cached_steps) and self.max_cached_steps >= 0),
              "None or an int >= 0 (cached steps per generation)")
        check(self, "max_consecutive", self.max_consecutive is None or
              (is_int(self.max_consecutive) and self.max_consecutive >= 0),
              "None or an int >= 0 (cached steps in a row)")
        check(self, "refresh", self.refresh is None or (is_int(self.refresh) and self.refresh >= 1),
              "None or an int >= 1 (every refresh-th step computes, from step 0)")
        check(self, "warmup", self.warmup is None or (is_int(self.warmup) and self.warmup >= 0),
              "None or an int >= 0 (the first steps that compute)")
        mask = _mask_value(self.mask)
        check(self, "mask", mask is not _BAD,
              f"None, a preset name ({', '.join(MASK_PRESETS)}), a string of 0s and 1s, or a non-empty sequence of "
              f"bools / 0 / 1 (1: the step must compute)")
        object.__setattr__(self, "mask", mask)

    @property
    def active(self) -> bool:
        """Any cap is set."""
        return any(getattr(self, f) is not None for f in CAP_FIELDS)

    def schedule(self, num_steps: int) -> list[bool]:
        """The steps the caps force before the run (mask, refresh and warm-up) of a generation of ``num_steps`` steps;
        ValueError naming both lengths when the mask has another length."""
        out = [False] * num_steps
        mask = self.mask
        if isinstance(mask, str):
            mask = steps_mask(num_steps, mask)
        if mask is not None:
            if len(mask) != num_steps:
                raise ValueError(f"Caps.mask: has {len(mask)} entries, the generation has {num_steps} steps; give a "
                                 f"mask of {num_steps} entries or a preset name ({', '.join(MASK_PRESETS)}), which "
                                 f"fits any step count")
            out = list(mask)
        if self.refresh is not None:
            out = [o or s % self.refresh == 0 for s, o in enumerate(out)]
        if self.warmup is not None:
            out = [o or s < self.warmup for s, o in enumerate(out)]
        return out

    def to_dict(self) -> dict:
        """The caps that are set, as plain JSON data (a mask as a list of 0/1 or its preset name)."""
        out = {}
        for f in CAP_FIELDS:
            v = getattr(self, f)
            if v is not None:
                out[f] = [int(b) for b in v] if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data, source: str = "caps") -> Caps:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: caps must be an object {{field: value}} with fields "
                             f"{', '.join(CAP_FIELDS)}, got {data!r}")
        unknown = sorted(set(data) - set(CAP_FIELDS))
        if unknown:
            raise ValueError(f"{source}: caps has no field {', '.join(unknown)} (fields: {', '.join(CAP_FIELDS)})")
        return cls(**data)

    def __repr__(self) -> str:
        def show(v):
            return "'" + "".join("1" if b else "0" for b in v) + "'" if isinstance(v, tuple) else repr(v)

        return "Caps(" + ", ".join(f"{f}={show(getattr(self, f))}" for f in CAP_FIELDS
                                   if getattr(self, f) is not None) + ")"


class CappedState:
    """A gate's state with the caps applied to its decisions (what ``StreamState`` holds as its gate when any cap
    is set): ``decide`` ORs the forced steps into the gate's decision; ``after`` passes the real (capped) outcome on
    to the gate and counts it. Eager mode (a host step index) decides and counts on the host; torch.compile (no host
    index) on the device, in buffers made here (under torch.compile a stream is made inside the first traced call).

    The gate's optional hooks that ``StreamState`` calls (``measured``, ``bind``, ``report``, ``measurements``) are
    called on the gate's own state (``inner``, ``StreamState.gate_state``), with the capped outcome; only the
    controller's ``output`` hook is forwarded (``_CappedOutput``). Every attribute is set here, as plain values
    and tensors: under torch.compile this object is made inside the trace, which can rebuild no bound method."""

    def __init__(self, inner, caps: Caps, num_steps: int, device):
        self.inner, self.caps, self.num_steps = inner, caps, num_steps
        self.static = caps.schedule(num_steps)  # mask | refresh | warm-up (ValueError on a mask of another length)
        self.max_run, self.max_total = caps.max_consecutive, caps.max_cached_steps
        self.probe = getattr(inner, "probe", None)
        self.uses_step = bool(getattr(inner, "uses_step", False))
        # the device side (compiled): the static schedule (+ a never-forcing overflow row), the cached steps in a
        # row and in all, a step computed, and the steps the caps forced (+ overflow)
        self.static_dev = torch.tensor(self.static + [False], dtype=torch.bool, device=device)
        self.run_t = torch.zeros((), dtype=torch.int64, device=device)
        self.total_t = torch.zeros((), dtype=torch.int64, device=device)
        self.seen_t = torch.zeros((), dtype=torch.bool, device=device)
        self.forced_t = torch.zeros(num_steps + 1, dtype=torch.bool, device=device)
        self.overrode_t = torch.zeros((), dtype=torch.bool, device=device)
        # a gate that keeps its own count of the steps since it computed (the signal gates' fused state) is told
        # of a step the caps computed (``forced``), so it counts from there
        self.tells = callable(getattr(inner, "forced", None))  # a flag: a bound method is not kept (see above)
        self._host_reset()

    def _host_reset(self) -> None:
        self.run = self.total = 0
        self.seen = False
        self.overrode = False
        self.forced: list[int] = []

    def decide(self, step):
        c = self.inner.decide(step)
        if step.index is not None:  # eager: the caps on the host
            i = step.index
            if i >= self.num_steps:  # past the announced steps: the controller computes them
                return True
            gate = c if isinstance(c, bool) else bool(c)  # a signal gate's one host read (the controller's)
            force = self.static[i] or (self.max_run is not None and self.run >= self.max_run) or \
                (self.max_total is not None and self.total >= self.max_total)
            self.overrode = force and not gate  # the caps computed a step the gate had cached
            if self.overrode and self.seen:
                self.forced.append(i)
            return gate or force
        if isinstance(c, bool):
            c = torch.full((), c, dtype=torch.bool, device=self.run_t.device)  # a constant of the graph
        idx = step.tensor.clamp(max=self.num_steps).view(1)
        force = self.static_dev.gather(0, idx).reshape(())
        if self.max_run is not None:
            force = force | (self.run_t >= self.max_run)
        if self.max_total is not None:
            force = force | (self.total_t >= self.max_total)
        self.overrode_t.copy_(force & ~c)
        self.forced_t.index_copy_(0, idx, (self.overrode_t & self.seen_t).view(1))
        return c | force

    def after(self, step, compute, residual) -> None:
        self.inner.after(step, compute, residual)
        if self.tells:
            if isinstance(compute, torch.Tensor):
                self.inner.forced(self.overrode_t & compute)
            elif self.overrode:
                self.inner.forced(True)
        if isinstance(compute, torch.Tensor):
            self.run_t.copy_(torch.where(compute, torch.zeros_like(self.run_t), self.run_t + 1))
            self.total_t.add_((~compute).long())
            self.seen_t.copy_(self.seen_t | compute)
        elif compute:
            self.run, self.seen = 0, True
        else:
            self.run += 1
            self.total += 1

    def reset(self) -> None:
        self.inner.reset()
        self._host_reset()
        self.run_t.zero_()
        self.total_t.zero_()
        self.seen_t.zero_()
        self.forced_t.zero_()
        self.overrode_t.zero_()

    def start_at(self, index: int) -> None:
        """A stream first called at step ``index`` (a second expert): the mask and refresh count the generation's
        steps; the cached-step counters count this stream's."""
        self.inner.start_at(index)

    def forced_steps(self, compiled: bool, n: int) -> list[int]:
        """The steps (of the first ``n``) the caps made compute where the gate would have cached (one read of the
        device record under torch.compile)."""
        if compiled:
            return [i for i, v in enumerate(self.forced_t[:n].tolist()) if v]
        return [i for i in self.forced if i < n]

    def tensors(self):
        return list(self.inner.tensors()) + [self.static_dev, self.run_t, self.total_t, self.seen_t, self.forced_t]


class _CappedOutput(CappedState):
    """A capped gate state whose gate measures the model's output (``output(step, out)``)."""

    def output(self, step, out) -> None:
        self.inner.output(step, out)


def with_caps(state, caps: Caps | None, num_steps: int, device):
    """``state`` (a gate's) with ``caps`` applied, or ``state`` itself where no cap is set."""
    if caps is None or not caps.active:
        return state
    cls = _CappedOutput if callable(getattr(state, "output", None)) else CappedState
    return cls(state, caps, num_steps, device)


__all__ = ["CAP_FIELDS", "MASK_PRESETS", "Caps", "CappedState", "steps_mask", "with_caps"]
