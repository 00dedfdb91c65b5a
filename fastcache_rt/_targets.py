"""What ``enable`` and the tools act on: a pipeline's transformers (or one transformer), unwrapped from
``torch.compile``."""

from __future__ import annotations

import torch

# the transformers of a pipeline, in the order they run (Wan 2.2 A14B: high noise, then low noise)
DENOISERS = ("transformer", "transformer_2")


def unwrap(model):
    """A ``torch.compile``d module: its original module (hooks go there; the compiled wrapper traces them)."""
    return getattr(model, "_orig_mod", model)


def split(target) -> tuple[object | None, dict]:
    """(pipeline or None, {name: transformer})."""
    if isinstance(target, torch.nn.Module):
        return None, {"transformer": unwrap(target)}
    models = {n: unwrap(getattr(target, n)) for n in DENOISERS if isinstance(getattr(target, n, None),
                                                                               torch.nn.Module)}
    if models:
        return target, models
    raise TypeError(
        f"target: expected a diffusers pipeline with a .transformer or a transformer module, got {type(target).__name__}"
    )
