"""Policies: composable gates x forecasters, validated dataclasses, and the presets."""

from .forecasters import Chebyshev, FreqCa, Reuse, Taylor
from .gates import (
    FLUX_TEACACHE_COEFFS,
    EveryStep,
    FBCacheGate,
    FixedInterval,
    MagCacheGate,
    SpectralCacheGate,
    SpectrumSchedule,
    TeaCacheGate,
)
from .presets import (
    PRESETS,
    Policy,
    load_policy,
    policy_from_dict,
    policy_to_dict,
    resolve_policy,
    save_policy,
)

__all__ = [
    "FLUX_TEACACHE_COEFFS", "PRESETS", "Chebyshev", "EveryStep", "FBCacheGate", "FixedInterval", "FreqCa",
    "MagCacheGate", "Policy", "Reuse", "SpectralCacheGate", "SpectrumSchedule", "Taylor", "TeaCacheGate",
    "load_policy", "policy_from_dict", "policy_to_dict", "resolve_policy", "save_policy",
]
