"""Every family's tiny model (``TINY``: family name -> how to build it, its inputs and its timestep) and a plain Euler
loop that drives any of them the way a pipeline does. The family tests (``tests/families/``) and
``benchmarks/bench_families.py`` run on these."""

from __future__ import annotations

import torch

from fastcache_rt.testing.tiny_common import Tiny
from fastcache_rt.testing.tiny_dit import TINY as _DIT
from fastcache_rt.testing.tiny_image import TINY as _IMAGE
from fastcache_rt.testing.tiny_image import TINY_OTHER_TIMESTEP_ARG
from fastcache_rt.testing.tiny_video import TINY as _VIDEO

TINY: dict[str, Tiny] = {**_IMAGE, **{k: v for k, (_, v) in TINY_OTHER_TIMESTEP_ARG.items()}, **_VIDEO, **_DIT}
# the families the issue names for eager-vs-compiled agreement
COMPILED = ("flux", "sd3", "wan", "qwenimage", "hunyuanvideo")

_MODELS: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    """The family's tiny model, built once per process and shared (callers must leave it as they found it)."""
    if name not in _MODELS:
        _MODELS[name] = TINY[name].build()
    return _MODELS[name]


def _update(x, out, dt: float):
    if isinstance(x, (list, tuple)):
        return [_update(a, b, dt) for a, b in zip(x, out)]
    if out.shape != x.shape:  # learned variance: the first half of the channels is the prediction
        out = out[:, : x.shape[1]]
    return x - dt * out


def call(m, tiny: Tiny, kw: dict, t: float, batch: int):
    return m(**kw, **{tiny.timestep_arg: tiny.timestep(t, batch)})[0]


@torch.no_grad()
def denoise(m, name: str, steps: int, *, seed: int = 0, batch: int = 1, size: int = 0, hook=None) -> torch.Tensor:
    """Euler steps from t = 1 to 1/steps; returns the final latent (flattened to one tensor)."""
    tiny = TINY[name]
    kw = tiny.inputs(seed, batch, size)
    for s in range(steps):
        out = call(m, tiny, kw, 1.0 - s / steps, batch)
        if hook is not None:
            hook(s, out)
        kw[tiny.latent] = _update(kw[tiny.latent], out, 1.0 / steps)
    x = kw[tiny.latent]
    return torch.cat([a.flatten() for a in x]) if isinstance(x, (list, tuple)) else x
