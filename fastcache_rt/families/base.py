"""What fastcache_rt knows of one model family, declared as data: the block lists it takes over, how a block takes
and returns the hidden (image) and text tokens, the probe for signal gates, the token grid, and the published
TeaCache coefficients. The runtime (``fastcache_rt.hooks``) reads nothing else of the model."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

# Probe kinds for signal gates (TeaCache, SpectralCache), computed at the first block of the span:
#   "norm1"  the first block's modulated input, ``block.norm1(hidden, emb=temb)[0]`` (TeaCache's own probe)
#   "temb"   the block's conditioning argument itself (the timestep-modulation vector; TeaCache's probe for Wan)
#   "hidden" the hidden tokens entering the first block (the documented fallback where no AdaLN norm1 exists)
PROBES = ("norm1", "temb", "hidden")


@dataclass(frozen=True)
class Blocks:
    """One block list, run in execution order. ``hidden`` / ``encoder`` are the block's argument names for the
    image and text tokens (``encoder`` None: the block takes no text tokens, or they are joined into ``hidden``);
    ``returns`` the order of the returned tuple ("hidden", "encoder"; ``("hidden",)`` = a single tensor)."""

    attr: str
    hidden: str = "hidden_states"
    encoder: str | None = "encoder_hidden_states"
    returns: tuple[str, ...] = ("encoder", "hidden")
    # how the model joined the text tokens into ``hidden`` before this list: None (not joined), "text_first" (text
    # tokens first: the image tokens are the last N) or "image_first" (image tokens are the first N)
    joined: str | None = None
    # True where the model's loop gives each block its own arguments (a slice of the conditioning, other text
    # states): the list is not taken over by its first block; each block runs or hands on in the model's loop
    # (under torch.compile: one torch.cond per block instead of one per list)
    per_block: bool = False

    # -- a block's inputs and outputs, by this declaration ---------------------------------------------------------
    def unpack(self, out, enc):
        """(hidden, text tokens) of a block's return value (``enc``: the input's text tokens, kept where the block
        returns none)."""
        if self.returns == ("hidden",):
            return (out[0] if isinstance(out, tuple) else out), enc
        vals = dict(zip(self.returns, out))
        return vals["hidden"], vals.get("encoder", enc)

    def pack(self, hidden, enc):
        """A block's return value from (hidden, text tokens)."""
        if self.returns == ("hidden",):
            return hidden
        return tuple(hidden if r == "hidden" else enc for r in self.returns)

    def image(self, h, n: int):
        """The ``n`` image tokens of ``h`` (all of it where the list's input holds image tokens only)."""
        if self.joined is None or h.shape[-2] == n:
            return h
        return h[..., -n:, :] if self.joined == "text_first" else h[..., :n, :]

    def text(self, h, enc, n: int):
        """The text tokens the blocks take and change: the text argument ``enc`` where they return it, else the part
        of ``h`` the model joined to its ``n`` image tokens; None where there is neither."""
        if self.encoder is not None and "encoder" in self.returns:
            return enc
        if self.joined is None or h.shape[-2] <= n:
            return None
        return h[..., :-n, :] if self.joined == "text_first" else h[..., n:, :]

    def join(self, txt, img):
        """Text and image tokens in the order the model joined them."""
        import torch

        return torch.cat([txt, img] if self.joined == "text_first" else [img, txt], dim=-2)

    def rejoin(self, h_in, img):
        """``h_in`` with its image tokens replaced by ``img`` (the text tokens the model joined in kept)."""
        n = img.shape[-2]
        if self.joined is None or h_in.shape[-2] == n:
            return img
        return self.join(h_in[..., :-n, :] if self.joined == "text_first" else h_in[..., n:, :], img)


_SIGNATURES: dict[type, list[str]] = {}


def signature(cls) -> list[str]:
    """The names of ``cls.forward``'s parameters after ``self`` (read once per class: not while torch.compile
    traces a call, which cannot trace ``inspect``)."""
    names = _SIGNATURES.get(cls)
    if names is None:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
        names = _SIGNATURES[cls] = [p.name for p in params]
    return names


def bind(module, args, kwargs) -> dict:
    """A module call's arguments by name (blocks are called positionally by some models, by keyword by others)."""
    if not args:
        return dict(kwargs)
    kw = dict(zip(signature(type(module)), args))
    kw.update(kwargs)
    return kw


def trace_outside_cond(blocks) -> None:
    """Before a ``torch.cond`` over ``blocks`` is traced: diffusers' attention modules read
    ``inspect.signature(self.processor.__call__)`` on every call. Traced for the first time inside a ``torch.cond``
    branch, that fails in torch 2.13's dynamo ("'Signature' object has no attribute '_parameters'"); traced once
    before the branch, it works. This costs nothing at run time: it only runs while dynamo traces."""
    for block in blocks:
        for mod in block.modules():
            proc = getattr(mod, "processor", None)
            if proc is not None and callable(proc):
                inspect.signature(proc.__call__)


@dataclass(frozen=True)
class Family:
    """One model family. ``classes``: the transformer class names it covers (``type(model).__name__``);
    ``lists``: its block lists in execution order; ``temb``: the block argument with the conditioning embedding;
    ``grid(model, kwargs)``: (frames, height, width) of the image-token grid from the forward's arguments (shapes
    only, no device reads), or None; ``teacache``: published TeaCache coefficients per checkpoint (highest power
    first; the first entry is the default), with ``teacache_source``; ``uncached_kwargs``: forward arguments that,
    when given, put model code between blocks (e.g. ControlNet residuals): such calls run uncached, with one
    warning."""

    name: str
    classes: tuple[str, ...]
    lists: tuple[Blocks, ...]
    temb: str | None = "temb"
    probe: str = "norm1"
    grid: Callable | None = None
    teacache: dict[str, tuple[float, ...]] = field(default_factory=dict)
    teacache_source: str = ""
    uncached_kwargs: tuple[str, ...] = ()
    hidden_arg: str = "hidden_states"  # the model forward's latent input (for ``grid``)
    notes: str = ""

    def __post_init__(self):
        if not self.lists:
            raise ValueError(f"Family {self.name}: lists must name at least one block list")
        if self.probe not in PROBES:
            raise ValueError(f"Family {self.name}: probe must be one of {PROBES}, got {self.probe!r}")
        for b in self.lists:
            if "hidden" not in b.returns:
                raise ValueError(f"Family {self.name}: {b.attr}.returns must name 'hidden'")
            if b.joined not in (None, "text_first", "image_first"):
                raise ValueError(f"Family {self.name}: {b.attr}.joined must be None, 'text_first' or 'image_first'")

    # -- what the runtime reads of a call, by this declaration -----------------------------------------------------
    def token_grid(self, model, kwargs: dict):
        """(frames, height, width) of the call's image-token grid, where the declaration can tell."""
        return self.grid(model, kwargs) if self.grid else None

    def probe_of(self, first_block, kw: dict, hidden):
        """The signal gates' probe at the first block: its modulated input (``norm1``), the conditioning
        (``temb``) or the hidden tokens."""
        if self.probe == "temb":
            return kw[self.temb]
        if self.probe == "hidden":
            return hidden
        norm1 = first_block.norm1
        takes_emb = "emb" in signature(type(norm1))
        out = norm1(hidden, emb=kw[self.temb]) if takes_emb else norm1(hidden, kw[self.temb])
        return out[0] if isinstance(out, tuple) else out

    def probe_replicated(self, probe, hidden) -> bool:
        """Whether every context-parallel rank holds the same whole probe: a timestep embedding does, unless it is
        per token (Wan 2.2 TI2V: ``(B, tokens, 6, D)``, split with the tokens); a probe made from the tokens
        never."""
        if self.probe != "temb":
            return False
        return not (probe.dim() > 2 and probe.shape[1] == hidden.shape[-2])


def patch_grid(shape_attr_dims: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, ...]:
    """Token grid of a latent whose spatial dims are ``shape_attr_dims`` after patchifying by ``patch``."""
    return tuple(max(1, d // p) for d, p in zip(shape_attr_dims, patch))
