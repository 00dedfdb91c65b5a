"""Model adapters: how to embed, probe, run the blocks of and finish one model family's forward. The controller
knows policies and nothing of models; an adapter knows its model and nothing of policies. Register new families
with ``register_adapter``."""

from __future__ import annotations

from .base import Adapter, StepInputs
from .flux import FluxAdapter

_REGISTRY: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Add an adapter class; it is chosen for models whose class name is in ``cls.model_classes``."""
    _REGISTRY.insert(0, cls)
    return cls


def adapter_for(model) -> Adapter:
    names = {c.__name__ for c in type(model).__mro__}
    for cls in _REGISTRY:
        if names & set(cls.model_classes):
            return cls()
    supported = sorted({n for cls in _REGISTRY for n in cls.model_classes})
    raise TypeError(
        f"target: no fastcache_rt adapter for {type(model).__name__}; supported: {', '.join(supported)}"
    )


register_adapter(FluxAdapter)

__all__ = ["Adapter", "FluxAdapter", "StepInputs", "adapter_for", "register_adapter"]
