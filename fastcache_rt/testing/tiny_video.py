"""Tiny configs of the video families declared in fastcache_rt/families/video.py (random weights, CPU). Configs follow
diffusers' own tests (tests/models/transformers/test_models_transformer_*.py) with 2 blocks per list; size 1 uses a
non-square grid so that a height/width mix-up in a grid shows."""

from __future__ import annotations

import torch

from fastcache_rt.testing.tiny_common import Tiny
from fastcache_rt.testing.tiny_common import built as _built
from fastcache_rt.testing.tiny_common import gen as _gen




def _t1000(t, batch):  # flow-matching pipelines: timestep = sigma * 1000
    return torch.full((batch,), 1000.0 * t)


def _t999_long(t, batch):  # DDPM/DDIM-style pipelines: integer timestep in [0, 999]
    return torch.full((batch,), round(999 * t), dtype=torch.long)


def _grid(sizes, patch):
    return lambda s: tuple(d // p for d, p in zip(sizes[s], patch))


# (frames, height, width) of the latent for size 0 and size 1
_FHW = [(2, 8, 8), (3, 8, 12)]


def _ncfhw_inputs(channels, text_dim, text_len=8, extra=None, sizes=_FHW):
    def inputs(seed, batch, size):
        g = _gen(seed)
        kw = {
            "hidden_states": torch.randn(batch, channels, *sizes[size], generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, text_dim, generator=g),
            "return_dict": False,
        }
        if extra is not None:
            kw.update(extra(g, batch, sizes[size]))
        return kw

    return inputs


# --- Wan 2.1 (diffusers test config, 2 layers) ---------------------------------------------------------------------
def _wan():
    from diffusers import WanTransformer3DModel

    build = _built(
        WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return Tiny(build, _ncfhw_inputs(4, 16), _t1000, grid=_grid(_FHW, (1, 2, 2)))


# --- HunyuanVideo (diffusers test config, 2 + 2 layers, guidance-distilled like the release) ----------------------
def _hunyuanvideo():
    from diffusers import HunyuanVideoTransformer3DModel

    sizes = [(1, 4, 4), (2, 4, 6)]
    build = _built(
        HunyuanVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
        num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )

    def extra(g, batch, fhw):
        return {
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "encoder_attention_mask": torch.ones(batch, 8),
            "guidance": torch.full((batch,), 6000.0),
        }

    return Tiny(build, _ncfhw_inputs(4, 16, extra=extra, sizes=sizes), _t1000, grid=_grid(sizes, (1, 1, 1)))


# --- CogVideoX (diffusers test config, 2 layers; latents are (B, F, C, H, W)) --------------------------------------
def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    sizes = [(2, 8, 8), (3, 8, 12)]
    build = _built(
        CogVideoXTransformer3DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8,
        patch_size=2, patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=8,
    )

    def inputs(seed, batch, size):
        g = _gen(seed)
        f, h, w = sizes[size]
        return {
            "hidden_states": torch.randn(batch, f, 4, h, w, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 8, generator=g),
            "return_dict": False,
        }

    return Tiny(build, inputs, _t999_long, grid=_grid(sizes, (1, 2, 2)))


# --- LTX-Video (diffusers test config, 2 layers; latents arrive packed (B, F*H*W, C)) ------------------------------
def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    sizes = [(2, 4, 4), (3, 4, 6)]
    build = _built(
        LTXVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16,
    )

    def inputs(seed, batch, size):
        g = _gen(seed)
        f, h, w = sizes[size]
        return {
            "hidden_states": torch.randn(batch, f * h * w, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "encoder_attention_mask": torch.ones(batch, 8),
            "num_frames": f, "height": h, "width": w,
            "return_dict": False,
        }

    return Tiny(build, inputs, _t1000, grid=_grid(sizes, (1, 1, 1)))


# --- Mochi (diffusers test config; Mochi's pipeline passes the reversed timestep 1000 * (1 - sigma)) ---------------
def _mochi():
    from diffusers import MochiTransformer3DModel

    build = _built(
        MochiTransformer3DModel, patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        pooled_projection_dim=16, in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16,
        time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16,
    )

    def extra(g, batch, fhw):
        return {"encoder_attention_mask": torch.ones(batch, 8)}

    return Tiny(build, _ncfhw_inputs(4, 16, extra=extra), lambda t, b: torch.full((b,), 1000.0 * (1.0 - t)),
                grid=_grid(_FHW, (1, 2, 2)))


# --- SkyReels-V2 (diffusers test config, 2 layers) ------------------------------------------------------------------
def _skyreels_v2():
    from diffusers import SkyReelsV2Transformer3DModel

    build = _built(
        SkyReelsV2Transformer3DModel, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return Tiny(build, _ncfhw_inputs(4, 16), _t1000, grid=_grid(_FHW, (1, 2, 2)))


# --- HunyuanVideo 1.5 (diffusers test config, t2v: image_embeds all zeros) ----------------------------------------
def _hunyuanvideo15():
    from diffusers import HunyuanVideo15Transformer3DModel

    sizes = [(1, 4, 4), (2, 4, 6)]
    build = _built(
        HunyuanVideo15Transformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
        text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    )

    def extra(g, batch, fhw):
        return {
            "encoder_attention_mask": torch.ones(batch, 6),
            "encoder_hidden_states_2": torch.randn(batch, 4, 8, generator=g),
            "encoder_attention_mask_2": torch.ones(batch, 4),
            "image_embeds": torch.zeros(batch, 3, 12),
        }

    return Tiny(build, _ncfhw_inputs(4, 16, text_len=6, extra=extra, sizes=sizes), _t1000,
                grid=_grid(sizes, (1, 1, 1)))


# --- Sana-Video (diffusers test config) ----------------------------------------------------------------------------
def _sanavideo():
    from diffusers import SanaVideoTransformer3DModel

    build = _built(
        SanaVideoTransformer3DModel, in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24,
        caption_channels=16, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
        norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return Tiny(build, _ncfhw_inputs(16, 16), _t1000, grid=_grid(_FHW, (1, 2, 2)))


# --- Cosmos (diffusers test config but concat_padding_mask=False: that path needs torchvision; 1-D timestep in
# Cosmos-Predict2's sigma / (sigma + 1) convention) ------------------------------------------------------------------
def _cosmos():
    from diffusers import CosmosTransformer3DModel

    build = _built(
        CosmosTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
        num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable",
    )

    def extra(g, batch, fhw):
        return {"attention_mask": torch.ones(batch, 8), "fps": 30}

    return Tiny(build, _ncfhw_inputs(4, 16, extra=extra), lambda t, b: torch.full((b,), float(t)),
                grid=_grid(_FHW, (1, 2, 2)))


# --- Allegro (diffusers test config, 2 layers; per-frame 2D patch embed) -------------------------------------------
def _allegro():
    from diffusers import AllegroTransformer3DModel

    build = _built(
        AllegroTransformer3DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8,
    )
    return Tiny(build, _ncfhw_inputs(4, 8), _t999_long, grid=_grid(_FHW, (1, 2, 2)))


# --- EasyAnimate (diffusers test config, 2 MMDiT layers) -----------------------------------------------------------
def _easyanimate():
    from diffusers import EasyAnimateTransformer3DModel

    build = _built(
        EasyAnimateTransformer3DModel, attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2,
        num_layers=2, out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16,
        time_embed_dim=8, time_position_encoding_type="3d_rope", timestep_activation_fn="silu",
    )
    return Tiny(build, _ncfhw_inputs(4, 16), _t1000, grid=_grid(_FHW, (1, 2, 2)))


TINY: dict[str, Tiny] = {
    "wan": _wan(),
    "hunyuanvideo": _hunyuanvideo(),
    "cogvideox": _cogvideox(),
    "ltx": _ltx(),
    "mochi": _mochi(),
    "skyreels_v2": _skyreels_v2(),
    "hunyuanvideo15": _hunyuanvideo15(),
    "sanavideo": _sanavideo(),
    "cosmos": _cosmos(),
    "allegro": _allegro(),
    "easyanimate": _easyanimate(),
}
