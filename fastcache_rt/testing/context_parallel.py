"""Tiny FLUX, Wan 2.1 and Qwen-Image transformers for the context-parallel tests (``tests/distributed/``), and
Euler loops that drive them.

The configs are those of ``fastcache_rt.testing.tiny_flux`` (``tiny_flux``) and
``fastcache_rt.testing.tiny_video`` (``wan``) with two changes that context parallelism needs: 4 attention
heads (Ulysses splits the heads over the ranks: heads % N == 0 for N = 2 and 4) and 8 text tokens for FLUX (its
``_cp_plan`` splits the text tokens too: 8 % N == 0; the 5 of ``tiny_flux.inputs`` are not divisible). The
image grids are 8 x 8 (FLUX, 64 tokens) and 2 x 4 x 4 (Wan, 32 tokens).

Everything here is deterministic from the seed, so that every rank and the single-process reference build the
same model and inputs.
"""

from __future__ import annotations

import torch

FLUX_TXT = 8
FLUX_HW = (8, 8)
WAN_FHW = (2, 8, 8)  # latent frames, height, width; patch (1, 2, 2) -> token grid (2, 4, 4)

FAMILIES = ("flux", "wan", "qwen")
QWEN_TXT = 8
QWEN_HW = (8, 8)


def tiny_flux(seed: int = 0, layers: int = 2, single: int = 2, heads: int = 4):
    from fastcache_rt.testing.tiny_flux import tiny_flux as _tiny_flux

    return _tiny_flux(seed, layers, single, heads)


def tiny_wan(seed: int = 0, layers: int = 2, heads: int = 4):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return m.eval()


def tiny_qwen(seed: int = 0, layers: int = 2, heads: int = 4):
    """Qwen-Image: its ``_cp_plan`` splits the tokens at ``transformer_blocks.0`` and the text mask at every block
    (``transformer_blocks.*``)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    m = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=heads, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    return m.eval()


def build(family: str, seed: int = 0, small: bool = False):
    """The family's tiny model; ``small``: one block per list (for torch.compile tests: less to trace)."""
    if family == "flux":
        return tiny_flux(seed, *((1, 1) if small else (2, 2)))
    if family == "wan":
        return tiny_wan(seed, 1 if small else 2)
    if family == "qwen":
        return tiny_qwen(seed, 1 if small else 2)
    raise ValueError(f"family: one of {FAMILIES}, got {family!r}")


def grid(family: str) -> tuple[int, int, int]:
    """The (frames, height, width) token grid of the inputs below."""
    if family == "flux":
        return (1, *FLUX_HW)
    if family == "qwen":
        return (1, *QWEN_HW)
    f, h, w = WAN_FHW
    return (f, h // 2, w // 2)


def _img_ids(H: int, W: int) -> torch.Tensor:
    ids = torch.zeros(H, W, 3)
    ids[..., 1] = torch.arange(H)[:, None]
    ids[..., 2] = torch.arange(W)[None]
    return ids.reshape(H * W, 3)


def inputs(family: str, seed: int = 0) -> dict:
    """Forward kwargs except the timestep and the latent's update; ``"latent"``: the name of the latent argument."""
    g = torch.Generator().manual_seed(seed)
    if family == "flux":
        H, W = FLUX_HW
        return {
            "hidden_states": torch.randn(1, H * W, 16, generator=g),
            "encoder_hidden_states": torch.randn(1, FLUX_TXT, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g),
            "img_ids": _img_ids(H, W),
            "txt_ids": torch.zeros(FLUX_TXT, 3),
            "return_dict": False,
        }
    if family == "qwen":
        H, W = QWEN_HW
        return {
            "hidden_states": torch.randn(1, H * W, 16, generator=g),
            "encoder_hidden_states": torch.randn(1, QWEN_TXT, 16, generator=g),
            "encoder_hidden_states_mask": torch.ones(1, QWEN_TXT, dtype=torch.long),
            "img_shapes": [[(1, H, W)]],
            "return_dict": False,
        }
    return {
        "hidden_states": torch.randn(1, 4, *WAN_FHW, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 16, generator=g),
        "return_dict": False,
    }


def timestep(family: str, t: float) -> torch.Tensor:
    """FLUX and Qwen-Image take sigma in [0, 1], Wan sigma * 1000 (the pipelines' conventions)."""
    return torch.full((1,), float(t) * (1000.0 if family == "wan" else 1.0))


@torch.no_grad()
def denoise(model, family: str, steps: int, seed: int = 0, outputs: list | None = None) -> torch.Tensor:
    """Euler steps on the flow from t = 1 to 1/steps; returns the final latent (the full one, on every rank). Each
    step's model output is appended to ``outputs`` when given."""
    kw = inputs(family, seed)
    for s in range(steps):
        t = 1.0 - s / steps
        v = model(**kw, timestep=timestep(family, t))[0]
        if outputs is not None:
            outputs.append(v.clone())
        kw["hidden_states"] = kw["hidden_states"] - v / steps
    return kw["hidden_states"]
