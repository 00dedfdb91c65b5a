"""pytest-benchmark configuration of the kernel-op microbenchmarks (``benchmarks/test_kernels.py``).

Not collected by ``python -m pytest`` from the repository root (``testpaths = ["tests"]``); run it explicitly:

    python -m pytest benchmarks/test_kernels.py                                   # FLUX-like size, fp32 + bf16
    python -m pytest benchmarks/test_kernels.py --kernel-quick                    # tiny size (1, 64, 256)
    python -m pytest benchmarks/test_kernels.py --benchmark-json out.json         # then bench_table.py out.json

Options (each also an environment variable, the option wins):

    --kernel-shape 1,4096,3072     FASTCACHE_RT_BENCH_SHAPE     feature shape
    --kernel-quick                 FASTCACHE_RT_BENCH_QUICK=1   shape (1, 64, 256)
    --kernel-dtypes float32,bfloat16  FASTCACHE_RT_BENCH_DTYPES
    --kernel-backends auto         FASTCACHE_RT_BENCH_BACKENDS  e.g. cpu,reference; auto = every available backend
                                                                 of the device (the Triton CPU interpreter only
                                                                 with TRITON_INTERPRET=1)
    --kernel-devices auto          FASTCACHE_RT_BENCH_DEVICES   cpu, and cuda when a GPU is visible
    --kernel-history 14            FASTCACHE_RT_BENCH_HISTORY   Chebyshev history rows
    --kernel-ops all               FASTCACHE_RT_BENCH_OPS       comma list of op names
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from kernel_meta import OPTIONS, git_commit

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PLUGIN = True
except ImportError:  # the suite needs the plugin; without it there is nothing to collect
    HAVE_PLUGIN = False
    collect_ignore = ["test_kernels.py"]


def pytest_addoption(parser):
    group = parser.getgroup("fastcache_rt kernels", "fastcache_rt kernel-op benchmarks")
    for name, (env, _default, help_) in OPTIONS.items():
        group.addoption("--" + name.replace("_", "-"), dest=name, default=None, help=f"{help_} (env {env})")
    group.addoption("--kernel-quick", dest="kernel_quick", action="store_true", default=None,
                    help="tiny shape (1, 64, 256) (env FASTCACHE_RT_BENCH_QUICK=1)")


def _update_machine_info(config, machine_info):
    import torch

    from fastcache_rt import __version__, ops

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["fastcache_rt"] = __version__
    machine_info["fastcache_rt_commit"] = git_commit()
    machine_info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["fastcache_rt_backends"] = {k: v["available"] for k, v in ops.backends().items()}
    machine_info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")


if HAVE_PLUGIN:  # a hook of the plugin: defined only when the plugin is there to call it
    pytest_benchmark_update_machine_info = _update_machine_info
