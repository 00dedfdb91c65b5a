"""Video transformer families (diffusers 0.42): Wan 2.1/2.2, HunyuanVideo (1.0 and 1.5), CogVideoX, LTX-Video, Mochi,
SkyReels-V2, Sana-Video, Cosmos (1.0 / Predict2), Allegro, EasyAnimate. Each declaration was checked against the
model's forward in ``diffusers/models/transformers`` (block loop, token order, block signature and return)."""

from __future__ import annotations

from .base import Blocks, Family, patch_grid

# Single-tensor blocks whose text tokens are a plain argument, the same for every block (cross-attention models).
_CROSS = {"encoder": None, "returns": ("hidden",)}


def _ncfhw(patch_attr: str | None = None, t_attr: str | None = None, s_attr: str = "patch_size"):
    """Grid of a (B, C, F, H, W) latent patchified by ``config.<patch_attr>`` (a (t, h, w) tuple) or by
    ``config.<t_attr>`` in time (None: 1) and ``config.<s_attr>`` in space; tokens are flattened as (F, H, W)."""

    def grid(model, kwargs):
        x = kwargs.get("hidden_states")
        if x is None or x.ndim != 5:
            return None
        cfg = model.config
        if patch_attr is not None:
            patch = tuple(cfg[patch_attr])
        else:
            patch = ((cfg[t_attr] or 1) if t_attr else 1, cfg[s_attr], cfg[s_attr])
        return patch_grid(tuple(x.shape[2:]), patch)

    return grid


def _cogvideox_grid(model, kwargs):
    # CogVideoX latents are (B, F, C, H, W); CogVideoXPatchEmbed flattens tokens as (F, H, W) after the text tokens.
    x = kwargs.get("hidden_states")
    if x is None or x.ndim != 5:
        return None
    cfg = model.config
    return patch_grid((x.shape[1], x.shape[3], x.shape[4]), (cfg.patch_size_t or 1, cfg.patch_size, cfg.patch_size))


def _ltx_grid(model, kwargs):
    # LTX latents arrive packed (B, F*H*W, C) in (F, H, W) order; the pipeline passes the latent num_frames / height /
    # width (before the transformer's own patch sizes, both 1 in released checkpoints).
    f, h, w = kwargs.get("num_frames"), kwargs.get("height"), kwargs.get("width")
    if f is None or h is None or w is None:
        return None
    cfg = model.config
    return patch_grid((int(f), int(h), int(w)), (cfg.patch_size_t, cfg.patch_size, cfg.patch_size))


# Official TeaCache4Wan2.1 probes either `e` (the time embedding before time_projection; the non-"ret_steps"
# coefficients) or `e0` (the 6-way modulation; the use_ret_steps coefficients). diffusers' block `temb` argument is
# `timestep_proj` == e0 (transformer_wan.py:683-704), so probe="temb" with the use_ret_steps ("ret mode")
# coefficients, which the official code pairs with 5 always-computed warm-up steps. Wan 2.2 TI2V passes a per-token
# `timestep` (B, seq): temb is then (B, seq, 6, D); the A14B pipeline's two transformers are both this class.
WAN_RET_STEPS = {
    "Wan2.1-T2V-1.3B": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    "Wan2.1-T2V-14B": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    "Wan2.1-I2V-14B-480P": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "Wan2.1-I2V-14B-720P": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}
WAN = Family(
    name="wan",
    classes=("WanTransformer3DModel",),
    lists=(Blocks("blocks", **_CROSS),),
    temb="temb",
    probe="temb",
    grid=_ncfhw("patch_size"),
    teacache=dict(WAN_RET_STEPS),
    teacache_source="ali-vilab/TeaCache TeaCache4Wan2.1/teacache_generate.py (use_ret_steps branch, probe e0); same "
    "values in SkyworkAI/SkyReels-V2 skyreels_v2_infer/modules/transformer.py initialize_teacache",
    notes="coefficients are the use_ret_steps set (probe = modulation e0 = block temb); the non-ret set "
    "(2396.77, ... for 1.3B) is fitted on the pre-projection embedding, which no block receives",
)

# Dual-stream then single-stream list; both take and return (hidden, encoder) separately (the single block joins
# image-first internally and splits again, transformer_hunyuan_video.py:549-584). Token-replace (I2V) blocks take two
# extra positional args (token_replace_emb, first_frame_num_tokens) bound to *args, the same for every block; their
# norm1 needs them too, so probe="norm1" is only for T2V / latent_concat checkpoints.
HUNYUANVIDEO = Family(
    name="hunyuanvideo",
    classes=("HunyuanVideoTransformer3DModel",),
    lists=(
        Blocks("transformer_blocks", returns=("hidden", "encoder")),
        Blocks("single_transformer_blocks", returns=("hidden", "encoder")),
    ),
    temb="temb",
    probe="norm1",
    grid=_ncfhw(t_attr="patch_size_t"),
    teacache={"HunyuanVideo": (733.226126, -401.131952, 67.5869174, -3.14987800, 0.0961237896)},
    teacache_source="ali-vilab/TeaCache TeaCache4HunyuanVideo/teacache_sample_video.py (probe "
    "transformer_blocks[0].norm1(hidden, emb=temb)[0])",
)

# norm1 is CogVideoXLayerNormZero(hidden, encoder, temb) (3 inputs), so no norm1 probe; official TeaCache4CogVideoX
# probes `emb`, which is exactly the block temb argument. The model splits text/image tokens before the list.
COGVIDEOX = Family(
    name="cogvideox",
    classes=("CogVideoXTransformer3DModel",),
    lists=(Blocks("transformer_blocks", returns=("hidden", "encoder")),),
    temb="temb",
    probe="temb",
    grid=_cogvideox_grid,
    teacache={
        "CogVideoX-5b": (-1538.80483, 843.202495, -134.363087, 7.97131516, -0.0523162339),
        "CogVideoX-2b": (-31.0658903, 25.4732368, -5.92380459, 1.75769064, -0.00361568434),
        "CogVideoX-5b-I2V": (-1538.80483, 843.202495, -134.363087, 7.97131516, -0.0523162339),
        "CogVideoX1.5-5B": (250.210439, -165.061612, 35.7804877, -0.781551492, 0.0358559703),
        "CogVideoX1.5-5B-I2V": (122.842302, -104.088754, 26.2981677, -0.306009921, 0.0371213220),
    },
    teacache_source="ali-vilab/TeaCache TeaCache4CogVideoX1.5/teacache_sample_video.py coefficients_dict (probe emb)",
)

# norm1 is a plain RMSNorm (modulation is scale_shift_table + temb inside the block), so no norm1 probe: "hidden".
# Official TeaCache4LTX-Video fits its coefficients on norm1(hidden) * (1 + scale_msa) + shift_msa of block 0, so
# they are an approximation with this probe.
LTX = Family(
    name="ltx",
    classes=("LTXVideoTransformer3DModel",),
    lists=(Blocks("transformer_blocks", **_CROSS),),
    temb="temb",
    probe="hidden",
    grid=_ltx_grid,
    teacache={"LTX-Video-0.9.1": (21.4700694, -12.8016453, 2.31279151, 0.792487521, 0.00969274326)},
    teacache_source="ali-vilab/TeaCache TeaCache4LTX-Video/teacache_ltx.py (fitted on block-0 modulated input)",
    notes="teacache coefficients were fitted on the AdaLN-modulated input, the runtime probes hidden: approximate",
)

# MochiRMSNormZero norm1(hidden, temb) returns (modulated, gates...); the last block is context_pre_only (its encoder
# output is its input), still the same arguments. Patch embed is per frame: tokens (F, H/p, W/p).
MOCHI = Family(
    name="mochi",
    classes=("MochiTransformer3DModel",),
    lists=(Blocks("transformer_blocks", returns=("hidden", "encoder")),),
    temb="temb",
    probe="norm1",
    grid=_ncfhw(t_attr=None),
    teacache={"Mochi-1-preview": (-3512.41319, 811.675948, -60.9400215, 2.42429681, 0.00305291719)},
    teacache_source="ali-vilab/TeaCache TeaCache4Mochi/teacache_mochi.py (probe transformer_blocks[0].norm1)",
)

# Wan-derived: temb is timestep_proj (the 6-way modulation, per token under diffusion forcing), the causal mask an
# extra argument shared by all blocks. SkyReels-V2's own TeaCache reuses the Wan2.1 coefficients (ret-steps set
# for the e0 probe).
SKYREELS_V2 = Family(
    name="skyreels_v2",
    classes=("SkyReelsV2Transformer3DModel",),
    lists=(Blocks("blocks", **_CROSS),),
    temb="temb",
    probe="temb",
    grid=_ncfhw("patch_size"),
    teacache={
        "SkyReels-V2-1.3B": WAN_RET_STEPS["Wan2.1-T2V-1.3B"],
        "SkyReels-V2-14B": WAN_RET_STEPS["Wan2.1-T2V-14B"],
        "SkyReels-V2-I2V-14B-540P": WAN_RET_STEPS["Wan2.1-I2V-14B-480P"],
        "SkyReels-V2-I2V-14B-720P": WAN_RET_STEPS["Wan2.1-I2V-14B-720P"],
    },
    teacache_source="SkyworkAI/SkyReels-V2 skyreels_v2_infer/modules/transformer.py initialize_teacache "
    "(use_ret_steps branch, probe e0)",
)

# HunyuanVideo 1.5: one dual-stream list; the model builds the joined text/ByT5/image encoder tokens before it.
HUNYUANVIDEO15 = Family(
    name="hunyuanvideo15",
    classes=("HunyuanVideo15Transformer3DModel",),
    lists=(Blocks("transformer_blocks", returns=("hidden", "encoder")),),
    temb="temb",
    probe="norm1",
    grid=_ncfhw(t_attr="patch_size_t"),
)

# Sana-Video: the block's conditioning argument is named `timestep` (t_block output, 6-way modulation); norm1 is a
# plain LayerNorm, hence probe="hidden". ControlNet residuals are added between blocks (transformer_sana_video.py
# forward loop), so calls passing controlnet_block_samples run uncached.
SANAVIDEO = Family(
    name="sanavideo",
    classes=("SanaVideoTransformer3DModel",),
    lists=(Blocks("transformer_blocks", **_CROSS),),
    temb="timestep",
    probe="hidden",
    grid=_ncfhw("patch_size"),
    uncached_kwargs=("controlnet_block_samples",),
)

# Cosmos: blocks take (hidden, encoder, embedded_timestep, temb=AdaLN-LoRA, ...); norm1(hidden, embedded_timestep)
# is the modulated input without the AdaLN-LoRA term (temb=None), close to TeaCache's probe. ControlNet residuals
# are a per-block argument (different for every block), so calls with them run uncached.
COSMOS = Family(
    name="cosmos",
    classes=("CosmosTransformer3DModel",),
    lists=(Blocks("transformer_blocks", **_CROSS),),
    temb="embedded_timestep",
    probe="norm1",
    grid=_ncfhw("patch_size"),
    uncached_kwargs=("block_controlnet_hidden_states",),
    notes="norm1 probe omits the AdaLN-LoRA temb term (the block passes it as a third input)",
)

# Allegro: PixArt-style block (LayerNorm norm1, modulation = scale_shift_table + temb) -> probe="hidden"; the 2D patch
# embed is applied per frame, so tokens are (F, H/p, W/p).
ALLEGRO = Family(
    name="allegro",
    classes=("AllegroTransformer3DModel",),
    lists=(Blocks("transformer_blocks", **_CROSS),),
    temb="temb",
    probe="hidden",
    grid=_ncfhw(t_attr=None),
)

# EasyAnimate: CogVideoX-like MMDiT block (norm1 takes hidden, encoder, temb) -> probe the timestep embedding as
# CogVideoX's TeaCache does. Text (and T5 text) are joined into `encoder` before the list; tokens (F, H/p, W/p).
EASYANIMATE = Family(
    name="easyanimate",
    classes=("EasyAnimateTransformer3DModel",),
    lists=(Blocks("transformer_blocks", returns=("hidden", "encoder")),),
    temb="temb",
    probe="temb",
    grid=_ncfhw(t_attr=None),
)

FAMILIES: list[Family] = [
    WAN,
    HUNYUANVIDEO,
    COGVIDEOX,
    LTX,
    MOCHI,
    SKYREELS_V2,
    HUNYUANVIDEO15,
    SANAVIDEO,
    COSMOS,
    ALLEGRO,
    EASYANIMATE,
]
