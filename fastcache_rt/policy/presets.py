"""A policy = a gate (when to compute) x a forecaster (what a skipped step gets) x a cache site. Presets carry the
published defaults (see README: Methods); any gate combines with any forecaster."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .forecasters import FORECASTERS, Chebyshev, FreqCa, Reuse, Taylor
from .gates import (
    GATES,
    EveryStep,
    FBCacheGate,
    FixedInterval,
    MagCacheGate,
    SpectralCacheGate,
    SpectrumSchedule,
    TeaCacheGate,
)

SITES = ("residual", "hidden", "output")


@dataclass(frozen=True)
class Policy:
    """gate x forecaster x site. ``site``: "residual" caches the whole-stack residual (output image tokens minus the
    tokens entering the cached blocks; FreqCa's CRF idea), "hidden" the image tokens after the last block, "output"
    the model's output (after its output head, which a skipped step then skips too; the smallest tensor: on FLUX 64
    channels instead of 3072). Either way one tensor per stream: the cache does not grow with depth."""

    gate: object
    forecaster: object = Reuse()
    site: str = "residual"
    name: str = "custom"

    def __post_init__(self):
        if not callable(getattr(self.gate, "make_state", None)) or isinstance(self.gate, type):
            raise ValueError(f"Policy.gate: must be a gate instance such as {', '.join(c.__name__ + '()' for c in GATES.values())}; "
                             f"got {self.gate!r}")
        if not callable(getattr(self.forecaster, "make_state", None)) or isinstance(self.forecaster, type) or \
                type(self.forecaster) in GATES.values():
            raise ValueError(f"Policy.forecaster: must be a forecaster instance such as "
                             f"{', '.join(c.__name__ + '()' for c in FORECASTERS.values())}; got {self.forecaster!r}")
        if not isinstance(self.site, str) or self.site not in SITES:
            raise ValueError(f"Policy.site: must be one of {SITES}, got {self.site!r}")
        if isinstance(self.gate, FBCacheGate) and self.site != "residual":
            raise ValueError("Policy.site: the FBCache gate runs the first blocks every step; use site='residual'")

    def check_ready(self) -> None:
        """What can only be checked once the policy is about to run (e.g. MagCache's calibrated ratios)."""
        for part in (self.gate, self.forecaster):
            if callable(getattr(part, "check_ready", None)):
                part.check_ready()

    def with_overrides(self, **overrides) -> "Policy":
        """Change fields by name: a gate field, a forecaster field, or gate=/forecaster=/site=."""
        gate, fc, site = self.gate, self.forecaster, self.site
        if "gate" in overrides:
            gate = overrides.pop("gate")
        if "forecaster" in overrides:
            fc = overrides.pop("forecaster")
        if "site" in overrides:
            site = overrides.pop("site")
        # a swapped part is checked here, before its fields are read: the error names the field
        Policy(gate=gate, forecaster=fc, site=site, name=self.name)
        g_fields = {f.name for f in dataclasses.fields(gate)}
        f_fields = {f.name for f in dataclasses.fields(fc)}
        g_new, f_new = {}, {}
        for k, v in overrides.items():
            if k in g_fields:
                g_new[k] = v
            elif k in f_fields:
                f_new[k] = v
            else:
                raise ValueError(
                    f"{k}: not a field of {type(gate).__name__} ({', '.join(sorted(g_fields)) or 'none'}) nor of "
                    f"{type(fc).__name__} ({', '.join(sorted(f_fields)) or 'none'})"
                )
        if g_new:
            gate = dataclasses.replace(gate, **g_new)
        if f_new:
            fc = dataclasses.replace(fc, **f_new)
        return Policy(gate=gate, forecaster=fc, site=site, name=self.name)


PRESETS: dict[str, Policy] = {
    "none": Policy(EveryStep(), Reuse(), "residual", "none"),
    "fora": Policy(FixedInterval(interval=3, warmup=1), Reuse(), "residual", "fora"),
    "teacache": Policy(TeaCacheGate(), Reuse(), "residual", "teacache"),
    "spectralcache": Policy(SpectralCacheGate(), Reuse(), "residual", "spectralcache"),
    "fbcache": Policy(FBCacheGate(), Reuse(), "residual", "fbcache"),
    "magcache": Policy(MagCacheGate(), Reuse(), "residual", "magcache"),
    "taylorseer": Policy(FixedInterval(interval=6, warmup=3), Taylor(order=1), "hidden", "taylorseer"),
    "freqca": Policy(FixedInterval(interval=6, warmup=3), FreqCa(), "hidden", "freqca"),
    # blend 0.5: the authors' run scripts (hanjq17/Spectrum scripts/run_mp_image.sh, w=0.5); the code default is 1.0
    "spectrum": Policy(SpectrumSchedule(), Chebyshev(blend=0.5), "hidden", "spectrum"),
}


def resolve_policy(policy: str | Policy, **overrides) -> Policy:
    if isinstance(policy, Policy):
        base = policy
    elif isinstance(policy, str):
        key = policy.strip().lower()
        if key not in PRESETS:
            raise ValueError(f"policy: unknown preset {policy!r}; choose one of {', '.join(PRESETS)} or pass a Policy")
        base = PRESETS[key]
    else:
        raise TypeError(f"policy: expected a preset name or a Policy, got {type(policy).__name__}")
    return base.with_overrides(**overrides) if overrides else base
