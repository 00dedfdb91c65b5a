"""Tiny diffusers pipelines built offline from configs with random weights (no downloads), each in about a second.

- With text encoders and tokenizers (they take prompts; the command line's, the benchmark's, the calibration's and
  the tuner's tests run on them): ``tiny_pipeline`` (FLUX), ``tiny_sd3_pipeline``, ``tiny_wan_pipeline`` (a tiny
  UMT5), ``tiny_wan_shipped_t5`` (Wan 2.1, or Wan 2.2 A14B-style with two experts, whose text encoder is the
  shipped model's small T5).
- Without text encoders (called with prompt embeddings; the runtime's end-to-end tests):
  ``tiny_flux_embeds_pipeline``, ``tiny_sd3_embeds_pipeline``, ``tiny_wan_embeds_pipeline`` (one or two experts),
  ``tiny_qwenimage_embeds_pipeline``, ``tiny_hunyuanvideo_embeds_pipeline``.
"""

import torch

WORDS = ["<pad>", "<unk>", "</s>", "red", "green", "blue", "circle", "square", "stripes", "dots"]
SIZE = 32
TOKENS = 8


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, model_max_length=TOKENS, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=TOKENS,
                                        eos_token_id=2, pad_token_id=0, bos_token_id=1)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 pad_token_id=0, eos_token_id=2)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                        norm_num_groups=4, sample_size=SIZE, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0, scaling_factor=1.0).eval()
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 6, 6]).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=_tokenizer(), text_encoder_2=t5, tokenizer_2=_tokenizer(), transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = dict(height=SIZE, width=SIZE, guidance_scale=1.0, max_sequence_length=TOKENS)


def tiny_sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline with two tiny CLIP encoders (with projection), a tiny T5 and offline tokenizers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_cfg = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=TOKENS, eos_token_id=2, pad_token_id=0,
                    bos_token_id=1, projection_dim=32)
    clip1 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    clip2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 pad_token_id=0, eos_token_id=2)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                        norm_num_groups=4, sample_size=SIZE, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0, scaling_factor=1.0).eval()
    tr = SD3Transformer2DModel(sample_size=SIZE // 2, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                               pooled_projection_dim=64, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip1,
                                    tokenizer=_tokenizer(), text_encoder_2=clip2, tokenizer_2=_tokenizer(),
                                    text_encoder_3=t5, tokenizer_3=_tokenizer(), transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_pipeline(seed: int = 0):
    """WanPipeline (video) with a tiny UMT5 encoder, an offline tokenizer and a tiny Wan VAE."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                     num_heads=4, pad_token_id=0, eos_token_id=2)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                               out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    pipe = WanPipeline(tokenizer=_tokenizer(), text_encoder=t5, vae=vae, transformer=tr,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ Wan (1 or 2 experts)
def _wan_transformer(seed: int, text_dim: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def _wan(two_experts: bool, text_dim: int, tokenizer=None, text_encoder=None):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    # Wan 2.2 A14B: the high-noise expert runs while t >= boundary_ratio * 1000, the low-noise one after
    extra = {"transformer_2": _wan_transformer(1, text_dim), "boundary_ratio": 0.9} if two_experts else {}
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=_wan_transformer(0, text_dim), **extra)


def tiny_wan_shipped_t5(two_experts: bool = False):
    """A tiny Wan 2.1 / 2.2 A14B-style pipeline that takes text prompts: random transformers and VAE from configs,
    and the shipped model's small T5 encoder and tokenizer as its text encoder (so that the commands and functions
    that take prompts run on it offline). Call it with ``WAN_SHIPPED_T5_CALL``."""
    from transformers import AutoTokenizer, T5EncoderModel

    from fastcache_rt.models import DEFAULT_PATH

    pipe = _wan(two_experts, 64, AutoTokenizer.from_pretrained(DEFAULT_PATH / "tokenizer_2"),
                T5EncoderModel.from_pretrained(DEFAULT_PATH / "text_encoder_2").eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# what a call of ``tiny_wan_shipped_t5`` takes beside the prompt and the step count
WAN_SHIPPED_T5_CALL = dict(height=16, width=16, num_frames=5, guidance_scale=4.0, max_sequence_length=16)


# ---------------------------------------------------------------------------- pipelines without text encoders
def tiny_flux_embeds_pipeline():
    """FluxPipeline with ``fastcache_rt.testing.tiny_flux.tiny_flux()`` and a tiny VAE; prompt embeddings (1, 5, 32),
    pooled (1, 32)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    from fastcache_rt.testing.tiny_flux import tiny_flux

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4, norm_num_groups=4,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0,
    ).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux())


def tiny_sd3_embeds_pipeline():
    """StableDiffusion3Pipeline (dual attention in the first block, RMS qk-norm); prompt embeddings (1, n, 32),
    pooled (1, 64)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def tiny_wan_embeds_pipeline(two_experts: bool = False):
    """WanPipeline (Wan 2.1; Wan 2.2 A14B-style ``transformer_2`` + ``boundary_ratio`` with ``two_experts``);
    prompt embeddings (1, n, 32)."""
    return _wan(two_experts, 32)


def tiny_qwenimage_embeds_pipeline():
    """QwenImagePipeline; prompt embeddings (1, n, 16) with their mask."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)


def tiny_hunyuanvideo_embeds_pipeline():
    """HunyuanVideoPipeline (guidance-distilled transformer); prompt embeddings (1, n, 16) with their mask, pooled
    (1, 8)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    ).eval()
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
