"""Tiny test models: configs with random weights (no downloads, CPU, a second or less each) that the tests
(``tests/``) and the benchmarks' smoke modes (``benchmarks/``) build and run.

- ``families``: every declared family's tiny transformer (``TINY``) and a plain Euler loop that drives any of
  them (``denoise``); the configs are in ``tiny_image``, ``tiny_video`` and ``tiny_dit``, their contract in
  ``tiny_common``;
- ``tiny_flux``: the tiny FLUX transformer of the runtime tests, its inputs and Euler loops;
- ``pipelines``: tiny diffusers pipelines (FLUX, SD3, Wan 2.1 / 2.2, Qwen-Image, HunyuanVideo), with tiny
  text encoders or called with prompt embeddings;
- ``context_parallel``: the FLUX, Wan and Qwen-Image transformers of the multi-rank tests (head and token
  counts that the ranks divide);
- ``presets``: the per-preset settings of the tests' short runs (``TINY_OVERRIDES``, ``tiny_overrides``) and the
  presets of the compiled test matrices (``COMPILED_PRESETS``).

Not imported by ``import fastcache_rt``. Its modules import diffusers (the pipelines also transformers), so
import them only where those are installed (the ``test`` extra). Test-only helpers (assertions, fixtures)
stay in ``tests/``.
"""
