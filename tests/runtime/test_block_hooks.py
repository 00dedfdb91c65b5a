"""Hooks on the blocks (profilers, offloading, user hooks) see each block run exactly once per real execution: a
list's takeover runs its blocks through their module calls, and the model's own loop, which then only hands the
result on, fires none of their forward hooks again (eager)."""

from __future__ import annotations

import pytest
import torch

import fastcache_rt
from fastcache_rt.models import SAMPLE_DEFAULTS, load_default

STEPS = 10


@pytest.mark.parametrize("preset", ["none", "spectrum", "teacache", "fbcache"])
def test_forward_hooks_fire_once_per_real_run(preset):
    pipe = load_default()
    pipe.set_progress_bar_config(disable=True)
    t = pipe.transformer
    blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
    pre, post = [0] * len(blocks), [0] * len(blocks)
    nan_on = {}
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: pre.__setitem__(i, pre[i] + 1))

        def after(m, a, out, i=i):
            post[i] += 1
            if nan_on.get(i) == post[i]:  # a value a hook injects reaches the output, as without caching
                return torch.full_like(out, float("nan")) if isinstance(out, torch.Tensor) else \
                    tuple(torch.full_like(o, float("nan")) for o in out)
            return None

        b.register_forward_hook(after)
    fastcache_rt.enable(pipe, preset)
    kw = dict(SAMPLE_DEFAULTS, num_inference_steps=STEPS)
    with torch.no_grad():
        pipe("red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    st = fastcache_rt.stats(pipe)
    n = len(st["computed"])
    first_blocks = 1 if preset == "fbcache" else 0
    for i in range(len(blocks)):
        if i in (0, len(t.transformer_blocks)):  # a list's first block: the model calls it on every step
            continue
        want = STEPS if i < first_blocks else n
        assert pre[i] == post[i] == want, (preset, i, pre[i], post[i], want)
    # a NaN a hook returns on a computed step's real run reaches the output and is counted
    nan_on.clear()
    pre[:] = post[:] = [0] * len(blocks)
    nan_on[len(blocks) - 1] = 1
    with torch.no_grad():
        out = pipe("red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    assert not torch.isfinite(out).all()
    assert fastcache_rt.stats(pipe)["nonfinite"] >= 1
    fastcache_rt.disable(pipe)
