"""What a gate's or a forecaster's state is made for (``StreamSpec``), the registries of gates and forecasters, and
the one helper for a write that happens only on computed steps.

Every gate and every forecaster is a validated config dataclass with ``make_state(spec: StreamSpec)``: one argument,
so that a field added to the spec never changes a user's class."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StreamSpec:
    """One stream (one CFG branch at one shape, of one transformer), as a gate or a forecaster sees it.

    shape      the tensor this part works on: for a forecaster the cached site tensor, for a gate the image tokens
               it measures (this rank's share under context parallelism in both cases)
    dtype      that tensor's dtype (the compute dtype of the hidden states, whatever the weights' storage dtype)
    device     where the state lives
    num_steps  denoising steps of the generation
    grid       (frames, height, width) of the whole image-token grid, when known
    shard      a ``fastcache_rt.parallel.Shard`` when the tokens are split over a context-parallel group (what is
               measured over the tokens is reduced over it), else None
    coeffs     the model family's published TeaCache polynomial (highest power first), for gates that use one
    offset     the generation's first step is step ``offset`` of the scheduler's whole schedule (img2img runs the
               schedule's tail: a gate calibrated per schedule position, MagCache, reads from there)
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: Any = "cpu"
    num_steps: int = 1
    grid: tuple[int, ...] | None = None
    shard: Any = None
    coeffs: tuple[float, ...] | None = None
    offset: int = 0

    def replace(self, **changes) -> StreamSpec:
        return dataclasses.replace(self, **changes)


def masked_write_(dst: torch.Tensor, src: torch.Tensor, compute) -> None:
    """``dst = src`` where the step computed: a plain copy for a host True (eager, computed), nothing for a host
    False (eager, cached), one ``where`` for a device bool (compiled: both branches write the same buffers)."""
    if compute is True:
        dst.copy_(src)
    elif compute is not False:
        dst.copy_(torch.where(compute, src, dst))


def masked(compute, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where the step computed, else ``old`` (the value form of ``masked_write_``)."""
    if compute is True:
        return new
    if compute is False:
        return old
    return torch.where(compute, new, old)


class Registry(dict):
    """Name -> class of the gates (or forecasters) a policy file may name. A class registers itself with the
    decorator (``@register_gate``); its ``name`` class attribute is the key."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls: type) -> type:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"register_{self.kind}: {cls.__name__} needs a class attribute name = '...' "
                             f"(an identifier), got {name!r}")
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"register_{self.kind}: {cls.__name__} must be a dataclass (its fields are its settings)")
        old = self.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"register_{self.kind}: the name {name!r} is taken by {old.__qualname__}")
        self[name] = cls
        return cls

    def name_of(self, obj) -> str:
        for name, cls in self.items():
            if type(obj) is cls:
                return name
        raise ValueError(f"{type(obj).__name__} is not a registered {self.kind}: decorate the class with "
                         f"@fastcache_rt.policy.register_{self.kind} (and give it name = '...') to save or load it "
                         f"in a policy file")
