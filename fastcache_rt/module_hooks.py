"""The forward hooks put on blocks with ``nn.Module.register_forward_pre_hook`` / ``register_forward_hook``
(profilers, a user's hooks) fire once per real run of a block. While a cached model call is in progress they are
held aside, so the model's own loop (which only hands a taken-over list's result on, or calls a block whose step is
cached) fires none of them, and the controller fires them around each block it really runs. The same code runs
eager and under ``torch.compile``, which traces the swap as a side effect on the modules. Global module hooks
(``torch.nn.modules.module.register_module_forward_hook``) are not held: they fire on every module call."""

from __future__ import annotations

from collections import OrderedDict

import torch


class HeldHooks:
    def __init__(self):
        self._held: dict = {}  # (list, block) -> (block, its pre-hooks, its forward hooks)

    def hold(self, lists) -> None:
        """Move the hooks of every block of ``lists`` aside (a no-op for blocks without any)."""
        self.release()  # (after a call that raised before its end)
        for li, blocks in enumerate(lists):
            for j, b in enumerate(blocks):
                if b._forward_pre_hooks or b._forward_hooks:
                    self._held[li, j] = (b, b._forward_pre_hooks, b._forward_hooks)
                    b._forward_pre_hooks, b._forward_hooks = OrderedDict(), OrderedDict()

    def release(self) -> None:
        """Put the hooks back (with any registered meanwhile, after the held ones, as they were registered)."""
        for b, pre, post in self._held.values():
            if not torch.compiler.is_compiling():  # (nothing registers a hook inside a compiled call)
                pre.update(b._forward_pre_hooks)
                post.update(b._forward_hooks)
            b._forward_pre_hooks, b._forward_hooks = pre, post
        self._held = {}

    def run(self, li: int, j: int, fn, kw: dict):
        """``fn(**kw)`` (a real run of block ``j`` of list ``li``) between its held hooks, as ``nn.Module.__call__``
        fires them: pre-hooks may replace the arguments, forward hooks the output."""
        held = self._held.get((li, j))
        if held is None:
            return fn(**kw)
        b, pre, post = held
        args: tuple = ()
        for key, hook in pre.items():
            if key in b._forward_pre_hooks_with_kwargs:
                r = hook(b, args, kw)
                if r is not None:
                    args, kw = r
            else:
                r = hook(b, args)
                if r is not None:
                    args = r if isinstance(r, tuple) else (r,)
        out = fn(*args, **kw)
        for key, hook in post.items():
            r = hook(b, args, kw, out) if key in b._forward_hooks_with_kwargs else hook(b, args, out)
            if r is not None:
                out = r
        return out
