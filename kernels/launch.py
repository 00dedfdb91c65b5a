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
import threading

import torch

__all__ = ["cdiv", "interpreted", "launch_options", "next_pow2", "persistent_programs", "resident"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def interpreted(device: torch.device) -> bool:
    """True when launches on ``device`` run in the Triton interpreter (CPU tensors); every other device compiles.
    The launchers take one code path for compiled launches, whatever the device is called (a GPU, or ``meta``
    tensors when ``kernels/aot.py`` compiles for an architecture without one)."""
    return device.type == "cpu"


def _driver():
    from triton.runtime import driver

    return driver.active


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else _driver().get_current_device()


@functools.cache
def _properties(index: int) -> tuple[int, int, int, int]:
    """(SMs, registers per SM, shared memory per block, compute capability as 10 * major + minor) of a device, from
    Triton's driver (the same query Triton itself makes)."""
    drv = _driver()
    props = drv.utils.get_device_properties(index)
    arch = drv.get_current_target().arch  # an int on NVIDIA; a name ("gfx942") on AMD: the default limits then
    return (props["multiprocessor_count"], props["max_num_regs"], props["max_shared_mem"],
            arch if isinstance(arch, int) else 0)


# threads and blocks an SM holds, by compute capability (CUDA C++ Programming Guide, "Compute capabilities")
THREADS_PER_SM = {75: 1024, 86: 1536, 89: 1536, 120: 1536, 121: 1536}  # 2048 otherwise
BLOCKS_PER_SM = {75: 16, 86: 16, 89: 24}  # 32 otherwise


def resident(arch: int, regs_per_sm: int, regs: int, num_warps: int, shared: int, smem_per_sm: int) -> int:
    """Programs of one compiled kernel resident on one SM: registers (allocated per warp in units of 256), threads,
    shared memory and the block limit."""
    per_warp = cdiv(regs * 32, 256) * 256
    blocks = BLOCKS_PER_SM.get(arch, 32)
    by_regs = (regs_per_sm // per_warp) // num_warps if per_warp else blocks
    by_threads = THREADS_PER_SM.get(arch, 2048) // (32 * num_warps)
    by_smem = smem_per_sm // shared if shared else blocks
    return max(0, min(by_regs, by_threads, by_smem, blocks))


_PERSISTENT: dict[tuple, int] = {}
_PERSISTENT_LOCK = threading.Lock()


def persistent_programs(kernel, key: tuple, device: torch.device, work: int, args: tuple, kwargs: dict) -> int:
    """Programs of a persistent grid: as many as are resident at once on the whole device (from the registers,
    threads and shared memory of the kernel as compiled for it), at most ``work`` (>= 1). ``key`` names the
    specialization (constexprs, dtypes): the kernel is compiled once per key and device (``warmup``) and its
    occupancy cached. Under the interpreter: 2 (a strided loop all the same, with few redundant programs)."""
    if interpreted(device):
        return max(1, min(work, 2))
    index = _device_index(device)
    full = (kernel.__name__, index, *key)
    per_device = _PERSISTENT.get(full)
    if per_device is None:
        with _PERSISTENT_LOCK:
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
            compiled._init_handles()
            sms, regs_per_sm, smem, arch = _properties(index)
            fit = resident(arch, regs_per_sm, compiled.n_regs, compiled.metadata.num_warps,
                           compiled.metadata.shared, smem)
            per_device = _PERSISTENT[full] = max(1, fit) * sms
    return max(1, min(work, per_device))


def launch_options() -> dict:
    """Compile options shared by every launch: no mul+add -> FMA contraction, so that the float32 arithmetic rounds
    step by step like the torch reference (the kernels are memory-bound: FMA would buy nothing)."""
    return {"enable_fp_fusion": False}
