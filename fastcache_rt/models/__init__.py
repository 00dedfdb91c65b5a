"""The shipped model: a small trained FLUX-architecture diffusion transformer as a diffusers ``FluxPipeline``.

It generates 32x32 RGB images of procedural classes (:data:`CLASSES`, e.g. ``"red circle"``) from the class name
as the prompt. ``load_default()`` returns the trained pipeline from :data:`DEFAULT_PATH` (offline);
``build_pipeline()`` the same architecture randomly initialised. Retrain with
``python -m fastcache_rt.models.train --out fastcache_rt/models/default --figures docs/images``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .build import MAX_SEQUENCE_LENGTH, build_pipeline
from .data import CLASSES, IMAGE_SIZE, class_index

DEFAULT_PATH: Path = Path(__file__).resolve().parent / "default"

# Recommended sampling settings for ``pipe(prompt=..., **SAMPLE_DEFAULTS)``.
SAMPLE_DEFAULTS: dict = {
    "height": IMAGE_SIZE,
    "width": IMAGE_SIZE,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
    "guidance_scale": 1.0,
    "num_inference_steps": 50,
}

_REQUIRED = ("model_index.json", "transformer/diffusion_pytorch_model.safetensors", "transformer/config.json",
             "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
             "text_encoder_2/model.safetensors", "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json",
             "scheduler/scheduler_config.json")

__all__ = ["CLASSES", "DEFAULT_PATH", "SAMPLE_DEFAULTS", "build_pipeline", "check_prompt", "load_default"]


def check_prompt(prompt) -> None:
    """Raises ``ValueError`` naming the known classes unless ``prompt`` (a str or a list of str) is one of them."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(f"prompt must be a class name or a non-empty list of class names, got {prompt!r}")
    for p in prompts:
        class_index(p)


def load_default(device="cpu", dtype: torch.dtype = torch.float32):
    """The trained pipeline from :data:`DEFAULT_PATH`, loaded offline and ready to sample."""
    missing = [r for r in _REQUIRED if not (DEFAULT_PATH / r).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the shipped model's weights are missing from {DEFAULT_PATH} (no {', '.join(missing)}); retrain them with "
            f"`python -m fastcache_rt.models.train --out {DEFAULT_PATH}` or reinstall fastcache_rt")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(DEFAULT_PATH, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
