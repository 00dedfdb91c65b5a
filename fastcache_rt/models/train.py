"""Trains the shipped model and writes it as a diffusers ``FluxPipeline`` folder.

    python -m fastcache_rt.models.train --out fastcache_rt/models/default --figures docs/images

Stages (each with a progress bar):
1. VAE: the one-level ``AutoencoderKL`` is trained to be a near-identity (decoder(pixels) ~ pixels and
   encoder(pixels) ~ pixels), so the transformer's latents are the image pixels in [-1, 1].
2. Transformer: rectified flow in FLUX's convention. For an image x0 (packed as 2x2 patches) and noise n,
   x_t = (1 - t) x0 + t n, and the transformer, given ``timestep = t`` (the pipeline feeds sigma = timestep / 1000),
   regresses the velocity n - x0. Conditioning: the frozen text encoders' token embeddings and pooled embedding
   of the class prompt, computed once per class through the pipeline's own ``encode_prompt``.
3. The weights (an exponential moving average of the transformer's) are saved with ``save_pretrained``
   (safetensors), with the loss log (CSV) and a summary (JSON) in the same folder.
4. Unless ``--no-report``: the folder is reloaded with ``FluxPipeline.from_pretrained`` and used for the report
   figures: loss curve, sample grid (every class x 4 seeds, 50 steps) beside training images, and the per-step
   rel-L1 change of the transformer's output over a 50-step run (PNG + JSON).

Everything is drawn from ``--seed``; for a fixed seed and thread count the run is reproducible.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import build
from .data import CLASSES, balanced_labels, generate, nearest_class

TRAIN_DEFAULTS = {
    "steps": 1400,
    "batch": 16,
    "lr": 2e-3,
    "warmup": 100,
    "ema": 0.995,
    "vae_steps": 600,
    "vae_batch": 16,
    "vae_lr": 3e-3,
}
SAMPLE_SEEDS = (0, 1, 2, 3)
REPORT_STEPS = 50


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's 2x2 patch packing (same layout as FluxPipeline._pack_latents)."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak range 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def train_vae(vae, steps: int, batch: int, lr: float, seed: int, tqdm) -> dict:
    """Fits the VAE to a near-identity on generated images and perturbed copies of them."""
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 11)
    bar = tqdm(range(steps), desc="vae", unit="step", disable=steps == 0)
    for step in bar:
        for pg in opt.param_groups:
            pg["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        x = generate(balanced_labels(batch, step), seed=seed * 1_000_003 + 500_000 + step)
        # the decoder also sees the slightly off-manifold latents a sampler may produce
        noisy = x + 0.05 * torch.randn(x.shape, generator=g)
        loss = (torch.nn.functional.mse_loss(vae.decode(noisy).sample, noisy)
                + torch.nn.functional.mse_loss(vae.encode(x).latent_dist.mean, x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = generate(balanced_labels(64, 0), seed=seed * 1_000_003 + 999_999)
        dec = vae.decode(x).sample
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return {"vae_psnr_decode_pixels_db": _psnr(dec, x), "vae_psnr_roundtrip_db": _psnr(rec, x)}


def train_transformer(transformer, cond, args, tqdm, log_rows: list, deadline: float) -> tuple[dict, dict]:
    """Rectified-flow training; returns (EMA state dict, info)."""
    from diffusers import FluxPipeline

    prompt_embeds, pooled, text_ids = cond
    ids = FluxPipeline._prepare_latent_image_ids(1, 16, 16, "cpu", torch.float32)
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    g = torch.Generator().manual_seed(args.seed * 7919 + 3)
    bar = tqdm(range(args.steps), desc="transformer", unit="step")
    done = 0
    t0 = time.perf_counter()
    stopped_early = False
    for step in bar:
        if time.perf_counter() > deadline:
            stopped_early = True
            break
        lr = _lr_at(step, args.steps, args.lr, args.warmup)
        for pg in opt.param_groups:
            pg["lr"] = lr
        labels = balanced_labels(args.batch, step)
        x0 = _pack(generate(labels, seed=args.seed * 1_000_003 + step))
        noise = torch.randn(x0.shape, generator=g)
        # timesteps: half uniform, half logit-normal (more weight on the middle of the trajectory)
        u = torch.rand(args.batch, generator=g)
        ln = torch.sigmoid(torch.randn(args.batch, generator=g))
        t = torch.where(torch.arange(args.batch) % 2 == 0, u, ln)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = transformer(hidden_states=xt, encoder_hidden_states=prompt_embeds[labels], pooled_projections=pooled[labels],
                        timestep=t, img_ids=ids, txt_ids=text_ids, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v_ in transformer.state_dict().items():
                if v_.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v_.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v_)
        done = step + 1
        log_rows.append({"step": done, "loss": loss.item(), "lr": lr, "grad_norm": float(gn),
                         "seconds": time.perf_counter() - t0})
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    transformer.eval()
    return ema, {"steps_done": done, "stopped_early_by_time_budget": stopped_early,
                 "transformer_seconds": time.perf_counter() - t0}


def _smooth(vals: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(vals):
        acc += v
        if i >= k:
            acc -= vals[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _to_grid(imgs: torch.Tensor, rows: int, cols: int, scale: int = 3):
    """(rows*cols, 3, H, W) in [0, 1] -> PIL image, nearest-upscaled."""
    from PIL import Image

    _, c, h, w = imgs.shape
    g = imgs.reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    img = Image.fromarray((g.clamp(0, 1) * 255).round().byte().numpy())
    return img.resize((cols * w * scale, rows * h * scale), Image.NEAREST)


def write_report(folder: Path, figures: Path, log_rows: list, seed: int) -> dict:
    """Loss curve, sample grid beside training images, and the per-step rel-L1 curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from diffusers import FluxPipeline

    from . import SAMPLE_DEFAULTS

    figures.mkdir(parents=True, exist_ok=True)
    info: dict = {}

    steps = [r["step"] for r in log_rows]
    losses = [r["loss"] for r in log_rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss (per step)")
    ax.plot(steps, _smooth(losses, 50), lw=1.5, label="moving average (50 steps)")
    ax.set_xlabel("training step")
    ax.set_ylabel("rectified-flow MSE")
    ax.set_yscale("log")
    ax.set_title("shipped model: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "model_loss.png", dpi=120)
    plt.close(fig)

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kw = {k: v for k, v in SAMPLE_DEFAULTS.items() if k != "num_inference_steps"}
    prompts = [c for c in CLASSES for _ in SAMPLE_SEEDS]
    gens = [torch.Generator().manual_seed(s) for _ in CLASSES for s in SAMPLE_SEEDS]

    outputs: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        outputs.append((out[0] if isinstance(out, tuple) else out.sample).detach().clone())

    h = pipe.transformer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            images = pipe(prompt=prompts, num_inference_steps=REPORT_STEPS, generator=gens, output_type="pt",
                          **kw).images
    finally:
        h.remove()
    rel = []
    for s in range(1, len(outputs)):
        prev, cur = outputs[s - 1], outputs[s]
        rel.append(((cur - prev).abs().mean() / prev.abs().mean()).item())
    info["rel_l1_steps"] = len(outputs)
    info["rel_l1"] = rel

    ncol = len(SAMPLE_SEEDS)
    train_imgs = (generate(torch.arange(len(CLASSES)).repeat_interleave(ncol), seed=seed * 1_000_003 + 424_242) + 1) / 2
    samples = images.reshape(len(CLASSES), ncol, 3, 32, 32)
    train_g = train_imgs.reshape(len(CLASSES), ncol, 3, 32, 32)
    gap = torch.ones(len(CLASSES), 1, 3, 32, 32)
    both = torch.cat([samples, gap, train_g], dim=1).reshape(-1, 3, 32, 32)
    grid = _to_grid(both, len(CLASSES), 2 * ncol + 1, scale=3)
    fig, ax = plt.subplots(figsize=(grid.width / 100 + 1.6, grid.height / 100 + 0.7))
    ax.imshow(grid)
    ax.set_xticks([(ncol * 32 * 3) / 2, ((ncol + 1) * 32 * 3) + (ncol * 32 * 3) / 2])
    ax.set_xticklabels([f"samples (50 steps, seeds {SAMPLE_SEEDS[0]}-{SAMPLE_SEEDS[-1]})", "training images"])
    ax.xaxis.tick_top()
    ax.set_yticks([(i + 0.5) * 96 for i in range(len(CLASSES))])
    ax.set_yticklabels(CLASSES)
    ax.tick_params(length=0)
    fig.tight_layout()
    fig.savefig(figures / "model_samples.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    # do the samples resemble their class? nearest class by foreground colour and area (data.nearest_class)
    pred = nearest_class(images).reshape(len(CLASSES), ncol)
    info["samples_nearest_class_accuracy"] = (pred == torch.arange(len(CLASSES))[:, None]).float().mean().item()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(rel) + 1), rel, marker="o", ms=3)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("rel-L1 of transformer output vs previous step")
    ax.set_yscale("log")
    ax.set_title(f"shipped model: output change per step ({REPORT_STEPS} steps, {len(CLASSES)} classes x {ncol} seeds)")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(figures / "model_rel_l1.png", dpi=120)
    plt.close(fig)
    with open(figures / "model_rel_l1.json", "w") as f:
        json.dump({"num_inference_steps": REPORT_STEPS, "prompts": list(CLASSES), "seeds": list(SAMPLE_SEEDS),
                   "definition": "mean|o_s - o_{s-1}| / mean|o_{s-1}| of the transformer output, batch of all "
                                 "classes x seeds, s = 1..49",
                   "rel_l1": rel}, f, indent=1)
    return info


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    probe = out if out.exists() else out.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise ValueError(f"--out {out} is not writable")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastcache_rt.models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="pipeline folder to write (created or overwritten)")
    p.add_argument("--figures", type=Path, default=None,
                   help="folder for the report PNGs (model_loss/samples/rel_l1.png); default: OUT/figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=TRAIN_DEFAULTS["steps"], help="transformer training steps")
    p.add_argument("--batch", type=int, default=TRAIN_DEFAULTS["batch"])
    p.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"])
    p.add_argument("--warmup", type=int, default=TRAIN_DEFAULTS["warmup"])
    p.add_argument("--ema", type=float, default=TRAIN_DEFAULTS["ema"])
    p.add_argument("--vae-steps", type=int, default=TRAIN_DEFAULTS["vae_steps"])
    p.add_argument("--minutes", type=float, default=30.0,
                   help="wall-clock budget for the whole run; transformer training stops early when it runs out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-report", action="store_true", help="skip the figures (sample grid, rel-L1 curve)")
    a = p.parse_args(argv)
    for name in ("steps", "batch", "warmup"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.vae_steps < 0:
        p.error(f"--vae-steps must be >= 0, got {a.vae_steps}")
    if not a.lr > 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    if not 0 <= a.ema < 1:
        p.error(f"--ema must lie in [0, 1), got {a.ema}")
    if not a.minutes > 0:
        p.error(f"--minutes must be > 0, got {a.minutes}")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    try:
        _check_out(a.out)
    except ValueError as e:
        p.error(str(e))
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    deadline = start + args.minutes * 60
    torch.manual_seed(args.seed)
    pipe = build.build_pipeline(seed=args.seed)

    vae_info = train_vae(pipe.vae, args.vae_steps, TRAIN_DEFAULTS["vae_batch"], TRAIN_DEFAULTS["vae_lr"], args.seed, tqdm)
    print(f"vae: decoder PSNR on pixels {vae_info['vae_psnr_decode_pixels_db']:.2f} dB, "
          f"round trip {vae_info['vae_psnr_roundtrip_db']:.2f} dB", file=sys.stderr)

    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=list(CLASSES), prompt_2=None, device=torch.device("cpu"),
            max_sequence_length=build.MAX_SEQUENCE_LENGTH)
    log_rows: list = []
    ema, tinfo = train_transformer(pipe.transformer, (prompt_embeds, pooled, text_ids), args, tqdm, log_rows, deadline)
    pipe.transformer.load_state_dict(ema)
    pipe.transformer.requires_grad_(False)
    train_seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    with open(args.out / "training_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "grad_norm", "seconds"])
        w.writeheader()
        w.writerows(log_rows)
    tail = [r["loss"] for r in log_rows[-100:]]
    summary = {
        "seed": args.seed, "threads": torch.get_num_threads(), "batch": args.batch, "lr": args.lr,
        "steps_planned": args.steps, **tinfo, **vae_info,
        "final_loss_mean_last_100": sum(tail) / max(1, len(tail)),
        "training_wall_seconds": train_seconds,
        "architecture": dict(build.ARCH, axes_dims_rope=list(build.ARCH["axes_dims_rope"])),
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "classes": list(CLASSES),
    }
    if tinfo["stopped_early_by_time_budget"]:
        print(f"warning: the --minutes budget ran out after {tinfo['steps_done']} of {args.steps} steps",
              file=sys.stderr)
    if not args.no_report:
        figures = args.figures if args.figures is not None else args.out / "figures"
        rep = write_report(args.out, figures, log_rows, args.seed)
        rel = rep["rel_l1"]
        summary.update({k: v for k, v in rep.items() if k != "rel_l1"})
        summary["rel_l1_min"], summary["rel_l1_max"] = min(rel), max(rel)
        summary["figures"] = str(figures)
    summary["total_wall_seconds"] = time.perf_counter() - start
    with open(args.out / "training_summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("architecture", "classes")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
