"""The streams of one transformer across generations, and what ``stats()`` reports of them: which streams exist
(one per CFG branch and shape, least recently used dropped past ``MAX_STREAMS``), the step count they were made
for, the start and end of a generation (warnings for what the device saw are read then, never inside a step), and
the last finished generation's report. The controller asks this for a stream at each call and runs the step."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .stream import StreamState, stream_stats

logger = logging.getLogger("fastcache_rt")

# Streams of one transformer at once: a CFG pair (or triple) at a few shapes.
MAX_STREAMS = 8


class Generations:
    def __init__(self, num_steps: int | None):
        self.num_steps = num_steps
        self.offset = 0  # the generation's first step in the scheduler's whole schedule (img2img)
        self.streams: dict[tuple, StreamState] = {}
        self.controller_seconds = 0.0  # host time in the controller this generation
        self.calls = 0  # model calls this generation
        self._last: list[dict] = []  # the per-stream report of the last finished generation
        self._last_time = (0.0, 0)  # its controller seconds and calls

    def stream(self, key: tuple, make: Callable[[int, int], StreamState]) -> StreamState:
        """The stream of ``key``, made by ``make(num_steps, offset)`` the first time."""
        st = self.streams.get(key)
        if st is None:
            if self.num_steps is None:
                raise ValueError(
                    "num_steps: the number of denoising steps is unknown; enable caching on the pipeline, or pass "
                    "num_steps= to fastcache_rt.enable() / handle.new_generation()"
                )
            if len(self.streams) >= MAX_STREAMS:  # keep memory bounded (least recently used goes)
                del self.streams[min(self.streams, key=lambda k: self.streams[k].last_use)]
            st = self.streams[key] = make(self.num_steps, self.offset)
        return st

    def running(self) -> bool:
        """A step of the current generation has run and the generation has not ended."""
        return any(st.ran for st in self.streams.values())

    def clear(self) -> None:
        """Drop every stream (their buffers were made for another step count or token split)."""
        self.streams.clear()

    def new(self, num_steps: int | None = None, offset: int = 0) -> None:
        """A generation starts (``num_steps`` None: as many steps as the last one), at step ``offset`` of the
        scheduler's schedule (img2img)."""
        if num_steps is not None:
            if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
                raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
        self.report_events()
        if (num_steps is not None and num_steps != self.num_steps) or offset != self.offset:
            self.num_steps = num_steps if num_steps is not None else self.num_steps
            self.offset = offset
            self.streams.clear()  # buffers sized by the step count (masks by the offset) are made anew
        for st in self.streams.values():
            st.reset()
        self.controller_seconds = 0.0
        self.calls = 0

    def end(self) -> bool:
        """A generation ended: keep its report, warn about what it saw. False when no step ran in it."""
        if not any(st.ran for st in self.streams.values()):
            return False
        self._last = self._per_stream()
        self._last_time = (self.controller_seconds, self.calls)
        self.new(None)
        return True

    def report_events(self) -> None:
        """Warnings for what the device saw (read at the end of a generation, never inside a step)."""
        for st in self.streams.values():
            if st.ran:
                bad = int(st.events[0])
                if bad:
                    logger.warning("fastcache_rt: %d computed step(s) of this generation had a non-finite result "
                                   "(the model produced NaN/Inf; caching did not cause it); they were kept out of the "
                                   "forecast history, so cached steps forecast from the finite ones", bad)
                    st.events.zero_()

    def _per_stream(self) -> list[dict]:
        return [stream_stats(key, st) for key, st in self.streams.items() if st.ran]

    def stats(self) -> dict:
        """The current generation's report, or the last finished one's when nothing ran since."""
        streams = list(self.streams.values())
        out = {"num_steps": self.num_steps, "cache_bytes": sum(s.cache_bytes() for s in streams),
               "controller_seconds": self.controller_seconds, "calls": self.calls}
        live = any(s.ran for s in streams)
        per = self._per_stream() if live or not self._last else self._last
        if not live and self._last:
            out["controller_seconds"], out["calls"] = self._last_time
        out["streams"] = len(per)
        out["per_stream"] = per
        out["per_stream_computed"] = [p["computed"] for p in per]
        first = per[0] if per else {"computed": [], "cached": []}
        out["computed"], out["cached"] = first["computed"], first["cached"]
        out["nonfinite"] = sum(p["nonfinite"] for p in per)
        ratios = [p["mag_ratios"] for p in per if "mag_ratios" in p]
        if ratios:
            out["mag_ratios"] = ratios[0]
        out["controller_seconds_per_call"] = out["controller_seconds"] / max(out["calls"], 1)
        return out
