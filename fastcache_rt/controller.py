"""One cached denoising step, read top to bottom. The controller knows policies and nothing of models (the family
declaration does the model); the ops know tensors and nothing of either.

A model call goes: ``begin_call`` (the transformer's hook: which branch) -> ``segment`` for each block list (or
each block of a list the model runs block by block): the first one picks the stream; the blocks before the cached
span run (``compute_first``, FBCache's probe blocks), then the probe and the decision; every segment runs its blocks
of the span or hands its inputs on through ``branch`` (the one point where eager and compiled differ: a host ``if``
or ``torch.cond``); the span's end records the value its forecaster keeps, and the blocks after it run
(``compute_last``) -> ``end_call``.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import typing
import torch

from .families import Family, bind, signature, trace_outside_cond
from .generation import Generations
from .module_hooks import HeldHooks
from .parallel import Shard
from .policy import Policy
from .policy.gates import probes as gate_probes
from .policy.spec import StreamSpec, masked
from .stream import Step, StreamState

logger = logging.getLogger("fastcache_rt")

# keyword marking a block call made by the list takeover itself
RUN = "_fastcache_rt_run"


class Setup(typing.NamedTuple):
    """What a pipeline's generations run with: its policy, the family's TeaCache polynomial its gate takes, and the
    token grid it was given (pipelines sharing a transformer each bring theirs)."""

    policy: Policy
    coeffs: tuple | None = None
    grid: tuple | None = None


class Call:
    """What one model call carries from its first block to its end."""

    __slots__ = ("base", "branch", "compute", "grid", "kwargs", "off", "st", "step")

    def __init__(self, branch, kwargs, off):
        self.branch, self.kwargs, self.off = branch, kwargs, off
        self.st: StreamState | None = None
        self.step: Step | None = None
        self.compute = True
        self.base = None
        self.grid = False  # the call's token grid once resolved (None: unknown)


def branch(compute, full, skip, operands: tuple):
    """The branch of a step: ``compute`` is a host bool (eager) or a device bool (torch.compile: ``torch.cond``,
    whose two sides return fresh dense tensors of one layout)."""
    if isinstance(compute, bool):
        return full(*operands) if compute else skip(*operands)

    def dense(fn):
        def run(*ops):
            return tuple(t.clone(memory_format=torch.contiguous_format) for t in fn(*ops))
        return run

    return torch.cond(compute, dense(full), dense(skip), operands)


def cached_span(sizes: list[int], policy: Policy) -> tuple[int, int]:
    """The blocks a skipped step skips, [first, end) counted over the block lists of ``sizes`` in execution order:
    the policy's blocks run before and after it on every step (``Policy.blocks``); ValueError where it leaves none."""
    before, after = policy.blocks()
    total = sum(sizes)
    if before + after >= total:
        raise ValueError(f"blocks: {before} block(s) before the cached span (compute_first, or the gate's probe "
                         f"blocks) and {after} after it (compute_last) leave none of the model's "
                         f"{' + '.join(map(str, sizes))} blocks to skip")
    return before, total - after


class Controller:
    """The cached steps of one transformer. What belongs to the pipeline (its scheduler announcing generations and
    steps) is told by the API through ``new_generation`` / ``step_done`` / ``follow_steps`` and the host callbacks
    in ``before_call``; what belongs to a parallel layout by the hooks through ``set_group``."""

    def __init__(self, model, family: Family, policy: Policy, *, num_steps: int | None = None,
                 grid: tuple[int, ...] | None = None, coeffs=None, group=None):
        self.model = model
        self.family = family
        self.policy = policy
        self.gens = Generations(num_steps)  # the streams, their generations and their report
        self.grid = grid
        self.coeffs = coeffs
        self.group = group  # the context-parallel process group given to enable (else diffusers' own)
        self.shard: Shard | None = None  # this rank's place in it, when the tokens are split over ranks
        self.lists = [list(getattr(model, b.attr)) for b in family.lists]
        self.offsets = [sum(len(b) for b in self.lists[:i]) for i in range(len(self.lists))]
        norm1 = getattr(self.lists[0][0], "norm1", None)
        for m in [model, *(b for blocks in self.lists for b in blocks), *([norm1] if norm1 is not None else [])]:
            signature(type(m))  # read here, not while torch.compile traces a call (it cannot trace inspect)
        self.set_policy(policy)
        self.owner = None  # who announced the current generation (a pipeline's watch), and what it last saw
        self.open = False  # a generation was announced and has not ended
        self.finished: dict = {}
        self.thread: threading.Thread | None = None  # the thread of the generation in progress
        self.call: Call | None = None
        self.hooks = HeldHooks()  # the blocks' forward hooks, fired once per real run of a block
        self.before_call: list = []  # host callbacks before each call, outside any compiled region (the API's)
        self.by_position = False  # CFG branches told apart by their position between announced steps
        self.calls_this_step = 0
        self.gen_steps = 0  # scheduler steps of this generation so far
        self._grids: dict = {}  # token grids read this generation, by latent shape (a read may cost a host sync)
        self._warned: set[str] = set()

    # ----------------------------------------------------------------------------------------------------------
    # generations
    # ----------------------------------------------------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        """The policy of the generations from now on (a pipeline sharing this transformer brings its own)."""
        self.policy = policy
        self.probes = gate_probes(policy.gate)
        self.span = cached_span([len(b) for b in self.lists], policy)
        self.tail = self.span[1] < self.offsets[-1] + len(self.lists[-1])  # blocks run after the span
        # streams are told apart by token grid where a part of the policy works on the grid (FreqCa's DCT)
        self.grid_keyed = any(getattr(part, "uses_grid", False) for part in (policy.gate, policy.forecaster))
        self.gens.clear()

    def _check_thread(self) -> None:
        """Cache state belongs to one generation at a time: a generation of this transformer started or called
        from another thread while one is in progress is refused (its steps would interleave)."""
        me = threading.current_thread()
        other = self.thread
        if other is not None and other is not me and other.is_alive() and self.gens.running():
            raise RuntimeError(
                f"fastcache_rt: {type(self.model).__name__} is generating in thread {other.name!r}; its cache state "
                f"belongs to that generation. Run generations that share a transformer one after another (or give "
                f"each thread its own pipeline and transformer)")
        self.thread = me

    def new_generation(self, num_steps: int | None = None, offset: int = 0, *, setup: Setup | None = None,
                       owner=None) -> None:
        """Announced by the pipeline (its scheduler's set_timesteps; ``offset``: set_begin_index, img2img; its
        ``setup`` where pipelines share this transformer), the cache context, or the user."""
        self._check_thread()
        if setup is not None and setup != (self.policy, self.coeffs, self.grid):
            self.coeffs, self.grid = setup.coeffs, setup.grid
            self.set_policy(setup.policy)
        if owner is not None:
            self.owner = owner
        caps = getattr(self.policy, "caps", None)
        steps = num_steps if num_steps is not None else self.gens.num_steps
        if caps is not None and caps.active and steps:  # on the host, before any (possibly compiled) call
            caps.schedule(steps)  # ValueError: a mask of another length than the generation's steps
        self.open = True
        self.gens.new(num_steps, offset)
        self._set_live(True)
        self.calls_this_step = 0
        self.gen_steps = 0
        self._grids.clear()

    def end_generation(self) -> None:
        """The pipeline finished a generation (diffusers resets stateful hooks at the end of every pipeline call):
        keep what ``stats`` reports of it, warn about what it saw, and start the next one clean."""
        self._check_thread()
        self.open = False
        ended = self.gens.end()
        if self.owner is not None:
            self._set_live(False)
        if ended:
            self.calls_this_step = 0
            self.gen_steps = 0
            self._grids.clear()
            self.finished[id(self.owner)] = self.stats()

    def set_group(self, group) -> None:
        """The context-parallel group the model's tokens are split over (None: not split). Streams made for
        another group are dropped (their buffers hold another share of the tokens)."""
        shard = Shard(group) if group is not None else None
        old = self.shard
        if (old is None) != (shard is None) or (old is not None and old.group is not shard.group):
            self.gens.clear()
        self.shard = shard

    def follow_steps(self) -> None:
        """A scheduler announces this model's steps (``step_done``): without a cache context, a call's branch is
        its position among the calls of its step."""
        self.by_position = True

    def step_done(self) -> None:
        """The pipeline's scheduler finished a step: the next transformer call is the first branch of the next."""
        self.calls_this_step = 0
        self.gen_steps += 1

    def _set_live(self, live: bool) -> None:
        for st in self.gens.streams.values():
            st.live.fill_(live)

    def steps_finished(self) -> None:
        """After a scheduler step: when it was the generation's last, the generation ends (its warnings, its
        stats, and another thread may start one)."""
        n = self.gens.num_steps
        if n is not None and self.gen_steps >= n and self.gens.running():
            self.end_generation()

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    # ----------------------------------------------------------------------------------------------------------
    # the transformer's hook
    # ----------------------------------------------------------------------------------------------------------
    def host_bookkeeping(self) -> None:
        """Run the host callbacks (the API's scheduler watch), outside any compiled region."""
        for fn in self.before_call:
            fn()

    def begin_call(self, kwargs: dict, context) -> None:
        fam = self.family
        if not torch.compiler.is_compiling():
            self._check_thread()
            if context is None:
                self.host_bookkeeping()
        off = any(kwargs.get(k) is not None for k in fam.uncached_kwargs)
        if self.owner is not None and not self.open and not torch.compiler.is_compiling():
            # pipelines drive this transformer, and none announced this call's generation: a pipeline sharing the
            # transformer without caching (disabled while another still caches it) calls it
            self._warn_once("unannounced", "fastcache_rt: %s called outside a generation a cached pipeline "
                            "announced (a pipeline sharing it without caching?): this call runs uncached",
                            type(self.model).__name__)
            off = True
        elif off:
            self._warn_once("off", "fastcache_rt: %s called with %s: this call runs uncached", type(self.model).__name__,
                            ", ".join(k for k in fam.uncached_kwargs if kwargs.get(k) is not None))
        if context is not None:
            name = ("context", context.name)
        elif self.by_position:  # no cache context: the call's position among the calls of this step
            name = ("position", self.calls_this_step)
            self.calls_this_step += 1
        else:  # a bare transformer: one stream per shape (CFG branches called separately need a cache context)
            name = ("default", 0)
        self.call = Call(name, kwargs, off)
        if off:
            self.hooks.release()
        else:
            self.hooks.hold(self.lists)

    def end_call(self, output):
        self.hooks.release()
        call, self.call = self.call, None
        if call is None or call.st is None:
            return output
        st = call.st
        measure = getattr(st.gate, "output", None)  # a gate measuring the model's output (calibration)
        if measure is None and self.policy.site != "output":
            return output
        t0 = self._clock()
        out = output[0] if isinstance(output, tuple) else output.sample
        if measure is not None:
            measure(call.step, out)
        if self.policy.site != "output":
            self._tick(t0)
            return output
        if tuple(out.shape) != st.shape:
            raise ValueError(f"site: the model's output {tuple(out.shape)} differs from its latent input {st.shape} "
                             f"({self.family.name}, e.g. a learned variance): use site='hidden'")
        if call.compute is True:
            value = out
        else:
            pred = st.fc.predict(st)
            value = masked(call.compute, out, pred)
        self._finish(call, value, lambda: value)
        self._tick(t0)
        if value is out:
            return output
        if isinstance(output, tuple):
            return (value, *output[1:])
        output.sample = value
        return output

    # ----------------------------------------------------------------------------------------------------------
    # the blocks' hooks
    # ----------------------------------------------------------------------------------------------------------
    def block(self, li: int, j: int, module, original, args, kwargs):
        call = self.call
        if kwargs.pop(RUN, False) or call is None or call.off:
            return original(*args, **kwargs)
        spec = self.family.lists[li]
        kw = bind(module, args, kwargs)
        if spec.per_block:  # the model's own loop runs this list: each block runs or hands on by itself
            return self.segment(call, li, j, j + 1, original, kw)
        if j > 0:  # the list's first block ran the whole list: hand its result on
            return spec.pack(kw[spec.hidden], kw.get(spec.encoder) if spec.encoder else None)
        return self.segment(call, li, 0, len(self.lists[li]), original, kw)

    def segment(self, call: Call, li: int, start: int, stop: int, original, kw: dict):
        """Blocks [start, stop) of list ``li``: the whole list (taken over by its first block), or one block of a
        list the model's loop runs block by block (``Blocks.per_block``). Of them, those before the cached span
        (``compute_first``, FBCache's probe blocks) and after it (``compute_last``) run on every step; those in it
        run or hand on."""
        spec = self.family.lists[li]
        hidden = kw[spec.hidden]
        enc = kw.get(spec.encoder) if spec.encoder else None
        off = self.offsets[li]  # the list's first block, counted over every list
        first, end = self.span  # the cached span [first, end), counted over every list
        own = start  # the block whose hook called this (``original`` is its forward)
        t0 = self._clock()
        if li == 0 and start == 0:  # 1. the stream (and the tokens the site's residual is taken against)
            call.base = self._image_part(call, spec, hidden)
            st = call.st = self._stream(call, call.base)
            call.step = Step(st.index if not torch.compiler.is_compiling() else None, st.step)
            call.compute = None
            if "modulated" in self.probes:  # the family's probe reads the first block's input
                probe = call.step.probes["modulated"] = self.family.probe_of(self.lists[0][0], kw, hidden)
                call.step.replicated = self.family.probe_replicated(probe, hidden)
        if off + start < first:  # 2. blocks before the span: they run (model time)
            n = min(stop, first - off)
            self._tick(t0)
            hidden, enc = self._run(li, original, own, kw, hidden, enc, start, n)
            start = n
            t0 = self._clock()
        if call.compute is None and off + start == first:
            # 3. the probe and the decision, where the blocks before the span end
            if first:
                img = self._image_part(call, spec, hidden)
                if "first_blocks" in self.probes:
                    call.step.probes["first_blocks"] = img - call.base
                if self.policy.gate.probe == "first_blocks" or self.policy.compute_first:
                    call.base = img  # the site's residual is the span's: a skipped step skips only the span
            call.step.probe = call.step.probes.get(self.policy.gate.probe)
            call.compute = self._decide(call.st, call.step)
        compute, site = call.compute, self.policy.site
        mid = min(stop, end - off)  # the span's blocks of this segment: [start, mid)
        if start < mid:
            ends = off + mid == end  # the span ends here: a skipped step gets the forecast
            txt = self._text_in(call, li, start, spec, hidden, enc)  # (blocks after the span: see _text_in)

            # 4. the branch: run the blocks, or hand on the inputs (the span's last block: the forecast)
            def full(h, *e):
                self._tick(t0)
                out = self._run(li, original, own, kw, h, e[0] if e else None, start, mid)
                if not e:
                    return out[:1]
                # a last block that returns no text tokens (SD3's context_pre_only): hand the input's on
                return out if out[1] is not None else (out[0], e[0])

            def skip(h, *e):
                if ends and site != "output":
                    h = spec.rejoin(h, self._forecast(call))
                if txt is not None:  # the text tokens as these blocks would have made them
                    h, e = self._text_skip(call, li, start, spec, h, e)
                return (h, *e)

            if not isinstance(compute, bool):
                trace_outside_cond(self.lists[li][start:mid])
            out = branch(compute, full, skip, (hidden,) if enc is None else (hidden, enc))
            t1 = self._clock()
            hidden = out[0]
            enc = out[1] if len(out) > 1 else None

            # 5. at the span's end: record the site value (the "output" site records in end_call)
            if txt is not None:
                self._text_record(call, li, start, spec, hidden, enc, txt)
            if ends and site != "output":
                img = spec.image(hidden, call.base.shape[-2])
                value = None if compute is False else img - call.base if site == "residual" else img
                self._finish(call, value, lambda: img - call.base)
            self._tick(t1)
            start = mid
        if start < stop:  # 6. blocks after the span: they run
            hidden, enc = self._run(li, original, own, kw, hidden, enc, start, stop)
        return spec.pack(hidden, enc)

    # The text tokens through a cached span with blocks after it (``compute_last``): those blocks attend to them, so
    # a skipped step gives them the text tokens the span's blocks would have made. Each of the span's segments (a
    # list's part of it, or one block of a block-by-block list) keeps the residual its blocks added to the text
    # tokens on the last computed step, and adds it on a skipped one: where the model hands the text tokens from
    # list to list (FLUX) the residuals add up over the span, as DBCache's one residual does; where it gives a list
    # or a block text tokens of its own (Z-Image's refined captions, HiDream's per-block states) each applies to
    # its own.
    def _text_in(self, call: Call, li: int, start: int, spec, hidden, enc):
        """The text tokens entering a segment of the span (None: no blocks after the span, or no text tokens), with
        the buffer of its residual allocated (before the branch that reads it)."""
        if not self.tail:
            return None
        txt = spec.text(hidden, enc, call.base.shape[-2])
        if txt is not None:
            buf = call.st.text.get((li, start))
            if buf is None or buf.shape != txt.shape:
                call.st.text[(li, start)] = torch.zeros_like(txt)
        return txt

    def _text_record(self, call: Call, li: int, start: int, spec, hidden, enc, txt_in) -> None:
        txt = spec.text(hidden, enc, call.base.shape[-2])
        if txt is None or txt.shape != txt_in.shape:
            return
        buf = call.st.text[(li, start)]
        if call.compute is True:
            buf.copy_(txt - txt_in)
        elif call.compute is not False:
            buf.copy_(torch.where(call.compute, txt - txt_in, buf))

    def _text_skip(self, call: Call, li: int, start: int, spec, h, e):
        n = call.base.shape[-2]
        txt = spec.text(h, e[0] if e else None, n) + call.st.text[(li, start)]
        if spec.encoder is not None and "encoder" in spec.returns:  # the list's text argument
            return h, (txt, *e[1:])
        return spec.join(txt, spec.image(h, n)), e

    # ----------------------------------------------------------------------------------------------------------
    def _stream(self, call: Call, hidden: torch.Tensor) -> StreamState:
        def make(num_steps: int, offset: int) -> StreamState:
            shape, dtype = tuple(hidden.shape), hidden.dtype
            if self.policy.site == "output":  # the model's output has its latent input's shape
                latent = call.kwargs.get(self.family.hidden_arg)
                if not isinstance(latent, torch.Tensor):
                    raise ValueError(f"site: 'output' needs the latent input {self.family.hidden_arg!r} as one tensor; "
                                     f"{self.family.name} passes {type(latent).__name__}: use site='hidden'")
                shape, dtype = tuple(latent.shape), latent.dtype
            spec = StreamSpec(shape, dtype, hidden.device, num_steps, self._grid(call), self.shard, self.coeffs,
                              offset)
            return StreamState(self.policy, spec, tokens=tuple(hidden.shape))

        # everything of the call a stream's buffers depend on selects it: branch, tokens, dtype, device, the token
        # grid where the forecaster works on it (FreqCa: 48x32 and 32x48 have one token count), the latent at the
        # "output" site (the step count and the parallel layout reset every stream when they change)
        key = (call.branch, tuple(hidden.shape), hidden.dtype, hidden.device,
               self._grid(call) if self.grid_keyed else None, self._latent_key(call))
        st = self.gens.stream(key, make)
        if not torch.compiler.is_compiling():
            st.last_use = self.gens.calls
            self.gens.calls += 1
            if not st.ran and self.gen_steps:  # first called mid-generation (Wan 2.2's low-noise expert)
                st.start_at(self.gen_steps)
        return st

    def _decide(self, st: StreamState, step: Step):
        gate = st.gate
        if step.index is not None:  # eager
            if step.index >= st.num_steps:
                self._warn_once("past", "fastcache_rt: step %d of a generation announced with %d steps: computing "
                                "every further step (announce the step count: handle.new_generation(S))",
                                step.index, st.num_steps)
                if step.probe is not None:
                    gate.decide(step)  # keep the gate's state moving
                return True
            c = gate.decide(step)
            c = c if isinstance(c, bool) else bool(c)  # signal gates: the one host read of the step
            return c or not st.host_has_cache
        c = gate.decide(step)
        if isinstance(c, bool):
            c = torch.full((), c, dtype=torch.bool, device=st.step.device)  # a constant of the graph
        return c | ~st.has_cache | (st.step >= st.num_steps) | ~st.live

    def _finish(self, call: Call, value: torch.Tensor, residual) -> None:
        call.st.gate.after(call.step, call.compute, residual)
        call.st.end_step(call.compute, value)

    def _forecast(self, call: Call) -> torch.Tensor:
        pred = call.st.fc.predict(call.st)
        return call.base + pred if self.policy.site == "residual" else pred

    def _run(self, li, original, own, kw, hidden, enc, start, stop):
        """Blocks [start, stop) of list ``li`` (the first is the block whose hook calls this), each with the
        arguments the first got and the previous block's hidden / text tokens; every hook on a block runs (group
        offloading, layerwise casting, ...)."""
        spec = self.family.lists[li]
        blocks = self.lists[li]
        for j in range(start, min(stop, len(blocks))):
            kw = dict(kw)
            kw[spec.hidden] = hidden
            if spec.encoder is not None:
                kw[spec.encoder] = enc
            # the block whose hook this is runs through the rest of its hook chain; the others through their
            # module call, as the model calls them (the marker tells fastcache_rt's hook on them to run the block)
            out = self.hooks.run(li, j, original if j == own else functools.partial(blocks[j], **{RUN: True}), kw)
            hidden, enc = spec.unpack(out, enc)
        return hidden, enc

    def _grid(self, call: Call):
        """The call's token grid (``grid=`` given to enable, else the family's reading of the call), read once per
        generation and latent shape: a family reading it from tensor values (FLUX's ``img_ids``) costs a host
        read."""
        if call.grid is False:
            if self.grid is not None:
                call.grid = self.grid
            else:
                latent = call.kwargs.get(self.family.hidden_arg)
                key = tuple(latent.shape) if isinstance(latent, torch.Tensor) else None
                if key is None or key not in self._grids or torch.compiler.is_compiling():
                    grid = self.family.token_grid(self.model, call.kwargs)
                    if key is not None and not torch.compiler.is_compiling():
                        self._grids[key] = grid
                else:
                    grid = self._grids[key]
                call.grid = grid
        return call.grid

    def _latent_key(self, call: Call):
        if self.policy.site != "output":
            return None
        latent = call.kwargs.get(self.family.hidden_arg)
        return (tuple(latent.shape), latent.dtype) if isinstance(latent, torch.Tensor) else None

    def _image_part(self, call: Call, spec, hidden: torch.Tensor) -> torch.Tensor:
        """The image tokens of the first list's input: all of it, or, where the model joined text and image
        tokens before the first list, the part the family's token grid covers (this rank's share of it)."""
        if spec.joined is None:
            return hidden
        grid = self._grid(call)
        if grid is None:
            return hidden
        n = math.prod(grid) // (self.shard.size if self.shard is not None else 1)
        return hidden if n >= hidden.shape[-2] else spec.image(hidden, n)

    def _clock(self) -> float:
        return 0.0 if torch.compiler.is_compiling() else time.perf_counter()

    def _tick(self, t0: float) -> None:
        if t0:
            self.gens.controller_seconds += time.perf_counter() - t0

    # ----------------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        from .parallel import tensor_parallel_layout

        return {
            "policy": self.policy.name,
            "policy_spec": repr(self.policy),
            "family": self.family.name,
            # this rank and the number of ranks the tokens are split over (context parallelism), else None
            "context_parallel": None if self.shard is None else {"rank": self.shard.rank, "size": self.shard.size},
            # this rank and the number of ranks the weights are split over (diffusers' tensor parallelism), else None
            "tensor_parallel": tensor_parallel_layout(self.model),
            **self.gens.stats(),
        }
