"""Text-to-image MMDiT / single-stream families: FLUX.1, FLUX.2, SD3 / 3.5, Qwen-Image, Lumina-Image-2.0,
Z-Image, AuraFlow, CogView4 / CogView3-Plus, Ovis-Image, LongCat-Image, Bria (Chroma and HiDream break the
contract: see the end). Each was checked against diffusers 0.42.1: every block of a list gets the same
arguments except the hidden/text tokens, and no model code runs between two blocks of one list unless an
optional argument listed in ``uncached_kwargs`` is given (fastcache_rt/testing/tiny_image.py: the tiny configs)."""

from __future__ import annotations

from .base import Blocks, Family, patch_grid

# TeaCache coefficients (highest power first), from the reference implementations:
#   ali-vilab/TeaCache @7c10efc TeaCache4FLUX/teacache_flux.py:113, TeaCache4Lumina2/teacache_lumina2.py:72;
#   welltop-cn/ComfyUI-TeaCache @91dff8e nodes.py:19 (FLUX.1 Kontext).
_FLUX_TEACACHE = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)
_FLUX_KONTEXT_TEACACHE = (-1046.55119, 312.563399, -16.9500694, 0.410995971, 0.0374537863)
_LUMINA2_TEACACHE = (393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344)


def _grid_nchw(model, kwargs):
    """(1, H/p, W/p) for an NCHW latent patchified by the square ``config.patch_size``."""
    p = model.config.patch_size
    return (1, *patch_grid(tuple(kwargs["hidden_states"].shape[-2:]), (p, p)))


def _grid_from_ids(model, kwargs):
    """FLUX-style packed latents carry their grid in ``img_ids`` rows (0, row, col): read once, when a stream is
    created (one small host read), in eager mode only (None under torch.compile: pass ``grid=`` for FreqCa)."""
    import torch

    ids = kwargs.get("img_ids")
    if ids is None or torch.compiler.is_compiling():
        return None
    if ids.ndim == 3:
        ids = ids[0]
    rows, cols = (int(v) + 1 for v in ids[:, 1:3].amax(0).tolist())
    return (1, rows, cols) if rows * cols == kwargs["hidden_states"].shape[1] else None


def _grid_qwenimage(model, kwargs):
    """Packed latent (B, N, C): the grid is ``img_shapes`` (a python list of (frames, h, w) per sample, or of
    lists of them), when one shape covers all N tokens (edit pipelines append reference-image tokens to
    ``hidden_states``: then None)."""
    shapes = kwargs.get("img_shapes")
    if not shapes:
        return None
    s = shapes[0]
    if isinstance(s, list):
        if len(s) != 1:
            return None
        s = s[0]
    f, h, w = (int(v) for v in s)
    return (f, h, w) if f * h * w == kwargs["hidden_states"].shape[1] else None


def _grid_zimage(model, kwargs):
    """``x`` is a list of (C, F, H, W) latents (one per sample, same size assumed), patchified by the
    forward's ``patch_size`` / ``f_patch_size`` (defaults 2 / 1). None in omni mode (``x`` a nested list)."""
    x = kwargs["x"]
    if not isinstance(x, (list, tuple)) or not x or not hasattr(x[0], "shape"):
        return None
    p, fp = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)
    return patch_grid(tuple(x[0].shape[1:4]), (fp, p, p))


# FLUX-style double list + single list; in diffusers 0.42 the single blocks take the text tokens
# separately, join them inside the block and split them again, returning (encoder, hidden).
_FLUX_LISTS = (Blocks("transformer_blocks"), Blocks("single_transformer_blocks"))

FAMILIES: list[Family] = [
    # FLUX.1 [dev/schnell/Kontext/Fill]: norm1 is AdaLayerNormZero(hidden, emb=temb) -> TeaCache's own probe.
    # Packed latents (B, H*W, C) with positions only in img_ids values (Kontext appends the reference image's
    # tokens): no grid from shapes. ControlNet residuals are added between blocks of both lists.
    Family(
        name="flux",
        classes=("FluxTransformer2DModel",),
        lists=_FLUX_LISTS,
        grid=_grid_from_ids,
        teacache={"FLUX.1-dev": _FLUX_TEACACHE, "FLUX.1-Kontext-dev": _FLUX_KONTEXT_TEACACHE},
        teacache_source="ali-vilab/TeaCache TeaCache4FLUX/teacache_flux.py; "
        "welltop-cn/ComfyUI-TeaCache nodes.py (flux-kontext)",
        uncached_kwargs=("controlnet_block_samples", "controlnet_single_block_samples"),
    ),
    # FLUX.2: blocks get precomputed modulation vectors (temb_mod_img / temb_mod_txt; norm1 is a plain
    # LayerNorm) -> probe "temb". The model joins [text, image] before the single list (single blocks get
    # encoder_hidden_states=None and return one tensor) and slices the text off after it. The KV-cache modes
    # write a per-block cache into the shared joint_attention_kwargs dict between blocks -> uncached.
    Family(
        name="flux2",
        classes=("Flux2Transformer2DModel",),
        lists=(
            Blocks("transformer_blocks"),
            Blocks("single_transformer_blocks", encoder=None, returns=("hidden",), joined="text_first"),
        ),
        temb="temb_mod_img",
        probe="temb",
        grid=None,
        uncached_kwargs=("kv_cache", "kv_cache_mode"),
    ),
    # SD3 / SD3.5: JointTransformerBlock, norm1 is AdaLayerNormZero (SD35AdaLayerNormZeroX in dual-attention
    # blocks), both return the modulated input first. The last block is context_pre_only and returns encoder
    # None. ControlNet residuals and skip_layers (SLG: blocks left out of the loop) change the loop ->
    # uncached.
    Family(
        name="sd3",
        classes=("SD3Transformer2DModel",),
        lists=(Blocks("transformer_blocks"),),
        grid=_grid_nchw,
        uncached_kwargs=("block_controlnet_hidden_states", "skip_layers"),
    ),
    # Qwen-Image (and Edit): img_norm1 is a plain LayerNorm; the block modulates with img_mod(temb) -> probe
    # "temb". Packed latents; the grid comes from the img_shapes argument.
    Family(
        name="qwenimage",
        classes=("QwenImageTransformer2DModel",),
        lists=(Blocks("transformer_blocks"),),
        probe="temb",
        grid=_grid_qwenimage,
        uncached_kwargs=("controlnet_block_samples",),
    ),
    # Lumina-Image-2.0: only the main `layers` list, as TeaCache4Lumina2 does: its probe is
    # layers[0].norm1(joint, temb) (LuminaRMSNormZero) on the joint [text, image] sequence the model builds
    # after the refiners. The context_refiner (text only, no temb) and noise_refiner (2 blocks) stay the
    # model's. Caveat: when captions of different lengths (encoder_attention_mask sums) share one batch, the
    # model right-pads each row, so the image tokens are not the last N of every row; Lumina2Pipeline runs
    # cond and uncond as separate calls, so its batches hold one caption length.
    Family(
        name="lumina2",
        classes=("Lumina2Transformer2DModel",),
        lists=(Blocks("layers", encoder=None, returns=("hidden",), joined="text_first"),),
        grid=_grid_nchw,
        teacache={"Lumina-Image-2.0": _LUMINA2_TEACACHE},
        teacache_source="ali-vilab/TeaCache TeaCache4Lumina2/teacache_lumina2.py",
    ),
    # Z-Image: block argument names are x / adaln_input; norms are plain RMSNorms
    # (adaLN_modulation(adaln_input) inside) -> probe "temb". noise_refiner sees the image tokens right-padded
    # to a multiple of 32; the model then builds the unified [image, caption] sequence (basic mode) for
    # `layers`. The context_refiner (caption only, unmodulated) stays the model's. Omni mode (siglip_feats /
    # image_noise_mask: [caption, image, siglip] order, per-token modulation with adaln_input None) and
    # ControlNet residuals run uncached. The forward's latent `x` and output are lists of tensors and its
    # timestep argument is `t`.
    Family(
        name="zimage",
        classes=("ZImageTransformer2DModel",),
        lists=(
            Blocks("noise_refiner", hidden="x", encoder=None, returns=("hidden",), joined="image_first"),
            Blocks("layers", hidden="x", encoder=None, returns=("hidden",), joined="image_first"),
        ),
        temb="adaln_input",
        probe="temb",
        grid=_grid_zimage,
        uncached_kwargs=("controlnet_block_samples", "siglip_feats", "image_noise_mask"),
        hidden_arg="x",
    ),
    # AuraFlow: MMDiT blocks (AdaLayerNormZero norm1) then single DiT blocks on [text(+registers), image]
    # joined by the model (single blocks take only hidden_states and temb).
    Family(
        name="auraflow",
        classes=("AuraFlowTransformer2DModel",),
        lists=(
            Blocks("joint_transformer_blocks"),
            Blocks("single_transformer_blocks", encoder=None, returns=("hidden",), joined="text_first"),
        ),
        grid=_grid_nchw,
    ),
    # CogView4: blocks return (hidden, encoder); norm1 is CogView4AdaLayerNormZero(hidden, encoder, temb),
    # which neither probe call fits -> probe "temb" (silu of the time/size conditioning embedding).
    Family(
        name="cogview4",
        classes=("CogView4Transformer2DModel",),
        lists=(Blocks("transformer_blocks", returns=("hidden", "encoder")),),
        probe="temb",
        grid=_grid_nchw,
    ),
    # Ovis-Image: FLUX-like double + single lists (AdaLayerNormZero norm1), no guidance / pooled input.
    Family(
        name="ovisimage",
        classes=("OvisImageTransformer2DModel",),
        lists=_FLUX_LISTS,
        grid=None,
    ),
    # LongCat-Image: FLUX-like double + single lists (AdaLayerNormZero norm1).
    Family(
        name="longcatimage",
        classes=("LongCatImageTransformer2DModel",),
        lists=_FLUX_LISTS,
        grid=None,
    ),
    # Bria 3.x: FLUX-like double + single lists (AdaLayerNormZero norm1); ControlNet residuals between blocks.
    Family(
        name="bria",
        classes=("BriaTransformer2DModel",),
        lists=_FLUX_LISTS,
        grid=None,
        uncached_kwargs=("controlnet_block_samples", "controlnet_single_block_samples"),
    ),
    # CogView3-Plus: blocks take `emb` and return (hidden, encoder); norm1 is
    # CogView3PlusAdaLayerNormZeroTextImage(x, context, emb) -> probe "temb".
    Family(
        name="cogview3plus",
        classes=("CogView3PlusTransformer2DModel",),
        lists=(Blocks("transformer_blocks", returns=("hidden", "encoder")),),
        temb="emb",
        probe="temb",
        grid=_grid_nchw,
    ),
]

# Block by block (``per_block``): the model's loop gives each block its own arguments, so no block can run a whole
# list; each block runs or hands its inputs on where the model calls it (diffusers 0.42.1, models/transformers/).
FAMILIES += [
    # Chroma: every block gets its own ``temb``, sliced from pooled_temb in the loop (transformer_chroma.py:545-556,
    # :585-587); the model joins [text, image] before the single list (:583) and slices the text off after it.
    # The block's temb packs image and text modulations, which norm1 alone does not take -> probe "hidden".
    Family(
        name="chroma",
        classes=("ChromaTransformer2DModel",),
        lists=(
            Blocks("transformer_blocks", per_block=True),
            Blocks("single_transformer_blocks", encoder=None, returns=("hidden",), joined="text_first",
                   per_block=True),
        ),
        probe="hidden",
        grid=_grid_from_ids,
        uncached_kwargs=("controlnet_block_samples", "controlnet_single_block_samples"),
    ),
    # HiDream-I1: each double block gets the T5/llama text joined with its own llama layer
    # (transformer_hidream_image.py:877-881) and the model slices the returned text (:899); each single block's
    # input is re-joined with its own llama layer, image tokens first, and sliced after it (:913-915, :933).
    # Blocks are HiDreamBlock wrappers (no norm1 of their own) -> probe "hidden". TeaCache4HiDream-I1 (ali-vilab)
    # fits its coefficients on the inner block's modulated input, not this probe: none declared.
    Family(
        name="hidream",
        classes=("HiDreamImageTransformer2DModel",),
        lists=(
            Blocks("double_stream_blocks", returns=("hidden", "encoder"), per_block=True),
            Blocks("single_stream_blocks", encoder=None, returns=("hidden",), joined="image_first", per_block=True),
        ),
        temb="temb",
        probe="hidden",
        grid=_grid_nchw,
    ),
]
