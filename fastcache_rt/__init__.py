"""fastcache_rt: kernel-first feature caching and forecasting for diffusion transformers.

    import fastcache_rt
    fastcache_rt.enable(pipe, "spectrum")     # or "teacache", "spectralcache", "freqca", "taylorseer", ...
    image = pipe(prompt, num_inference_steps=50).images[0]
    print(fastcache_rt.stats(pipe))
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402
from .api import Handle, cached, disable, enable, stats  # noqa: E402
from .calibration import calibrate, load_profile, merge_profiles  # noqa: E402
from .policy import PRESETS, Policy, load_policy, save_policy  # noqa: E402
from .tuning import tune  # noqa: E402

__all__ = ["PRESETS", "Handle", "Policy", "__version__", "cached", "calibrate", "disable", "enable", "load_policy",
           "load_profile", "merge_profiles", "ops", "save_policy", "stats", "tune"]
