"""fastcache_rt in the shape of diffusers' cache methods: a config dataclass and ``apply_fastcache(module, config)``,
as ``apply_first_block_cache(module, FirstBlockCacheConfig(...))``, and ``remove_fastcache(module)``.

    from fastcache_rt.integrations.diffusers import FastCacheConfig, apply_fastcache, remove_fastcache

    apply_fastcache(pipe.transformer, FastCacheConfig("teacache", num_steps=28, overrides={"threshold": 0.4}))
    image = pipe(prompt, num_inference_steps=28).images[0]
    remove_fastcache(pipe.transformer)           # the transformer's forward exactly as before

A thin layer over ``fastcache_rt.enable`` / ``fastcache_rt.disable``: ``apply_fastcache(m, FastCacheConfig(p,
num_steps=S, profile=f, overrides=kw))`` is ``fastcache_rt.enable(m, p, num_steps=S, profile=f, **kw)``, the same
hooks on diffusers' hook system, the same decisions and bitwise the same images. The pipeline's
``cache_context("cond")`` / ``("uncond")`` keeps one cache per CFG branch, and the end of every pipeline call
(diffusers resets the stateful hooks of its denoisers there) starts the next generation clean, exactly as for
diffusers' own hooks.

The transformer alone is not told how many steps the pipeline runs (the pipeline tells its scheduler), so on
``pipe.transformer`` the config needs ``num_steps``, as diffusers' ``MagCacheConfig`` needs
``num_inference_steps``: pass the ``num_inference_steps`` you call the pipeline with (another count for one
generation: ``handle.new_generation(S)`` before the call). Applied to the pipeline itself (``apply_fastcache(pipe,
config)``), fastcache_rt follows the pipeline's scheduler and ``num_steps`` is not needed.

diffusers' ``ModelMixin.enable_cache`` accepts only diffusers' own config classes; use ``apply_fastcache``. A
diffusers cache already enabled on the module (``enable_cache``) must be disabled first (``disable_cache``): two
caching methods on one transformer do not compose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import api
from .._targets import split
from ..policy import Policy, resolve_policy

__all__ = ["FastCacheConfig", "apply_fastcache", "remove_fastcache"]

# enable()'s own keyword arguments: given as config fields, never inside ``overrides``
_ENABLE_ARGS = ("policy", "num_steps", "grid", "group", "profile")


@dataclass
class FastCacheConfig:
    r"""Configuration of fastcache_rt for ``apply_fastcache``.

    Args:
        policy (``str``, ``os.PathLike`` or ``fastcache_rt.Policy``, defaults to ``"spectrum"``):
            a preset name (``fastcache_rt.PRESETS``: ``"spectrum"``, ``"teacache"``, ``"fbcache"``, ...), a policy
            file (``.json``, written by ``fastcache-rt tune`` or ``fastcache_rt.save_policy``) or a ``Policy``.
        num_steps (``int``, *optional*):
            denoising steps per generation; needed when applied to a transformer (``pipe.transformer``), not when
            applied to a pipeline, whose scheduler announces them.
        profile (``str``, ``os.PathLike`` or ``dict``, *optional*):
            a calibration profile made on this model (``fastcache-rt calibrate``): the TeaCache / SpectralCache
            gates take its polynomial, MagCache its ratios.
        overrides (``dict``, defaults to ``{}``):
            fields of the policy's gate or forecaster (e.g. ``{"threshold": 0.4}``, ``{"alpha": 3.0}``), or
            ``gate`` / ``forecaster`` / ``site``.
        grid (``tuple[int, ...]``, *optional*):
            (H, W) or (F, H, W) of the image-token grid, for FreqCa where the model family cannot tell it.
        group (*optional*):
            the ``torch.distributed`` process group (or 1-D ``DeviceMesh``) the tokens are split over, when not split
            by diffusers' ``enable_parallelism`` (whose group is found by itself).

    Values are checked here (``TypeError`` / ``ValueError`` naming the field): the policy is resolved with its
    overrides, so an unknown preset or gate field fails at construction, not at the first denoising step.
    """

    policy: str | os.PathLike | Policy = "spectrum"
    num_steps: int | None = None
    profile: str | os.PathLike | dict | None = None
    overrides: dict = field(default_factory=dict)
    grid: tuple[int, ...] | None = None
    group: Any = None

    def __post_init__(self):
        if isinstance(self.policy, os.PathLike):
            self.policy = os.fspath(self.policy)
        if not isinstance(self.policy, (str, Policy)):
            raise TypeError(f"FastCacheConfig.policy: expected a preset name, a policy file path or a "
                            f"fastcache_rt.Policy, got {type(self.policy).__name__}")
        if self.num_steps is not None and (isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int)
                                           or self.num_steps < 1):
            raise ValueError(f"FastCacheConfig.num_steps: must be an int >= 1 (or None), got {self.num_steps!r}")
        if self.profile is not None and not isinstance(self.profile, (str, os.PathLike, dict)):
            raise TypeError(f"FastCacheConfig.profile: expected a path or a profile dict, got "
                            f"{type(self.profile).__name__}")
        if not isinstance(self.overrides, dict):
            raise TypeError(f"FastCacheConfig.overrides: expected a dict of gate/forecaster fields, got "
                            f"{type(self.overrides).__name__}")
        for key in self.overrides:
            if not isinstance(key, str):
                raise TypeError(f"FastCacheConfig.overrides: keys are field names (str), got {key!r}")
            if key in _ENABLE_ARGS:
                raise ValueError(f"FastCacheConfig.overrides: {key!r} is a field of FastCacheConfig; set "
                                 f"FastCacheConfig({key}=...) instead")
        for where, check in (("", lambda: api._check_grid(self.grid)), ("", lambda: resolve_policy(self.policy)),
                             (".overrides", lambda: resolve_policy(self.policy, **self.overrides))):
            try:
                check()
            except (TypeError, ValueError) as e:
                raise type(e)(f"FastCacheConfig{where}: {e}") from None

    def resolved_policy(self) -> Policy:
        """The ``Policy`` the config stands for (preset or file with the overrides applied; a profile is applied per
        transformer by ``apply_fastcache``)."""
        return resolve_policy(self.policy, **self.overrides)


def apply_fastcache(module, config: FastCacheConfig) -> api.Handle:
    r"""Apply fastcache_rt to ``module``: a transformer of a supported family (typically ``pipe.transformer``, also a
    ``torch.compile``d one) or a diffusers pipeline (its ``transformer``, and ``transformer_2`` where there is one).

    The same as ``fastcache_rt.enable(module, config.policy, num_steps=config.num_steps, grid=config.grid,
    group=config.group, profile=config.profile, **config.overrides)``; applying again replaces the earlier
    fastcache_rt caching. Returns the ``fastcache_rt.Handle`` (``handle.stats()``, ``handle.new_generation(S)``);
    ``fastcache_rt.stats(module)`` reads the same.

    Example:
        ```python
        >>> from fastcache_rt.integrations.diffusers import FastCacheConfig, apply_fastcache, remove_fastcache
        >>> apply_fastcache(pipe.transformer, FastCacheConfig("fbcache", num_steps=28, overrides={"threshold": 0.1}))
        >>> image = pipe("a photo of a cat", num_inference_steps=28).images[0]
        >>> remove_fastcache(pipe.transformer)
        ```
    """
    if not isinstance(config, FastCacheConfig):
        hint = (" (diffusers' own cache configs go to module.enable_cache(config))"
                if type(config).__module__.startswith("diffusers") else "")
        raise TypeError(f"config: expected a fastcache_rt FastCacheConfig, got {type(config).__name__}{hint}")
    if not isinstance(module, torch.nn.Module) and not isinstance(getattr(module, "transformer", None),
                                                                   torch.nn.Module):
        raise TypeError(f"module: expected a transformer module or a diffusers pipeline, got {type(module).__name__}")
    for m in split(module)[1].values():
        other = getattr(m, "_cache_config", None)
        if other is not None:
            raise ValueError(f"module: diffusers' {type(other).__name__} caching is enabled on "
                             f"{type(m).__name__}; call its disable_cache() first (two caching "
                             f"methods on one transformer do not compose)")
    if isinstance(module, torch.nn.Module) and config.num_steps is None:
        raise ValueError("FastCacheConfig.num_steps: needed when applied to a transformer (the pipeline announces its "
                         "step count only to its scheduler): pass the num_inference_steps you call the pipeline with, "
                         "or apply to the pipeline itself")
    return api.enable(module, config.policy, num_steps=config.num_steps, grid=config.grid, group=config.group,
                      profile=config.profile, **config.overrides)


def remove_fastcache(module) -> None:
    r"""Remove what ``apply_fastcache`` applied: the module's forward (and a pipeline's scheduler methods) exactly as
    before. ``ValueError`` if fastcache_rt is not applied to ``module``. The same as ``fastcache_rt.disable``."""
    try:
        handle = api._handle(module)
    except ValueError:
        raise ValueError(f"module: fastcache_rt is not applied to this {type(module).__name__} "
                         f"(apply_fastcache)") from None
    handle.disable()
