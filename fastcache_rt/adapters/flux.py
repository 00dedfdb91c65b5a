"""diffusers FluxTransformer2DModel (FLUX.1 dev/schnell and anything built from its config).

Mirrors the model's own forward operation for operation, so that with every step computed the output is bitwise
the unpatched model's. Probe: ``transformer_blocks[0].norm1(hidden, emb=temb)[0]`` on the image tokens; cached
tensor: the image tokens after the last single-stream block; ``norm_out(temb)`` and ``proj_out`` always run with the
current step's embedding."""

from __future__ import annotations

import numpy as np
import torch

from .base import Adapter, StepInputs


class FluxAdapter(Adapter):
    model_classes = ("FluxTransformer2DModel",)

    def num_blocks(self, model) -> int:
        return len(model.transformer_blocks) + len(model.single_transformer_blocks)

    def embed(self, model, a: dict) -> StepInputs:
        hidden_states = a["hidden_states"]
        timestep = a["timestep"]
        guidance = a.get("guidance")
        joint_attention_kwargs = a.get("joint_attention_kwargs")
        hidden = model.x_embedder(hidden_states)
        t = timestep.to(hidden.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden.dtype) * 1000
        temb = (
            model.time_text_embed(t, a["pooled_projections"])
            if guidance is None
            else model.time_text_embed(t, guidance, a["pooled_projections"])
        )
        txt_ids, img_ids = a["txt_ids"], a["img_ids"]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            joint_attention_kwargs = dict(joint_attention_kwargs)
            ip = model.encoder_hid_proj(joint_attention_kwargs.pop("ip_adapter_image_embeds"))
            joint_attention_kwargs.update({"ip_hidden_states": ip})
        extra = dict(
            encoder_hidden_states=a["encoder_hidden_states"],
            txt_ids=txt_ids,
            rotary=None,
            joint_attention_kwargs=joint_attention_kwargs,
            controlnet_block_samples=a.get("controlnet_block_samples"),
            controlnet_single_block_samples=a.get("controlnet_single_block_samples"),
            controlnet_blocks_repeat=a.get("controlnet_blocks_repeat", False),
            img_ids=img_ids,
        )
        return StepInputs(hidden, None, temb, timestep, extra, a.get("return_dict", True))

    def context(self, model, inp: StepInputs) -> torch.Tensor:
        # text tokens and rotary tables: only the blocks use them (the same ops as the model's forward)
        if inp.encoder is None:
            ex = inp.extra
            inp.encoder = model.context_embedder(ex["encoder_hidden_states"])
            ex["rotary"] = model.pos_embed(torch.cat((ex["txt_ids"], ex["img_ids"]), dim=0))
        return inp.encoder

    def probe(self, model, inp: StepInputs) -> torch.Tensor:
        return model.transformer_blocks[0].norm1(inp.hidden, emb=inp.temb)[0]

    def run_blocks(self, model, inp: StepInputs, hidden, encoder, start: int, stop: int | None):
        n_double = len(model.transformer_blocks)
        n_total = n_double + len(model.single_transformer_blocks)
        stop = n_total if stop is None else min(stop, n_total)
        if encoder is None:
            encoder = self.context(model, inp)
        ex = inp.extra
        cbs, csbs = ex["controlnet_block_samples"], ex["controlnet_single_block_samples"]
        for i in range(start, stop):
            single = i >= n_double
            idx = i - n_double if single else i
            block = model.single_transformer_blocks[idx] if single else model.transformer_blocks[idx]
            if torch.is_grad_enabled() and model.gradient_checkpointing:
                encoder, hidden = model._gradient_checkpointing_func(
                    block, hidden, encoder, inp.temb, ex["rotary"], ex["joint_attention_kwargs"]
                )
            else:
                encoder, hidden = block(
                    hidden_states=hidden,
                    encoder_hidden_states=encoder,
                    temb=inp.temb,
                    image_rotary_emb=ex["rotary"],
                    joint_attention_kwargs=ex["joint_attention_kwargs"],
                )
            if not single and cbs is not None:
                interval = int(np.ceil(n_double / len(cbs)))
                if ex["controlnet_blocks_repeat"]:
                    hidden = hidden + cbs[idx % len(cbs)]
                else:
                    hidden = hidden + cbs[idx // interval]
            if single and csbs is not None:
                interval = int(np.ceil(len(model.single_transformer_blocks) / len(csbs)))
                hidden = hidden + csbs[idx // interval]
        return hidden, encoder

    def token_grid(self, model, inp: StepInputs) -> tuple[int, int] | None:
        # FLUX's image ids are (0, row, col) per token. Read once when a stream is created (eager only).
        if torch.compiler.is_compiling():
            return None
        ids = inp.extra["img_ids"]
        H, W = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        return (H, W) if H * W == inp.hidden.shape[1] else None

    def head(self, model, inp: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        return model.proj_out(model.norm_out(hidden, inp.temb))

    def wrap(self, inp: StepInputs, output: torch.Tensor):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if not inp.return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def output_like(self, model, inp: StepInputs):
        B, N, _ = inp.hidden.shape
        return (B, N, model.proj_out.out_features), inp.hidden.dtype
