"""Argument checking and canonicalisation shared by the public ops."""

from __future__ import annotations

import math
import operator
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


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) bytes ``t`` can touch (an over-estimate for interleaved views)."""
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        if size > 1:
            if stride < 0:
                lo += stride * (size - 1) * t.element_size()
            else:
                hi += stride * (size - 1) * t.element_size()
    return lo, hi + t.element_size()


def internal_overlap(t: torch.Tensor) -> bool:
    """True unless ``t``'s elements are provably distinct in memory: torch's own check (0 no, 1 yes, 2 too hard,
    e.g. any non-dense view), and for "too hard" the sorted-strides test (each stride, smallest first, beyond the
    span of the smaller dims: a slice or a strided view of a buffer passes, an expanded view does not). A host check
    on the strides (no data read)."""
    verdict = torch._debug_has_internal_overlap(t)
    if verdict != 2:
        return verdict == 1
    span = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def check_out(out: object, src_name: str, src: torch.Tensor) -> bool:
    """``out=`` of a forecast: shape ``src.shape[1:]``, src's dtype and device, not overlapping ``src``.

    Returns True when the op may write into ``out`` directly, False when it must compute into a fresh tensor and
    copy: ``out`` and ``src`` are views of one storage whose byte ranges interleave (e.g. a column block and a row
    of one buffer: they may or may not share elements), or ``out``'s dims do not collapse to one strided dim.
    Raises, naming ``out``, when they certainly share memory (both dense, ranges intersect) or ``out`` is not a
    tensor of the right shape, dtype and device. A separate row of the same buffer is written directly."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a tensor, got {type(out).__name__}")
    check_same(src_name, src, "out", out, shape=False)
    if tuple(out.shape) != tuple(src.shape[1:]):
        raise ValueError(f"out: shape {tuple(out.shape)}, expected {tuple(src.shape[1:])} (the rows of {src_name})")
    direct = True
    if (not torch.compiler.is_compiling() and out.numel() and src.numel()
            and out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()):
        a0, a1 = _byte_span(out)
        b0, b1 = _byte_span(src)
        if a0 < b1 and b0 < a1:  # the ranges intersect
            if out.is_contiguous() and src.is_contiguous():  # both dense: they share elements
                raise ValueError(f"out: overlaps {src_name} in memory; the forecast would overwrite its own input")
            direct = False
    if direct:
        try:
            out.view(-1)
        except RuntimeError:
            direct = False
    return direct


def check_bounds(bounds: Sequence[int] | torch.Tensor | None, D: int) -> list[int]:
    """bounds: increasing channel boundaries [0, b1, ..., D] as a sequence of ints or a CPU integer tensor;
    None = one band. Checked on the host: a tensor on an accelerator would have to be read back (a sync) every
    call, so it is refused."""
    if bounds is None:
        return [0, D]
    if isinstance(bounds, torch.Tensor):
        if bounds.dtype.is_floating_point or bounds.dtype.is_complex or bounds.dtype == torch.bool or bounds.dim() != 1:
            raise TypeError(f"bounds: expected a 1-D integer tensor or a sequence of ints, got {bounds.dtype} "
                            f"of shape {tuple(bounds.shape)}")
        if bounds.device.type != "cpu":
            raise TypeError(f"bounds: a tensor on {bounds.device} would be read back to the host (a device sync) "
                            "every call; pass a list of ints or a CPU tensor")
        bounds = bounds.tolist()
    if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence):
        raise TypeError(f"bounds: expected a sequence of ints, got {type(bounds).__name__}")
    for x in bounds:
        if isinstance(x, bool) or not hasattr(x, "__index__"):
            raise TypeError(f"bounds: expected integers, got {x!r} ({type(x).__name__})")
    b = [operator.index(x) for x in bounds]
    if len(b) < 2:
        raise ValueError(f"bounds: need at least [0, D], got {b}")
    if b[0] != 0 or b[-1] != D:
        raise ValueError(f"bounds: must start at 0 and end at D={D}, got {b}")
    if any(b1 <= b0 for b0, b1 in zip(b, b[1:])):
        raise ValueError(f"bounds: must be strictly increasing, got {b}")
    return b


def scalar_arg(name: str, x: float | int | torch.Tensor, device: torch.device, dtype: torch.dtype):
    """A scalar argument as the pair the registered ops take: ``(tensor, None)`` for a one-element tensor on the
    device (read by the kernel), ``(None, value)`` for a Python number (passed to the kernel as an argument: no
    host-to-device copy, nothing to sync, capturable in a CUDA graph)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name}: expected a single value, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name}: on {x.device}, but the data is on {device}")
        if dtype.is_floating_point and not (x.dtype.is_floating_point or x.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: dtype {x.dtype} is not a number")
        if not dtype.is_floating_point and (x.dtype.is_floating_point or x.dtype == torch.bool):
            raise TypeError(f"{name}: must be an integer tensor, got {x.dtype}")
        return x.reshape(()).to(dtype), (0.0 if dtype.is_floating_point else None)  # the value is unused
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected a number or a tensor, got {type(x).__name__}")
    if dtype.is_floating_point:
        if not math.isfinite(float(x)):
            raise ValueError(f"{name}: must be finite, got {x}")
        return None, float(x)
    if isinstance(x, float) and not x.is_integer():
        raise TypeError(f"{name}: must be an integer, got {x}")
    if not -(2**63) <= int(x) < 2**63:
        raise ValueError(f"{name}: {x} is outside the int64 range")
    return None, int(x)


def scalar_value(t: torch.Tensor | None, value):
    """The canonical scalar of a registered op's (tensor, value) pair."""
    return t if t is not None else value


# Device copies of small constant vectors (coeffs, gammas, taus, bounds given as Python sequences), keyed by value.
# A miss uploads through pinned memory without blocking the host; a hit costs a dict lookup. One copy per
# (device, stream): a consumer on the stream of the copy is ordered after it.
_const_cache: dict = {}
_CONST_MAX = 256


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def const_tensor(name: str, values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached device tensor holding ``values``. Inside a CUDA-graph capture a value never seen on this stream
    cannot be uploaded (the copy would be captured, not run): that raises and says what to do."""
    # float.hex: 0.0 and -0.0 (equal as keys) keep their own entries
    key = (tuple(v.hex() if isinstance(v, float) else v for v in values), dtype, str(device), _stream_id(device))
    t = _const_cache.get(key)
    if t is not None:
        return t
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{name}: a Python sequence cannot be uploaded inside a CUDA-graph capture; pass it as a tensor on "
                f"{device}, or call the op once with these values on this stream before capturing"
            )
        t = torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
    else:
        t = torch.tensor(values, dtype=dtype, device=device)
    if len(_const_cache) >= _CONST_MAX:
        _const_cache.pop(next(iter(_const_cache)))
    _const_cache[key] = t
    return t


def float_vector(name: str, x: Sequence[float] | torch.Tensor, device: torch.device, length: int | None = None,
                 finite: bool = False):
    """A float32 1-D device tensor from a tensor or a sequence of numbers. Sequences are checked on the host
    (NaN; Inf too with ``finite``) and come from ``const_tensor`` (no sync); a tensor's values are not read (that
    would be a sync per call): a non-finite coefficient there makes the gate compute every step."""
    if isinstance(x, torch.Tensor):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a float tensor, got {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name}: on {x.device}, but the data is on {device}")
        t = x.to(torch.float32).contiguous()
    else:
        if isinstance(x, (str, bytes)):
            raise TypeError(f"{name}: expected a sequence of numbers, got {type(x).__name__}")
        try:
            items = list(x)
        except TypeError:
            raise TypeError(f"{name}: expected a tensor or a sequence of numbers") from None
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__") for v in items):
            raise TypeError(f"{name}: expected numbers, got {items!r}")
        vals = tuple(float(v) for v in items)
        if any(math.isnan(v) for v in vals):
            raise ValueError(f"{name}: contains NaN")
        if finite and any(math.isinf(v) for v in vals):
            raise ValueError(f"{name}: must be finite, got {list(vals)}")
        if length is not None and len(vals) != length:
            raise ValueError(f"{name}: expected {length} values, got {len(vals)}")
        if not vals:
            raise ValueError(f"{name}: is empty")
        return const_tensor(name, vals, torch.float32, device)
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


def bounds_tensor(bounds: list[int], device: torch.device) -> torch.Tensor:
    """Cached device copy of ``bounds`` (int64) so that a step does not upload it again."""
    return const_tensor("bounds", tuple(bounds), torch.int64, device)


# ---- the forecast error of an update (taylor_update's error=, history_update) -------------------------------------


def samples(value: torch.Tensor) -> int:
    """B of a per-sample sum: the leading dim of a value of >= 2 dims; a 1-D (or 0-D) value is one sample."""
    return value.shape[0] if value.dim() >= 2 else 1


def check_weights(name: str, w: object, n: int, rows_name: str, device: torch.device) -> torch.Tensor:
    """A float32 (n,) tensor on ``device`` (one weight per row of ``rows_name``), contiguous for the kernels."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a float32 tensor of shape ({n},), got {type(w).__name__}")
    if w.dtype != torch.float32:
        raise TypeError(f"{name}: dtype {w.dtype}, expected torch.float32")
    if w.dim() != 1 or w.shape[0] != n:
        raise ValueError(f"{name}: shape {tuple(w.shape)}, expected ({n},) (one weight per row of {rows_name})")
    if w.device != device:
        raise ValueError(f"{name}: on {w.device}, but the data is on {device}")
    return w.contiguous()


def check_error(error: object, value_name: str, value: torch.Tensor, written: tuple) -> None:
    """``error=``: float32 (B, 2), contiguous, on value's device (B = ``samples(value)``), sharing no memory with
    the tensors the op reads or writes (``written``: (name, tensor) pairs)."""
    B = samples(value)
    if not isinstance(error, torch.Tensor):
        raise TypeError(f"error: expected a float32 tensor of shape ({B}, 2), got {type(error).__name__}")
    if error.dtype != torch.float32:
        raise TypeError(f"error: dtype {error.dtype}, expected torch.float32")
    if tuple(error.shape) != (B, 2):
        raise ValueError(f"error: shape {tuple(error.shape)}, expected ({B}, 2) (per sample of {value_name}: the "
                         "squared error and the squared value)")
    if error.device != value.device:
        raise ValueError(f"error: on {error.device}, but {value_name} is on {value.device}")
    if not error.is_contiguous():
        raise ValueError("error: must be contiguous")
    if not torch.compiler.is_compiling() and error.numel():
        for name, t in written:
            if t.numel() and t.untyped_storage().data_ptr() == error.untyped_storage().data_ptr():
                a0, a1 = _byte_span(error)
                b0, b1 = _byte_span(t)
                if a0 < b1 and b0 < a1:
                    raise ValueError(f"error: overlaps {name} in memory")


def update_rows(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(n, ...) -> ((n, N) rows to update in place, direct). When the trailing dims do not collapse the rows are a
    copy (direct False): the op then writes them back into ``t``."""
    n = t.shape[0]
    N = t[0].numel() if n > 0 else 0
    try:
        return t.view(n, N), True
    except RuntimeError:
        return t.reshape(n, N).clone(), False
