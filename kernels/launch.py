"""Launch helpers shared by the Triton kernels of fastcache_rt (``fastcache_rt.kernels``, a namespace package:
this folder has no ``__init__.py``, see README.md beside this file).

Modules, one per op family, each with its ``@triton.jit`` kernels and thin launchers that take torch tensors (the
canonical arguments of ``fastcache_rt/ops/_backend.py``) and launch exactly one kernel per call:

  band_l1     band_l1, gate_step, gate_decide
  chebyshev   chebyshev_weights, chebyshev_forecast, history_update
  taylor      taylor_forecast, hermite_forecast, taylor_update, taylor_update_error
  error_sums  the error sums' @triton.jit helpers, shared by taylor_update_error and history_update (no launcher)

Kernel code imports nothing of fastcache_rt except ``fastcache_rt.ops.layout`` (the gate state/params layout).
To run on CPU tensors through the Triton interpreter, set ``TRITON_INTERPRET=1`` before importing these modules.
See README.md beside this file for the bytes moved and launches per op.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["cdiv", "launch_options", "next_pow2", "num_sms"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


@functools.cache
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(
            index if index is not None else torch.cuda.current_device()
        ).multi_processor_count
    # Triton interpreter (CPU tensors): programs run one after another; a few per op still exercise the
    # multi-program paths (workspace reduction, persistent loops) without making the interpreter crawl.
    return 1


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a host-side property query, cached; 1 for the interpreter)."""
    return _sm_count(device.type, device.index)


def launch_options() -> dict:
    """Compile options shared by every launch: no mul+add -> FMA contraction, so that the float32 arithmetic rounds
    step by step like the torch reference (the kernels are memory-bound: FMA would buy nothing)."""
    return {"enable_fp_fusion": False}
