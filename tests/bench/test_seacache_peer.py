"""diffusers' SeaCache as a benchmark peer on the shipped FLUX model: the FLUX adapter (unpacked latents, scheduler
position in the cache context) makes it skip steps, its decisions are diffusers' own, and disable restores the
pipeline exactly."""

import math

import pytest
import torch

from fastcache_rt.bench import methods as M
from fastcache_rt.bench.harness import Harness, Settings

pytestmark = pytest.mark.skipif(not M.seacache_available()[0], reason="this diffusers has no SeaCache")

STEPS = 16
PROMPTS = ["red circle", "blue square"]


@pytest.fixture(scope="module")
def pipe():
    from fastcache_rt.models import load_default

    return load_default()


def test_flux_raw_vision_unpacks_the_packed_latents():
    from diffusers import FluxPipeline

    lat = torch.randn(2, 3, 8, 6)
    packed = FluxPipeline._pack_latents(lat, 2, 3, 8, 6)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    got = M.flux_sea_raw_vision(None, (), dict(hidden_states=packed, img_ids=ids))
    assert len(got) == 2 and all(torch.equal(g, lat[b].unsqueeze(1)) for b, g in enumerate(got))  # (C, 1, H, W)
    assert torch.equal(torch.stack(got).squeeze(2), FluxPipeline._unpack_latents(packed, 8 * 8, 6 * 8, 8))
    assert M.flux_sea_raw_vision(None, (), dict(hidden_states=packed, img_ids=ids[:-1])) is None


def _spied(cfg, log):
    """``cfg`` with diffusers' own gate decisions and fail-open warnings recorded into ``log``."""

    def enable(pipe, ctx):
        cfg.enable(pipe, ctx)
        hook = pipe.transformer._diffusers_hook.get_hook("sea_cache_root")
        shared = hook.shared_state
        resolve, fail = shared.resolve_gate, shared.mark_fail_open

        def resolve_gate(state, meta, indicator, config):
            out = resolve(state, meta, indicator, config)
            log["gates"].append((meta.step_index, meta.sigma, meta.num_inference_steps, out,
                                 [t.clone() for t in indicator or []]))
            return out

        def mark_fail_open(msg):
            log["fail_open"].append(msg)
            fail(msg)

        shared.resolve_gate, shared.mark_fail_open = resolve_gate, mark_fail_open

    return M.Config(cfg.method, cfg.library, cfg.config, enable, cfg.disable, note=cfg.note)


def _documented_rule(indicators, threshold, k, steps):
    """SeaCache's gate as its docs state it: first and last step full; otherwise full once the accumulated mean
    (over samples) relative L1 change of the SEA indicator reaches ``threshold`` or after ``k`` cached steps."""
    out, acc, run, prev = [], 0.0, 0, None
    for i, cur in enumerate(indicators):
        if i < 1 or i >= steps - 1 or prev is None or (k and run >= k):
            compute, d = True, 0.0
        else:
            d = sum(float((c.float() - p.float()).abs().mean() / (p.float().abs().mean() + 1e-16))
                    for c, p in zip(cur, prev)) / len(cur)
            compute = acc + d >= threshold
        acc, run = (0.0, 0) if compute else (acc + d, run + 1)
        out.append(compute)
        prev = cur
    return out


@pytest.mark.slow
def test_seacache_skips_steps_as_diffusers_decides_and_disable_restores(pipe):
    threshold, k = 0.25, 2
    log = dict(gates=[], fail_open=[])
    cfg = _spied(M.diffusers_seacache(threshold, max_consecutive=k), log)
    h = Harness(pipe, Settings(prompts=PROMPTS, seeds=[0], steps=STEPS, height=32, width=32, rounds=2,
                               uncached_every=1, call_kwargs=dict(guidance_scale=1.0, max_sequence_length=8)),
                progress=False)
    try:
        res = h.run([cfg])  # raises if an uncached call after disable differs from the reference
        ref = res.latents["uncached"]
        after, _, flags = h.call()
    finally:
        h.close()
    row = res.rows[1]
    # (a) steps skipped; output near but not equal to the uncached one; the same on the second enable
    assert 3 <= row["nfe"] < STEPS - 3, row["computed"]
    assert row["repeatable"]
    assert row["rel_l2"] > 0 and math.isfinite(row["psnr"]) and 30 < row["psnr"] < 100
    # (b) disable leaves nothing behind
    assert torch.equal(after, ref) and sum(flags) == STEPS
    tr = pipe.transformer
    assert "cache_context" not in tr.__dict__ and tr._cache_config is None
    assert not [n for m in tr.modules() for n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
                if n.startswith("sea_cache")]
    # (c) the watched NFE is diffusers' gate: the FLUX adapter fed it every step in order with the scheduler's sigma,
    # nothing ran fail-open, and the decisions follow SeaCache's documented rule
    assert not log["fail_open"]
    first = log["gates"][:STEPS]  # the first of the two enabled calls
    sigmas = pipe.scheduler.sigmas[:-1].tolist()
    assert [g[0] for g in first] == list(range(STEPS)) and [g[1] for g in first] == sigmas
    assert {g[2] for g in first} == {STEPS}
    decisions = [g[3] for g in first]
    assert [i for i, c in enumerate(decisions) if c] == row["computed"]
    side = 2 * (32 // (pipe.vae_scale_factor * 2))  # the latent's height and width
    channels = tr.config.in_channels // 4
    assert all(len(g[4]) == len(PROMPTS) and g[4][0].shape == (1, side, side, channels) for g in first)  # T, H, W, C
    assert decisions == _documented_rule([g[4] for g in first], threshold, k, STEPS)
