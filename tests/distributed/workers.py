"""What every rank runs in the context-parallel tests (module-level functions: the harness pickles them by name),
and the single-process references they are compared with.

A rank builds the tiny model (``fastcache_rt.testing.context_parallel``; identical on every rank), turns on
diffusers' context parallelism, optionally fastcache_rt (after ``enable_parallelism`` by default, the order a user
follows, or before it), runs a short Euler loop and returns the final latent (full: diffusers gathers the output on
every rank), fastcache_rt's decision log and cache bytes.
"""

from __future__ import annotations

import time

import torch

from fastcache_rt.testing import context_parallel as tiny

CONFIGS = (("ulysses", 2), ("ulysses", 4), ("ring", 2))

MAG_RATIOS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.88, 0.86)
# Thresholds: each gate caches some steps; on FLUX the ranks' own accumulations straddle them (today's per-rank
# gates disagree on every config), and no single-process accumulation is within rounding of them (the reduced sums
# must reproduce the single-process decisions). MagCache's ratios: a made-up decay that caches some of 8 steps.
METHODS: dict[str, dict[str, dict]] = {  # preset -> family -> overrides
    "teacache": {"flux": {"threshold": 0.26, "coeffs": (1.0, 0.0)}, "wan": {"threshold": 0.5, "coeffs": (1.0, 0.0)},
                 "qwen": {"threshold": 2.0, "coeffs": (1.0, 0.0)}},
    "spectralcache": {"flux": {"threshold": 0.15, "coeffs": (1.0, 0.0)},
                      "wan": {"threshold": 0.5, "coeffs": (1.0, 0.0)},
                      "qwen": {"threshold": 1.5, "coeffs": (1.0, 0.0)}},
    "fbcache": {"flux": {"threshold": 0.42}, "wan": {"threshold": 0.1}, "qwen": {"threshold": 0.45}},
    "magcache": {f: {"ratios": MAG_RATIOS} for f in ("flux", "wan", "qwen")},
    "spectrum": {f: {"warmup": 2} for f in ("flux", "wan", "qwen")},
    "freqca": {f: {"warmup": 2, "interval": 2} for f in ("flux", "wan", "qwen")},
    # the error estimates' sums are all-reduced over the group: every rank chooses the same gaps
    "adaptive": {f: {"tol": 0.3, "warmup": 2} for f in ("flux", "wan", "qwen")},
}


def cp_config(mode: str, world_size: int):
    from diffusers import ContextParallelConfig

    if mode == "ulysses":
        return ContextParallelConfig(ulysses_degree=world_size)
    if mode == "ring":
        return ContextParallelConfig(ring_degree=world_size)
    raise ValueError(f"mode: 'ulysses' or 'ring', got {mode!r}")


def cp_group(model):
    """The context-parallel process group diffusers set up on ``model`` (``enable_parallelism``): the flattened
    ring x ulysses mesh, the one its sharder splits the sequence over (hooks/context_parallel.py
    ``EquipartitionSharder.shard``)."""
    return model._parallel_config.context_parallel_config._flattened_mesh.get_group()


def _model(family, mode, world_size, method=None, overrides=None, order="after", steps=None, small=False,
           explicit_group=False):
    import fastcache_rt

    m = tiny.build(family, small=small)
    if method is not None and order == "before":
        fastcache_rt.enable(m, method, num_steps=steps, **(overrides or {}))
    m.enable_parallelism(config=cp_config(mode, world_size))
    if method is not None and order == "after":
        group = {"group": cp_group(m)} if explicit_group else {}
        fastcache_rt.enable(m, method, num_steps=steps, **group, **(overrides or {}))
    return m


def _stats(m) -> dict:
    import fastcache_rt

    st = fastcache_rt.stats(m)
    return {"computed": st["computed"], "per_stream_computed": st["per_stream_computed"],
            "cache_bytes": st["cache_bytes"], "mag_ratios": st.get("mag_ratios")}


def uncached(rank, world_size, family, mode, steps):
    """Context parallelism alone: the final latent and the wall time of the loop."""
    m = _model(family, mode, world_size)
    t0 = time.perf_counter()
    out = tiny.denoise(m, family, steps)
    return {"out": out, "loop_seconds": time.perf_counter() - t0}


def cached(rank, world_size, family, mode, steps, method, overrides=None, order="after", compile_backend=None,
           explicit_group=False):
    """Context parallelism + fastcache_rt: final latent, decisions, cache bytes. With ``compile_backend``, the
    eager run is followed by a ``torch.compile(fullgraph=True)`` run of the same generation (fresh state); both
    are returned (``compiled_out``, ``compiled_computed``)."""
    m = _model(family, mode, world_size, method, overrides, order, steps, explicit_group=explicit_group)
    t0 = time.perf_counter()
    out = tiny.denoise(m, family, steps)
    res = {"out": out, "loop_seconds": time.perf_counter() - t0, **_stats(m)}
    if compile_backend is not None:
        res.update(_compiled(m, family, steps, compile_backend, method, **(overrides or {})))
    return res


def _compiled(m, family, steps, backend, method, **overrides) -> dict:
    """The same generation once more under ``torch.compile(fullgraph=True)``, from fresh fastcache_rt state:
    ``compiled_out``, ``compiled_seconds``, ``compiled_computed``."""
    import fastcache_rt

    torch._dynamo.reset()
    fastcache_rt.enable(m, method, num_steps=steps, **overrides)
    c = torch.compile(m, fullgraph=True, backend=backend)
    t0 = time.perf_counter()
    out = tiny.denoise(c, family, steps)
    return {"compiled_out": out, "compiled_seconds": time.perf_counter() - t0,
            "compiled_computed": fastcache_rt.stats(m)["computed"]}


def cached_then_disabled(rank, world_size, family, mode, steps, method, overrides=None, order="after"):
    """A cached generation, then ``fastcache_rt.disable`` and an uncached one: diffusers' context-parallel hooks
    must work as before (the final latent), and only theirs remain."""
    import fastcache_rt

    m = _model(family, mode, world_size, method, overrides, order, steps)
    tiny.denoise(m, family, steps)
    fastcache_rt.disable(m)
    out = tiny.denoise(m, family, steps)
    chains = {name: list(mod._diffusers_hook._hook_order) for name, mod in m.named_modules()
              if getattr(mod, "_diffusers_hook", None) is not None and mod._diffusers_hook._hook_order}
    return {"out": out, "chains": chains}


def single_cached(family, steps, method, overrides=None) -> dict:
    """The single-process cached run the context-parallel one must reproduce."""
    import fastcache_rt

    m = tiny.build(family)
    fastcache_rt.enable(m, method, num_steps=steps, **(overrides or {}))
    out = tiny.denoise(m, family, steps)
    return {"out": out, **_stats(m)}


def single_uncached(family, steps) -> torch.Tensor:
    return tiny.denoise(tiny.build(family), family, steps)


# ---------------------------------------------------------------------------------------------------------------
# TeaCache's probe on each rank, and the decisions the reduced sums give (the knife-edge test)
# ---------------------------------------------------------------------------------------------------------------
def _probe_module(m, family):
    """The module whose output is TeaCache's probe on ``family`` (fastcache_rt/families: FLUX probe "norm1" =
    ``transformer_blocks[0].norm1(hidden, emb=temb)[0]``, on the rank's shard of the image tokens)."""
    if family != "flux":
        raise ValueError("the knife-edge test uses FLUX, whose TeaCache probe is sharded (Wan's is the replicated temb)")
    return m.transformer_blocks[0].norm1


def _capture_probes(m, family) -> tuple[list, list]:
    """Record the first output of the probe module in every model call (the controller's probe comes first; the
    block's own norm1 call follows on computed steps). Returns (the list it fills, the hook handles)."""
    probes: list = []
    fresh = [False]

    def pre(module, args, kwargs):
        fresh[0] = True

    def post(module, args, out):
        if fresh[0]:
            probes.append((out[0] if isinstance(out, tuple) else out).detach().clone())
            fresh[0] = False

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True), _probe_module(m, family).register_forward_hook(post)]
    return probes, handles


def reduced_sums(probes: list, group, reduce: bool = True) -> list:
    """Per step s: ``band_l1(probe_s, probe_{s-1})`` (step 0 against itself, as the gate does), summed over the
    group (``dist.all_reduce``, the sums of the whole sequence) unless ``reduce`` is False."""
    import torch.distributed as dist

    from fastcache_rt import ops

    out = []
    for s, p in enumerate(probes):
        sums = ops.band_l1(p, probes[s - 1] if s else p)
        if reduce:
            dist.all_reduce(sums, group=group)
        out.append(sums)
    return out


def gate_decisions(sums: list, threshold: float, steps: int, coeffs=(1.0, 0.0)) -> tuple[list, list]:
    """TeaCache's decisions from per-step sums (``ops.gate_decide``, the gate epilogue): (computed steps, the
    accumulator after each step: on a cached step the value that was compared with the threshold, 0 on a computed
    one)."""
    from fastcache_rt import ops
    from fastcache_rt.ops import layout as L

    state, params = ops.gate_state(), ops.gate_params(threshold, steps)
    computed, accs = [], []
    for s, x in enumerate(sums):
        decision, state = ops.gate_decide(x, state, params, coeffs)
        accs.append(state[L.S_ACC].clone())
        if bool(decision):
            computed.append(s)
    return computed, accs


def knife_edge(rank, world_size, mode, steps, family="flux", second_pass=True, compile_backend=None,
               small=False):
    """Pass 1: TeaCache with a huge threshold (every step but the first and last cached, on every rank): the probes
    of that trajectory. The accumulator the *reduced* sums give, acc_k, at each step k; the threshold is set to
    exactly acc_k at a step k where the ranks' own (unreduced) accumulators fall on both sides of it where there
    is one (today's per-rank gates then disagree), else at the middle step. Pass 2: TeaCache with that threshold;
    returns its decisions and the decisions the reduced sums of pass 2's own probes give (what every rank must
    take). With ``compile_backend``: pass 2 once more under ``torch.compile(fullgraph=True)`` (fresh state; its
    decisions must be the eager ones)."""
    import torch.distributed as dist

    import fastcache_rt

    coeffs = (1.0, 0.0)
    m = _model(family, mode, world_size, small=small)
    group = cp_group(m)
    probes, handles = _capture_probes(m, family)
    fastcache_rt.enable(m, "teacache", num_steps=steps, threshold=1e6, coeffs=coeffs)
    tiny.denoise(m, family, steps)
    pass1 = fastcache_rt.stats(m)["computed"]
    red = reduced_sums(probes, group)
    loc = reduced_sums(probes, group, reduce=False)
    _, acc_red = gate_decisions(red, 1e6, steps, coeffs)
    _, acc_loc = gate_decisions(loc, 1e6, steps, coeffs)
    # every rank's own accumulators, on every rank
    mine = torch.stack(acc_loc)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    everyone = torch.stack(everyone)  # (ranks, steps)
    k = None
    for s in range(1, steps - 1):
        tau = acc_red[s]
        if bool((everyone[:, s] < tau).any()) and bool((everyone[:, s] >= tau).any()):
            k = s
            break
    straddles = k is not None
    if k is None:
        k = steps // 2
    tau = float(acc_red[k])
    info = {"pass1": pass1, "k": k, "tau": tau, "straddles": straddles, "acc_reduced": torch.stack(acc_red),
            "acc_ranks": everyone}
    if not second_pass:
        return info
    probes.clear()
    fastcache_rt.enable(m, "teacache", num_steps=steps, threshold=tau, coeffs=coeffs)
    out = tiny.denoise(m, family, steps)
    got = fastcache_rt.stats(m)["computed"]
    expected, _ = gate_decisions(reduced_sums(probes, group), tau, steps, coeffs)
    res = {**info, "computed": got, "expected": expected, "out": out}
    if compile_backend is not None:
        for h in handles:
            h.remove()
        res.update(_compiled(m, family, steps, compile_backend, "teacache", threshold=tau, coeffs=coeffs))
    return res


# ---------------------------------------------------------------------------------------------------------------
# Communication per step: the collectives each model call issues (ops of the c10d / _c10d_functional namespaces)
# ---------------------------------------------------------------------------------------------------------------
_REDUCE_OPS = ("allreduce", "all_reduce", "reduce_scatter")


class CollectiveCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the collective ops dispatched while active (eager): ``calls`` = [(op name, bytes of its first
    tensor argument)]; ``wait_tensor`` (the functional collectives' completion) and ``_wrap_tensor_autograd`` are not
    collectives and not counted."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace
        name = func._schema.name.split("::")[-1]
        if ns in ("c10d", "_c10d_functional") and name not in ("wait_tensor", "_wrap_tensor_autograd"):
            first = next((a for a in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                          if isinstance(a, torch.Tensor)), None)
            self.calls.append((name, 0 if first is None else first.numel() * first.element_size()))
        return func(*args, **(kwargs or {}))


def communication(rank, world_size, family, mode, steps, method=None, overrides=None, order="after"):
    """Per model call (one per step): the collectives issued (name, bytes), split into reductions (the model itself
    issues none: Ulysses all-to-alls, ring and output all-gathers) and the rest; plus fastcache_rt's decisions."""
    m = _model(family, mode, world_size, method, overrides, order, steps)
    per_step = []
    original = m.forward

    def forward(*args, **kwargs):
        with CollectiveCounter() as counter:
            out = original(*args, **kwargs)
        per_step.append(counter.calls)
        return out

    m.forward = forward
    tiny.denoise(m, family, steps)
    res = {"per_step": per_step,
           "reductions": [[c for c in calls if any(k in c[0] for k in _REDUCE_OPS)] for calls in per_step],
           "others": [[c for c in calls if not any(k in c[0] for k in _REDUCE_OPS)] for calls in per_step]}
    if method is not None:
        res.update(_stats(m))
    return res


# ---------------------------------------------------------------------------------------------------------------
# fastcache_rt.parallel.Shard and FreqCa's low-pass of a shard
# ---------------------------------------------------------------------------------------------------------------
def shard_ops(rank, world_size, channels):
    import torch.distributed as dist

    from fastcache_rt.parallel import Shard
    from fastcache_rt.policy import StreamSpec
    from fastcache_rt.policy.forecasters import FreqCa

    sh = Shard(dist.group.WORLD)
    grid = (2, 3, 2 * world_size)  # frames x rows x columns: 12 * N tokens, N-way split
    full = torch.randn(2, 12 * world_size, channels, generator=torch.Generator().manual_seed(7))
    mine = sh.own_tokens(full)
    res = {"gathered": torch.equal(sh.gather_tokens(mine), full)}
    if channels % world_size == 0:
        d = channels // world_size
        mid = sh.tokens_to_channels(mine)
        res["channels"] = torch.equal(mid, full[..., rank * d:(rank + 1) * d])
        res["roundtrip"] = torch.equal(sh.channels_to_tokens(mid), mine)
    else:
        res["channels"] = res["roundtrip"] = True  # the all-to-all needs channels divisible by the ranks
    fc = FreqCa(cutoff=0.4)
    single = fc.make_state(StreamSpec(tuple(full.shape), torch.float32, "cpu", 8, grid))
    sharded = fc.make_state(StreamSpec(tuple(mine.shape), torch.float32, "cpu", 8, grid, sh))
    want = sh.own_tokens(single.lowpass(full))
    res["lowpass_err"] = float((sharded.lowpass(mine) - want).abs().max() / want.abs().max())
    return res


# ---------------------------------------------------------------------------------------------------------------
# for the harness's own tests
# ---------------------------------------------------------------------------------------------------------------
def raise_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return {}


def hang_on_rank1(rank, world_size):
    """Rank 0 enters a collective that rank 1 never joins."""
    import torch.distributed as dist

    if rank == 0:
        dist.all_reduce(torch.ones(1))
    else:
        time.sleep(600)
    return {}


def sleep(rank, world_size):
    time.sleep(600)
    return {}
