"""Backend registry and selection.

A backend is a module exposing ``available() -> str | None`` (None when usable, else the reason it is not),
``DEVICE_TYPES`` (the device types it runs on) and one function per op with the *canonical* signature below.
The public functions in ``fastcache_rt.ops`` validate and canonicalise the user's arguments, then call these through
the registered ``torch.library`` ops. Every function writes its results into the given output tensors (which may hold
garbage or NaN beforehand: every element must be written) and reads no device value back to the host.

Canonical signatures (all tensors on one device). A "scalar" argument (tau_query, distance, gap) is either a
float32 0-dim tensor on the device, read by the kernel, or a Python float, passed to the kernel as an argument and
rounded to float32 there; ``count`` is an int64 0-dim tensor, a Python int or None (= all rows). Nothing may turn a
Python value into a device tensor per call (that is a host-to-device copy and a sync, and illegal in a CUDA-graph
capture).

band_l1 and gate_step on the GPU backends sum in the order of ``_reference.band_l1_gpu_order`` (partition fixed by
the input's size, order-free exact group sums): their sums are bitwise equal to it on every GPU. Their persistent
scratch (a ticket counter, the partials) is per (device, stream): launches on different streams never share it.

  band_l1(cur, prev, bounds, per_sample, out)
      cur, prev: (B, R, D), same dtype in {float32, float16, bfloat16}, any strides (element strides, may be 0 or
      negative-free views such as transposes and slices). bounds: int64 (nb+1,) contiguous, 0 = b0 < b1 < ... = D.
      out: float32 contiguous (B if per_sample else 1, nb, 2): [..., k, 0] = sum |cur - prev|, [..., k, 1] =
      sum |prev| over the channels of band k and all rows (and all samples unless per_sample).
      Accumulation: relative error vs an fp64 sum < 1e-5 up to 2^24 elements. NaN/Inf propagate into the sums of
      the band they are in.
  gate_step(cur, prev, bounds, state, params, coeffs, gammas, decision_out, state_out, sums_out)
      band_l1 over everything (per_sample=False) into sums_out (nb, 2) float32, then gate_decide, in one launch.
  gate_decide(sums, state, params, coeffs, gammas, decision_out, state_out)
      sums: float32 (nb, 2) (e.g. all-reduced across ranks); state/params: float32 (STATE_LEN,)/(PARAMS_LEN,),
      layout in ``layout.py``; coeffs: float32 (P,), P >= 1, highest power first; gammas: float32 (nb,) or None
      (no per-band check). decision_out: bool scalar (True = compute); state_out: float32 (STATE_LEN,), may alias
      nothing. Rules: ``_reference.gate_decide``.
  chebyshev_weights(taus, tau_query, count, degree, lam, blend, out)
      taus: float32 (n,) contiguous; tau_query: scalar; count: int64 scalar, int or None (= n): rows
      j < min(count, n) are valid; degree >= 0 int; lam >= 0 float; blend float (1.0 = pure Chebyshev).
      out: float32 (n,), zero for invalid rows, NaN everywhere if no row is valid.
  chebyshev_forecast(history, taus, tau_query, count, degree, lam, blend, out)
      history: (n, N) any strides, float32/16/bf16; out: (N,) contiguous, history's dtype;
      out = sum_{valid j} w_j * history[j], fp32 accumulation, weights as chebyshev_weights. Rows j >= count are
      never read (a ring buffer may hold garbage there).
  taylor_forecast(diffs, distance, out)
      diffs: (K, N) any strides; distance: scalar; out (N,) contiguous in diffs' dtype;
      out = sum_i diffs[i] * distance^i / i!.
  hermite_forecast(diffs, distance, scale, out)
      as taylor_forecast with weights c_0 = 1, c_k = H_k(scale*distance) * scale^k / k! (physicists' Hermite).
  taylor_update(diffs, feature, gap, count)
      in place on diffs (K, N) (any strides, float32/16/bf16); feature: (N,) any stride, same dtype;
      gap: scalar; count: int64 scalar, int or None (= K), the number of valid orders before the call.
      new[0] = feature; new[i+1] = (new[i] - old[i]) / gap if i < count else 0. fp32 arithmetic.
  taylor_update_error(diffs, feature, gap, count, weights, error)
      taylor_update, and in the same pass the error sums (below) of pred = sum_{i < min(count, K)} weights[i] *
      old diffs[i] against feature. weights: float32 (K,) contiguous. Rows i >= count are never read.
  history_update(history, value, row, weights, count, error)
      history (n, N) any strides, float32/16/bf16; value (N,) any stride, same dtype; row: int64 scalar tensor or
      int (a tensor outside [0, n) writes nothing); weights: float32 (n,) contiguous; count as chebyshev_forecast;
      error: float32 (B, 2) contiguous or None. With error: the error sums of pred = sum_{k < min(count, n)}
      weights[k] * history[k] (before the write) against value; then history[row] = value (a bit copy).

The error sums (``_reference.error_sums``): error (B, 2) float32 contiguous, written; sample b is the b-th of B
equal consecutive slices of the N elements (N % B == 0). pred is formed in fp32 in row order from +0.0, each a
product then an add (no FMA: the terms are bitwise the same on every backend); e = pred - value, then
error[b] = (sum e * e, sum value * value), the fp32 terms summed in float64 over a partition of the sample's
elements that depends on the sizes only (not on thread or SM counts), the parts added in a fixed order, rounded
once to float32. NaN/Inf propagate.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger("fastcache_rt")

# Preference order per device type for the automatic choice.
_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_MODULES = {
    "reference": "fastcache_rt.ops._reference_backend",
    "cpu": "fastcache_rt.ops._cpu",
    "triton": "fastcache_rt.ops._triton",
    "cuda": "fastcache_rt.ops._cuda",
}
NAMES = tuple(_MODULES)

_loaded: dict[str, ModuleType | None] = {}
_reasons: dict[str, str | None] = {}
_auto_cache: dict[tuple[str, str | None], str] = {}
_logged: set[tuple[str, str]] = set()


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            reason = mod.available()
        except Exception as exc:  # keep the reason, show it when this backend is asked for
            mod, reason = None, f"import failed: {type(exc).__name__}: {exc}"
        _loaded[name] = mod if reason is None else None
        _reasons[name] = reason
    return _loaded[name]


def backends() -> dict[str, dict]:
    """Each backend's availability: {name: {"available": bool, "reason": str | None, "devices": [...]}} for
    "reference", "cpu", "triton" and "cuda" ("reason" says why one is unavailable). A host function, not an op.

    Example::

        >>> ops.backends()["reference"]["available"]        # plain torch: always there
        True
    """
    out = {}
    for name in NAMES:
        mod = _load(name)
        devices = list(getattr(importlib.import_module(_MODULES[name]), "DEVICE_TYPES", ())) if mod else []
        out[name] = {"available": mod is not None, "reason": _reasons[name], "devices": devices}
    return out


def env_backend() -> str | None:
    value = os.environ.get("FASTCACHE_RT_BACKEND", "").strip().lower()
    return value or None


def resolve(device: torch.device, requested: str | None) -> str:
    """The backend name to run on ``device``. ``requested`` (argument) beats FASTCACHE_RT_BACKEND beats the
    automatic choice. An explicit request that cannot run raises with the reason."""
    key = (device.type, requested)
    hit = _auto_cache.get(key)
    if hit is not None:
        return hit
    explicit = requested if requested is not None else env_backend()
    if explicit is not None:
        if explicit not in _MODULES:
            raise ValueError(f"backend: unknown backend {explicit!r}; choose one of {', '.join(NAMES)}")
        mod = _load(explicit)
        if mod is None:
            raise RuntimeError(f"backend {explicit!r} is not available: {_reasons[explicit]}")
        if device.type not in mod.DEVICE_TYPES:
            raise RuntimeError(
                f"backend {explicit!r} does not run on {device.type} tensors (it runs on {', '.join(mod.DEVICE_TYPES)})"
            )
        _auto_cache[key] = explicit
        return explicit
    for name in _ORDER.get(device.type, ("reference",)):
        mod = _load(name)
        if mod is not None and device.type in mod.DEVICE_TYPES:
            _auto_cache[key] = name
            return name
        if (device.type, name) not in _logged:
            _logged.add((device.type, name))
            logger.warning("fastcache_rt: backend %r unavailable for %s (%s); falling back", name, device.type,
                           _reasons.get(name) or "does not run on this device")
    _auto_cache[key] = "reference"
    return "reference"


def get(name: str) -> ModuleType:
    mod = _load(name)
    if mod is None:
        raise RuntimeError(f"backend {name!r} is not available: {_reasons[name]}")
    return mod


def reset() -> None:
    """Forget cached choices (after changing FASTCACHE_RT_BACKEND or TRITON_INTERPRET)."""
    _auto_cache.clear()
    _logged.clear()
