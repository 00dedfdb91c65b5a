"""A tiny randomly initialised FluxPipeline with real text encoders and tokenizers, built offline in well under a
second: the benchmark's and the command line's tests run on it."""

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
