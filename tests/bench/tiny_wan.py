"""A tiny Wan 2.1 / 2.2 A14B-style pipeline that takes text prompts: random transformers and VAE from configs, and
the shipped model's small T5 encoder and tokenizer as its text encoder (so that the commands and functions that
take prompts run on it offline)."""

import torch


def _transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def tiny_wan(two_experts: bool = False):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    from fastcache_rt.models import DEFAULT_PATH

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    extra = {"transformer_2": _transformer(1), "boundary_ratio": 0.9} if two_experts else {}
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(DEFAULT_PATH / "tokenizer_2"),
                       text_encoder=T5EncoderModel.from_pretrained(DEFAULT_PATH / "text_encoder_2").eval(), vae=vae,
                       scheduler=scheduler, transformer=_transformer(0), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# what a call of it takes beside the prompt and the step count
CALL = dict(height=16, width=16, num_frames=5, guidance_scale=4.0, max_sequence_length=16)
