"""The user-facing API: enable / disable / stats and the context manager."""

from __future__ import annotations

import contextlib
import functools
import types
import weakref

import torch

from .adapters import adapter_for
from .controller import Controller
from .policy import Policy, resolve_policy

_ATTR = "_fastcache_rt"


class Handle:
    """Returned by ``enable``: the controller of one patched transformer."""

    def __init__(self, target, model, controller: Controller, restore: list):
        self._target = weakref.ref(target)
        self.model = model
        self.controller = controller
        self._restore = restore

    @property
    def policy(self) -> Policy:
        return self.controller.policy

    def new_generation(self, num_steps: int | None = None) -> None:
        """Start a new generation (a pipeline does this by itself through its scheduler)."""
        self.controller.new_generation(num_steps)

    def stats(self) -> dict:
        return self.controller.stats()

    def disable(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        for obj in (self.model, self._target()):
            if obj is not None and getattr(obj, _ATTR, None) is self:
                delattr(obj, _ATTR)

    def __repr__(self) -> str:
        return f"fastcache_rt.Handle(policy={self.policy.name!r}, model={type(self.model).__name__})"


def _split(target):
    """(pipeline or None, transformer)."""
    if isinstance(target, torch.nn.Module):
        return None, target
    model = getattr(target, "transformer", None)
    if isinstance(model, torch.nn.Module):
        return target, model
    raise TypeError(
        f"target: expected a diffusers pipeline with a .transformer or a transformer module, got {type(target).__name__}"
    )


def _patch_attr(obj, name: str, value, restore: list) -> None:
    """Set an instance attribute and remember how to put back exactly what was there."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    setattr(obj, name, value)

    def undo():
        if had:
            setattr(obj, name, old)
        else:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)

    restore.append(undo)


def enable(target, policy: str | Policy = "spectrum", *, num_steps: int | None = None,
           grid: tuple[int, int] | None = None, **overrides) -> Handle:
    """Turn caching on for a diffusers pipeline (its ``.transformer`` is patched) or a transformer module.

    Args:
        target: a pipeline or a transformer (FluxTransformer2DModel; see ``fastcache_rt.adapters``).
        policy: a preset name (``fastcache_rt.PRESETS``) or a ``Policy``.
        num_steps: steps per generation, for a bare transformer (a pipeline announces it itself).
        grid: (H, W) of the image-token grid, for FreqCa on non-square images without a pipeline.
        **overrides: fields of the preset's gate or forecaster (e.g. ``threshold=0.4``, ``alpha=3.0``), or
            ``gate=``, ``forecaster=``, ``site=``.

    Returns a ``Handle``; ``fastcache_rt.disable(target)`` restores the original forward exactly.
    """
    pipe, model = _split(target)
    pol = resolve_policy(policy, **overrides)
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
    if grid is not None and (len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid)):
        raise ValueError(f"grid: must be (H, W) of positive ints, got {grid!r}")
    if getattr(model, _ATTR, None) is not None:
        getattr(model, _ATTR).disable()
    adapter = adapter_for(model)
    if getattr(pol.gate, "blocks", 0) >= adapter.num_blocks(model):
        raise ValueError(f"blocks: the FBCache probe must leave blocks to skip ({adapter.num_blocks(model)} in all)")
    controller = Controller(model, adapter, pol, num_steps=num_steps, grid=grid)
    restore: list = []

    def forward(self, *args, **kwargs):
        return controller.forward(self, *args, **kwargs)

    _patch_attr(model, "forward", types.MethodType(forward, model), restore)
    if pipe is not None:
        sched = getattr(pipe, "scheduler", None)
        if sched is not None and hasattr(sched, "set_timesteps"):
            original = sched.set_timesteps

            # functools.wraps keeps the signature visible: pipelines inspect it (e.g. for a `sigmas` parameter)
            @functools.wraps(original)
            def set_timesteps(*args, **kwargs):
                result = original(*args, **kwargs)
                controller.new_generation(len(sched.timesteps))
                return result

            _patch_attr(sched, "set_timesteps", set_timesteps, restore)
            if hasattr(sched, "step"):
                original_step = sched.step

                @functools.wraps(original_step)
                def step(*args, **kwargs):
                    controller.step_done()
                    return original_step(*args, **kwargs)

                _patch_attr(sched, "step", step, restore)
                controller.track_branches = True
            if hasattr(sched, "set_begin_index"):
                original_begin = sched.set_begin_index

                @functools.wraps(original_begin)
                def set_begin_index(begin_index: int = 0, *args, **kwargs):
                    result = original_begin(begin_index, *args, **kwargs)
                    if begin_index:  # img2img: only the tail of the schedule runs
                        controller.new_generation(len(sched.timesteps) - int(begin_index))
                    return result

                _patch_attr(sched, "set_begin_index", set_begin_index, restore)
    handle = Handle(target, model, controller, restore)
    setattr(model, _ATTR, handle)
    if pipe is not None:
        setattr(pipe, _ATTR, handle)
        restore.append(lambda: pipe.__dict__.pop(_ATTR, None))
    restore.append(lambda: model.__dict__.pop(_ATTR, None))
    return handle


def _handle(target) -> Handle:
    h = getattr(target, _ATTR, None)
    if h is None and not isinstance(target, torch.nn.Module):
        h = getattr(getattr(target, "transformer", None), _ATTR, None)
    if h is None:
        raise ValueError("target: fastcache_rt is not enabled on it")
    return h


def disable(target) -> None:
    """Restore the original forward (and scheduler methods) exactly."""
    _handle(target).disable()


def stats(target) -> dict:
    """For the last generation: ``num_steps``, ``computed`` / ``cached`` step indices, ``policy``, ``cache_bytes``,
    ``controller_seconds`` (host time spent in the controller) and more."""
    return _handle(target).stats()


@contextlib.contextmanager
def cached(target, policy: str | Policy = "spectrum", **kwargs):
    """``with fastcache_rt.cached(pipe, "teacache"):`` caching on inside the block, restored after it."""
    handle = enable(target, policy, **kwargs)
    try:
        yield handle
    finally:
        handle.disable()
