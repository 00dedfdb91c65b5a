"""The user-facing API: enable / disable / stats and the context manager."""

from __future__ import annotations

import contextlib
import functools
import logging
import types
import weakref

import torch

from ._targets import split as _split
from ._targets import unwrap as _unwrap
from .controller import Controller, Setup, cached_span
from .families import family_for
from .hooks import COPY_NOTE, PICKLE_NOTE, install, sync_parallel, uninstall
from .policy import Policy, resolve_policy
from .policy.gates import GATES

logger = logging.getLogger("fastcache_rt")
_ATTR = "_fastcache_rt"


class Handle:
    """Returned by ``enable``: the controllers of the patched transformer(s) of one target."""

    def __init__(self, target, models: dict, controllers: dict, restore: list, watch=None):
        self._target = weakref.ref(target)
        self.models = models
        self.controllers = controllers
        self._restore = restore
        self._watch = watch  # the pipeline's scheduler watch (None for a bare transformer)

    @property
    def controller(self) -> Controller:
        return next(iter(self.controllers.values()))

    @property
    def model(self):
        return next(iter(self.models.values()))

    @property
    def policy(self) -> Policy:
        return self.controller.policy

    def new_generation(self, num_steps: int | None = None) -> None:
        """Start a new generation (a pipeline does this by itself)."""
        for c in self.controllers.values():
            c.end_generation()
            c.new_generation(num_steps)

    def stats(self) -> dict:
        def of(c):  # this pipeline's last generation, where another pipeline sharing the transformer ran since
            if self._watch is not None and c.owner is not self._watch and id(self._watch) in c.finished:
                return c.finished[id(self._watch)]
            return c.stats()

        out = of(self.controller)
        if len(self.controllers) > 1:
            out["models"] = {name: of(c) for name, c in self.controllers.items()}
        return out

    def disable(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()

    def __deepcopy__(self, memo):
        return None  # a copy of the target is not enabled (see COPY_NOTE: it is made without the hooks, saying so)

    def __reduce__(self):
        raise TypeError(PICKLE_NOTE)

    def __repr__(self) -> str:
        fams = ", ".join(f"{n}: {c.family.name}" for n, c in self.controllers.items())
        return f"fastcache_rt.Handle(policy={self.policy.name!r}, {fams})"


class _Patched:
    """A method patched on one object (a scheduler's ``set_timesteps``, ...). A deep copy of that object gets the
    class's own method back (the patch belongs to the original: its closures hold the original's state); pickling
    refuses with what to do."""

    def __init__(self, obj, name: str, fn, owner=None):
        self.obj, self.name, self.fn, self.owner = obj, name, fn, owner
        functools.update_wrapper(self, fn)  # the signature stays visible (pipelines inspect it)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        twin = memo.get(id(self.obj))
        original = getattr(type(self.obj), self.name)
        logger.warning(COPY_NOTE)
        return types.MethodType(original, twin) if twin is not None else original

    def __reduce__(self):
        raise TypeError(PICKLE_NOTE)


def _patch_attr(obj, name: str, value, restore: list, owner=None) -> None:
    """Set an instance attribute and remember how to put back exactly what was there."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    setattr(obj, name, _Patched(obj, name, value, owner) if callable(value) else value)

    def undo():
        if had:
            setattr(obj, name, old)
        else:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)

    restore.append(undo)


def _check_grid(grid):
    if grid is None:
        return None
    ok = isinstance(grid, (tuple, list)) and len(grid) in (2, 3) and all(
        isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    if not ok:
        raise ValueError(f"grid: must be (H, W) or (F, H, W) of positive ints, got {grid!r}")
    return tuple(grid) if len(grid) == 3 else (1, *grid)


def _apply_profile(pol: Policy, profile: dict, name: str, model) -> Policy:
    """The policy with what the profile's fit for this transformer gives its gate (the gate's ``from_profile``:
    TeaCache's polynomial as ``coeffs``, MagCache's ratios as ``ratios``)."""
    from .profiles import ProfileError, for_model

    fit = for_model(profile, name, model)
    gate = pol.gate
    reads = getattr(gate, "from_profile", None)
    fields = getattr(gate, "profile", {}) or {}
    for field in fields:
        if getattr(gate, field, None) is not None and not getattr(gate, "calibrate", False):
            raise ValueError(f"profile: the policy's {type(gate).__name__} already has {field}=; pass one or the other")
    try:
        changes = reads(fit) if callable(reads) else {}
    except KeyError as e:
        raise ProfileError(f"profile: no {e.args[0]} fit for {name} (too few measured steps in its runs)") from None
    if not changes:
        readers = sorted(cls.__name__ for cls in GATES.values() if cls.profile)
        raise ValueError(f"profile: the {type(gate).__name__} gate reads nothing from a profile (the "
                         f"{', '.join(readers)} gates do)")
    return pol.with_overrides(**changes)


def enable(target, policy: str | Policy = "spectrum", *, num_steps: int | None = None,
           grid: tuple[int, ...] | None = None, group=None, profile=None, **overrides) -> Handle:
    """Turn caching on for a diffusers pipeline (its ``transformer``, and ``transformer_2`` where there is one,
    each with its own state) or a transformer module.

    Args:
        target: a pipeline or a transformer of a supported family (``fastcache_rt.families``), also a
            ``torch.compile``d one.
        policy: a preset name (``fastcache_rt.PRESETS``), a policy file (``.json``, from ``fastcache-rt tune``)
            or a ``Policy``.
        num_steps: steps per generation, for a bare transformer (a pipeline announces it itself).
        grid: (H, W) or (F, H, W) of the image-token grid, for FreqCa where the family cannot tell it.
        group: the ``torch.distributed`` process group (or 1-D ``DeviceMesh``) the transformer's tokens are split
            over, when the model splits them by other means than diffusers' ``enable_parallelism`` (whose group is
            found by itself). Signal gates then reduce their sums over it, so every rank decides alike.
        profile: a calibration profile (a path or the dict from ``fastcache_rt.calibrate``) made on this model:
            the TeaCache / SpectralCache gates take its polynomial, MagCache its ratios (per transformer).
        **overrides: fields of the preset's gate or forecaster (e.g. ``threshold=0.4``, ``alpha=3.0``), or
            ``gate=``, ``forecaster=``, ``site=``; or caps that hold whatever the gate (``fastcache_rt.policy.Caps``;
            a name that is a field of the gate or the forecaster goes there first): ``max_cached_steps=`` (cached
            steps per generation and stream), ``max_consecutive=`` (cached steps in a row), ``mask=`` (1 = the
            step computes, 0 = the gate decides; or a preset "slow" / "medium" / "fast" / "ultra" for any step
            count), ``refresh=k`` (steps 0, k, 2k, ... compute), ``warmup=k`` (the first k steps compute), or
            ``caps=Caps(...)``. ``stats()`` lists per stream the steps the caps made compute (``forced``).
            ``compute_first=n`` / ``compute_last=m``: blocks that run on every step before / after the cached span
            (DBCache's Fn / Bn; the presets "dbcache" and "dbcache-f<n>b<m>").

    Returns a ``Handle``; ``fastcache_rt.disable(target)`` restores the original forward exactly.
    """
    pipe, models = _split(target)
    fams = {name: family_for(m) for name, m in models.items()}  # TypeError before anything is touched
    pol = resolve_policy(policy, **overrides)
    pols = {name: pol for name in models}
    if profile is not None:
        from .profiles import load_profile

        prof = load_profile(profile)
        pols = {name: _apply_profile(pol, prof, name, m) for name, m in models.items()}
    for p in pols.values():
        p.check_ready()
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
    grid = _check_grid(grid)
    if group is not None:
        from .parallel import resolve_group

        resolve_group(None, group)  # TypeError / ValueError before anything is touched
    for name, m in models.items():  # ValueError where the policy's blocks leave none to skip
        cached_span([len(getattr(m, b.attr)) for b in fams[name].lists], pols[name])
    if getattr(target, _ATTR, None) is not None:  # enabled again: the new policy replaces the old
        getattr(target, _ATTR).disable()
    sched = getattr(pipe, "scheduler", None) if pipe is not None else None
    patched = sched.__dict__.get("set_timesteps") if sched is not None and hasattr(sched, "__dict__") else None
    if isinstance(patched, _Patched) and patched.owner is not None and patched.owner.pipe is not pipe:
        raise ValueError(
            "target: this pipeline shares its scheduler and transformer with another pipeline that has caching "
            "enabled (FluxPipeline.from_pipe shares every component): a generation cannot tell which of the two "
            "drives it. Calls through either pipeline are already cached as the other one is; to cache them "
            "differently, give this one its own scheduler (from_pipe(other, scheduler=copy.deepcopy("
            "other.scheduler))) before enabling")
    for m in models.values():
        inst = m.__dict__.get(_INSTALL)
        # a transformer cached through other pipelines is shared (each pipeline keeps its scheduler and policy);
        # one enabled by itself, or enabled by itself now, is taken over
        if inst is not None and (pipe is None or not inst.shared_by_pipelines()):
            inst.detach_all()
    for name, m in models.items():
        if m.__dict__.get("_is_cached"):  # cache-dit's mark on a transformer it caches
            raise ValueError(f"target: cache-dit caching is enabled on its {name}; two caching libraries on one "
                             f"transformer would each skip what the other computes: call cache_dit.disable_cache("
                             f"pipe) first")

    restore: list = []
    controllers = {}
    setups = {}
    for name, m in models.items():
        fam, pol = fams[name], pols[name]
        coeffs = None
        if getattr(pol.gate, "family_coeffs", False) and pol.gate.coeffs is None:
            if fam.teacache:
                coeffs = next(iter(fam.teacache.values()))
            else:
                logger.warning("fastcache_rt: no published TeaCache coefficients for %s; the relative change is "
                               "accumulated unscaled (coeffs=(1, 0)): tune threshold= or pass coeffs=", fam.name)
        # what this pipeline's generations run with (a transformer shared with another pipeline switches to it)
        setups[name] = Setup(pol, coeffs, grid)
        inst = m.__dict__.get(_INSTALL)
        if inst is not None:  # shared with another pipeline: its hooks and controller serve this one too
            if group is not None and group is not inst.controller.group:
                raise ValueError(f"group: its {name} is cached through another pipeline with another process "
                                 f"group; pipelines sharing a transformer share its context-parallel group")
            controllers[name] = inst.controller
            restore.append(inst.attach())
            continue
        ctl = Controller(m, fam, pol, num_steps=num_steps, grid=grid, coeffs=coeffs, group=group)
        inst = _Installation(m, ctl)
        restore.append(inst.attach())
        controllers[name] = ctl
    watch = _PipelineWatch(pipe, controllers, restore, setups) if pipe is not None else None
    handle = Handle(target, models, controllers, restore, watch)
    for obj in [target, *models.values()]:
        if obj is target or pipe is None:
            setattr(obj, _ATTR, handle)
            restore.append(functools.partial(_pop_if, obj, handle))
        else:  # the transformer: the handle of the pipeline enabled last (stats(pipe.transformer) reads it)
            _set_transformer_handle(obj, handle, restore)
    return handle


_INSTALL = "_fastcache_rt_install"


class _Installation:
    """fastcache_rt's hooks on one transformer and its controller, shared by the pipelines that cache it (each
    attaches; the hooks come off when the last one detaches)."""

    def __init__(self, model, ctl: Controller):
        self.model, self.controller = model, ctl
        self.users: list = []
        self._undo: list = []
        created = install(model, ctl)
        self._undo.append(functools.partial(uninstall, model, ctl, created))
        _follow_parallelism(model, ctl, self._undo)
        model.__dict__[_INSTALL] = self

    def attach(self):
        token = object()
        self.users.append(token)

        def detach():
            if token in self.users:
                self.users.remove(token)
            if not self.users:
                for undo in reversed(self._undo):
                    undo()
                self._undo.clear()
                self.model.__dict__.pop(_INSTALL, None)

        return detach

    def shared_by_pipelines(self) -> bool:
        h = self.model.__dict__.get(_ATTR)
        return h is not None and h._watch is not None

    def detach_all(self) -> None:
        """Every handle caching this transformer is disabled (a bare-transformer enable takes it over)."""
        for h in [*_HANDLES.get(id(self), ()), self.model.__dict__.get(_ATTR)]:
            if h is not None:
                h.disable()

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        raise TypeError(PICKLE_NOTE)


# the handles attached to each installation (to disable them all when a bare transformer takes it over)
_HANDLES: dict[int, list] = {}


def _set_transformer_handle(model, handle: Handle, restore: list) -> None:
    inst = model.__dict__[_INSTALL]
    handles = _HANDLES.setdefault(id(inst), [])
    handles.append(handle)
    model.__dict__[_ATTR] = handle

    def undo():
        if handle in handles:
            handles.remove(handle)
        if model.__dict__.get(_ATTR) is handle:  # another pipeline still caching it takes its place
            if handles:
                model.__dict__[_ATTR] = handles[-1]
            else:
                model.__dict__.pop(_ATTR, None)
        if not handles:
            _HANDLES.pop(id(inst), None)

    restore.append(undo)


def _pop_if(obj, handle) -> None:
    if obj.__dict__.get(_ATTR) is handle:
        obj.__dict__.pop(_ATTR, None)


def _follow_parallelism(model, ctl: Controller, restore: list) -> None:
    """``enable_parallelism`` called after ``enable`` registers diffusers' context-parallel hooks around
    fastcache_rt's: put them in place right then, outside any call (``hooks.order_hooks``)."""
    original = getattr(model, "enable_parallelism", None)
    if not callable(original):
        return

    @functools.wraps(original)
    def enable_parallelism(*args, **kwargs):
        result = original(*args, **kwargs)
        sync_parallel(model, ctl)
        return result

    _patch_attr(model, "enable_parallelism", enable_parallelism, restore)


class _PipelineWatch:
    """The pipeline's scheduler announces each generation's step count (``set_timesteps``, ``set_begin_index`` for
    img2img) and its steps (``step``: the next transformer call is the first branch of the next step). A scheduler
    replaced after ``enable`` is watched from the next transformer call on and announces the generation it has set
    up (the controllers run ``check`` before each call, on the host)."""

    def __init__(self, pipe, controllers: dict, restore: list, setups: dict):
        self.pipe, self.restore = pipe, restore
        self.controllers = list(controllers.values())
        # each transformer's policy for this pipeline's generations (a transformer shared with another pipeline
        # runs each pipeline's generations with that pipeline's policy)
        self.setups = [setups[name] for name in controllers]
        self.scheduler = None
        self.watch(getattr(pipe, "scheduler", None))
        for c in self.controllers:
            c.before_call.append(self.check)
        restore.append(lambda: [c.before_call.remove(self.check) for c in self.controllers
                                if self.check in c.before_call])

    def check(self) -> None:
        if self.pipe is None:
            return
        sched = getattr(self.pipe, "scheduler", None)
        if sched is self.scheduler:
            return
        self.watch(sched)
        ts = getattr(sched, "timesteps", None)
        begin = int(getattr(sched, "begin_index", None) or 0)
        steps = (len(ts) if ts is not None else 0) - begin
        self._announce(steps if steps > 0 else None, offset=begin if steps > 0 else 0)

    def _announce(self, steps: int | None, close: bool = True, offset: int = 0) -> None:
        for c, setup in zip(self.controllers, self.setups):
            if close:
                c.end_generation()
            c.new_generation(steps, offset, setup=setup, owner=self)

    def watch(self, sched) -> None:
        self.scheduler = sched
        if sched is None or not hasattr(sched, "set_timesteps"):
            return
        original = sched.set_timesteps

        # functools.wraps keeps the signature visible: pipelines inspect it (e.g. for a `sigmas` parameter)
        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            self._announce(len(sched.timesteps))
            return result

        _patch_attr(sched, "set_timesteps", set_timesteps, self.restore, owner=self)
        if hasattr(sched, "step"):
            original_step = sched.step

            @functools.wraps(original_step)
            def step(*args, **kwargs):
                for c in self.controllers:
                    c.step_done()
                result = original_step(*args, **kwargs)
                for c in self.controllers:  # the last step: the generation ends here (a transformer without
                    c.steps_finished()      # diffusers' cache context is not reset at the pipeline's end)
                return result

            _patch_attr(sched, "step", step, self.restore)
        if hasattr(sched, "set_begin_index"):
            original_begin = sched.set_begin_index

            @functools.wraps(original_begin)
            def set_begin_index(begin_index: int = 0, *args, **kwargs):
                result = original_begin(begin_index, *args, **kwargs)
                if begin_index:  # img2img: only the tail of the schedule runs
                    self._announce(len(sched.timesteps) - int(begin_index), close=False, offset=int(begin_index))
                return result

            _patch_attr(sched, "set_begin_index", set_begin_index, self.restore)
        for c in self.controllers:
            c.follow_steps()


def _handle(target) -> Handle:
    h = getattr(target, _ATTR, None)
    if h is None and isinstance(target, torch.nn.Module):
        h = getattr(_unwrap(target), _ATTR, None)
    if h is None and not isinstance(target, torch.nn.Module):
        h = getattr(getattr(target, "transformer", None), _ATTR, None)
    if h is None:
        raise ValueError("target: fastcache_rt is not enabled on it")
    return h


def disable(target) -> None:
    """Restore the original forward (and scheduler methods) exactly."""
    _handle(target).disable()


def stats(target) -> dict:
    """For the last generation: ``num_steps``, ``computed`` / ``cached`` step indices (of the first stream),
    ``per_stream`` (branch, shape, decisions of every stream), ``policy``, ``family``, ``cache_bytes``,
    ``controller_seconds`` and more; ``models`` per transformer where a pipeline has two."""
    return _handle(target).stats()


@contextlib.contextmanager
def cached(target, policy: str | Policy = "spectrum", **kwargs):
    """``with fastcache_rt.cached(pipe, "teacache"):`` caching on inside the block, restored after it."""
    handle = enable(target, policy, **kwargs)
    try:
        yield handle
    finally:
        handle.disable()
