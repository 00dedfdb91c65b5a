"""A tiny randomly initialised FluxTransformer2DModel built from a config (no downloads) and a plain Euler
flow-matching loop that drives it the way a pipeline does (the runtime tests and ``benchmarks/bench_step_ops.py``)."""

import torch
from diffusers import FluxTransformer2DModel

TXT = 5


def tiny_flux(seed: int = 0, layers: int = 2, single: int = 2, heads: int = 2) -> FluxTransformer2DModel:
    """``layers`` double-stream and ``single`` single-stream blocks of ``heads`` heads of 16 channels (the context-
    parallel tests use 4 heads: Ulysses splits the heads over the ranks)."""
    torch.manual_seed(seed)
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
    )
    return m.eval()


def img_ids(H: int, W: int) -> torch.Tensor:
    ids = torch.zeros(H, W, 3)
    ids[..., 1] = torch.arange(H)[:, None]
    ids[..., 2] = torch.arange(W)[None]
    return ids.reshape(H * W, 3)


def inputs(seed: int, B: int = 1, H: int = 8, W: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H * W, 16, generator=g)
    enc = torch.randn(B, TXT, 32, generator=g)
    pooled = torch.randn(B, 32, generator=g)
    return x, enc, pooled


def call(model, x, enc, pooled, t, H, W):
    B = x.shape[0]
    return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                 timestep=torch.full((B,), float(t)), img_ids=img_ids(H, W), txt_ids=torch.zeros(TXT, 3),
                 return_dict=False)[0]


@torch.no_grad()
def denoise(model, steps: int, seed: int = 0, B: int = 1, H: int = 8, W: int = 8, hook=None):
    """Euler steps on the flow from t = 1 to 0; returns the final latents."""
    x, enc, pooled = inputs(seed, B, H, W)
    for s in range(steps):
        t = 1.0 - s / steps
        v = call(model, x, enc, pooled, t, H, W)
        if hook is not None:
            v = hook(s, v)
        x = x - v / steps
    return x


@torch.no_grad()
def denoise_cfg(model, steps: int, seed: int = 0, H: int = 8, W: int = 8, scale: float = 3.0):
    """True classifier-free guidance with separate cond / uncond calls (two text-embedding tensors)."""
    x, enc, pooled = inputs(seed, 1, H, W)
    g = torch.Generator().manual_seed(seed + 999)
    neg = torch.randn(enc.shape, generator=g)
    for s in range(steps):
        t = 1.0 - s / steps
        vc = call(model, x, enc, pooled, t, H, W)
        vu = call(model, x, neg, pooled, t, H, W)
        x = x - (vu + scale * (vc - vu)) / steps
    return x
