"""What a SKIPPED denoising step costs outside the model: tensor ops dispatched and device-to-host reads, for every
fastcache_rt preset and, side by side on the same transformer, diffusers' own cache hooks for the same methods.

    python benchmarks/bench_step_ops.py --out step_ops.json     # the shipped model, batch 4, 50 steps
    python benchmarks/bench_step_ops.py --smoke --out ops.json  # a tiny random FLUX transformer, 12 steps (CI)

Method. The transformer is driven through a FLUX denoising loop over the scheduler (what ``FluxPipeline.__call__``
does: its timesteps, ``timestep / 1000``, every call inside ``transformer.cache_context("cond")``), batch 4, one
intra-op thread. Every transformer call runs under a ``TorchDispatchMode`` that counts the ops reaching the
dispatcher (aten ops after autograd; a ``torch.library`` custom op counts as one op plus every op its Python
implementation dispatches, e.g. its output allocations), while ``Tensor.__bool__ / item / tolist / __int__ /
__float__ / __index__ / numpy / cpu`` are wrapped to count host reads. A call is SKIPPED when the last block's
first linear layer (its attention's ``to_q``) did not run in it, the same watch for every library (for fastcache_rt
also checked against ``fastcache_rt.stats()["cached"]``).

"Outside the model" = the ops of the skipped call minus the ops the model's own code outside its blocks issues
(embedders, RoPE, output norm and head), measured on an uncached call as the ops dispatched while no block module
is running (forward pre-/post-hooks on every block), and cross-checked against a call whose blocks all return their
inputs. So a method's own block work on a skipped step (FBCache's first block, diffusers TaylorSeer's MLPs, which
run every step) counts as outside the model, the same way for both libraries.

Per method the reported count is the largest over its skipped steps (the JSON also has the smallest and the
per-op breakdown of the ops outside the model). Targets are reported, never enforced (exit code 0 either way):
every fastcache_rt method issues fewer ops per skipped step (total) than each diffusers implementation of the
same method; schedule gates (fora, taylorseer, freqca, spectrum, magcache) <= 25 ops outside the model and 0 host
reads; signal gates (teacache, spectralcache, fbcache) <= 1 host read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import types
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fastcache_rt

OURS, DIFFUSERS = "fastcache_rt", "diffusers"
PRESETS = ("fora", "teacache", "spectralcache", "fbcache", "magcache", "taylorseer", "freqca", "spectrum")
SCHEDULE = ("fora", "taylorseer", "freqca", "spectrum", "magcache")  # decide from the step index on the host
SIGNAL = ("teacache", "spectralcache", "fbcache")  # decide from a device signal
SCHEDULE_MAX_OPS = 25
SIGNAL_MAX_READS = 1
READ_METHODS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "cpu")
BATCH = 4

# Settings. Full mode: each preset's defaults (its default site), except FBCache at 0.1 (the preset's 0.05 skips no
# step on the shipped model) and the magnitude-ratio threshold of the benchmark's representative setting; diffusers'
# methods get the same knobs. Smoke mode: thresholds high enough that a random tiny model skips steps.
FULL = dict(ours={"fbcache": dict(threshold=0.1), "magcache": dict(threshold=0.24)},
            fbc_threshold=0.1, mag=dict(threshold=0.24, max_skip_steps=5, retention_ratio=0.1))
SMOKE = dict(ours={"teacache": dict(threshold=1e3), "spectralcache": dict(threshold=1e3),
                   "fbcache": dict(threshold=1e3), "magcache": dict(threshold=1e3)},
             fbc_threshold=1e3, mag=dict(threshold=1e3, max_skip_steps=5, retention_ratio=0.1))
TAYLOR = dict(cache_interval=6, disable_cache_before_step=3, max_order=1)  # = the taylorseer preset's 6 / 3 / order 1


# ----------------------------------------------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------------------------------------------
def _custom_impl(func):
    """The Python implementation of a ``torch.library.custom_op`` (None for aten / C++-registered ops)."""
    if func.namespace in ("aten", "prim", "prims"):
        return None
    try:
        from torch._library.custom_ops import _maybe_get_opdef

        opdef = _maybe_get_opdef(func)
    except Exception:  # noqa: BLE001 - private API; without it a custom op counts as one op
        return None
    return getattr(opdef, "_init_fn", None) if opdef is not None else None


class OpCounter(TorchDispatchMode):
    """Counts the ops reaching the dispatcher, by name; ``outside`` counts (by name) those dispatched while no
    watched block module is running (``depth`` is kept by the block hooks of the baseline measurement)."""

    def __init__(self, counts: Counter | None = None, outside: Counter | None = None, depth=None, prefix=""):
        super().__init__()
        self.counts = Counter() if counts is None else counts
        self.outside = Counter() if outside is None else outside
        self.depth = depth if depth is not None else [0]
        self.prefix = prefix

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = self.prefix + str(func)
        self.counts[name] += 1
        if not self.depth[0]:
            self.outside[name] += 1
        impl = _custom_impl(func)
        if impl is not None:
            # a custom op: also count what its implementation dispatches (allocations, views, ...)
            with OpCounter(self.counts, self.outside, self.depth, prefix=name + "/"):
                return impl(*args, **kwargs)
        return func(*args, **kwargs)


class HostReads:
    """Wraps the Tensor methods that read device data back; counts calls while ``on``."""

    def __init__(self):
        self.on = False
        self.calls: list[str] = []
        self._saved = {}

    def __enter__(self):
        for name in READ_METHODS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from TensorBase

            def counting(t, *a, _orig=orig, _name=name, **k):
                if self.on:
                    self.calls.append(_name)
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counting)
        return self

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            if orig is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, orig)
        self._saved.clear()


def _last_block_linear(tr) -> torch.nn.Module:
    blocks = list(getattr(tr, "single_transformer_blocks", [])) or list(tr.transformer_blocks)
    last = blocks[-1]
    inner = getattr(getattr(last, "attn", None), "to_q", None)
    return inner if inner is not None else next(m for m in last.modules() if isinstance(m, torch.nn.Linear))


def _blocks(tr) -> list[torch.nn.Module]:
    return list(getattr(tr, "transformer_blocks", [])) + list(getattr(tr, "single_transformer_blocks", []))


# ----------------------------------------------------------------------------------------------------------------
# the workload: a FLUX denoising loop over the scheduler, as FluxPipeline.__call__ runs it
# ----------------------------------------------------------------------------------------------------------------
class Workload:
    def __init__(self, transformer, scheduler_config, latents, static: dict, steps: int, name: str):
        self.tr, self.scheduler_config, self.latents, self.static = transformer, scheduler_config, latents, static
        self.steps, self.name = steps, name
        self.watch = _last_block_linear(transformer)

    def timesteps(self):
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sigmas = np.linspace(1.0, 1 / self.steps, self.steps)
        mu = None
        if sched.config.get("use_dynamic_shifting", False):
            c = sched.config
            mu = calculate_shift(self.latents.shape[1], c.get("base_image_seq_len", 256),
                                 c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        ts, _ = retrieve_timesteps(sched, self.steps, self.latents.device, sigmas=sigmas, mu=mu)
        return sched, ts

    @torch.no_grad()
    def run(self, reads: HostReads | None = None, depth=None) -> list[dict]:
        """One generation; per transformer call: ops by name, ops outside the watched blocks, host reads, and
        whether the last block ran."""
        sched, ts = self.timesteps()
        latents = self.latents.clone()
        ran = [False]
        handle = self.watch.register_forward_hook(lambda m, a, o: ran.__setitem__(0, True))
        calls = []
        try:
            for t in ts:
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                ran[0] = False
                counter = OpCounter(depth=depth)
                n0 = len(reads.calls) if reads is not None else 0
                with self.tr.cache_context("cond"):
                    if reads is not None:
                        reads.on = True
                    try:
                        with counter:
                            pred = self.tr(hidden_states=latents, timestep=timestep / 1000, return_dict=False,
                                           **self.static)[0]
                    finally:
                        if reads is not None:
                            reads.on = False
                calls.append(dict(ops=counter.counts, outside=counter.outside, ran=ran[0],
                                  reads=list(reads.calls[n0:]) if reads is not None else []))
                latents = sched.step(pred, t, latents, return_dict=False)[0]
        finally:
            handle.remove()
        return calls


def shipped_workload(steps: int | None = None) -> Workload:
    from fastcache_rt.models import CLASSES, SAMPLE_DEFAULTS, load_default

    pipe = load_default()
    S = steps or SAMPLE_DEFAULTS["num_inference_steps"]
    prompts = list(CLASSES[:BATCH])
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=torch.device("cpu"),
                                                  max_sequence_length=SAMPLE_DEFAULTS["max_sequence_length"])
        tr = pipe.transformer
        latents, image_ids = pipe.prepare_latents(
            BATCH, tr.config.in_channels // 4, SAMPLE_DEFAULTS["height"], SAMPLE_DEFAULTS["width"], pe.dtype,
            torch.device("cpu"), torch.Generator().manual_seed(0), None)
    guidance = torch.full((BATCH,), SAMPLE_DEFAULTS["guidance_scale"]) if tr.config.guidance_embeds else None
    static = dict(encoder_hidden_states=pe, pooled_projections=pooled, txt_ids=text_ids, img_ids=image_ids,
                  guidance=guidance, joint_attention_kwargs=None)
    return Workload(tr, pipe.scheduler.config, latents, static, S,
                    f"shipped model (fastcache_rt.models.load_default), {tuple(latents.shape)} latents")


def tiny_workload(steps: int) -> Workload:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastcache_rt.testing.tiny_flux import TXT, img_ids, inputs, tiny_flux

    H = W = 8
    x, enc, pooled = inputs(0, BATCH, H, W)
    static = dict(encoder_hidden_states=enc, pooled_projections=pooled, txt_ids=torch.zeros(TXT, 3),
                  img_ids=img_ids(H, W), guidance=None, joint_attention_kwargs=None)
    return Workload(tiny_flux(), FlowMatchEulerDiscreteScheduler().config, x, static, steps,
                    f"tiny FLUX transformer (fastcache_rt.testing.tiny_flux), {tuple(x.shape)} latents")


# ----------------------------------------------------------------------------------------------------------------
# the model's own ops outside its blocks
# ----------------------------------------------------------------------------------------------------------------
def _identity(hidden_states, encoder_hidden_states, *args, **kwargs):
    return encoder_hidden_states, hidden_states  # FLUX blocks return (encoder_hidden_states, hidden_states)


@contextlib.contextmanager
def _identity_blocks(tr, keep_first=False):
    """Every block (but the first, with ``keep_first``) returns its inputs."""
    blocks = _blocks(tr)[1 if keep_first else 0:]
    saved = {b: b.__dict__.get("forward") for b in blocks}
    try:
        for b in blocks:
            b.forward = _identity
        yield
    finally:
        for b, f in saved.items():
            if f is None:
                del b.forward
            else:
                b.forward = f


def baseline(w: Workload, reads: HostReads) -> dict:
    """An uncached generation with every block watched: per call, the ops dispatched while no block runs."""
    depth = [0]
    handles = []
    for b in _blocks(w.tr):
        handles.append(b.register_forward_pre_hook(lambda m, a: depth.__setitem__(0, depth[0] + 1)))
        handles.append(b.register_forward_hook(lambda m, a, o: depth.__setitem__(0, depth[0] - 1)))
    try:
        calls = w.run(reads, depth=depth)
    finally:
        for h in handles:
            h.remove()
    if not all(c["ran"] for c in calls):
        raise RuntimeError("the uncached run skipped the last block: the watch is broken")
    outside = [sum(c["outside"].values()) for c in calls]
    totals = [sum(c["ops"].values()) for c in calls]
    if len(set(outside)) != 1:
        raise RuntimeError(f"the model's ops outside its blocks vary between steps: {sorted(set(outside))}")
    # cross-check: every block returns its inputs; and the first block alone (FBCache runs it on every step)
    with _identity_blocks(w.tr):
        ident_ops = sorted({sum(c["ops"].values()) for c in w.run(None)})
    with _identity_blocks(w.tr, keep_first=True):
        first_ops = sorted({sum(c["ops"].values()) - outside[0] for c in w.run(None)})
    return dict(outside=outside[0], outside_by_op=dict(calls[0]["outside"]), total=max(totals),
                total_min=min(totals), identity_blocks_ops=ident_ops, identity_matches=ident_ops == [outside[0]],
                first_block_ops=max(first_ops), host_reads=max(len(c["reads"]) for c in calls))


# ----------------------------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------------------------
def calibrate(w: Workload, reads: HostReads) -> dict:
    from fastcache_rt.bench.methods import diffusers_magcache_calibration

    fastcache_rt.enable(w.tr, "magcache", num_steps=w.steps, calibrate=True)
    try:
        w.run(reads)
        ours = fastcache_rt.stats(w.tr)["mag_ratios"]
    finally:
        fastcache_rt.disable(w.tr)
    theirs = diffusers_magcache_calibration(types.SimpleNamespace(transformer=w.tr), lambda: w.run(reads), w.steps)
    return dict(ours=ours, diffusers=theirs)


def methods(w: Workload, settings: dict, ratios: dict) -> list[dict]:
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    rows = []
    for p in PRESETS:
        ov = dict(settings["ours"].get(p, {}))
        label = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in ov.items())
        if p == "magcache":
            ov["ratios"] = ratios["ours"]
            label = (label + " ratios=calibrated").strip()
        pol = fastcache_rt.policy.PRESETS[p].with_overrides(**{k: v for k, v in ov.items() if k != "ratios"})
        label = (label or "preset defaults") + f" site={pol.site}"

        def enable(tr, _p=p, _ov=ov):
            fastcache_rt.enable(tr, _p, num_steps=w.steps, **_ov)

        rows.append(dict(method=p, library=OURS, config=label, enable=enable, disable=fastcache_rt.disable,
                         kind="schedule" if p in SCHEDULE else "signal"))

    def off(tr):
        tr.disable_cache()

    fbc = settings["fbc_threshold"]
    rows.append(dict(method="fbcache", library=DIFFUSERS, name="FirstBlockCache", config=f"FirstBlockCacheConfig(threshold={fbc:g})",
                     enable=lambda tr: tr.enable_cache(FirstBlockCacheConfig(threshold=fbc)), disable=off))
    mag = settings["mag"]
    rows.append(dict(method="magcache", library=DIFFUSERS, name="MagCache",
                     config=f"MagCacheConfig(threshold={mag['threshold']:g} K={mag['max_skip_steps']} "
                            f"retention={mag['retention_ratio']:g}, calibrated)",
                     enable=lambda tr: tr.enable_cache(MagCacheConfig(num_inference_steps=w.steps,
                                                                      mag_ratios=list(ratios["diffusers"]), **mag)),
                     disable=off))
    for lite in (False, True):
        rows.append(dict(
            method="taylorseer", library=DIFFUSERS, name="TaylorSeerCache" + (" lite" if lite else ""),
            config=f"TaylorSeerCacheConfig(interval={TAYLOR['cache_interval']} warmup="
                   f"{TAYLOR['disable_cache_before_step']} order=1 fp32{' lite' if lite else ''})",
            enable=lambda tr, _lite=lite: tr.enable_cache(TaylorSeerCacheConfig(
                taylor_factors_dtype=torch.float32, use_lite_mode=_lite, **TAYLOR)),
            disable=off))
    order = {p: i for i, p in enumerate(PRESETS)}
    rows.sort(key=lambda r: (order[r["method"]], r["library"] != OURS))
    return rows


def measure(w: Workload, row: dict, base: dict, reads: HostReads) -> dict:
    row["enable"](w.tr)
    try:
        calls = w.run(reads)
        stats_cached = fastcache_rt.stats(w.tr)["cached"] if row["library"] == OURS else None
    finally:
        row["disable"](w.tr)
    skipped = [i for i, c in enumerate(calls) if not c["ran"]]
    if stats_cached is not None and stats_cached != skipped:
        raise RuntimeError(f"{row['method']}: the last-block watch saw skipped steps {skipped}, "
                           f"fastcache_rt.stats() reports {stats_cached}")
    out = {k: row[k] for k in ("method", "library", "config")}
    out["name"] = row.get("name", row["method"])
    out["kind"] = row.get("kind")
    out["skipped_steps"] = skipped
    out["computed_steps"] = [i for i, c in enumerate(calls) if c["ran"]]
    if not skipped:
        out.update(ops_outside=None, ops_total=None, host_reads=None)
        return out
    totals = [sum(calls[i]["ops"].values()) for i in skipped]
    nreads = [len(calls[i]["reads"]) for i in skipped]
    worst = skipped[max(range(len(skipped)), key=lambda j: totals[j])]
    diff = Counter(calls[worst]["ops"])
    diff.subtract(base["outside_by_op"])
    out.update(ops_outside=max(totals) - base["outside"], ops_outside_min=min(totals) - base["outside"],
               ops_total=max(totals), ops_total_min=min(totals), host_reads=max(nreads), host_reads_min=min(nreads),
               host_read_methods=dict(Counter(r for i in skipped for r in calls[i]["reads"])),
               ops_outside_by_op={k: v for k, v in sorted(diff.items()) if v}, worst_step=worst)
    if row["method"] == "fbcache":  # the first block runs on every step: what is left is the method's own
        out["ops_outside_excluding_first_block"] = out["ops_outside"] - base["first_block_ops"]
    return out


def judge(rows: list[dict]) -> None:
    """Attach the issue's targets to the fastcache_rt rows: a list of (target, met) and met overall."""
    for r in rows:
        r["targets"] = []
        if r["library"] != OURS:
            r["met"] = None
            continue
        t = r["targets"]
        if r["ops_total"] is None:
            t.append(dict(target="a skipped step to measure", met=False))
        else:
            for d in rows:
                if d["library"] == DIFFUSERS and d["method"] == r["method"] and d["ops_total"] is not None:
                    t.append(dict(target=f"total ops < diffusers {d['name']} ({d['ops_total']})",
                                  met=r["ops_total"] < d["ops_total"]))
            if r["kind"] == "schedule":
                t.append(dict(target=f"<= {SCHEDULE_MAX_OPS} ops outside", met=r["ops_outside"] <= SCHEDULE_MAX_OPS))
                t.append(dict(target="0 host reads", met=r["host_reads"] == 0))
            else:
                t.append(dict(target=f"<= {SIGNAL_MAX_READS} host read", met=r["host_reads"] <= SIGNAL_MAX_READS))
        r["met"] = all(x["met"] for x in t)


def _fmt_range(hi, lo) -> str:
    if hi is None:
        return "-"
    return str(hi) if hi == lo else f"{lo}..{hi}"


def table(rows: list[dict]) -> str:
    head = ("method", "library", "config", "ops outside model", "total ops", "host reads", "skipped", "targets")
    lines = []
    for r in rows:
        if r["library"] != OURS:
            status = "-"
        elif r["met"]:
            status = "met"
        else:
            status = "not met: " + "; ".join(x["target"] for x in r["targets"] if not x["met"])
        lines.append((r["method"], r["library"], r["config"], _fmt_range(r["ops_outside"], r.get("ops_outside_min")),
                      _fmt_range(r["ops_total"], r.get("ops_total_min")),
                      _fmt_range(r["host_reads"], r.get("host_reads_min")),
                      f"{len(r['skipped_steps'])}/{len(r['skipped_steps']) + len(r['computed_steps'])}", status))
    widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i < 3 or i == 7 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*x) for x in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny random FLUX transformer and 12 steps (seconds)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50, smoke 12)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows and the baseline as JSON here")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        ap.error("--steps: at least 2")

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.smoke:
        w, settings = tiny_workload(args.steps or 12), SMOKE
    else:
        w, settings = shipped_workload(args.steps), FULL
    w.tr.eval()

    with HostReads() as reads:
        base = baseline(w, reads)
        ratios = calibrate(w, reads)
        rows = [measure(w, r, base, reads) for r in methods(w, settings, ratios)]
        after = baseline(w, reads)  # every method was disabled: the model is as it was
    judge(rows)
    clean = after["outside"] == base["outside"] and after["total"] == base["total"]

    print(f"model: {w.name}; batch {BATCH}, {w.steps} steps, 1 thread; torch {torch.__version__}")
    print(f"uncached call: {base['total']} ops, of which {base['outside']} outside the blocks (embedders, RoPE, "
          f"output norm and head; blocks replaced by identity: {base['identity_blocks_ops']}), "
          f"{base['host_reads']} host reads; the first block alone: {base['first_block_ops']} ops")
    print("per SKIPPED step (largest over the skipped steps, lo..hi where they differ); 'ops outside model' = "
          "total - the model's own ops outside its blocks\n")
    print(table(rows))
    bad = [r for r in rows if r["library"] == OURS and not r["met"]]
    print(f"\ntargets: {sum(1 for r in rows if r['library'] == OURS) - len(bad)} of "
          f"{sum(1 for r in rows if r['library'] == OURS)} fastcache_rt rows met"
          + ("" if clean else "; WARNING: the model's op count changed after the methods were disabled"))
    print(f"({time.perf_counter() - t0:.1f} s)")

    if args.out is not None:
        import diffusers

        doc = dict(mode="smoke" if args.smoke else "full", model=w.name, batch=BATCH, steps=w.steps, threads=1,
                   torch=torch.__version__, diffusers=diffusers.__version__,
                   baseline=base, model_unchanged_after=clean, mag_ratios=ratios,
                   targets=dict(schedule_max_ops_outside=SCHEDULE_MAX_OPS, schedule_host_reads=0,
                                signal_max_host_reads=SIGNAL_MAX_READS, fewer_total_ops_than_diffusers=True),
                   rows=rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
