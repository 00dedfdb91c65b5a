"""What every rank runs in the tensor-parallel tests (module-level functions: the harness pickles them by name), and
the single-process references they are compared with.

Tensor parallelism in diffusers 0.42.1 is chosen at load time: ``Model.from_pretrained(dir,
parallel_config=TensorParallelConfig(tp_degree=N))`` reads each rank's slice of every weight the class's ``_tp_plan``
covers (safetensors only) into a ``DTensor`` and registers torch's ``ColwiseParallel`` / ``RowwiseParallel`` hooks on
those ``Linear`` layers. The parent saves the tiny model with ``save_pretrained`` to a temporary directory; every rank
loads it from there, sharded, and runs the same Euler loop as the single-process reference.

On the CPU, diffusers refuses tensor parallelism outright (hooks/tensor_parallel.py ``apply_tensor_parallel``:
"Tensor parallelism is not supported on device type 'cpu'. Supported device types are ['cuda', 'neuron', 'tpu',
'xpu']"), after the sharded load itself went through; ``cpu_tensor_parallel_fix`` adds "cpu" to that list (torch's
DTensor and its parallel styles run on gloo CPU meshes). Everything else is diffusers' and torch's own code.
"""

from __future__ import annotations

import time
import traceback

import torch

from fastcache_rt.testing import context_parallel as tiny

# FLUX.2: a tiny config of 4 heads (fastcache_rt.testing.tiny_image's has 2: TP 4 needs heads % 4 == 0), on the
# 8 x 8 token grid and 8 text tokens of the other families here
FLUX2_HW, FLUX2_TXT = (8, 8), 8
FAMILIES = ("flux", "qwen", "flux2")

# preset -> family -> overrides: each caches some of STEPS steps on these tiny models and computes others
STEPS = 8
METHODS: dict[str, dict[str, dict]] = {
    # FLUX and Qwen-Image: tests/distributed/workers.py's; FLUX.2's: the middle of a range of thresholds that give the
    # same decisions (TeaCache 1.15-1.25, FBCache 0.9-1.0), so the few-ulp differences of TP cannot flip one
    "teacache": {"flux": {"threshold": 0.26, "coeffs": (1.0, 0.0)}, "qwen": {"threshold": 2.0, "coeffs": (1.0, 0.0)},
                 "flux2": {"threshold": 1.2, "coeffs": (1.0, 0.0)}},
    "fbcache": {"flux": {"threshold": 0.42}, "qwen": {"threshold": 0.45}, "flux2": {"threshold": 0.95}},
    "spectrum": {f: {"warmup": 2} for f in FAMILIES},
    "taylorseer": {f: {"interval": 2} for f in FAMILIES},
}


def cpu_tensor_parallel_fix() -> None:
    """diffusers 0.42.1 allows tensor parallelism on cuda / neuron / tpu / xpu meshes only
    (``diffusers.hooks.tensor_parallel._SUPPORTED_TP_DEVICES``); add "cpu" (gloo). Test-only."""
    from diffusers.hooks import tensor_parallel as tp

    if "cpu" not in tp._SUPPORTED_TP_DEVICES:
        tp._SUPPORTED_TP_DEVICES = (*tp._SUPPORTED_TP_DEVICES, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# the tiny models, their inputs and the Euler loop
# ---------------------------------------------------------------------------------------------------------------
def model_class(family: str):
    import diffusers

    return {"flux": diffusers.FluxTransformer2DModel, "qwen": diffusers.QwenImageTransformer2DModel,
            "flux2": diffusers.Flux2Transformer2DModel}[family]


def build(family: str, small: bool = False):
    """The tiny model (4 heads: TP 2 and 4 split them evenly); ``small``: one block per list."""
    if family != "flux2":
        return tiny.build(family, small=small)
    torch.manual_seed(0)
    n = 1 if small else 2
    m = model_class("flux2")(
        patch_size=1, in_channels=4, num_layers=n, num_single_layers=n, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4))
    return m.eval()


def inputs(family: str, seed: int = 0) -> dict:
    if family != "flux2":
        return tiny.inputs(family, seed)
    g = torch.Generator().manual_seed(seed)
    H, W = FLUX2_HW
    img_ids = torch.zeros(H, W, 4)
    img_ids[..., 1] = torch.arange(H)[:, None]
    img_ids[..., 2] = torch.arange(W)[None]
    txt_ids = torch.zeros(FLUX2_TXT, 4)
    txt_ids[:, 3] = torch.arange(FLUX2_TXT)
    return {"hidden_states": torch.randn(1, H * W, 4, generator=g),
            "encoder_hidden_states": torch.randn(1, FLUX2_TXT, 32, generator=g),
            "img_ids": img_ids.reshape(H * W, 4), "txt_ids": txt_ids, "guidance": torch.full((1,), 3.5),
            "return_dict": False}


@torch.no_grad()
def denoise(model, family: str, steps: int, seed: int = 0) -> torch.Tensor:
    """Euler steps from t = 1 to 1/steps (sigma in (0, 1] for all three families); the final latent."""
    kw = inputs(family, seed)
    for s in range(steps):
        v = model(**kw, timestep=torch.full((1,), 1.0 - s / steps))[0]
        kw["hidden_states"] = kw["hidden_states"] - v / steps
    return kw["hidden_states"]


def save(family: str, path: str, small: bool = False) -> None:
    """The tiny model, saved as safetensors (what a tensor-parallel ``from_pretrained`` reads)."""
    build(family, small).save_pretrained(path, safe_serialization=True)


def load_tp(family: str, path: str, mesh=None, degree: int | None = None):
    """``from_pretrained`` with ``TensorParallelConfig(tp_degree=degree)`` (the whole world when None) or on
    ``mesh`` (a 1-D DeviceMesh, e.g. one dimension of a 2-D one)."""
    import torch.distributed as dist
    from diffusers import TensorParallelConfig

    cpu_tensor_parallel_fix()
    cfg = TensorParallelConfig(mesh=mesh) if mesh is not None else \
        TensorParallelConfig(tp_degree=degree or dist.get_world_size())
    return model_class(family).from_pretrained(path, parallel_config=cfg)


def _stats(m) -> dict:
    import fastcache_rt

    st = fastcache_rt.stats(m)
    return {"computed": st["computed"], "per_stream_computed": st["per_stream_computed"],
            "cache_bytes": st["cache_bytes"], "context_parallel": st["context_parallel"],
            "tensor_parallel": st.get("tensor_parallel", "missing")}


# ---------------------------------------------------------------------------------------------------------------
# tensor parallelism: layout, uncached and cached runs, one launch per (family, degree)
# ---------------------------------------------------------------------------------------------------------------
def _blocks(m):
    return [*m.transformer_blocks, *getattr(m, "single_transformer_blocks", [])]


def layout(m, family: str) -> dict:
    """One model call: what every block passes on (its outputs: type, shape, whether a DTensor), the outputs
    themselves (compared across ranks by the parent) and the parameters' types and local sizes."""
    from torch.distributed.tensor import DTensor

    seen: list = []

    def hook(mod, args, out):
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
        seen.append([(type(o).__name__, tuple(o.shape), isinstance(o, DTensor),
                      o.to_local().detach().clone() if isinstance(o, DTensor) else o.detach().clone()) for o in outs])

    handles = [b.register_forward_hook(hook) for b in _blocks(m)]
    try:
        with torch.no_grad():
            out = m(**inputs(family), timestep=torch.full((1,), 0.5))[0]
    finally:
        for h in handles:
            h.remove()
    params = [(n, type(p).__name__, tuple(p.shape), tuple(p.to_local().shape) if isinstance(p, DTensor) else None)
              for n, p in m.named_parameters()]
    return {"block_outputs": seen, "model_out_type": type(out).__name__, "model_out": out.clone(),
            "dtensor_params": sum(1 for p in params if p[1] == "DTensor"), "plain_params": sum(
                1 for p in params if p[1] != "DTensor"), "sharded_examples": [p for p in params if p[3] is not None][:3]}


def tp_runs(rank, world_size, family, path, steps=STEPS, methods=tuple(METHODS), compile_backend=None,
            compile_methods=(), small=False):
    """One launch: load with TP, the layout of one call, the uncached loop, then every method of ``methods``
    (fresh fastcache_rt state each) eager, and those of ``compile_methods`` once more under
    ``torch.compile(fullgraph=True, backend=compile_backend)``."""
    import fastcache_rt

    t0 = time.perf_counter()
    m = load_tp(family, path)
    res = {"load_seconds": time.perf_counter() - t0, "layout": layout(m, family),
           "parallel_config": repr(m._parallel_config)}
    t0 = time.perf_counter()
    res["uncached"] = denoise(m, family, steps)
    res["uncached_seconds"] = time.perf_counter() - t0
    for method in methods:
        fastcache_rt.enable(m, method, num_steps=steps, **METHODS[method][family])
        t0 = time.perf_counter()
        out = denoise(m, family, steps)
        res[method] = {"out": out, "seconds": time.perf_counter() - t0, **_stats(m)}
    if compile_methods:
        fastcache_rt.disable(m)
        res["compiled_uncached"] = _compiled(m, family, steps, compile_backend)
        for method in compile_methods:
            res[f"compiled_{method}"] = _compiled(m, family, steps, compile_backend, method)
    elif methods:
        fastcache_rt.disable(m)
    return res


def _compiled(m, family, steps, backend, method=None) -> dict:
    """The loop under ``torch.compile(m, fullgraph=True, backend=backend)``, with fastcache_rt's ``method`` enabled
    first (fresh state) or uncached; an error is returned (as text), not raised: the parent asserts on it."""
    import fastcache_rt

    torch._dynamo.reset()
    if method is not None:
        fastcache_rt.enable(m, method, num_steps=steps, **METHODS[method][family])
    c = torch.compile(m, fullgraph=True, backend=backend)
    t0 = time.perf_counter()
    try:
        out = denoise(c, family, steps)
        res = {"out": out, "seconds": time.perf_counter() - t0, **(_stats(m) if method is not None else {})}
    except Exception as e:  # noqa: BLE001
        res = {"error": f"{type(e).__name__}: {str(e)[:2000]}", "traceback": traceback.format_exc()[-20000:]}
    if method is not None:
        fastcache_rt.disable(m)
    return res


def single(family, steps=STEPS, methods=tuple(METHODS), small=False) -> dict:
    """The single-process runs: uncached, and cached with each method."""
    import fastcache_rt

    m = build(family, small)
    res = {"uncached": denoise(m, family, steps)}
    for method in methods:
        fastcache_rt.enable(m, method, num_steps=steps, **METHODS[method][family])
        res[method] = {"out": denoise(m, family, steps), **_stats(m)}
    fastcache_rt.disable(m)
    return res


# ---------------------------------------------------------------------------------------------------------------
# context x tensor parallelism on a 2-D mesh
# ---------------------------------------------------------------------------------------------------------------
def _attempt(fn) -> str | None:
    """None if ``fn()`` ran, else its exception as ``Type: message``."""
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 (what diffusers says is the result)
        return f"{type(e).__name__}: {e}"


def cp_tp(rank, world_size, family, path, cp=2, tp=2, steps=STEPS, methods=("teacache",)):
    """4 ranks as a (ring 1, ulysses ``cp``, tp ``tp``) mesh. First what diffusers' public API says to each way of
    combining the two (the exact errors), then the composition through diffusers' own pieces: TP applied at load on
    the mesh's "tp" dimension, then context parallelism's hooks (``apply_context_parallel``) and the attention
    processors' config on its ("ring", "ulysses") dimensions, with ``model._parallel_config`` a ``ParallelConfig``
    holding both (its constructor refuses both: the tensor-parallel one is set after it). Returns the errors, the
    uncached latent and, per method, the cached latent and decisions."""
    from diffusers import ContextParallelConfig, ParallelConfig, TensorParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel
    from torch.distributed.device_mesh import init_device_mesh

    import fastcache_rt

    cpu_tensor_parallel_fix()
    mesh = init_device_mesh("cpu", (1, cp, tp), mesh_dim_names=("ring", "ulysses", "tp"))
    res: dict = {"errors": {}}
    # 1. one ParallelConfig with both
    res["errors"]["parallel_config_both"] = _attempt(lambda: ParallelConfig(
        context_parallel_config=ContextParallelConfig(ulysses_degree=cp, mesh=mesh["ring", "ulysses"]),
        tensor_parallel_config=TensorParallelConfig(mesh=mesh["tp"])))
    # 2. TP at load, then enable_parallelism with CP
    m = load_tp(family, path, mesh=mesh["tp"])
    res["errors"]["tp_then_enable_parallelism_cp"] = _attempt(lambda: m.enable_parallelism(
        config=ContextParallelConfig(ulysses_degree=cp, mesh=mesh["ring", "ulysses"])))
    # 3. CP first (enable_parallelism on an in-memory model), then TP (enable_parallelism again)
    m2 = build(family)
    m2.enable_parallelism(config=ContextParallelConfig(ulysses_degree=cp, mesh=mesh["ring", "ulysses"]))
    res["errors"]["cp_then_enable_parallelism_tp"] = _attempt(lambda: m2.enable_parallelism(
        config=TensorParallelConfig(mesh=mesh["tp"])))
    # 4. the composition through diffusers' pieces
    tp_cfg = m._parallel_config.tensor_parallel_config
    cp_cfg = ContextParallelConfig(ulysses_degree=cp, mesh=mesh["ring", "ulysses"])
    both = ParallelConfig(context_parallel_config=cp_cfg)
    both.setup(rank, world_size, tp_cfg._device, mesh=mesh["ring", "ulysses"])
    both.tensor_parallel_config = tp_cfg
    for mod in m.modules():
        proc = getattr(mod, "processor", None)
        if proc is not None and hasattr(proc, "_parallel_config"):
            proc._parallel_config = both
    apply_context_parallel(m, cp_cfg, m._cp_plan)
    m._parallel_config = both
    res["coords"] = {"cp_rank": cp_cfg._flattened_mesh.get_local_rank(), "tp_rank": mesh["tp"].get_local_rank()}
    try:
        res["uncached"] = denoise(m, family, steps)
    except Exception:  # noqa: BLE001
        res["composed_error"] = traceback.format_exc()
        return res
    for method in methods:
        fastcache_rt.enable(m, method, num_steps=steps, **METHODS[method][family])
        res[method] = {"out": denoise(m, family, steps), **_stats(m)}
    fastcache_rt.disable(m)
    return res
