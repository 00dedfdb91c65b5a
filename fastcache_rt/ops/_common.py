"""Argument checking and canonicalisation shared by the public ops."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (use float32, float16 or bfloat16)")
    return t


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, shape: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b}: on {b.device}, but {name_a} is on {a.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b}: dtype {b.dtype} differs from {name_a}'s {a.dtype}")
    if shape and a.shape != b.shape:
        raise ValueError(f"{name_b}: shape {tuple(b.shape)} differs from {name_a}'s {tuple(a.shape)}")


def check_out(out: object, src_name: str, src: torch.Tensor) -> torch.Tensor:
    """``out=`` of a forecast: shape ``src.shape[1:]``, src's dtype and device, not sharing memory with ``src``.
    Returns a 1-D view of it (an element stride the kernels accept), or raises naming ``out``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a tensor, got {type(out).__name__}")
    check_same(src_name, src, "out", out, shape=False)
    if tuple(out.shape) != tuple(src.shape[1:]):
        raise ValueError(f"out: shape {tuple(out.shape)}, expected {tuple(src.shape[1:])} (the rows of {src_name})")
    if (not torch.compiler.is_compiling() and out.numel() and src.numel()
            and out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()):
        raise ValueError(f"out: shares memory with {src_name}; the forecast would overwrite its own input")
    try:
        return out.view(-1)
    except RuntimeError:
        raise ValueError("out: its dims do not collapse to one strided dim (pass a contiguous tensor)") from None


def check_bounds(bounds: Sequence[int] | torch.Tensor | None, D: int) -> list[int]:
    """bounds: increasing channel boundaries [0, b1, ..., D]; None = one band."""
    if bounds is None:
        return [0, D]
    if isinstance(bounds, torch.Tensor):
        if bounds.dtype.is_floating_point or bounds.dtype == torch.bool or bounds.dim() != 1:
            raise TypeError("bounds: expected a 1-D integer tensor or a sequence of ints")
        bounds = bounds.tolist()
    try:
        b = [int(x) for x in bounds]
    except (TypeError, ValueError):
        raise TypeError("bounds: expected a sequence of ints") from None
    if any(isinstance(x, float) and not float(x).is_integer() for x in bounds):
        raise TypeError("bounds: expected integers")
    if len(b) < 2:
        raise ValueError(f"bounds: need at least [0, D], got {b}")
    if b[0] != 0 or b[-1] != D:
        raise ValueError(f"bounds: must start at 0 and end at D={D}, got {b}")
    if any(b1 <= b0 for b0, b1 in zip(b, b[1:])):
        raise ValueError(f"bounds: must be strictly increasing, got {b}")
    return b


def scalar_tensor(name: str, x: float | int | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A number or a one-element tensor -> a 0-dim tensor of ``dtype`` on ``device`` (no host read)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name}: expected a single value, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name}: on {x.device}, but the data is on {device}")
        if dtype.is_floating_point and not (x.dtype.is_floating_point or x.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: dtype {x.dtype} is not a number")
        if not dtype.is_floating_point and x.dtype.is_floating_point:
            raise TypeError(f"{name}: must be an integer tensor, got {x.dtype}")
        return x.reshape(()).to(dtype)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected a number or a tensor, got {type(x).__name__}")
    if dtype.is_floating_point and not math.isfinite(float(x)):
        raise ValueError(f"{name}: must be finite, got {x}")
    if not dtype.is_floating_point and not float(x).is_integer():
        raise TypeError(f"{name}: must be an integer, got {x}")
    return torch.tensor(x, dtype=dtype, device=device)


def float_vector(name: str, x: Sequence[float] | torch.Tensor, device: torch.device, length: int | None = None):
    if isinstance(x, torch.Tensor):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a float tensor, got {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name}: on {x.device}, but the data is on {device}")
        t = x.to(torch.float32).contiguous()
    else:
        try:
            vals = [float(v) for v in x]
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected a sequence of numbers") from None
        if any(math.isnan(v) for v in vals):
            raise ValueError(f"{name}: contains NaN")
        t = torch.tensor(vals, dtype=torch.float32, device=device)
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name}: expected {length} values, got {t.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: is empty")
    return t


def rows_view(t: torch.Tensor, n: int) -> torch.Tensor:
    """(n, ...) -> (n, N) without a copy when the trailing dims collapse, else a contiguous copy."""
    N = t[0].numel() if n > 0 else 0
    try:
        return t.view(n, N)
    except RuntimeError:
        return t.reshape(n, N)


def three_d(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (B, R, D): B = shape[0] (1 for a 1-D tensor); a view when possible."""
    D = t.shape[-1]
    if t.dim() == 3:  # already (B, R, D): no view op (a skipped step counts its dispatched ops)
        return t
    if t.dim() == 1:
        return t.view(1, 1, D)
    B = t.shape[0]
    R = 1
    for s in t.shape[1:-1]:
        R *= s
    try:
        return t.view(B, R, D)
    except RuntimeError:
        return t.reshape(B, R, D)


@torch.compiler.assume_constant_result
def resolve_backend(device_type: str, requested: str | None) -> str:
    return _backend.resolve(torch.device(device_type), requested)


def backend_name(device: torch.device, backend: str | None) -> str:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a string or None, got {type(backend).__name__}")
    return resolve_backend(device.type, backend)


_const_cache: dict = {}


def bounds_tensor(bounds: list[int], device: torch.device) -> torch.Tensor:
    """Cached device copy of ``bounds`` (int64) so that a step does not upload it again."""
    key = (tuple(bounds), str(device))
    t = _const_cache.get(key)
    if t is None:
        t = torch.tensor(bounds, dtype=torch.int64, device=device)
        if len(_const_cache) > 256:
            _const_cache.clear()
        _const_cache[key] = t
    return t
