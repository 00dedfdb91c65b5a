"""band_l1: banded sums of |cur - prev| and |prev| over the channel dim (the relative-L1 change of a probe)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _backend
from ._common import backend_name, bounds_tensor, check_bounds, check_float, check_same, three_d


@torch.library.custom_op("fastcache_rt::band_l1", mutates_args=())
def _band_l1_op(cur: torch.Tensor, prev: torch.Tensor, bounds: list[int], per_sample: bool, backend: str) -> torch.Tensor:
    check_bounds(bounds, cur.shape[-1])  # the registered op checks too (it may be called directly)
    c3, p3 = three_d(cur), three_d(prev)
    nb = len(bounds) - 1
    out = torch.empty((c3.shape[0] if per_sample else 1, nb, 2), dtype=torch.float32, device=cur.device)
    _backend.get(backend).band_l1(c3, p3, bounds_tensor(bounds, cur.device), per_sample, out)
    return out if per_sample else out[0]


@_band_l1_op.register_fake
def _(cur, prev, bounds, per_sample, backend):
    nb = len(bounds) - 1
    shape = (cur.shape[0], nb, 2) if per_sample else (nb, 2)
    return cur.new_empty(shape, dtype=torch.float32)


def band_l1(
    cur: torch.Tensor,
    prev: torch.Tensor,
    bounds: Sequence[int] | torch.Tensor | None = None,
    *,
    per_sample: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Banded L1 sums of a change: for each band k of the last dim (channels ``bounds[k]:bounds[k+1]``),
    ``out[k] = (sum |cur - prev|, sum |prev|)`` over every other element.

    Formula: ``out[k, 0] = sum_{i, c in band k} |cur[i, c] - prev[i, c]|``, ``out[k, 1] = sum_{i, c in band k}
    |prev[i, c]|``, ``i`` running over every index of the leading dims (all of them, or all but dim 0 with
    ``per_sample``). The relative L1 change of band k is ``out[k, 0] / out[k, 1]`` (TeaCache's / FBCache's
    ``mean|cur - prev| / mean|prev|``: the element counts cancel).

    Args:
        cur, prev: same shape ``(..., D)``, same dtype float32/float16/bfloat16, same device, any strides (no copy
            is made for views that collapse to ``(B, R, D)``).
        bounds: increasing channel boundaries ``[0, b1, ..., D]``: a sequence of ints or a CPU integer tensor
            (None: one band). A tensor on an accelerator is refused (reading it would be a sync every call).
        per_sample: keep dim 0 separate: result ``(B, num_bands, 2)`` with ``B = cur.shape[0]``.
        backend: "reference", "cpu", "triton", "cuda" or None (automatic; ``FASTCACHE_RT_BACKEND`` overrides).

    Returns:
        float32 ``(num_bands, 2)`` (or ``(B, num_bands, 2)``) on the inputs' device, whatever their dtype.

    Reduction: fp32 accumulation of the inputs' values (relative error against an fp64 sum below 1e-5 up to 2^24
    elements); the GPU backends sum in one order fixed by the input's size (``_reference.band_l1_gpu_order``), so
    the bits do not depend on the GPU or the backend. Sums, not ratios, so results of several ranks add up: with
    the tokens split over ranks (context parallelism), ``torch.distributed.all_reduce`` (SUM) of each rank's
    result is the result of the whole tensor, and ``gate_decide`` takes it from there. NaN/Inf in the inputs
    propagate into the sums of the band they are in.

    Capture / compile: registered as ``torch.ops.fastcache_rt.band_l1`` (``torch.library.custom_op`` with a fake
    kernel: ``torch.compile(fullgraph=True)`` traces it as one node, ``torch.library.opcheck`` passes); no host
    sync (no device value is read back) and nothing is uploaded per call (``bounds`` is uploaded once per value and
    stream, then cached): capturable in a CUDA graph (one kernel node on the GPU backends).

    Example::

        >>> prev = torch.tensor([[1., 2., 3., 4.]])
        >>> cur = torch.tensor([[1., 2., 4., 2.]])
        >>> ops.band_l1(cur, prev, [0, 2, 4])           # bands: channels 0:2 and 2:4
        tensor([[0., 3.],
                [3., 7.]])
        >>> s = ops.band_l1(cur, prev)                   # one band; on a shard: all_reduce(s) first
        >>> s[:, 0] / s[:, 1]                            # the relative L1 change, on the device
        tensor([0.3000])
    """
    check_float("cur", cur)
    check_float("prev", prev)
    check_same("cur", cur, "prev", prev)
    if cur.dim() == 0:
        raise ValueError("cur: must have at least one dimension (..., D)")
    if cur.shape[-1] == 0:
        raise ValueError("cur: the channel dim D is empty")
    if per_sample and cur.dim() < 2:
        raise ValueError("per_sample: needs cur of shape (B, ..., D) with at least 2 dims")
    b = check_bounds(bounds, cur.shape[-1])
    return _band_l1_op(cur, prev, b, bool(per_sample), backend_name(cur.device, backend))
