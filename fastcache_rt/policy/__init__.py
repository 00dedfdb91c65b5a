"""Policies: composable gates x forecasters (and the caps that hold under any of them), validated dataclasses, and
the presets."""

from .caps import MASK_PRESETS, Caps, steps_mask
from .forecasters import FORECASTERS, Chebyshev, Forecaster, FreqCa, Reuse, Taylor, register_forecaster
from .gates import (
    FLUX_TEACACHE_COEFFS,
    GATES,
    EveryStep,
    Gate,
    ScheduleState,
    SearchSpace,
    SignalState,
    FBCacheGate,
    FixedInterval,
    MagCacheGate,
    SpectralCacheGate,
    SpectrumSchedule,
    TeaCacheGate,
    register_gate,
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
from .spec import StreamSpec, masked, masked_write_

__all__ = [
    "FLUX_TEACACHE_COEFFS", "FORECASTERS", "GATES", "MASK_PRESETS", "PRESETS", "Caps", "Chebyshev", "EveryStep",
    "FBCacheGate", "FixedInterval", "Forecaster", "FreqCa", "Gate", "MagCacheGate", "Policy", "Reuse", "ScheduleState",
    "SearchSpace", "SignalState", "SpectralCacheGate", "SpectrumSchedule", "StreamSpec", "Taylor", "TeaCacheGate",
    "load_policy", "masked", "masked_write_", "policy_from_dict", "policy_to_dict", "register_forecaster",
    "register_gate", "resolve_policy", "save_policy", "steps_mask",
]
