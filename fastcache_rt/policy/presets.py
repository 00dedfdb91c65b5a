"""A policy = a gate (when to compute) x a forecaster (what a skipped step gets) x a cache site. Presets carry the
published defaults (see README: Methods); any gate combines with any forecaster."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ._validate import check, is_int
from .caps import CAP_FIELDS, Caps
from .forecasters import FORECASTERS, Chebyshev, FreqCa, Reuse, Taylor
from .gates import (
    GATES,
    ErrorControl,
    EveryStep,
    FBCacheGate,
    FixedInterval,
    MagCacheGate,
    SpectralCacheGate,
    SpectrumSchedule,
    TeaCacheGate,
    first_blocks,
    probes,
)

SITES = ("residual", "hidden", "output")
BLOCK_FIELDS = ("compute_first", "compute_last")


@dataclass(frozen=True)
class Policy:
    """gate x forecaster x site. ``site``: "residual" caches the whole-stack residual (output image tokens minus the
    tokens entering the cached blocks; FreqCa's CRF idea), "hidden" the image tokens after the last block, "output"
    the model's output (after its output head, which a skipped step then skips too; the smallest tensor: on FLUX 64
    channels instead of 3072). Either way one tensor per stream: the cache does not grow with depth. ``caps``
    (``Caps``): limits that hold whatever the gate (at most so many cached steps, in all or in a row, a computation
    mask, a refresh every k steps); they only add computed steps. ``compute_first`` / ``compute_last``: blocks
    that run on every step before / after the cached span (cache-dit's DBCache ``Fn_compute_blocks`` /
    ``Bn_compute_blocks``), counted over the family's block lists in execution order; a skipped step skips only the
    span between them, whose residual of the text tokens is cached too where blocks run after it. A gate that
    probes the first blocks (FBCache's ``blocks``) runs at least that many: the larger of the two counts."""

    gate: object
    forecaster: object = Reuse()
    site: str = "residual"
    name: str = "custom"
    caps: Caps = Caps()
    compute_first: int = 0
    compute_last: int = 0

    def __post_init__(self):
        if self.caps is None:
            object.__setattr__(self, "caps", Caps())
        for f in BLOCK_FIELDS:
            check(self, f, is_int(getattr(self, f)) and getattr(self, f) >= 0, "an int >= 0 (blocks)")
        if not isinstance(self.caps, Caps):
            raise ValueError(f"Policy.caps: must be a fastcache_rt.policy.Caps (e.g. Caps(max_consecutive=3)), "
                             f"got {self.caps!r}")
        if not callable(getattr(self.gate, "make_state", None)) or isinstance(self.gate, type):
            raise ValueError(f"Policy.gate: must be a gate instance such as {', '.join(c.__name__ + '()' for c in GATES.values())}; "
                             f"got {self.gate!r}")
        if not callable(getattr(self.forecaster, "make_state", None)) or isinstance(self.forecaster, type) or \
                type(self.forecaster) in GATES.values():
            raise ValueError(f"Policy.forecaster: must be a forecaster instance such as "
                             f"{', '.join(c.__name__ + '()' for c in FORECASTERS.values())}; got {self.forecaster!r}")
        if not isinstance(self.site, str) or self.site not in SITES:
            raise ValueError(f"Policy.site: must be one of {SITES}, got {self.site!r}")
        if "first_blocks" in probes(self.gate) and self.site != "residual":
            raise ValueError(f"Policy.site: the {type(self.gate).__name__} gate runs the first blocks every step; use "
                             f"site='residual'")
        if self.compute_last and self.site == "output":
            raise ValueError("Policy.site: 'output' caches the model's output, after every block; with compute_last "
                             "blocks running after the cached span use site='residual' or 'hidden'")

    def __repr__(self) -> str:  # caps and block counts only where set (a policy without them reads as before them)
        caps = f", caps={self.caps!r}" if self.caps.active else ""
        blocks = "".join(f", {f}={getattr(self, f)}" for f in BLOCK_FIELDS if getattr(self, f))
        return (f"Policy(gate={self.gate!r}, forecaster={self.forecaster!r}, site={self.site!r}, "
                f"name={self.name!r}{caps}{blocks})")

    def blocks(self) -> tuple[int, int]:
        """(blocks run before the cached span, blocks run after it) on every step."""
        return max(first_blocks(self.gate), self.compute_first), self.compute_last

    def check_ready(self) -> None:
        """What can only be checked once the policy is about to run (e.g. MagCache's calibrated ratios)."""
        for part in (self.gate, self.forecaster):
            if callable(getattr(part, "check_ready", None)):
                part.check_ready()

    def with_overrides(self, **overrides) -> "Policy":
        """Change fields by name: a gate field, a forecaster field, a cap (``max_cached_steps``,
        ``max_consecutive``, ``mask``, ``refresh``, ``warmup``: a name that is a field of the gate or the forecaster
        goes there first), or gate=/forecaster=/site=/caps=/compute_first=/compute_last=."""
        gate, fc, site, caps = self.gate, self.forecaster, self.site, self.caps
        blocks = {f: overrides.pop(f, getattr(self, f)) for f in BLOCK_FIELDS}
        if "gate" in overrides:
            gate = overrides.pop("gate")
        if "forecaster" in overrides:
            fc = overrides.pop("forecaster")
        if "site" in overrides:
            site = overrides.pop("site")
        if "caps" in overrides:
            caps = overrides.pop("caps")
        # a swapped part is checked here, before its fields are read: the error names the field
        Policy(gate=gate, forecaster=fc, site=site, name=self.name, caps=caps, **blocks)
        caps = caps if caps is not None else Caps()
        g_fields = {f.name for f in dataclasses.fields(gate)}
        f_fields = {f.name for f in dataclasses.fields(fc)}
        g_new, f_new, c_new = {}, {}, {}
        for k, v in overrides.items():
            if k in g_fields:
                g_new[k] = v
            elif k in f_fields:
                f_new[k] = v
            elif k in CAP_FIELDS:
                c_new[k] = v
            else:
                raise ValueError(
                    f"{k}: not a field of {type(gate).__name__} ({', '.join(sorted(g_fields)) or 'none'}) nor of "
                    f"{type(fc).__name__} ({', '.join(sorted(f_fields)) or 'none'}) nor a cap "
                    f"({', '.join(CAP_FIELDS)})"
                )
        if g_new:
            gate = dataclasses.replace(gate, **g_new)
        if f_new:
            fc = dataclasses.replace(fc, **f_new)
        if c_new:
            caps = dataclasses.replace(caps, **c_new)
        return Policy(gate=gate, forecaster=fc, site=site, name=self.name, caps=caps, **blocks)


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
    "adaptive": Policy(ErrorControl(), Taylor(order=1), "hidden", "adaptive"),
    # cache-dit's DBCache: FBCache's gate over the first n blocks' residual (threshold 0.08, 8 warm-up steps: its
    # DBCacheConfig defaults), the last m blocks run on every step too; "dbcache" is F1B0, "dbcache-f<n>b<m>" any
    # other (cache-dit's own default is F8B0: "dbcache-f8b0")
    "dbcache": Policy(FBCacheGate(threshold=0.08, blocks=1), Reuse(), "residual", "dbcache", Caps(warmup=8)),
}


@dataclass(frozen=True)
class Sweep:
    """A preset's settings in the benchmark (``fastcache-rt bench``): ``quick`` and ``full`` lists of overrides
    (fields of its gate or forecaster, or ``site``), and the setting its picture-grid row shows (the published
    default where the sweep has it)."""

    quick: tuple
    full: tuple
    shown: dict


def _sweep(quick, full, shown) -> Sweep:
    return Sweep(tuple(quick), tuple(full), shown)


# The benchmark's sweep of each preset's speed knob, in table order. Thresholds of the signal gates are in the units
# of each gate's signal and were chosen on the shipped model to spread NFE over roughly 7-36 of 50 steps (the FLUX
# TeaCache polynomial applied to this model's modulated-input change; the first block's relative residual change,
# where the preset's 0.05 skips nothing here; the accumulated magnitude-ratio error). The fixed-interval settings
# with 3 warm-up steps and one full step in 4 or 6, and Spectrum's alpha 0.75 and 3.0, are the two budgets of the
# Spectrum paper at 50 steps (14 and 10 full steps).
_I4, _I6 = dict(interval=4, warmup=3), dict(interval=6, warmup=3)
SWEEPS: dict[str, Sweep] = {
    "fora": _sweep([_I4, _I6], [dict(interval=2, warmup=1), dict(interval=3, warmup=1), _I4, _I6], _I4),
    "teacache": _sweep([dict(threshold=0.3), dict(threshold=0.6)],
                       [dict(threshold=t) for t in (0.3, 0.45, 0.6, 0.8, 1.0, 1.5)], dict(threshold=0.6)),
    "spectralcache": _sweep([dict(threshold=0.3), dict(threshold=0.6)],
                            [dict(threshold=t) for t in (0.2, 0.3, 0.45, 0.6, 1.0)], dict(threshold=0.6)),
    "fbcache": _sweep([dict(threshold=0.1), dict(threshold=0.2)],
                      [dict(threshold=t) for t in (0.08, 0.1, 0.15, 0.2, 0.3)], dict(threshold=0.1)),
    "magcache": _sweep([dict(threshold=0.06), dict(threshold=0.24)],
                       [dict(threshold=t) for t in (0.03, 0.06, 0.12, 0.24, 0.5)], dict(threshold=0.24)),
    "taylorseer": _sweep([_I4, _I6], [dict(interval=3, warmup=3), _I4, _I6, dict(interval=8, warmup=3),
                                      dict(_I4, site="output"), dict(_I6, site="output")], _I6),
    "freqca": _sweep([_I4, _I6], [dict(interval=3, warmup=3), _I4, _I6, dict(interval=8, warmup=3)], _I6),
    "spectrum": _sweep([dict(alpha=0.75), dict(alpha=3.0)],
                       [dict(alpha=0.25), dict(alpha=0.75), dict(alpha=1.5), dict(alpha=3.0),
                        dict(alpha=0.75, site="output"), dict(alpha=3.0, site="output")], dict(alpha=0.75)),
    # error-controlled caching: the tolerance of the forecast's relative error (larger: faster); on the shipped model
    # at 50 steps tol 0.1 computes about 32 steps, 0.3 about 17, 0.5 about 15, 2.0 about 11
    # DBCache F1B0 and F1B1 (the last block runs on every step too), beside cache-dit's at the same thresholds
    "dbcache": _sweep([dict(threshold=0.1), dict(threshold=0.1, compute_last=1)],
                      [dict(threshold=t, compute_last=b) for b in (0, 1) for t in (0.1, 0.2, 0.3)],
                      dict(threshold=0.1)),
    "adaptive": _sweep([dict(tol=t) for t in (0.1, 0.3, 0.5)],
                       [dict(tol=t) for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0)], dict(tol=0.3)),
}


# ---------------------------------------------------------------------------------------------------------------
# policy files: {"format": "fastcache_rt.policy", "version": 1, "name", "site", "gate": {"type", fields},
# "forecaster": {"type", fields}, "caps": {set caps} (only where any is set; optional), "compute_first" /
# "compute_last" (only where not 0; optional)}: what
# ``fastcache-rt tune`` writes and ``enable(pipe, "file.json")`` reads
# ---------------------------------------------------------------------------------------------------------------
POLICY_FORMAT = "fastcache_rt.policy"
POLICY_VERSION = 1


def _part(obj, registry) -> dict:
    out = {"type": registry.name_of(obj)}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def policy_to_dict(policy: Policy) -> dict:
    """The policy as plain JSON data (every field of its gate and forecaster; the caps that are set, if any)."""
    out = {"format": POLICY_FORMAT, "version": POLICY_VERSION, "name": policy.name, "site": policy.site,
           "gate": _part(policy.gate, GATES), "forecaster": _part(policy.forecaster, FORECASTERS)}
    if policy.caps.active:
        out["caps"] = policy.caps.to_dict()
    for f in BLOCK_FIELDS:
        if getattr(policy, f):
            out[f] = getattr(policy, f)
    return out


def policy_from_dict(data: dict, source: str = "policy") -> Policy:
    """The inverse of ``policy_to_dict``; every field is validated as if passed by hand (ValueError naming it)."""
    if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
        raise ValueError(f"{source}: not a fastcache_rt policy file (no \"format\": \"{POLICY_FORMAT}\")")
    if data.get("version") != POLICY_VERSION:
        raise ValueError(f"{source}: version {data.get('version')!r}; this fastcache_rt reads {POLICY_VERSION}")
    parts = []
    for key, table in (("gate", GATES), ("forecaster", FORECASTERS)):
        spec = data.get(key)
        if not isinstance(spec, dict):
            raise ValueError(f"{source}: {key} must be an object {{\"type\": ..., fields}}, got {spec!r}")
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind not in table:
            raise ValueError(f"{source}: {key} type {kind!r}; one of {', '.join(table)}")
        fields = {f.name for f in dataclasses.fields(table[kind])}
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ValueError(f"{source}: {key} {kind} has no field {', '.join(unknown)}")
        try:
            parts.append(table[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}))
        except TypeError as e:
            raise ValueError(f"{source}: {key} {kind}: {e}") from None
    caps = Caps()
    if data.get("caps") is not None:
        caps = Caps.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in data["caps"].items()}
                              if isinstance(data["caps"], dict) else data["caps"], source)
    return Policy(parts[0], parts[1], data.get("site", "residual"), str(data.get("name", "custom")), caps,
                  **{f: data.get(f, 0) for f in BLOCK_FIELDS})


def save_policy(policy: Policy, path) -> None:
    import json
    from pathlib import Path

    from .._files import write_atomic

    write_atomic(Path(path), (json.dumps(policy_to_dict(policy), indent=1) + "\n").encode())


def load_policy(path) -> Policy:
    import json
    from pathlib import Path

    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"policy: cannot read {path} ({e})") from None
    return policy_from_dict(data, f"policy {path}")


def _is_policy_file(policy: str) -> bool:
    import os

    return policy.strip().lower().endswith(".json") or os.path.isfile(policy)


_DBCACHE = re.compile(r"dbcache-f(\d+)b(\d+)")


def dbcache(first: int, last: int) -> Policy:
    """The "dbcache" preset computing the first ``first`` and the last ``last`` blocks on every step (cache-dit's
    DBCache F<first>B<last>; the probe is the first blocks' residual, so ``first`` >= 1)."""
    base = PRESETS["dbcache"]
    pol = base.with_overrides(blocks=first, compute_last=last)
    return dataclasses.replace(pol, name=f"dbcache-f{first}b{last}") if (first, last) != (1, 0) else pol


def resolve_policy(policy: str | Policy, **overrides) -> Policy:
    """A preset name (also "dbcache-f<n>b<m>"), a policy file (``.json``, written by ``fastcache-rt tune`` or
    ``save_policy``) or a Policy, with ``overrides`` applied."""
    key = policy.strip().lower() if isinstance(policy, str) else None
    if isinstance(policy, Policy):
        base = policy
    elif key in PRESETS:
        base = PRESETS[key]
    elif key is not None and _DBCACHE.fullmatch(key):
        base = dbcache(*map(int, _DBCACHE.fullmatch(key).groups()))
    elif isinstance(policy, str) and _is_policy_file(policy):
        base = load_policy(policy)
    elif isinstance(policy, str):
        raise ValueError(f"policy: unknown preset {policy!r}; choose one of {', '.join(PRESETS)} (or "
                         f"dbcache-f<n>b<m>), a policy .json file or pass a Policy")
    else:
        raise TypeError(f"policy: expected a preset name or a Policy, got {type(policy).__name__}")
    return base.with_overrides(**overrides) if overrides else base
