"""Installation on diffusers' hook system (``diffusers.hooks.HookRegistry`` / ``ModelHook``), as diffusers' own
cache methods are, so fastcache_rt composes with diffusers' other hooks (group offloading, layerwise casting,
context parallelism): a stateful hook on the transformer (whose ``StateManager`` receives the pipeline's
``cache_context``) and one hook on every block of the family's block lists."""

from __future__ import annotations

import copy
import functools
import logging
import weakref

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .controller import Controller
from .families import bind
from .parallel import resolve_group

COPY_NOTE = ("fastcache_rt: a copy (copy.deepcopy) of a pipeline or transformer with caching enabled is made without "
             "fastcache_rt's hooks: it runs uncached (fastcache_rt.enable caches it on its own); the original keeps "
             "its caching")
PICKLE_NOTE = ("fastcache_rt: a pipeline or transformer with caching enabled cannot be pickled; call "
               "fastcache_rt.disable(target) first and enable it again after loading")

MODEL_HOOK = "fastcache_rt"
BLOCK_HOOK = "fastcache_rt_block"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _Manager(StateManager):
    """diffusers' StateManager; the pipeline sets its cache context before each denoiser call, outside any
    compiled region: the controller does its per-call host bookkeeping there."""

    def __init__(self, controller: Controller):
        super().__init__(_NoState)
        self.controller = controller

    def set_context(self, context) -> None:
        super().set_context(context)
        if context is not None:
            sync_parallel(self.controller.model, self.controller)
            self.controller.host_bookkeeping()


_COPY_WARNED = []


def _warn_copy() -> None:
    if not _COPY_WARNED:
        _COPY_WARNED.append(True)
        logging.getLogger("fastcache_rt").warning(COPY_NOTE)


class _NotPicklable:
    """A deep copy of the modules is made without the hooks (``_CopyPlain``); pickling them refuses."""

    def __reduce__(self):
        raise TypeError(PICKLE_NOTE)


class TransformerHook(_NotPicklable, ModelHook):
    """On the transformer: opens and closes each call; the pipeline's cache context (CFG branch) arrives through
    ``state_manager``; the pipeline's end of generation through ``reset_state``."""

    _is_stateful = True

    def __init__(self, controller: Controller):
        super().__init__()
        self.controller = controller
        self.state_manager = _Manager(controller)

    def new_forward(self, module, *args, **kwargs):
        ctl = self.controller
        original = self.fn_ref.original_forward  # (what this call runs, even if the sync below moves the hook)
        if not torch.compiler.is_compiling():
            sync_parallel(module, ctl)
        # no try/except here: under torch.compile a try block around the blocks' torch.cond changes how dynamo
        # traces exceptions raised and handled inside them (diffusers' attention inspects its processor's
        # signature), and fails; a call that raised leaves ``ctl.call`` set until the next call replaces it
        ctl.begin_call(bind(module, args, kwargs), self.state_manager._context)
        return ctl.end_call(original(*args, **kwargs))

    def reset_state(self, module):
        self.controller.end_generation()
        return module


class BlockHook(_NotPicklable, ModelHook):
    """On every block of the family's lists: the first block of a list runs (or skips) the whole list, calling
    each block through its module call, so other hooks on the blocks run as they would without caching."""

    def __init__(self, controller: Controller, li: int, j: int):
        super().__init__()
        self.controller, self.li, self.j = controller, li, j

    def new_forward(self, module, *args, **kwargs):
        return self.controller.block(self.li, self.j, module, self.fn_ref.original_forward, args, kwargs)


def _register(module, hook: ModelHook, name: str, created: list) -> None:
    if not hasattr(module, "_diffusers_hook"):
        created.append(module)
    if "forward" not in module.__dict__:
        created.append((module, "forward"))
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


# diffusers' context-parallel hooks (hooks/context_parallel.py): "cp_input---<plan key>" splits a module's inputs
# over the ranks, "cp_output---<plan key>" gathers its outputs; a plan key with "*" is on every block of a list
_CP_PREFIXES = ("cp_input---", "cp_output---")


def _reorder(registry, order: list[str]) -> None:
    """Put the registry's hooks in ``order`` (innermost first). Hooks are unwound from the outside only: diffusers'
    ``remove_hook`` of an inner hook rewires the next one's ``forward``, which bypasses a hook that wraps with
    ``new_forward`` (as fastcache_rt's do)."""
    current = list(registry._hook_order)
    keep = 0
    while keep < len(order) and current[keep] == order[keep]:
        keep += 1
    hooks = {name: registry.hooks[name] for name in current[keep:]}
    for name in reversed(current[keep:]):
        registry.remove_hook(name, recurse=False)
    for name in order[keep:]:
        registry.register_hook(hooks[name], name)


def order_hooks(model, controller: Controller) -> None:
    """Place fastcache_rt's hooks among diffusers' context-parallel ones, whichever was enabled first:
    - on the transformer, fastcache_rt's hook is outermost: it sees the call's whole inputs (the token grid),
      and the split at the model's own forward (FLUX's plan key "") happens inside it;
    - on a block, a split planned for that block alone (Wan's "blocks.0", Qwen-Image's "transformer_blocks.0")
      wraps fastcache_rt's hook, so the controller sees the rank's shard of the tokens, as the blocks do; a split
      planned for every block of a list ("transformer_blocks.*") stays inside it, because the first block's hook
      hands its inputs on to the others, whose own split hook must receive them unsplit."""
    reg = getattr(model, "_diffusers_hook", None)
    if reg is not None and MODEL_HOOK in reg.hooks and reg._hook_order[-1] != MODEL_HOOK:
        _reorder(reg, [n for n in reg._hook_order if n != MODEL_HOOK] + [MODEL_HOOK])
    for blocks in controller.lists:
        for block in blocks:
            reg = getattr(block, "_diffusers_hook", None)
            if reg is None or BLOCK_HOOK not in reg.hooks:
                continue
            order = reg._hook_order
            cp = [n for n in order if n.startswith(_CP_PREFIXES)]
            outer = [n for n in cp if "*" not in n]
            inner = [n for n in cp if "*" in n]
            mine = order.index(BLOCK_HOOK)
            if any(order.index(n) < mine for n in outer) or any(order.index(n) > mine for n in inner):
                rest = [n for n in order if n != BLOCK_HOOK and n not in outer]
                _reorder(reg, rest + [BLOCK_HOOK] + outer)
    model._diffusers_hook.invalidate_child_registries_cache()


# the model's diffusers parallel config each controller's group and hook order were last synced with
_SYNCED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NEVER = object()


def sync_parallel(model, controller: Controller) -> None:
    """Follow the model's context parallelism (``enable_parallelism`` before or after ``enable``): the group its
    tokens are split over, and the hooks' order. Host work, outside any compiled region; a pointer comparison
    when nothing changed."""
    cfg = getattr(model, "_parallel_config", None)
    if _SYNCED.get(controller, _NEVER) is cfg:
        return
    controller.set_group(resolve_group(model, controller.group))
    _SYNCED[controller] = cfg
    if cfg is not None:
        order_hooks(model, controller)


class _CopyPlain:
    """``copy.deepcopy`` of the transformer or of one of its blocks while fastcache_rt's hooks are on them (set as
    the modules' instance attribute ``__deepcopy__``, which deepcopy consults first). diffusers' hook registry binds
    the original module in closures that a deep copy shares, so a copy made with the hooks on would run the original
    module. The copy is made with fastcache_rt's hooks taken off, which are put back on the original right after: a
    plain module (its other hooks copied as diffusers copies them), uncached unless caching is enabled on it."""

    def __init__(self, model, controller: Controller, created: list):
        self.model, self.controller, self.created = model, controller, created

    def copy(self, target, memo):
        _warn_copy()
        model, ctl = self.model, self.controller
        uninstall(model, ctl, self.created)
        try:
            return copy.deepcopy(target, memo)
        finally:
            _SYNCED.pop(ctl, None)  # the hooks' order among diffusers' parallel ones is set again
            install(model, ctl, self.created)

    def __reduce__(self):
        raise TypeError(PICKLE_NOTE)


_COPY_ATTR = "__deepcopy__"


def _hooked(model, controller: Controller) -> list:
    return [model, *(b for blocks in controller.lists for b in blocks)]


def install(model, controller: Controller, created: list | None = None) -> list:
    """Register the hooks; returns the modules that had no hook registry before (``uninstall`` removes those),
    filling ``created`` when given."""
    created = [] if created is None else created
    created.clear()
    for li, blocks in enumerate(controller.lists):
        for j, block in enumerate(blocks):
            _register(block, BlockHook(controller, li, j), BLOCK_HOOK, created)
    _register(model, TransformerHook(controller), MODEL_HOOK, created)
    model._diffusers_hook.invalidate_child_registries_cache()
    sync_parallel(model, controller)
    guard = _CopyPlain(model, controller, created)
    for m in _hooked(model, controller):
        m.__dict__[_COPY_ATTR] = functools.partial(guard.copy, m)
    return created


def _remove(registry, name: str) -> None:
    """Remove one hook, unwinding the hooks outside it first and registering them again (see ``_reorder``: removing
    a hook in the middle would bypass the next one if it wraps with ``new_forward``)."""
    order = list(registry._hook_order)
    if name not in order:
        return
    _reorder(registry, [n for n in order if n != name] + [name])
    registry.remove_hook(name, recurse=False)


def uninstall(model, controller: Controller, created: list) -> None:
    """Remove the hooks; a module that had no other hook is left exactly as it was (no registry, no instance
    ``forward``)."""
    controller.hooks.release()  # (hooks a call that raised left aside)
    for m in _hooked(model, controller):
        if isinstance(m.__dict__.get(_COPY_ATTR), functools.partial):
            del m.__dict__[_COPY_ATTR]
    _remove(model._diffusers_hook, MODEL_HOOK)
    for blocks in controller.lists:
        for block in blocks:
            _remove(block._diffusers_hook, BLOCK_HOOK)
    model._diffusers_hook.invalidate_child_registries_cache()
    had_no_forward = {id(entry[0]) for entry in created if isinstance(entry, tuple)}
    for module in [model, *(b for blocks in controller.lists for b in blocks)]:
        reg = module.__dict__.get("_diffusers_hook")
        if reg is None or reg.hooks:
            continue
        # the registry put the original bound forward back as an instance attribute: remove it where there was none
        fwd = module.__dict__.get("forward")
        if id(module) in had_no_forward and getattr(fwd, "__func__", None) is type(module).forward:
            del module.forward
        if any(m is module for m in created if not isinstance(m, tuple)):
            del module._diffusers_hook
