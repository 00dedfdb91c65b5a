"""img2img runs the tail of the scheduler's schedule: a gate calibrated per schedule position (MagCache's ratios)
reads the ratios of the positions that run, not of the first steps."""

from __future__ import annotations

import pytest
import torch

import fastcache_rt
from fastcache_rt.models import SAMPLE_DEFAULTS, load_default
from fastcache_rt.policy import MagCacheGate

pytestmark = pytest.mark.slow

STEPS, STRENGTH = 10, 0.6
# ratios that drift early and are flat late: the first 6 positions and the last 6 give different schedules
RATIOS = (1.0, 0.8, 0.8, 0.8, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0)


def test_magcache_in_img2img_reads_the_ratios_of_the_positions_that_run():
    from diffusers import FluxImg2ImgPipeline

    pipe = load_default()
    i2i = FluxImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    kw = {k: v for k, v in SAMPLE_DEFAULTS.items() if k != "num_inference_steps"}
    image = torch.rand(1, 3, kw["height"], kw["width"])
    gate = MagCacheGate(ratios=RATIOS, threshold=0.15, retention=0.0)
    run = int(STEPS * STRENGTH)
    want = [i for i, c in enumerate(gate.schedule(run, STEPS - run)) if c]
    wrong = [i for i, c in enumerate(gate.schedule(run)) if c]
    assert want != wrong  # the test can tell the two apart
    with fastcache_rt.cached(i2i, "magcache", ratios=RATIOS, threshold=0.15, retention=0.0):
        i2i("red circle", image=image, strength=STRENGTH, num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
        st = fastcache_rt.stats(i2i)
    assert st["num_steps"] == run
    assert st["computed"] == want, (st["computed"], want, wrong)
