"""Tiny randomly initialised configs (no downloads) for the families of fastcache_rt/families/image.py,
adapted from diffusers' own tests (tests/models/transformers/test_models_transformer_*.py) with 2 blocks
per list. Size 0 / 1 give a 4x4 / 4x6 token grid; text length 5."""

import torch

from fastcache_rt.testing.tiny_common import Tiny
from fastcache_rt.testing.tiny_common import built as _built
from fastcache_rt.testing.tiny_common import gen as _g

TXT = 5
_GRID = {0: (4, 4), 1: (4, 6)}  # token grid (h, w) per size




def _ids(h, w, cols=3):
    """FLUX-style position ids: rows (0, row, col[, 0]) over an h x w grid."""
    ids = torch.zeros(h, w, cols)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    return ids.reshape(h * w, cols)


def _sigma(t, B):  # flow-matching sigma in (0, 1] (the pipeline divides the scheduler's timestep by 1000)
    return torch.full((B,), float(t))


def _t1000(t, B):  # scheduler timesteps in (0, 1000] (SD3, CogView4, Bria)
    return torch.full((B,), float(t) * 1000)


def _lumina_t(t, B):  # Lumina / Z-Image: 1 - sigma (0 = pure noise)
    return torch.full((B,), 1.0 - float(t))


# ------------------------------------------------------------------------------------- FLUX-like (packed)
def _flux():
    from diffusers import FluxTransformer2DModel

    return _built(
        FluxTransformer2DModel, patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 6, 6],
    )


def _flux_inputs(seed, B, size):
    h, w = _GRID[size]
    g = _g(seed)
    return dict(
        hidden_states=torch.randn(B, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(B, TXT, 32, generator=g),
        pooled_projections=torch.randn(B, 32, generator=g),
        img_ids=_ids(h, w), txt_ids=torch.zeros(TXT, 3), return_dict=False,
    )


def _flux2():
    from diffusers import Flux2Transformer2DModel

    return _built(
        Flux2Transformer2DModel, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
    )


def _flux2_inputs(seed, B, size):
    h, w = _GRID[size]
    g = _g(seed)
    txt_ids = torch.zeros(TXT, 4)
    txt_ids[:, 3] = torch.arange(TXT)
    return dict(
        hidden_states=torch.randn(B, h * w, 4, generator=g),
        encoder_hidden_states=torch.randn(B, TXT, 32, generator=g),
        img_ids=_ids(h, w, 4), txt_ids=txt_ids, guidance=torch.full((B,), 3.5), return_dict=False,
    )


def _ovis():
    from diffusers import OvisImageTransformer2DModel

    return _built(
        OvisImageTransformer2DModel, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
        num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
    )


def _longcat():
    from diffusers import LongCatImageTransformer2DModel

    return _built(
        LongCatImageTransformer2DModel, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )


def _bria():
    from diffusers import BriaTransformer2DModel

    return _built(
        BriaTransformer2DModel, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8],
    )


def _packed_inputs(seed, B, size):
    """Ovis-Image / LongCat-Image / Bria: packed (B, h*w, 4) latents with FLUX-style ids."""
    h, w = _GRID[size]
    g = _g(seed)
    return dict(
        hidden_states=torch.randn(B, h * w, 4, generator=g),
        encoder_hidden_states=torch.randn(B, TXT, 32, generator=g),
        img_ids=_ids(h, w), txt_ids=torch.zeros(TXT, 3), return_dict=False,
    )


# ------------------------------------------------------------------------------------------ NCHW latents
def _sd3():
    from diffusers import SD3Transformer2DModel

    return _built(
        SD3Transformer2DModel, sample_size=32, patch_size=2, in_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96,
        dual_attention_layers=(0,), qk_norm="rms_norm",  # SD3.5-style block 0 (dual attention), plain block 1
    )


def _sd3_inputs(seed, B, size):
    h, w = _GRID[size]
    g = _g(seed)
    return dict(
        hidden_states=torch.randn(B, 4, 2 * h, 2 * w, generator=g),
        encoder_hidden_states=torch.randn(B, TXT, 32, generator=g),
        pooled_projections=torch.randn(B, 64, generator=g), return_dict=False,
    )


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    return _built(
        QwenImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )


def _qwen_inputs(seed, B, size):
    h, w = _GRID[size]
    g = _g(seed)
    return dict(
        hidden_states=torch.randn(B, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(B, TXT, 16, generator=g),
        encoder_hidden_states_mask=torch.ones(B, TXT, dtype=torch.long),
        img_shapes=[[(1, h, w)]] * B, return_dict=False,
    )


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    return _built(
        Lumina2Transformer2DModel, sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2,
        num_refiner_layers=2, num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None,
        norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=8,
    )


def _lumina2_inputs(seed, B, size):
    h, w = _GRID[size]
    g = _g(seed)
    return dict(
        hidden_states=torch.randn(B, 4, 2 * h, 2 * w, generator=g),
        encoder_hidden_states=torch.randn(B, TXT, 8, generator=g),
        encoder_attention_mask=torch.ones(B, TXT, dtype=torch.bool), return_dict=False,
    )


def _auraflow():
    from diffusers import AuraFlowTransformer2DModel

    return _built(
        AuraFlowTransformer2DModel, sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=2,
        num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=32, out_channels=4, pos_embed_max_size=256,
    )


def _auraflow_inputs(seed, B, size):
    h, w = _GRID[size]
    g = _g(seed)
    return dict(
        hidden_states=torch.randn(B, 4, 2 * h, 2 * w, generator=g),
        encoder_hidden_states=torch.randn(B, TXT, 32, generator=g), return_dict=False,
    )


def _cogview4():
    from diffusers import CogView4Transformer2DModel

    return _built(
        CogView4Transformer2DModel, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
        num_attention_heads=4, out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=4,
    )


def _cogview3plus():
    from diffusers import CogView3PlusTransformer2DModel

    return _built(
        CogView3PlusTransformer2DModel, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
        num_attention_heads=2, out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2,
        pos_embed_max_size=8, sample_size=8,
    )


def _cogview_inputs(seed, B, size):
    h, w = _GRID[size]
    g = _g(seed)
    hw = torch.tensor([[16.0 * h, 16.0 * w]]).repeat(B, 1)
    return dict(
        hidden_states=torch.randn(B, 4, 2 * h, 2 * w, generator=g),
        encoder_hidden_states=torch.randn(B, TXT, 8, generator=g),
        original_size=hw, target_size=hw, crop_coords=torch.zeros(B, 2), return_dict=False,
    )


def _cogview3_t(t, B):  # CogView3-Plus: discrete DDIM timesteps in [0, 999]
    return torch.full((B,), int(round(float(t) * 999)), dtype=torch.long)


def _nchw_grid(size):
    return (1, *_GRID[size])


# ----------------------------------------------------------------------- per-block arguments (Chroma, HiDream)
def _chroma():
    from diffusers import ChromaTransformer2DModel

    return _built(
        ChromaTransformer2DModel, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8],
        approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1,
    )


def _chroma_inputs(seed, B, size):
    h, w = _GRID[size]
    g = _g(seed)
    return dict(
        hidden_states=torch.randn(B, h * w, 4, generator=g), encoder_hidden_states=torch.randn(B, TXT, 32, generator=g),
        img_ids=_ids(h, w), txt_ids=torch.zeros(TXT, 3), return_dict=False,
    )


def _hidream():
    from diffusers import HiDreamImageTransformer2DModel

    # one llama layer per block (2 double + 2 single); the model joins the last two text states as the first
    return _built(
        HiDreamImageTransformer2DModel, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        num_single_layers=2, attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8,
        num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
        llama_layers=(0, 1, 2, 3), force_inference_output=True,
    )


def _hidream_inputs(seed, B, size):
    h, w = _GRID[size]
    g = _g(seed)
    return dict(
        hidden_states=torch.randn(B, 4, 2 * h, 2 * w, generator=g),
        encoder_hidden_states_t5=torch.randn(B, TXT, 8, generator=g),
        encoder_hidden_states_llama3=torch.randn(4, B, TXT, 4, generator=g),
        pooled_embeds=torch.randn(B, 8, generator=g), return_dict=False,
    )


TINY: dict[str, Tiny] = {
    "chroma": Tiny(build=_chroma(), inputs=_chroma_inputs, timestep=_sigma),
    "hidream": Tiny(build=_hidream(), inputs=_hidream_inputs, timestep=_t1000, grid=_nchw_grid,
                    timestep_arg="timesteps"),
    "flux": Tiny(build=_flux(), inputs=_flux_inputs, timestep=_sigma),
    "flux2": Tiny(build=_flux2(), inputs=_flux2_inputs, timestep=_sigma),
    "sd3": Tiny(build=_sd3(), inputs=_sd3_inputs, timestep=_t1000, grid=_nchw_grid),
    "qwenimage": Tiny(build=_qwen(), inputs=_qwen_inputs, timestep=_sigma, grid=_nchw_grid),
    "lumina2": Tiny(build=_lumina2(), inputs=_lumina2_inputs, timestep=_lumina_t, grid=_nchw_grid),
    "auraflow": Tiny(build=_auraflow(), inputs=_auraflow_inputs, timestep=_sigma, grid=_nchw_grid),
    "cogview4": Tiny(build=_cogview4(), inputs=_cogview_inputs, timestep=_t1000, grid=_nchw_grid),
    "ovisimage": Tiny(build=_ovis(), inputs=_packed_inputs, timestep=_sigma),
    "longcatimage": Tiny(build=_longcat(), inputs=_packed_inputs, timestep=_sigma),
    "bria": Tiny(build=_bria(), inputs=_packed_inputs, timestep=_t1000),
    "cogview3plus": Tiny(
        build=_cogview3plus(), inputs=_cogview_inputs, timestep=_cogview3_t, grid=_nchw_grid
    ),
}


# Z-Image does not fit the Tiny calling convention: its forward's timestep argument is `t` (not `timestep`),
# the latent `x` is a list of (C, F, H, W) tensors and the output a list of such tensors. Kept apart so that a
# harness calling model(**inputs, timestep=...) does not trip on it: call model(**inputs, t=tiny.timestep(t,
# B)). Token grids 4x8 / 8x8 (multiples of 32, the length the model pads the image tokens to).
def _zimage():
    from diffusers import ZImageTransformer2DModel

    return _built(
        ZImageTransformer2DModel, all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16,
        n_layers=2, n_refiner_layers=2, n_heads=1, n_kv_heads=1, qk_norm=True, cap_feat_dim=16,
        rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )


_ZGRID = {0: (4, 8), 1: (8, 8)}


def _zimage_inputs(seed, B, size):
    h, w = _ZGRID[size]
    g = _g(seed)
    return dict(
        x=[torch.randn(4, 1, 2 * h, 2 * w, generator=g) for _ in range(B)],
        cap_feats=[torch.randn(TXT, 16, generator=g) for _ in range(B)], return_dict=False,
    )


TINY_OTHER_TIMESTEP_ARG: dict[str, tuple[str, Tiny]] = {
    # name -> (the forward's timestep argument name, Tiny)
    "zimage": ("t", Tiny(build=_zimage(), inputs=_zimage_inputs, timestep=_lumina_t, latent="x",
                         grid=lambda size: (1, *_ZGRID[size]), timestep_arg="t")),
}
