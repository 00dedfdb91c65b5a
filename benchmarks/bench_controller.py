"""Controller overhead at a FLUX-like token count: the time a step spends outside the transformer (probe, gate,
forecast, cache update, state), as a fraction of a full FLUX.1 step, both measured on this machine in one run.

    python benchmarks/bench_controller.py            # 4096 image + 512 text tokens, width 3072 (FLUX.1-dev)
    python benchmarks/bench_controller.py --quick    # fewer controller repeats

A full FLUX.1-dev step (19 double + 38 single blocks) is too slow to run here dozens of times, so it is timed by
parts: one double block, one single block and the embed/output head of a FLUX-width model (random weights, fp32),
each measured, and summed as embed + 19 x double + 38 x single. The controller is timed inside real forward calls of
that model with the policy's schedule, through ``stats()['controller_seconds']``, with the blocks of computed steps
stubbed out (their cost is the denominator, not the numerator).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fastcache_rt  # noqa: E402
from fastcache_rt.controller import Controller  # noqa: E402

FLUX_DOUBLE, FLUX_SINGLE = 19, 38


def flux_width_model(layers=1, single=1):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56],
        guidance_embeds=True,
    ).eval()


def make_inputs(n_img=4096, n_txt=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = int(n_img**0.5)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None]
    return dict(
        hidden_states=torch.randn(1, n_img, 64, generator=g), encoder_hidden_states=torch.randn(1, n_txt, 4096, generator=g),
        pooled_projections=torch.randn(1, 768, generator=g), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(n_txt, 3),
        guidance=torch.full((1,), 3.5), return_dict=False,
    )


@torch.no_grad()
def time_full_step(model, inp, repeats):
    """Per-part times of one forward: embed+head, one double block, one single block (medians)."""
    marks = {}

    def pre(name):
        def hook(mod, args, kwargs):
            marks[name + "_start"] = time.perf_counter()
        return hook

    def post(name):
        def hook(mod, args, kwargs, out):
            marks[name] = time.perf_counter() - marks[name + "_start"]
        return hook

    hs = [model.transformer_blocks[0].register_forward_pre_hook(pre("double"), with_kwargs=True),
          model.transformer_blocks[0].register_forward_hook(post("double"), with_kwargs=True),
          model.single_transformer_blocks[0].register_forward_pre_hook(pre("single"), with_kwargs=True),
          model.single_transformer_blocks[0].register_forward_hook(post("single"), with_kwargs=True)]
    rows = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(timestep=torch.full((1,), 0.5), **inp)
            total = time.perf_counter() - t0
            rows.append((total - marks["double"] - marks["single"], marks["double"], marks["single"]))
    finally:
        for h in hs:
            h.remove()
    head, dbl, sgl = (statistics.median(c) for c in zip(*rows))
    return head, dbl, sgl


@torch.no_grad()
def time_controller(model, inp, policy, steps, overrides):
    """Controller seconds per call over one generation, blocks stubbed out."""
    orig = Controller._run
    Controller._run = lambda self, li, original, kw, hidden, enc, start, stop: (hidden * 1.0, enc)
    try:
        with fastcache_rt.cached(model, policy, num_steps=steps, **overrides):
            for s in range(steps):
                model(timestep=torch.full((1,), 1.0 - s / steps), **inp)
            st = fastcache_rt.stats(model)
    finally:
        Controller._run = orig
    return st["controller_seconds_per_call"], len(st["computed"]), st["cache_bytes"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="20 steps, one timing of the full step")
    ap.add_argument("--policies", default="none,fora,teacache,spectralcache,fbcache,magcache,taylorseer,freqca,spectrum")
    args = ap.parse_args(argv)
    steps = 20 if args.quick else args.steps
    model = flux_width_model()
    inp = make_inputs()
    print(f"FLUX-width model (D=3072, 4096 image + 512 text tokens, fp32), {torch.get_num_threads()} threads; "
          f"backends: {', '.join(k for k, v in fastcache_rt.ops.backends().items() if v['available'])}")
    head, dbl, sgl = time_full_step(model, inp, 1 if args.quick else 2)
    full = head + FLUX_DOUBLE * dbl + FLUX_SINGLE * sgl
    print(f"full FLUX.1 step, summed from measured parts: head {head:.2f} s + {FLUX_DOUBLE} x {dbl:.2f} s + "
          f"{FLUX_SINGLE} x {sgl:.2f} s = {full:.1f} s")
    print(f"{'policy':15s} {'full steps':>10s} {'controller/step':>16s} {'of a full step':>15s} {'cache MiB':>10s}")
    worst = 0.0
    for name in args.policies.split(","):
        overrides = {"ratios": [1.0] * steps} if name == "magcache" else {}
        ctl, nfe, nbytes = time_controller(model, inp, name, steps, overrides)
        frac = ctl / full
        worst = max(worst, frac)
        print(f"{name:15s} {nfe:>7d}/{steps:<2d} {ctl * 1e3:13.2f} ms {frac * 100:14.4f}% {nbytes / 2**20:10.1f}")
    print(f"\nworst controller overhead: {worst * 100:.4f}% of a full step (target < 0.5%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
