"""Builds the components of the shipped model's diffusers ``FluxPipeline`` from configs (no downloads).

- transformer: a small ``FluxTransformer2DModel`` (the FLUX class and forward) on 2x2-packed pixels:
  32x32 RGB images become 256 tokens of 12 channels; conditioning through ``encoder_hidden_states`` (text tokens)
  and ``pooled_projections`` (pooled text); no guidance embedding.
- vae: a one-level ``AutoencoderKL`` (``vae_scale_factor`` 1, 3 latent channels, scaling 1, shift 0) trained to be
  a near-identity, so the latents the transformer works on are the pixels in [-1, 1].
- text_encoder / text_encoder_2: tiny, frozen, randomly initialised ``CLIPTextModel`` (pooled embedding) and
  ``T5EncoderModel`` (token embeddings) with tokenizers built here over the class vocabulary.
- scheduler: ``FlowMatchEulerDiscreteScheduler`` with shift 1 (sigmas spaced evenly from 1 to 0).
"""

from __future__ import annotations

import string

import torch

from .data import CLASSES

# Architecture of the shipped model. Everything the folder's configs record is derived from here.
ARCH: dict = {
    "num_layers": 2,  # double-stream (MMDiT) blocks
    "num_single_layers": 6,  # single-stream blocks
    "num_attention_heads": 3,
    "attention_head_dim": 32,
    "axes_dims_rope": (8, 12, 12),  # sums to attention_head_dim
    "text_dim": 64,  # T5 d_model = joint_attention_dim
    "pooled_dim": 64,  # CLIP hidden size = pooled_projection_dim
    "vae_channels": 32,
}
MAX_SEQUENCE_LENGTH = 8  # T5 tokens per prompt
CLIP_MAX_LENGTH = 8  # CLIP tokenizer's model_max_length (the pipeline pads CLIP prompts to it)


def _words() -> list[str]:
    return sorted({w for c in CLASSES for w in c.split()})


def build_tokenizers():
    """(CLIPTokenizer, T5TokenizerFast) over the class vocabulary, built offline.

    CLIP: a byte-pair vocabulary of the letters plus merges that spell every class word as one token; other
    lowercase words fall back to letters. T5: a unigram vocabulary with one piece per class word plus the letters.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    words = _words()
    letters = list(string.ascii_lowercase)
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    for ch in letters:
        add(ch)
    for ch in letters:
        add(ch + "</w>")
    add("<|startoftext|>")
    add("<|endoftext|>")
    # merges are added until every class word is a single token (merges added later have lower priority, so
    # each word is re-checked with the full merge list once all of them are known)
    merges: list[tuple[str, str]] = []
    for _ in range(len(words) * 16):
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=1 << 20)
        split = [(w, tok.tokenize(w)) for w in words]
        split = [(w, p) for w, p in split if len(p) > 1]
        if not split:
            break
        parts = split[0][1]
        merges.append((parts[0], parts[1]))
        add(parts[0] + parts[1])
    else:  # pragma: no cover - the loop always converges for lowercase words
        raise RuntimeError("could not build a CLIP vocabulary with one token per class word")
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [("\u2581", -3.0)] + [(ch, -5.0) for ch in letters]
    t5 = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)
    return clip, t5


def build_text_encoders(clip_tok, t5_tok, seed: int = 0):
    """Tiny randomly initialised, frozen CLIP and T5 text encoders sized to the tokenizers."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed + 1)
    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=ARCH["pooled_dim"], intermediate_size=2 * ARCH["pooled_dim"],
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=ARCH["pooled_dim"], bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id,
    )
    clip = CLIPTextModel(clip_cfg)
    torch.manual_seed(seed + 2)
    t5_cfg = T5Config(
        vocab_size=len(t5_tok), d_model=ARCH["text_dim"], d_kv=32, d_ff=2 * ARCH["text_dim"], num_layers=1,
        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id,
        is_encoder_decoder=False, use_cache=False, feed_forward_proj="relu",
    )
    t5 = T5EncoderModel(t5_cfg)
    for m in (clip, t5):
        m.requires_grad_(False).eval()
    return clip, t5


def build_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=12, out_channels=None, num_layers=ARCH["num_layers"],
        num_single_layers=ARCH["num_single_layers"], attention_head_dim=ARCH["attention_head_dim"],
        num_attention_heads=ARCH["num_attention_heads"], joint_attention_dim=ARCH["text_dim"],
        pooled_projection_dim=ARCH["pooled_dim"], guidance_embeds=False, axes_dims_rope=tuple(ARCH["axes_dims_rope"]),
    )


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 3)
    c = ARCH["vae_channels"]
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(c,), layers_per_block=1, latent_channels=3, norm_num_groups=8, sample_size=32,
        scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=False, use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def build_pipeline(seed: int = 0):
    """A ``FluxPipeline`` with the shipped architecture, randomly initialised (no weights file needed)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    from diffusers import FluxPipeline

    clip_tok, t5_tok = build_tokenizers()
    clip, t5 = build_text_encoders(clip_tok, t5_tok, seed)
    pipe = FluxPipeline(
        scheduler=build_scheduler(), vae=build_vae(seed).eval(), text_encoder=clip, tokenizer=clip_tok,
        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=build_transformer(seed).eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
