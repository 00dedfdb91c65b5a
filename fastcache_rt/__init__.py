"""fastcache_rt: kernel-first feature caching and forecasting for diffusion transformers.

    import fastcache_rt
    fastcache_rt.enable(pipe, "spectrum")     # or "teacache", "spectralcache", "freqca", "taylorseer", ...
    image = pipe(prompt, num_inference_steps=50).images[0]
    print(fastcache_rt.stats(pipe))

``import fastcache_rt`` and ``fastcache_rt.ops`` / ``fastcache_rt.policy`` need only torch and numpy; the names that
work on diffusers models (``enable``, ``calibrate``, ``tune``, ...) import diffusers when first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

from . import ops, policy  # noqa: E402
from .policy import PRESETS, Policy, load_policy, save_policy  # noqa: E402

# name -> the module that defines it, imported on first use (it imports diffusers)
_LAZY = {
    "Handle": "api", "cached": "api", "disable": "api", "enable": "api", "stats": "api",
    "calibrate": "calibration",
    "load_profile": "profiles", "merge_profiles": "profiles",
    "tune": "tuning",
}


# subpackages and modules reached as attributes (``fastcache_rt.families.register_family``), imported on first use
_SUBMODULES = ("api", "bench", "calibration", "cli", "controller", "families", "generation", "hooks",
               "integrations", "models", "parallel", "profiles", "stream", "testing", "tuning")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastcache_rt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["PRESETS", "Handle", "Policy", "__version__", "cached", "calibrate", "disable", "enable", "load_policy",
           "load_profile", "merge_profiles", "ops", "policy", "save_policy", "stats", "tune"]
