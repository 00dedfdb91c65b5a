"""Model families: one ``Family`` declaration each (``base.py``), grouped in ``image.py``, ``video.py`` and
``dit.py``. ``family_for(model)`` picks the declaration by the transformer's class name; ``register_family`` adds
one (yours, for a model fastcache_rt does not know yet)."""

from __future__ import annotations

from .base import Blocks, Family, bind, patch_grid, signature, trace_outside_cond

_REGISTRY: list[Family] = []


def register_family(family: Family) -> Family:
    """Add a declaration; a later registration of the same class name wins."""
    if not isinstance(family, Family):
        raise TypeError(f"family: expected a fastcache_rt.families.Family, got {type(family).__name__}")
    _REGISTRY.insert(0, family)
    return family


def families() -> list[Family]:
    return list(_REGISTRY)


def supported_classes() -> list[str]:
    return sorted({c for f in _REGISTRY for c in f.classes})


def family_for(model) -> Family:
    names = [c.__name__ for c in type(model).__mro__]
    for name in names:
        for fam in _REGISTRY:
            if name in fam.classes:
                return fam
    raise TypeError(
        f"target: fastcache_rt has no family declaration for {type(model).__name__}. Supported: "
        f"{', '.join(supported_classes())}. To add one, declare its block lists: "
        "fastcache_rt.families.register_family(Family(name=..., classes=('YourModel',), "
        "lists=(Blocks('transformer_blocks', returns=('encoder', 'hidden')),))) -- see README, 'Adding a model'."
    )


def _load() -> None:
    from . import dit, image, video

    for mod in (dit, video, image):
        for fam in reversed(mod.FAMILIES):
            register_family(fam)


_load()

__all__ = ["Blocks", "Family", "bind", "families", "family_for", "patch_grid", "register_family", "signature",
           "supported_classes", "trace_outside_cond"]
