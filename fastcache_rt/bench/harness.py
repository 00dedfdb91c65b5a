"""Run a FLUX pipeline uncached and under each configuration, in the same process and on the same inputs, and measure
NFE, wall-clock time, cache memory and the distance of the outputs to the uncached ones.

Timing: each pipeline call generates the whole batch (every prompt x seed) with ``output_type="latent"`` and
precomputed text embeddings, so the timed work is the denoising loop. Uncached calls are interleaved with the
configurations (one before every few configurations and one at the end of each round); in each round a
configuration's speedup is (mean of the nearest uncached times before and after it) / (its time), and the table
gives the median over the rounds with their min-max range. A quantity derived from a difference of timings (what
a skipped step cost) is given only where its range over the rounds is smaller than its median (at least two
rounds), else marked not measurable. Every uncached call must reproduce the reference latents exactly: a
configuration whose ``disable`` leaves anything behind stops the benchmark.

True classifier-free guidance (``Settings.true_cfg_scale``, FluxPipeline's ``true_cfg_scale`` with a negative
prompt): two transformer calls per step (the pipeline's "cond" and "uncond" cache contexts, two cache streams).
NFE then counts transformer calls that ran in full, of ``steps * 2``.

Quality: PSNR / SSIM of the decoded images and relative L2 of the final latents against the uncached run, per
image (prompt x seed); the table gives their mean, min, max and standard deviation over the batch.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

import fastcache_rt

from . import memory, metrics
from .methods import CACHE_DIT, DIFFUSERS, OURS, Config, Context, diffusers_magcache_calibration


class BenchError(RuntimeError):
    """A benchmark precondition or invariant failed; the message is meant for the user as is."""


@dataclass
class Settings:
    prompts: list  # one entry per class
    seeds: list
    steps: int = 50
    height: int = 64
    width: int = 64
    call_kwargs: dict = field(default_factory=dict)  # guidance_scale, max_sequence_length, ...
    rounds: int = 1
    uncached_every: int = 3  # an uncached call before every this many configurations
    true_cfg_scale: float | None = None  # FluxPipeline's true CFG (> 1), None: off (one transformer call per step)
    negative_prompt: str = ""  # the negative prompt of true CFG (every image of the batch)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("prompts: at least one is needed")
        if not self.seeds:
            raise ValueError("seeds: at least one is needed")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError(f"steps: must be an int >= 2, got {self.steps!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds: must be an int >= 1, got {self.rounds!r}")
        if not isinstance(self.uncached_every, int) or self.uncached_every < 1:
            raise ValueError(f"uncached_every: must be an int >= 1, got {self.uncached_every!r}")
        g = self.true_cfg_scale
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)
                              or g <= 1):
            raise ValueError(f"true_cfg_scale: None (off) or a finite number > 1, got {g!r}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt: must be a str, got {self.negative_prompt!r}")

    @property
    def calls_per_step(self) -> int:
        """Transformer calls per denoising step: 2 with true CFG (cond and uncond), else 1."""
        return 1 if self.true_cfg_scale is None else 2

    def describe(self) -> dict:
        """The setting the table was measured at (steps, guidance), for its header and table.json's meta."""
        cfg = self.true_cfg_scale
        return dict(steps=self.steps, true_cfg_scale=cfg, negative_prompt=self.negative_prompt if cfg else None,
                    calls_per_step=self.calls_per_step, guidance_scale=self.call_kwargs.get("guidance_scale"))

    @property
    def batch(self) -> list[tuple[str, int]]:
        """(prompt, seed) of each image of the batch, prompt-major."""
        return [(p, s) for p in self.prompts for s in self.seeds]


@dataclass
class Result:
    rows: list  # dicts, the table (first row: uncached)
    images: dict  # key -> (N, C, H, W) float images in [0, 1]; "uncached" included
    latents: dict
    meta: dict


class _Probe:
    """Counts, per transformer call of a pipeline call, how many of its blocks really ran (a block's first linear
    layer, whatever library skipped the rest): the configuration's NFE in full-step equivalents (a call that runs
    k of L blocks costs k / L, as DBCache's first and last blocks do on a cached step), and which calls ran every
    block (computed steps)."""

    def __init__(self, pipe):
        tr = pipe.transformer
        blocks = list(getattr(tr, "transformer_blocks", [])) + list(getattr(tr, "single_transformer_blocks", []))
        if not blocks:
            raise BenchError("model: the transformer has no transformer blocks to watch (not a FLUX transformer?)")
        watched = []
        for block in blocks:
            inner = getattr(getattr(block, "attn", None), "to_q", None)
            if inner is None:
                inner = next((m for m in block.modules() if isinstance(m, torch.nn.Linear)), None)
            if inner is None:
                raise BenchError("model: a transformer block has no linear layer to watch")
            watched.append(inner)
        self.blocks = len(watched)
        self.calls: list[int] = []  # blocks run in each transformer call
        self._handles = [tr.register_forward_pre_hook(self._pre)]
        self._handles += [m.register_forward_hook(self._ran) for m in watched]

    def _pre(self, module, args):
        self.calls.append(0)

    def _ran(self, module, args, out):
        if self.calls:
            self.calls[-1] += 1

    def flags(self) -> list[bool]:
        """Per call: every block ran."""
        return [n >= self.blocks for n in self.calls]

    def nfe(self) -> float:
        """Full-step equivalents of the calls so far (an integer where every call ran all blocks or none)."""
        v = sum(self.calls) / self.blocks
        return int(v) if v == int(v) else round(v, 4)

    def remove(self):
        for h in self._handles:
            h.remove()


class Harness:
    def __init__(self, pipe, settings: Settings, progress: bool = True):
        self.pipe = pipe
        self.s = settings
        self.progress = progress
        pipe.set_progress_bar_config(disable=True)
        self.device = getattr(pipe, "_execution_device", torch.device("cpu"))
        prompts = [p for p, _ in settings.batch]
        kw = dict(settings.call_kwargs)
        msl = kw.pop("max_sequence_length", None)
        with torch.no_grad():
            enc = dict(prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1)
            if msl is not None:
                enc["max_sequence_length"] = msl
            pe, pp, _ = pipe.encode_prompt(**enc)
            self.embeds = dict(prompt_embeds=pe, pooled_prompt_embeds=pp)
            if settings.true_cfg_scale is not None:
                npe, npp, _ = pipe.encode_prompt(**dict(enc, prompt=[settings.negative_prompt] * len(prompts)))
                self.embeds.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npp)
        if msl is not None:
            kw["max_sequence_length"] = msl
        if settings.true_cfg_scale is not None:
            kw["true_cfg_scale"] = float(settings.true_cfg_scale)
        self.kw = kw
        others = [v for k, v in pipe.components.items() if k != "transformer" and v is not None]
        self._stop = [pipe] + others
        self._exclude = memory.model_storages(*[v for v in pipe.components.values()])
        self._baseline_keep: list = []
        self.probe = _Probe(pipe)
        self._walk = False
        self._walked = None
        self._walk_seconds = 0.0

    # ------------------------------------------------------------------------------------------------------------
    def _callback(self, pipe, i, t, kwargs):
        if self._walk and i == self.s.steps - 1:
            t0 = time.perf_counter()
            roots = [pipe.transformer, getattr(pipe, "_context_manager", None)]
            self._walked = memory.tensor_storages(roots, stop=self._stop, exclude=self._exclude)
            self._walk_seconds += time.perf_counter() - t0
        return kwargs

    def call(self, walk: bool = False) -> tuple[torch.Tensor, float, list[bool]]:
        """One pipeline call on the whole batch: (final packed latents, seconds, per-call computed flags); the
        call's NFE in full-step equivalents is ``self.probe.nfe()`` after it."""
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for _, s in self.s.batch]
        self.probe.calls = []
        self._walk, self._walked, self._walk_seconds = walk, None, 0.0
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.pipe(**self.embeds, num_inference_steps=self.s.steps, height=self.s.height, width=self.s.width,
                            generator=gens, output_type="latent", callback_on_step_end=self._callback, **self.kw)
        seconds = time.perf_counter() - t0 - self._walk_seconds
        self._walk = False
        lat = out.images if hasattr(out, "images") else out[0]
        return lat.detach().clone(), seconds, self.probe.flags()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> (N, 3, H, W) float32 images in [0, 1], exactly as the pipeline decodes them."""
        pipe = self.pipe
        lat = pipe._unpack_latents(latents, self.s.height, self.s.width, pipe.vae_scale_factor)
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        img = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(img, output_type="pt").float().cpu()

    # ------------------------------------------------------------------------------------------------------------
    def calibrate(self, configs: list[Config]) -> Context:
        ctx = Context(steps=self.s.steps, calls_per_step=self.s.calls_per_step)
        needs = {c.needs for c in configs if c.needs}
        if "ours_mag" in needs:
            fastcache_rt.enable(self.pipe, "magcache", calibrate=True)
            try:
                self.call()
                ratios = fastcache_rt.stats(self.pipe).get("mag_ratios")
            finally:
                fastcache_rt.disable(self.pipe)
            if not ratios or len(ratios) != self.s.steps:
                raise BenchError(f"magcache: the calibration run returned {len(ratios or [])} ratios for "
                                 f"{self.s.steps} steps")
            ctx.ratios["ours_mag"] = ratios
        if "diffusers_mag" in needs:
            ctx.ratios["diffusers_mag"] = diffusers_magcache_calibration(self.pipe, self.call, self.s.steps)
        return ctx

    def run(self, configs: list[Config]) -> Result:
        s = self.s
        t_start = time.time()
        # the reference (also the warm-up: its time is not used); the baseline memory walk tells what the bare
        # model already holds
        ref, _, ref_flags = self.call(walk=True)
        baseline = self._walked or {}
        cps = s.calls_per_step
        calls = s.steps * cps
        if len(ref_flags) != calls:
            raise BenchError(f"the uncached run made {len(ref_flags)} transformer calls for {s.steps} steps; "
                             f"{cps} per step expected" + (" (true CFG: cond and uncond)" if cps > 1 else ""))
        ref_nfe = sum(ref_flags)
        if ref_nfe != calls:
            raise BenchError(f"the uncached run computed the last block {ref_nfe} times in {calls} transformer calls")
        self._exclude = self._exclude | set(baseline)
        ctx = self.calibrate(configs)

        # the schedule: rounds of configurations (rotated each round) with uncached calls interleaved
        sched: list = []
        n = len(configs)
        for r in range(s.rounds):
            shift = (r * n) // s.rounds
            order = configs[shift:] + configs[:shift]
            for j, c in enumerate(order):
                if j % s.uncached_every == 0:
                    sched.append(None)
                sched.append(c)
        sched.append(None)

        times: list[float | None] = [None] * len(sched)
        first: dict = {}
        repeat_ok: dict = {}
        prev_cfg = None
        bar = _tqdm(total=len(sched), desc="bench", disable=not self.progress)
        for idx, c in enumerate(sched):
            if c is None:
                bar.set_postfix_str("uncached")
                lat, sec, flags = self.call()
                if not torch.equal(lat, ref):
                    where = f"after {prev_cfg.key} was disabled" if prev_cfg is not None else "before any method"
                    raise BenchError(f"an uncached call {where} differs from the reference "
                                     f"(rel L2 {metrics.rel_l2(lat, ref):.3g}): a cache hook was left behind")
                times[idx] = sec
                bar.update()
                continue
            bar.set_postfix_str(c.key[:60])
            is_first = c.key not in first
            c.enable(self.pipe, ctx)
            try:
                lat, sec, flags = self.call(walk=is_first)
                info = {}
                if c.library == OURS:
                    info = fastcache_rt.stats(self.pipe)
            finally:
                c.disable(self.pipe)
            prev_cfg = c
            times[idx] = sec
            if is_first:
                first[c.key] = dict(latents=lat, flags=flags, nfe=self.probe.nfe(), walked=self._walked or {},
                                    stats=info)
            else:
                repeat_ok[c.key] = repeat_ok.get(c.key, True) and torch.equal(lat, first[c.key]["latents"])
            bar.update()
        bar.close()

        # speedups: nearest uncached neighbours of each timed call
        def neighbours(i):
            before = next((times[k] for k in range(i - 1, -1, -1) if sched[k] is None), None)
            after = next((times[k] for k in range(i + 1, len(sched)) if sched[k] is None), None)
            vals = [v for v in (before, after) if v is not None]
            return sum(vals) / len(vals)

        per_cfg: dict = {}
        for i, c in enumerate(sched):
            if c is not None:
                per_cfg.setdefault(c.key, []).append((times[i], neighbours(i)))
        unc_times = [times[i] for i, c in enumerate(sched) if c is None]

        ref_img = self.decode(ref)
        images = {"uncached": ref_img}
        latents = {"uncached": ref}
        setting = s.describe()
        per_image_ref = [dict(prompt=p, seed=sd, psnr=None, ssim=1.0, rel_l2=0.0) for p, sd in s.batch]
        rows = [dict(key="uncached", method="uncached", library="-", config="every step", nfe=calls,
                     steps=s.steps, calls=calls, true_cfg_scale=s.true_cfg_scale, ideal_speedup=1.0, speedup=1.0,
                     speedup_min=None, speedup_max=None, achieved_of_ideal=1.0,
                     **quality_spread(per_image_ref), rel_l2=0.0, cache_bytes=0,
                     **timing_spread(unc_times, "time_s"), times_s=unc_times, skipped_step_cost=None,
                     computed=list(range(s.steps)), controller_ms_per_step=None, repeatable=True, default=True,
                     tags=[], note="reference", per_image=per_image_ref)]
        for c in configs:
            f = first[c.key]
            flags = f["flags"]
            nfe = f["nfe"]  # full-step equivalents (partial-block caching runs some blocks on a cached step)
            img = self.decode(f["latents"])
            images[c.key] = img
            latents[c.key] = f["latents"]
            pairs = per_cfg[c.key]
            ideal = calls / nfe if nfe else float("inf")
            walked = sum(f["walked"].values())
            speed = timing_spread([u / t for t, u in pairs], "speedup")
            # what a skipped call cost, as a fraction of a full call, if full calls cost what uncached ones do:
            # (t - NFE * t_full) / ((C - NFE) * t_full), t_full = uncached time / C (C calls: steps x calls per
            # step), per round; only where the rounds agree (range < median)
            skip = skip_cost(pairs, nfe, calls)
            per_image = [dict(prompt=p, seed=sd, psnr=a, ssim=b, rel_l2=r) for (p, sd), a, b, r in zip(
                s.batch, metrics.psnr_per_image(img, ref_img).tolist(), metrics.ssim_per_image(img, ref_img).tolist(),
                metrics.rel_l2_per_image(f["latents"], ref).tolist())]
            row = dict(key=c.key, method=c.method, library=c.library, config=c.config, nfe=nfe, steps=s.steps,
                       calls=calls, true_cfg_scale=s.true_cfg_scale, ideal_speedup=ideal, **speed,
                       achieved_of_ideal=speed["speedup"] / ideal, speedup_rounds=[u / t for t, u in pairs], **skip,
                       **quality_spread(per_image), rel_l2=metrics.rel_l2(f["latents"], ref), cache_bytes=walked,
                       **timing_spread([t for t, _ in pairs], "time_s"), times_s=[t for t, _ in pairs],
                       computed=[i for i in range(s.steps) if flags[i * cps]], controller_ms_per_step=None,
                       repeatable=repeat_ok.get(c.key, True), default=c.default, tags=list(c.tags), note=c.note,
                       settings=dict(c.settings), per_image=per_image)
            if cps > 1:  # each branch's computed steps (cond, uncond)
                row["computed_streams"] = [[i for i in range(s.steps) if flags[i * cps + b]] for b in range(cps)]
            st = f["stats"]
            if c.library == OURS and st:
                row["cache_bytes"] = int(st["cache_bytes"])
                row["cache_bytes_walked"] = walked
                row["controller_ms_per_step"] = 1e3 * st["controller_seconds_per_call"]
                watched = row.get("computed_streams", [row["computed"]])
                told = st.get("per_stream_computed") or [st.get("computed", [])]
                if [list(x) for x in told] != watched:
                    row["note"] = (row["note"] + "; " if row["note"] else "") + \
                        f"stats computed {sum(len(x) for x in told)} != watched {nfe}"
            rows.append(row)
        meta = dict(steps=s.steps, height=s.height, width=s.width, prompts=list(s.prompts), seeds=list(s.seeds),
                    batch=len(s.batch), rounds=s.rounds, uncached_every=s.uncached_every, setting=setting,
                    true_cfg_scale=s.true_cfg_scale, negative_prompt=setting["negative_prompt"],
                    calls_per_step=cps, calls=calls,
                    uncached_time_s=statistics.median(unc_times), uncached_times_s=unc_times,
                    baseline_walk_bytes=sum(baseline.values()), wall_seconds=time.time() - t_start,
                    mag_ratios={k: list(v) for k, v in ctx.ratios.items()}, torch=torch.__version__,
                    threads=torch.get_num_threads())
        return Result(rows=rows, images=images, latents=latents, meta=meta)

    def close(self):
        self.probe.remove()


def spread(values) -> dict:
    """mean, min, max and standard deviation (population: the spread of the values measured) of a list of
    numbers; all None for an empty list."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return dict(mean=None, min=None, max=None, std=None)
    return dict(mean=statistics.fmean(vals), min=min(vals), max=max(vals), std=statistics.pstdev(vals))


def quality_spread(per_image: list) -> dict:
    """Row fields from per-image quality (dicts with psnr, ssim, rel_l2): ``psnr`` / ``ssim`` the means (as
    before) and ``<metric>_min``, ``_max``, ``_std`` over the images; ``rel_l2_mean`` etc. for the per-image
    relative L2 (``rel_l2`` itself stays the whole batch's)."""
    out = {}
    for m in ("psnr", "ssim", "rel_l2"):
        sp = spread(e[m] for e in per_image)
        out[m if m != "rel_l2" else "rel_l2_mean"] = sp["mean"]
        out.update({f"{m}_{k}": sp[k] for k in ("min", "max", "std")})
    return out


def timing_spread(values: list, name: str) -> dict:
    """``name``: the median over the rounds, ``name_min`` / ``name_max``: their range."""
    return {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values)}


def skip_cost(pairs: list, nfe: int, calls: int) -> dict:
    """What a skipped transformer call cost as a fraction of a full one, from (time, uncached neighbours' time)
    per round: (t - NFE u / C) / ((C - NFE) u / C). ``skipped_step_cost`` is its median over the rounds where
    that is measurable (at least two rounds and their range smaller than the median), else None with
    ``skipped_step_cost_measurable`` False; the per-round median and range are kept either way. Nothing when no
    call was skipped."""
    out = dict(skipped_step_cost=None, skipped_step_cost_median=None, skipped_step_cost_min=None,
               skipped_step_cost_max=None, skipped_step_cost_measurable=None)
    if nfe >= calls or not pairs:
        return out
    vals = [(t - nfe * u / calls) / ((calls - nfe) * u / calls) for t, u in pairs]
    med, lo, hi = statistics.median(vals), min(vals), max(vals)
    ok = len(vals) >= 2 and hi - lo < med
    out.update(skipped_step_cost=med if ok else None, skipped_step_cost_median=med, skipped_step_cost_min=lo,
               skipped_step_cost_max=hi, skipped_step_cost_measurable=ok)
    return out


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(**kw)


__all__ = ["CACHE_DIT", "DIFFUSERS", "OURS", "BenchError", "Harness", "Result", "Settings"]
