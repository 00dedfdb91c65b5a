"""DiT-style families: PixArt, Sana, DiT, HunyuanImage, Kandinsky 5, OmniGen, PRX. Each was checked against
diffusers 0.42.1: every block of a list gets the same arguments except the hidden/text tokens, and no model
code runs between two blocks of one list (fastcache_rt/testing/tiny_dit.py holds the tiny configs)."""

from __future__ import annotations

from .base import Blocks, Family, patch_grid


def _grid_nchw(model, kwargs):
    """(1, H/p, W/p) for an NCHW latent patchified by the square ``config.patch_size``."""
    p = model.config.patch_size
    return (1, *patch_grid(tuple(kwargs["hidden_states"].shape[-2:]), (p, p)))


def _grid_hunyuanimage(model, kwargs):
    """NCHW (image) or NCFHW (video-style) latent patchified by the 2- or 3-tuple ``config.patch_size``."""
    shape, p = tuple(kwargs["hidden_states"].shape[2:]), tuple(model.config.patch_size)
    g = patch_grid(shape, p)
    return g if len(g) == 3 else (1, *g)


def _grid_kandinsky5(model, kwargs):
    """Channels-last latent (B, T, H, W, C) patchified by ``config.patch_size`` (t, h, w)."""
    return patch_grid(tuple(kwargs["hidden_states"].shape[1:4]), tuple(model.config.patch_size))


# Single-token-stream families share BasicTransformerBlock-like blocks that return one tensor; the text tokens
# are a fixed cross-attention input, identical for every block, so encoder=None.
_CROSS_ATTN = Blocks("transformer_blocks", encoder=None, returns=("hidden",))

FAMILIES: list[Family] = [
    # PixArt-Alpha / Sigma (BasicTransformerBlock, ada_norm_single): norm1 is a plain LayerNorm and the block
    # modulates with scale_shift_table + `timestep`, which is adaln_single's 6*dim modulation vector -> probe
    # "temb".
    Family(
        name="pixart",
        classes=("PixArtTransformer2DModel",),
        lists=(_CROSS_ATTN,),
        temb="timestep",
        probe="temb",
        grid=_grid_nchw,
    ),
    # Sana (linear attention + GLUMBConv): norm1 is a plain LayerNorm; `timestep` is the 6*dim AdaLN-single
    # modulation vector -> probe "temb". ControlNet residuals are added between blocks.
    Family(
        name="sana",
        classes=("SanaTransformer2DModel",),
        lists=(_CROSS_ATTN,),
        temb="timestep",
        probe="temb",
        grid=_grid_nchw,
        uncached_kwargs=("controlnet_block_samples",),
    ),
    # DiT (class-conditional, ada_norm_zero): blocks get the raw `timestep` and `class_labels` and embed them
    # in norm1 (norm1(hidden, timestep) without class_labels fails), so there is no embedding argument: probe
    # "hidden".
    Family(
        name="dit",
        classes=("DiTTransformer2DModel",),
        lists=(_CROSS_ATTN,),
        temb=None,
        probe="hidden",
        grid=_grid_nchw,
    ),
    # HunyuanImage 2.1: dual-stream then single-stream blocks, both (hidden, encoder) in and out; the single
    # blocks concatenate image+text themselves (image first) and split before returning, so no joined layout.
    # norm1 is AdaLayerNormZero (as in FLUX): the probe must pass temb as `emb=` (positionally it lands on
    # `timestep`).
    Family(
        name="hunyuanimage",
        classes=("HunyuanImageTransformer2DModel",),
        lists=(
            Blocks("transformer_blocks", returns=("hidden", "encoder")),
            Blocks("single_transformer_blocks", returns=("hidden", "encoder")),
        ),
        temb="temb",
        probe="norm1",
        grid=_grid_hunyuanimage,
    ),
    # Kandinsky 5: only the visual (decoder) list is taken over; the 2 text (encoder) blocks run on text
    # tokens only, before it, every step. Latent is channels-last (B, T, H, W, C); with
    # sparse_params["to_fractal"] the tokens are in 8x8-block order (same count). forward(return_dict=False)
    # returns the bare tensor, not a tuple.
    Family(
        name="kandinsky5",
        classes=("Kandinsky5Transformer3DModel",),
        lists=(
            Blocks("visual_transformer_blocks", hidden="visual_embed", encoder=None, returns=("hidden",)),
        ),
        temb="time_embed",
        probe="temb",
        grid=_grid_kandinsky5,
    ),
    # OmniGen: one decoder-only stack over [condition tokens, time token, image tokens] joined by the model
    # (text first: the image tokens are the last N). Time enters as a token, blocks take no conditioning:
    # "hidden".
    Family(
        name="omnigen",
        classes=("OmniGenTransformer2DModel",),
        lists=(Blocks("layers", encoder=None, returns=("hidden",), joined="text_first"),),
        temb=None,
        probe="hidden",
        grid=_grid_nchw,
    ),
    # PRX (Photoroom): image tokens cross-attend a fixed text sequence (encoder=None); the block's norm is a
    # plain LayerNorm modulated from `temb` by block.modulation -> probe "temb".
    Family(
        name="prx",
        classes=("PRXTransformer2DModel",),
        lists=(Blocks("blocks", encoder=None, returns=("hidden",)),),
        temb="temb",
        probe="temb",
        grid=_grid_nchw,
    ),
]

# Not declared (diffusers 0.42.1, diffusers/models/transformers/...):
# - latte (LatteTransformer3DModel): latte_transformer_3d.py:240-303 interleaves transformer_blocks[i] and
#   temporal_transformer_blocks[i] in one loop, with (B*F, N) <-> (B*N, F) reshapes and, at i == 0, a
#   temp_pos_embed add between them: neither list runs contiguously, so neither can be taken over.
# - hunyuandit (HunyuanDiT2DModel): hunyuan_transformer_2d.py:426-449 passes each block of the second half a
#   different `skip` (skips.pop() of a first-half output, + controlnet_block_samples.pop()): per-block
#   arguments.
# - glmimage (GlmImageTransformer2DModel): transformer_glm_image.py:690 passes kv_cache=kv_caches[idx], a
#   different per-layer KV cache per block, and pipeline_glm_image.py:1012/1029 always passes kv_caches (mode
#   "read"/"skip", after a "write" pass over the condition images at :945). Declaring it with
#   uncached_kwargs=("kv_caches",) would be correct but every pipeline call would run uncached.
# - ernieimage (ErnieImageTransformer2DModel): the takeover itself holds (layers, hidden="x", one tensor out,
#   joined="image_first"; bitwise-checked on a tiny model), but the tokens are sequence-first (S, B, D):
#   transformer_ernie_image.py:384 transposes to (S, B, D), :391 joins image+text on dim 0, :448 runs the
#   blocks. Blocks/Family cannot say so, and a runtime reading dim 0 as batch and dim 1 as tokens would
#   mis-slice and mis-gate per sample. The block's `temb` is a list of 6 tensors (no tensor to probe). Needs a
#   token-layout field.
