"""Caching under diffusers' context parallelism (or tensor parallelism): one generation of the shipped model on
several ranks.

    torchrun --nproc-per-node 2 examples/context_parallel.py                      # Ulysses, uncached only
    torchrun --nproc-per-node 2 examples/context_parallel.py --ring --method spectrum
    torchrun --nproc-per-node 2 examples/context_parallel.py --method teacache --set threshold=0.4
    torchrun --nproc-per-node 3 examples/context_parallel.py --tp 3 --method teacache   # tensor parallelism

Every rank loads the shipped FLUX-architecture pipeline (``fastcache_rt.models.load_default``), turns on context
parallelism on its transformer (``transformer.enable_parallelism(config=ContextParallelConfig(...))``: the token
sequence is split over the ranks at the model's entry and gathered at its output), runs one uncached generation,
then (with ``--method``) one generation with fastcache_rt, and prints every rank's decisions, whether they agree,
the wall times and the speedup against the uncached context-parallel run.

Backends: NCCL with one GPU per rank where CUDA is available, gloo on the CPU otherwise.

What a user must know (diffusers 0.42.1):
- On a CPU-only torch, diffusers computes ``rank % torch.accelerator.device_count()`` (= ``% 0``) when it sets up
  parallelism; this script makes ``device_count`` return 1 there.
- The transformer must be called with ``return_dict=False`` (the pipelines do; ``return_dict=True`` fails in the
  output gather).
- Ulysses splits the attention heads over the ranks: the shipped model has 3 heads, so with 2 ranks this script turns
  on ``ulysses_anything`` (uneven heads), and 4 ranks need ``--ring``. Ring attention has no such constraint.
- Ring attention needs the log-sum-exp of partial attentions; on the CPU diffusers' ``native`` backend does not
  return it, so this script routes it through ``aten::_scaled_dot_product_flash_attention_for_cpu`` (CPU only).
- The image tokens (256) and text tokens (8) are split evenly: the rank count must divide both (1, 2, 4, 8).

Tensor parallelism (``--tp N``, N = the number of ranks): the transformer is loaded with
``FluxTransformer2DModel.from_pretrained(..., parallel_config=TensorParallelConfig(tp_degree=N))``, which reads each
rank's slice of the weights its ``_tp_plan`` names (safetensors); every block then passes the whole hidden states on,
identical on every rank, so caching needs no communication of its own. What a user must know:
- N must divide the attention heads: the shipped model's 3 heads allow ``--tp 3`` (diffusers refuses 2 and 4:
  "`tp_degree` (2) must divide the number of attention heads (3).").
- diffusers 0.42.1 allows tensor parallelism on cuda / neuron / tpu / xpu only ("Tensor parallelism is not
  supported on device type 'cpu'"); on the CPU this script adds "cpu" to that list (torch's DTensors run on gloo).
- Context and tensor parallelism together are refused: diffusers' ``ParallelConfig`` says "Combining context
  parallelism and tensor parallelism in a single `ParallelConfig` is not supported", and ``enable_parallelism`` on
  a model loaded with a ``parallel_config`` says "Parallelism is already applied". ``--tp`` with ``--ulysses`` /
  ``--ring``, or with more ranks than N, stops with that message.

With ``--method``, every signal gate (TeaCache, SpectralCache, FBCache) all-reduces its band sums over the
context-parallel group before deciding (one all-reduce of a few floats per step), so every rank takes the same
decision; schedule gates need no communication. The script also counts the collectives of one more cached
generation (``--count``) and prints them per computed and per cached step.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()  # (default: Ulysses, unless --tp)
    mode.add_argument("--ulysses", dest="mode", action="store_const", const="ulysses", help="Ulysses attention "
                      "(all-to-all over heads; the default)")
    mode.add_argument("--ring", dest="mode", action="store_const", const="ring", help="ring attention")
    p.set_defaults(mode=None)
    p.add_argument("--tp", type=int, default=None, metavar="N", help="tensor parallelism over N ranks instead of "
                   "context parallelism (N = the number of ranks; N must divide the model's 3 attention heads)")
    p.add_argument("--method", default=None, help="a fastcache_rt preset (spectrum, teacache, spectralcache, fbcache, "
                   "magcache, freqca, ...); without it only the uncached run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="a field of the preset's gate or forecaster, e.g. threshold=0.4 (repeatable)")
    p.add_argument("--prompt", default="red circle", help="one of fastcache_rt.models.CLASSES")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed generations per configuration (the best counts)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a collective may wait (a hang fails instead of blocking)")
    p.add_argument("--reference", action="store_true", help="first run the generation on each rank without context "
                   "parallelism and report the largest pixel difference of the context-parallel image")
    p.add_argument("--count", action="store_true", help="run the cached generation once more, counting the "
                   "collectives (and their bytes) each transformer call issues")
    p.add_argument("--out", default=None, help="save rank 0's images here (PREFIX_uncached.png, PREFIX_cached.png)")
    args = p.parse_args(argv)
    if args.tp is not None and args.tp < 1:
        p.error("--tp: a positive number of ranks")
    if args.tp is not None and args.mode is not None:
        p.error(f"--tp with --{args.mode}: {CP_TP_REFUSED}")
    if args.tp is None and args.mode is None:
        args.mode = "ulysses"
    return args


# what diffusers 0.42.1 says to context and tensor parallelism together
CP_TP_REFUSED = ("context and tensor parallelism cannot be combined in diffusers 0.42.1 (ParallelConfig: "
                 "\"Combining context parallelism and tensor parallelism in a single `ParallelConfig` is not "
                 "supported\"; enable_parallelism on a model loaded with a parallel_config: \"Parallelism is already "
                 "applied\"); run one of them")


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "," in text:
        return tuple(_value(t) for t in text.split(",") if t)
    return text


def overrides(items) -> dict:
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: expected FIELD=VALUE, got {item!r}")
        out[key.strip()] = _value(val.strip())
    return out


def cpu_fixes() -> None:
    """diffusers 0.42.1 on a CPU-only torch: ``device_count`` 1 instead of 0; ring attention's log-sum-exp through
    the CPU flash-attention kernel; tensor parallelism allowed on a CPU mesh (see the module docstring)."""
    import torch
    from diffusers.hooks import tensor_parallel as tp
    from diffusers.models import attention_dispatch as ad

    if "cpu" not in tp._SUPPORTED_TP_DEVICES:
        tp._SUPPORTED_TP_DEVICES = (*tp._SUPPORTED_TP_DEVICES, "cpu")

    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    original = ad._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse or query.device.type != "cpu":
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        return out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()

    ad._native_attention_forward_op = forward_op


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        print("launch with torchrun, e.g. torchrun --nproc-per-node 2 examples/context_parallel.py", file=sys.stderr)
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.tp is not None and args.tp != world:
        if rank == 0:
            print(f"--tp {args.tp} on {world} ranks: tensor parallelism needs exactly --tp ranks (launch with "
                  f"--nproc-per-node {args.tp}); splitting the rest with context parallelism is not possible: "
                  f"{CP_TP_REFUSED}", file=sys.stderr, flush=True)
        return 2
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        cpu_fixes()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        code = run(args, rank, world, device)
        dist.barrier()  # no rank tears its groups down while another still talks to it
        return code
    finally:
        # The pipeline outlives run(): its modules and hooks form reference cycles, and they hold the context-parallel
        # mesh's process groups. Left to the collector they would be freed during interpreter shutdown, after the
        # groups were destroyed, which can abort the process (gloo's threads tearing down with the interpreter).
        # Collect them now, while everything is alive, then destroy the groups.
        gc.collect()
        dist.destroy_process_group()


def _say(rank: int, world: int, text: str) -> None:
    """Print ``text`` of every rank, in rank order, from rank 0."""
    import torch.distributed as dist

    lines = [None] * world
    dist.all_gather_object(lines, text)
    if rank == 0:
        for r, line in enumerate(lines):
            print(f"[rank {r}] {line}", flush=True)


def run(args, rank: int, world: int, device) -> int:
    import torch
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from fastcache_rt import models

    models.check_prompt(args.prompt)
    kw = {**models.SAMPLE_DEFAULTS, "num_inference_steps": args.steps, "output_type": "pt"}
    if args.tp is not None:
        return run_tensor_parallel(args, rank, world, device, kw)
    pipe = models.load_default(device=device)
    heads = pipe.transformer.config.num_attention_heads
    reference = None
    if args.reference:  # before enable_parallelism: the plain single-process result
        reference = pipe(prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed), **kw).images
    if world > 1:
        if args.mode == "ulysses" and heads < world:
            if rank == 0:
                print(f"Ulysses splits the {heads} attention heads over the ranks: at most {heads} ranks; use --ring "
                      f"for {world}", file=sys.stderr, flush=True)
            return 2
        if args.mode == "ulysses":
            uneven = heads % world != 0
            cfg = ContextParallelConfig(ulysses_degree=world, ulysses_anything=uneven)
        else:
            cfg = ContextParallelConfig(ring_degree=world)
        pipe.transformer.enable_parallelism(config=cfg)
    if rank == 0:
        print(f"context parallelism: {args.mode}, {world} rank(s), backend {dist.get_backend()}, device "
              f"{device.type}; model {type(pipe.transformer).__name__} ({heads} heads), {args.steps} steps", flush=True)
    return generate_and_cache(args, rank, world, device, pipe, kw, reference, "context-parallel")


def run_tensor_parallel(args, rank: int, world: int, device, kw) -> int:
    """The shipped pipeline with its transformer loaded sharded over the ranks (``TensorParallelConfig``)."""
    import torch
    import torch.distributed as dist
    from diffusers import FluxPipeline, FluxTransformer2DModel, TensorParallelConfig

    from fastcache_rt import models

    reference = None
    if args.reference:  # the plain single-process result, from an unsharded copy of the pipeline
        plain = models.load_default(device=device)
        reference = plain(prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed), **kw).images
        del plain
    try:
        transformer = FluxTransformer2DModel.from_pretrained(
            models.DEFAULT_PATH, subfolder="transformer", local_files_only=True,
            parallel_config=TensorParallelConfig(tp_degree=args.tp))
    except ValueError as e:  # e.g. a degree that does not divide the heads: the same on every rank
        if rank == 0:
            print(f"--tp {args.tp}: diffusers refuses to shard the transformer: {e}", file=sys.stderr, flush=True)
        return 2
    pipe = FluxPipeline.from_pretrained(models.DEFAULT_PATH, transformer=transformer, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if rank == 0:
        print(f"tensor parallelism: {world} rank(s), backend {dist.get_backend()}, device {device.type}; model "
              f"{type(transformer).__name__} ({transformer.config.num_attention_heads} heads), {args.steps} steps",
              flush=True)
    return generate_and_cache(args, rank, world, device, pipe, kw, reference, "tensor-parallel")


def generate_and_cache(args, rank, world, device, pipe, kw, reference, layout: str) -> int:
    """The uncached generation (against ``reference`` where given), then, with ``--method``, the cached one; every
    rank's figures and whether their decisions agree. ``layout``: "context-parallel" or "tensor-parallel"."""
    import torch
    import torch.distributed as dist

    import fastcache_rt

    def generate():
        best, image = float("inf"), None
        for _ in range(max(1, args.repeats)):
            g = torch.Generator("cpu").manual_seed(args.seed)
            dist.barrier()
            t0 = time.perf_counter()
            image = pipe(prompt=args.prompt, generator=g, **kw).images
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return image, best

    generate_warmup = pipe(prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed),
                           **{**kw, "num_inference_steps": 2}).images  # first-call costs out of the timing
    del generate_warmup
    base, t_base = generate()
    ref = "" if reference is None else \
        f"; max |{layout} - single-process| pixel difference {float((base - reference).abs().max()):.2e}"
    _say(rank, world, f"uncached: {t_base:.2f} s{ref}")
    if args.out and rank == 0:
        _save(base, f"{args.out}_uncached.png")
    if args.method is None:
        return 0

    fastcache_rt.enable(pipe, args.method, **overrides(args.overrides))
    img, t_cached = generate()
    st = fastcache_rt.stats(pipe)
    computed = st["computed"]
    if args.count:
        _say(rank, world, communication(pipe, args, kw, computed))
    _say(rank, world, f"{args.method}: computed {len(computed)}/{args.steps} steps {computed}; "
                      f"cache {st['cache_bytes'] / 1024:.1f} KiB; {t_cached:.2f} s; context_parallel "
                      f"{st['context_parallel']}, tensor_parallel {st.get('tensor_parallel')}")
    logs = [None] * world
    dist.all_gather_object(logs, st["per_stream_computed"])
    agree = all(log == logs[0] for log in logs)
    diff = float((img.float() - base.float()).abs().max())
    if rank == 0:
        print(f"decisions identical on every rank: {agree}", flush=True)
        print(f"speedup against the uncached {layout} run: {t_base / t_cached:.2f}x "
              f"({t_base:.2f} s -> {t_cached:.2f} s); max |cached - uncached| pixel difference {diff:.4f}", flush=True)
        if args.out:
            _save(img, f"{args.out}_cached.png")
    return 0 if agree else 1


def communication(pipe, args, kw, computed) -> str:
    """One more cached generation, counting the collectives of each transformer call (a dispatch mode sees every
    c10d and functional-collective op): their count and the bytes this rank puts in (the first tensor argument: the
    input of a functional collective, this rank's chunk of a c10d all-gather), per computed and per cached step."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if func.namespace in ("c10d", "_c10d_functional") and name not in ("wait_tensor", "_wrap_tensor_autograd"):
                t = next((a for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)), None)
                self.calls.append((name, 0 if t is None else t.numel() * t.element_size()))
            return func(*args, **(kwargs or {}))

    model = pipe.transformer
    per_call, original = [], model.forward

    def forward(*a, **k):
        with Counter() as c:
            out = original(*a, **k)
        per_call.append(c.calls)
        return out

    model.forward = forward
    try:
        pipe(prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed), **kw)
    finally:
        model.forward = original
    per_step = max(1, len(per_call) // args.steps)  # transformer calls per step (CFG branches)
    parts = []
    for label, want in (("computed", True), ("cached", False)):
        calls = [c for i, c in enumerate(per_call) if (i // per_step in computed) == want]
        if not calls:
            continue
        n = sum(len(c) for c in calls) / len(calls)
        nbytes = sum(b for c in calls for _, b in c) / len(calls)
        reduce = sum(b for c in calls for name, b in c if "reduce" in name) / len(calls)
        kinds = sorted({name for c in calls for name, _ in c})
        parts.append(f"{label} step: {n:.0f} collectives, {nbytes / 1024:.1f} KiB of input ({reduce:.0f} B to "
                     f"all-reduces; {', '.join(kinds) or 'none'})")
    return "communication per " + "; per ".join(parts)


def _save(images, path: str) -> None:
    from PIL import Image

    x = (images[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(x).save(path)


if __name__ == "__main__":
    sys.exit(main())
