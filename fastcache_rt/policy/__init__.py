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
from .presets import PRESETS, Policy, resolve_policy

__all__ = [
    "FLUX_TEACACHE_COEFFS", "PRESETS", "Chebyshev", "EveryStep", "FBCacheGate", "FixedInterval", "FreqCa",
    "MagCacheGate", "Policy", "Reuse", "SpectralCacheGate", "SpectrumSchedule", "Taylor", "TeaCacheGate",
    "resolve_policy",
]
