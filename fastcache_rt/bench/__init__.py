"""The pipeline benchmark behind ``fastcache-rt bench``: fastcache_rt's presets and the peers (diffusers' cache
hooks, cache-dit) on one FLUX pipeline, timed side by side, with quality against the uncached images.

- ``harness``: runs and times the configurations (``Harness``, ``Settings``)
- ``methods``: the configurations and their sweeps
- ``metrics``: PSNR, SSIM, relative L2
- ``memory``: bytes of cache tensors held by hooks
- ``analysis``: the questions answered from the table
- ``report``: table, JSON / CSV / Markdown and PNG outputs (written atomically)
"""

from .harness import BenchError, Harness, Result, Settings
from .metrics import psnr, rel_l2, ssim

__all__ = ["BenchError", "Harness", "Result", "Settings", "psnr", "rel_l2", "ssim"]
