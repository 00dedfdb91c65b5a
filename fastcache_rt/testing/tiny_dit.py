"""Tiny configs of the DiT-style families declared in fastcache_rt/families/dit.py (random weights, CPU)."""

from __future__ import annotations

import torch

from fastcache_rt.testing.tiny_common import Tiny


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _built(cls, redraw_zeros=False, **config):
    """``redraw_zeros``: the model zero-initialises its modulation (blocks would be identities): draw it."""

    def build():
        torch.manual_seed(0)
        m = cls(**config)
        if redraw_zeros:
            with torch.no_grad():
                for prm in m.parameters():
                    if not prm.any():
                        prm.normal_(0, 0.1)
        return m.eval()

    return build


def _t1000(t, batch):  # diffusers' 0..1000 timestep convention
    return torch.full((batch,), 1000.0 * t)


# --- PixArt (diffusers test config, 2 layers; learned sigma: out_channels = 2 * in_channels) ----------------
def _pixart():
    from diffusers import PixArtTransformer2DModel

    sizes = [(8, 8), (8, 12)]

    def inputs(seed, batch, size):
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, *sizes[size], generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 8, generator=g),
            "added_cond_kwargs": {"aspect_ratio": None, "resolution": None},
            "return_dict": False,
        }

    build = _built(
        PixArtTransformer2DModel,
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=4,
        num_attention_heads=2,
        in_channels=4,
        cross_attention_dim=8,
        out_channels=8,
        num_embeds_ada_norm=8,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
        caption_channels=None,
    )
    return Tiny(build, inputs, _t1000, grid=lambda s: (1, sizes[s][0] // 2, sizes[s][1] // 2))


# --- Sana (diffusers test config, 2 layers) -----------------------------------------------------------------
def _sana():
    from diffusers import SanaTransformer2DModel

    sizes = [(4, 4), (4, 6)]

    def inputs(seed, batch, size):
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, *sizes[size], generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 8, generator=g),
            "return_dict": False,
        }

    build = _built(
        SanaTransformer2DModel,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=4,
    )
    return Tiny(build, inputs, _t1000, grid=lambda s: (1, *sizes[s]))


# --- DiT (class-conditional; learned sigma; the model unpatchifies a square grid only) ----------------------
def _dit():
    from diffusers import DiTTransformer2DModel

    sizes = [8, 12]

    def inputs(seed, batch, size):
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, sizes[size], sizes[size], generator=g),
            "class_labels": torch.randint(0, 8, (batch,), generator=g),
            "return_dict": False,
        }

    build = _built(
        DiTTransformer2DModel,
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=8,
        norm_num_groups=1,
    )
    return Tiny(build, inputs, _t1000, grid=lambda s: (1, sizes[s] // 2, sizes[s] // 2))


# --- HunyuanImage 2.1 (2 dual + 2 single blocks, 1 refiner layer) -------------------------------------------
def _hunyuanimage():
    from diffusers import HunyuanImageTransformer2DModel

    sizes = [(4, 4), (4, 6)]

    def inputs(seed, batch, size):
        g = _gen(seed)
        mask = torch.ones(batch, 6, dtype=torch.long)
        mask[:, 4:] = 0
        return {
            "hidden_states": torch.randn(batch, 4, *sizes[size], generator=g),
            "encoder_hidden_states": torch.randn(batch, 6, 16, generator=g),
            "encoder_attention_mask": mask,
            "return_dict": False,
        }

    build = _built(
        HunyuanImageTransformer2DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=(1, 1),
        text_embed_dim=16,
        rope_axes_dim=(4, 4),
    )
    return Tiny(build, inputs, _t1000, grid=lambda s: (1, *sizes[s]))


# --- Kandinsky 5 (channels-last video latent; forward(return_dict=False) returns a bare tensor, so inputs use
# return_dict=True: output[0] is then the sample; modulations are zero-initialised, so redrawn)
def _kandinsky5():
    from diffusers import Kandinsky5Transformer3DModel

    sizes = [(1, 4, 4), (2, 4, 6)]  # (frames, height, width) of the latent; patch (1, 2, 2)

    def inputs(seed, batch, size):
        g = _gen(seed)
        f, h, w = sizes[size]
        return {
            "hidden_states": torch.randn(batch, f, h, w, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 6, 16, generator=g),
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "visual_rope_pos": [torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)],
            "text_rope_pos": torch.arange(6),
            "return_dict": True,
        }

    build = _built(
        Kandinsky5Transformer3DModel,
        redraw_zeros=True,
        in_visual_dim=4,
        in_text_dim=16,
        in_text_dim2=8,
        time_dim=16,
        out_visual_dim=4,
        patch_size=(1, 2, 2),
        model_dim=16,
        ff_dim=32,
        num_text_blocks=2,
        num_visual_blocks=2,
        axes_dims=(2, 2, 4),
    )
    return Tiny(build, inputs, _t1000, grid=lambda s: (sizes[s][0], sizes[s][1] // 2, sizes[s][2] // 2))


# --- OmniGen (text-to-image: condition tokens + time token + image tokens in one sequence). Its scheduler is
# FlowMatchEuler(invert_sigmas=True, num_train_timesteps=1): the model's timestep is 1 - t (0 = pure noise)
def _omnigen():
    from diffusers import OmniGenTransformer2DModel

    sizes = [(4, 4), (4, 6)]
    n_txt = 6

    def inputs(seed, batch, size):
        g = _gen(seed)
        h, w = sizes[size]
        n = n_txt + 1 + (h // 2) * (w // 2)
        return {
            "hidden_states": torch.randn(batch, 4, h, w, generator=g),
            "input_ids": torch.randint(1, 32, (batch, n_txt), generator=g),
            "input_img_latents": [],
            "input_image_sizes": {},
            "attention_mask": torch.ones(batch, n, n),
            "position_ids": torch.arange(n).repeat(batch, 1),
            "return_dict": False,
        }

    build = _built(
        OmniGenTransformer2DModel,
        in_channels=4,
        patch_size=2,
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=32,
        num_layers=2,
        pad_token_id=0,
        vocab_size=32,
        time_step_dim=4,
        rope_scaling={"long_factor": [1, 2], "short_factor": [1, 2]},
        pos_embed_max_size=8,
    )
    return Tiny(
        build,
        inputs,
        lambda t, batch: torch.full((batch,), 1.0 - t),
        grid=lambda s: (1, sizes[s][0] // 2, sizes[s][1] // 2),
    )


# --- PRX (Photoroom): modulation and final layer are zero-initialised, so redrawn; timestep = sigma in [0, 1]
def _prx():
    from diffusers import PRXTransformer2DModel

    sizes = [(4, 4), (4, 8)]

    build = _built(
        PRXTransformer2DModel,
        redraw_zeros=True,
        in_channels=4,
        patch_size=2,
        context_in_dim=8,
        hidden_size=16,
        mlp_ratio=2.0,
        num_heads=2,
        depth=2,
        axes_dim=[4, 4],
    )

    def inputs(seed, batch, size):
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, *sizes[size], generator=g),
            "encoder_hidden_states": torch.randn(batch, 6, 8, generator=g),
            "attention_mask": torch.tensor([[1] * 5 + [0]] * batch, dtype=torch.bool),
            "return_dict": False,
        }

    return Tiny(
        build,
        inputs,
        lambda t, batch: torch.full((batch,), float(t)),
        grid=lambda s: (1, sizes[s][0] // 2, sizes[s][1] // 2),
    )


TINY: dict[str, Tiny] = {
    "pixart": _pixart(),
    "sana": _sana(),
    "dit": _dit(),
    "hunyuanimage": _hunyuanimage(),
    "kandinsky5": _kandinsky5(),
    "omnigen": _omnigen(),
    "prx": _prx(),
}
