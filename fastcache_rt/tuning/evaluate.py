"""Running one policy on a batch of prompts x seeds, and its quality against the uncached output."""

from __future__ import annotations

import time

import torch

from ..policy import Policy


class Evaluator:
    """Generations of one (prompts x seeds) batch, in one pipeline call, with the images and final latents of the
    uncached run as the reference."""

    def __init__(self, pipe, prompts, seeds, steps: int, call_kwargs: dict | None = None):
        self.pipe = pipe
        self.batch = [(p, s) for p in prompts for s in seeds]
        self.steps = steps
        self.kw = dict(call_kwargs or {})
        neg = self.kw.get("negative_prompt")
        if isinstance(neg, str):  # true CFG: the negative prompt of every image of the batch
            self.kw["negative_prompt"] = [neg] * len(self.batch)
        self.generations = 0
        self.ref_images, self.ref_latents, self.ref_seconds, _ = self.run(None)

    def run(self, policy: Policy | None):
        """(images (N, C, H, W) in [0, 1], final latents, seconds, NFE) of one generation of the batch."""
        import fastcache_rt

        final = {}

        def keep(pipe, i, t, kwargs):
            final["latents"] = kwargs["latents"]
            return {}

        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for _, s in self.batch]
        handle = fastcache_rt.enable(self.pipe, policy) if policy is not None else None
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.pipe(prompt=[p for p, _ in self.batch], num_inference_steps=self.steps, generator=gens,
                                output_type="pt", callback_on_step_end=keep, **self.kw)
            seconds = time.perf_counter() - t0
            nfe = self.steps if handle is None else _nfe(handle, self.steps)
        finally:
            if handle is not None:
                handle.disable()
        self.generations += 1
        return _images(out), final["latents"].detach().float().clone(), seconds, nfe

    def quality(self, images, latents) -> dict:
        from ..bench import metrics

        return {"psnr": metrics.psnr(images, self.ref_images), "ssim": metrics.ssim(images, self.ref_images),
                "rel_l2": metrics.rel_l2(latents, self.ref_latents)}


def _images(out) -> torch.Tensor:
    """A pipeline's ``output_type="pt"`` result as (N, C, H, W) float images (video frames flattened)."""
    x = getattr(out, "images", None)
    if x is None:
        x = getattr(out, "frames", None)
    if x is None:
        x = out[0]
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    x = x.float().cpu()
    if x.dim() == 5:  # (N, F, C, H, W) video frames
        x = x.flatten(0, 1)
    if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # channels last
        x = x.permute(0, 3, 1, 2)
    return x.clamp(0, 1)


def _nfe(handle, steps: int) -> int | float:
    """Computed steps: for each branch (stream) the steps at which any transformer of the pipeline ran it (the
    union over the transformers: the experts of a two-transformer pipeline take turns), averaged over the branches.
    One branch without true CFG; with it (FluxPipeline's ``true_cfg_scale``: cond and uncond calls, one stream
    each, each deciding for itself) the mean of the two, so a fractional count means the branches differ (an int
    where it is whole)."""
    branches: list[set] = []
    for c in handle.controllers.values():
        st = c.stats()
        per = st.get("per_stream_computed") or [st.get("computed", [])]
        for b, comp in enumerate(per):
            while len(branches) <= b:
                branches.append(set())
            branches[b].update(comp)
    if not branches:
        return 0
    n = sum(len(b) for b in branches) / len(branches)
    return int(n) if float(n).is_integer() else n


def _calibration(ev: Evaluator) -> dict:
    """The calibrated fields (``profiles.calibrated_fields``) fitted from one generation of the search batch with
    the calibration gate (every step computed, every signal measured)."""
    import fastcache_rt

    from ..policy.gates import Calibrate
    from ..profiles import _fit_model, calibrated_fields

    handle = fastcache_rt.enable(ev.pipe, Policy(Calibrate(), name="calibrate"))
    try:
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for _, s in ev.batch]
        with torch.no_grad():
            ev.pipe(prompt=[p for p, _ in ev.batch], num_inference_steps=ev.steps, generator=gens,
                    output_type="latent", **ev.kw)
        series = [row["calibration"] for row in handle.controller.stats()["per_stream"] if "calibration" in row]
    finally:
        handle.disable()
    ev.generations += 1
    return calibrated_fields(_fit_model(series, ev.steps))
