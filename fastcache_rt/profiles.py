"""Calibration profiles as data, below the API: what a profile is made for (the pipeline's and transformers'
identity), fitting it from its runs' raw measurements, loading, saving, merging and checking it, and its picture.
``fastcache_rt.calibrate`` (``calibration.py``, above the API) produces the runs; ``enable(..., profile=)`` and the
tuner read the fit through each gate's ``from_profile``.

The fit of one transformer:
- TeaCache: ``numpy.polyfit(input_change, output_change, 4)`` over every step after the first of every run (the
  authors' recipe: the relative L1 change of the modulated input against that of the model's output), with its
  R^2. A polynomial that reaches 0 or falls within four times the largest measured change would let a step that
  changes that much be skipped: the highest degree (4, 3, 2, 1) that does neither is kept, else degree 4 with a
  warning at ``enable``.
- MagCache: the per-step residual-norm ratios averaged over the runs.
- FBCache: the first block's relative residual change per step (mean and spread), to choose a threshold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from pathlib import Path

logger = logging.getLogger("fastcache_rt")

FORMAT = "fastcache_rt.profile"
VERSION = 1
DEGREE = 4  # TeaCache's polynomial
SIGNALS = ("input", "output", "first_block", "mag")


class ProfileError(ValueError):
    """A profile that cannot be used here (another model, another format, an incompatible merge)."""


# ---------------------------------------------------------------------------------------------------------------
# what a profile is made for
# ---------------------------------------------------------------------------------------------------------------
def config_hash(model) -> str:
    """A short hash of a diffusers model's config (its architecture), or "" for a module without one."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return ""
    items = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def identity(pipe) -> dict:
    from ._targets import split as _split

    _, models = _split(pipe)
    sched = getattr(pipe, "scheduler", None)
    return {
        "pipeline": type(pipe).__name__,
        "scheduler": type(sched).__name__ if sched is not None else None,
        "models": {name: {"class": type(m).__name__, "config_hash": config_hash(m)} for name, m in models.items()},
    }


# ---------------------------------------------------------------------------------------------------------------
# the profile
# ---------------------------------------------------------------------------------------------------------------
def new_profile(identity: dict, steps: int, call_kwargs: dict) -> dict:
    call = {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {"format": FORMAT, "version": VERSION, **identity, "steps": steps, "call": call, "runs": [],
            "fit": {}}


def refit(profile: dict) -> dict:
    """Fit every transformer's entry from the profile's runs (in place; returns ``profile["fit"]``)."""
    fit = {}
    for name in profile["models"]:
        series = [branch for run in profile["runs"] for branch in run["models"].get(name, {}).values()]
        fit[name] = _fit_model(series, profile["steps"])
    profile["fit"] = fit
    profile["prompts"] = len({r["prompt"] for r in profile["runs"]})
    profile["seeds"] = sorted({r["seed"] for r in profile["runs"]})
    return fit


def _pairs(series: list[dict]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for s in series:
        for x, y in zip(s.get("input", []), s.get("output", [])):
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                xs.append(x)
                ys.append(y)
    return xs, ys


def _per_step(series: list[dict], signal: str, steps: int) -> list[list[float]]:
    cols: list[list[float]] = [[] for _ in range(steps)]
    for s in series:
        for i, v in enumerate(s.get(signal, [])[:steps]):
            if v is not None and math.isfinite(v):
                cols[i].append(v)
    return cols


def _fit_model(series: list[dict], steps: int) -> dict:
    import numpy as np

    out: dict = {"series": len(series)}
    xs, ys = _pairs(series)
    if len(xs) > DEGREE:
        x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        fits = []
        for degree in range(DEGREE, 0, -1):  # TeaCache's degree 4 first
            with warnings.catch_warnings(record=True) as caught:  # numpy's RankWarning: reported in the fit
                warnings.simplefilter("always")
                coeffs = np.polyfit(x, y, degree)
            fits.append((degree, coeffs, caught, nonpositive_from(coeffs, float(x.min()), float(x.max())),
                         _turns_down(coeffs, float(x.max()))))
            if fits[-1][3] is None and not fits[-1][4]:
                break
        # the highest degree that stays positive and does not fall past the measured range, else degree 4 (warned)
        degree, coeffs, caught, bad_from, _ = fits[-1] if fits[-1][3] is None and not fits[-1][4] else fits[0]
        out["teacache"] = {"coeffs": [float(c) for c in coeffs], "degree": degree, "r2": _r2(coeffs, x, y),
                           "points": len(xs),
                           "input_range": [float(x.min()), float(x.max())], "nonpositive_from": bad_from,
                           "r2_degree4": _r2(fits[0][1], x, y),
                           "poorly_conditioned": any("conditioned" in str(w.message) for w in caught)}
    mag = _per_step(series, "mag", steps)
    if any(mag):  # steps this transformer never ran (the other expert's) get 1: no change
        out["magcache"] = {"ratios": [sum(c) / len(c) if c else 1.0 for c in mag],
                           "std": [_std(c) if c else None for c in mag], "steps_measured": sum(map(bool, mag))}
    fb = _per_step(series, "first_block", steps)
    if any(fb):
        out["fbcache"] = {"mean": [sum(c) / len(c) if c else None for c in fb],
                          "max": [max(c) if c else None for c in fb]}
    return out


def nonpositive_from(coeffs, x_min: float, x_max: float, reach: float = 4.0) -> float | None:
    """The smallest input change in [x_min, reach * x_max] at which the polynomial is <= 0, else None. A TeaCache
    gate accumulates the polynomial's value: where it is <= 0, a step with that much change adds nothing (or
    subtracts) and is skipped however large the change; a degree-4 fit can turn down just past the measured range.
    (Below the smallest measured change the value is near the intercept, close to 0 either way.)"""
    import numpy as np

    grid = np.linspace(x_min, reach * x_max, 1600)
    bad = np.nonzero(np.polyval(np.asarray(coeffs, dtype=np.float64), grid) <= 0)[0]
    return float(grid[bad[0]]) if bad.size else None


def _turns_down(coeffs, x_max: float, reach: float = 4.0) -> bool:
    """Whether the polynomial decreases somewhere between the largest measured change and ``reach`` times it."""
    import numpy as np

    vals = np.polyval(np.asarray(coeffs, dtype=np.float64), np.linspace(x_max, reach * x_max, 400))
    return bool(np.any(np.diff(vals) < 0))


def _r2(coeffs, x, y) -> float:
    import numpy as np

    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - np.polyval(coeffs, x)) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def _std(vals: list[float]) -> float:
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def save_profile(profile: dict, path) -> Path:
    from ._files import json_bytes, write_atomic

    path = Path(path)
    write_atomic(path, json_bytes(profile))
    return path


def load_profile(profile) -> dict:
    """A profile from a JSON file (or the dict itself), checked for its format."""
    if isinstance(profile, dict):
        data = profile
    elif isinstance(profile, (str, os.PathLike)):
        path = Path(profile).expanduser()
        if not path.is_file():
            raise ProfileError(f"profile: no such file: {profile}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProfileError(f"profile: {profile} is not a JSON file ({e})") from None
    else:
        raise ProfileError(f"profile: expected a path or a dict, got {type(profile).__name__}")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProfileError(f"profile: not a fastcache_rt profile (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("version") != VERSION:
        raise ProfileError(f"profile: version {data.get('version')!r}; this fastcache_rt reads version {VERSION}")
    for key in ("models", "runs", "steps"):
        if key not in data:
            raise ProfileError(f"profile: missing {key!r}")
    _check_structure(data)
    if "fit" not in data or not data["fit"]:
        refit(data)
    return data


def _check_structure(data: dict) -> None:
    """The fields a profile is read by, each of the type it must have (ProfileError naming the field)."""
    steps = data["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ProfileError(f"profile: steps must be an int >= 2, got {steps!r}")
    models = data["models"]
    if not isinstance(models, dict) or not models:
        raise ProfileError(f"profile: models must map each transformer's name to its class, got {models!r}")
    for name, entry in models.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
            raise ProfileError(f"profile: models.{name} must be {{\"class\": ..., \"config_hash\": ...}}, got {entry!r}")
    runs = data["runs"]
    if not isinstance(runs, list):
        raise ProfileError(f"profile: runs must be a list of runs, got {type(runs).__name__}")
    for i, run in enumerate(runs):
        ok = isinstance(run, dict) and isinstance(run.get("prompt"), str) and isinstance(run.get("seed"), int) \
            and isinstance(run.get("models"), dict)
        if not ok:
            raise ProfileError(f"profile: runs[{i}] must be {{\"prompt\": str, \"seed\": int, \"models\": {{...}}}}")
    fit = data.get("fit")
    if fit is not None and not isinstance(fit, dict):
        raise ProfileError(f"profile: fit must be a dict, got {type(fit).__name__}")


def check_compatible(a: dict, b: dict, what: str) -> None:
    for key in ("pipeline", "models", "steps"):
        if a.get(key) != b.get(key):
            raise ProfileError(f"{what}: made for another {key} ({a.get(key)!r}, here {b.get(key)!r})")
    if a.get("call") != b.get("call"):
        raise ProfileError(f"{what}: made with other call arguments ({a.get('call')!r}, here {b.get('call')!r})")


def merge_profiles(profiles) -> dict:
    """One profile from partial ones (shards of a calibration of one model): their runs together (a run present
    in several counts once), the fit recomputed."""
    loaded = [load_profile(p) for p in profiles]
    if not loaded:
        raise ProfileError("merge: no profiles")
    out = json.loads(json.dumps(loaded[0]))
    seen = {(r["prompt"], r["seed"]) for r in out["runs"]}
    for i, p in enumerate(loaded[1:], 1):
        check_compatible(p, out, f"merge: profile {i + 1}")
        for r in p["runs"]:
            if (r["prompt"], r["seed"]) not in seen:
                seen.add((r["prompt"], r["seed"]))
                out["runs"].append(r)
    refit(out)
    return out


def for_model(profile: dict, name: str, model) -> dict:
    """The fitted entry of transformer ``name`` (``model``), checked to be made for it."""
    entry = profile["models"].get(name)
    if entry is None:
        raise ProfileError(f"profile: has no entry for {name!r} (it has {', '.join(profile['models'])})")
    if entry["class"] != type(model).__name__:
        raise ProfileError(f"profile: made for {entry['class']}, not {type(model).__name__} ({name})")
    tc = profile["fit"].get(name, {}).get("teacache")
    if tc and "input_range" in tc:  # checked again here: a profile's fit may have been written by hand
        tc = dict(tc, nonpositive_from=nonpositive_from(tc["coeffs"], *tc["input_range"]))
    if tc and tc.get("nonpositive_from") is not None:
        logger.warning("fastcache_rt: the profile's TeaCache polynomial for %s is <= 0 from an input change of %.3g "
                       "(measured up to %.3g): a step changing that much accumulates nothing and is skipped; "
                       "calibrate on more prompts or steps that reach such changes", name, tc["nonpositive_from"],
                       tc["input_range"][1])
    h = config_hash(model)
    if entry.get("config_hash") and h and entry["config_hash"] != h:
        logger.warning("fastcache_rt: the profile was calibrated on a %s with another config (hash %s, this one "
                       "%s): its coefficients may not fit this model", entry["class"], entry["config_hash"], h)
    return profile["fit"].get(name, {})


# ---------------------------------------------------------------------------------------------------------------
# the picture
# ---------------------------------------------------------------------------------------------------------------
def fit_plot_png(profile: dict, reference: dict | None = None) -> bytes:
    """The TeaCache fit of every transformer: measured (input change, output change) points, the fitted
    polynomial and, where given, ``reference`` polynomials ({label: coeffs}, e.g. FLUX's) for comparison."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n in profile["models"] if "teacache" in profile["fit"].get(n, {})]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5.2 * max(1, len(names)), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        series = [b for r in profile["runs"] for b in r["models"].get(name, {}).values()]
        xs, ys = _pairs(series)
        tc = profile["fit"][name]["teacache"]
        ax.scatter(xs, ys, s=6, alpha=0.4, color="#4477aa", label=f"measured ({len(xs)} steps)")
        grid = np.linspace(min(xs), max(xs), 200)
        ax.plot(grid, np.polyval(tc["coeffs"], grid), color="#cc3311", lw=2,
                label=f"fitted degree {tc.get('degree', DEGREE)} (R² {tc['r2']:.3f})")
        for label, coeffs in (reference or {}).items():
            ax.plot(grid, np.polyval(coeffs, grid), color="#999999", lw=1.5, ls="--", label=label)
        ax.set_xlabel("relative L1 change of the probe (modulated input)")
        ax.set_ylabel("relative L1 change of the model output")
        ax.set_title(f"{profile['models'][name]['class']} ({name})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"TeaCache calibration: {profile.get('prompts', 0)} prompts x {len(profile.get('seeds', []))} "
                 f"seeds, {profile['steps']} steps", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def calibrated_fields(fit: dict) -> dict:
    """What a fitted entry gives the gates' ``search`` (the tuner): {"coeffs": TeaCache's polynomial, "ratios":
    MagCache's ratios}, where fitted."""
    out = {}
    if "teacache" in fit:
        out["coeffs"] = tuple(fit["teacache"]["coeffs"])
    if "magcache" in fit:
        out["ratios"] = tuple(fit["magcache"]["ratios"])
    return out


__all__ = ["FORMAT", "ProfileError", "VERSION", "calibrated_fields", "check_compatible", "config_hash",
           "fit_plot_png", "for_model", "identity", "load_profile", "merge_profiles", "new_profile", "refit",
           "save_profile"]
