"""diffusers' FirstBlockCache with its decision on ``fastcache_rt.ops.gate_step``: an example for the author of
another caching library.

    python examples/fbcache_on_gate_step.py                        # shipped model, 16 steps, threshold 0.2
    python examples/fbcache_on_gate_step.py --steps 20 --threshold 0.15 --prompt "blue square"

diffusers' ``FirstBlockCacheConfig(threshold)`` runs the first transformer block every step and skips the others
when the relative L1 change of the first block's residual against the last computed step's is at most the threshold
(``hooks/first_block_cache.py``, ``_should_compute_remaining_blocks``)::

    diff = ((r - r_last).abs().mean() / r_last.abs().mean()).item()      # a host read every step
    compute = diff > threshold

The same decision on the device, with three calls of ``fastcache_rt.ops``:

    params = ops.gate_params(threshold, 1, force_last=False)    # once: tau = threshold; no forced last step
    state = ops.gate_state()                                    # per generation and CFG branch: step 0
    compute, state, _ = ops.gate_step(r, r_last, state, params) # every step: bool 0-dim tensor, nothing read back

and two element-wise lines of bookkeeping, as fastcache_rt's own FBCache gate (``policy.gates.FBCacheGate``, a
``SignalState`` with ``accumulate=False, against_last_computed=True``) does:

    state = state * keep                          # keep = 1 but 0 at S_ACC: no accumulation (TeaCache would keep it)
    r_last = torch.where(compute, r, r_last)      # compare with the last *computed* step's residual

``gate_step`` computes ``d = sum|r - r_last| / sum|r_last|`` (the ratio of the two means), adds ``polyval(coeffs, d)``
(identity by default) to the state's accumulator and caches the step iff the accumulator is below ``tau``, the step
is not the first (the state's step counter is 0 at the start of a generation), something was computed before, and
``d`` is finite. With the accumulator zeroed after every call the test is ``d < threshold``: diffusers' ``diff <=
threshold`` but for a change exactly equal to the threshold, and a NaN/Inf change computes (diffusers skips on NaN).
``num_steps`` is read only by ``force_last`` and the TADS schedule (``tads=(1, 1)``, off), so 1 does: diffusers'
FirstBlockCache does not know the step count either, and the step counter runs on past it.

The hooks below are diffusers' ``ModelHook``s like FirstBlockCache's own: a stateful hook on the first block (its
``StateManager`` receives the pipeline's ``cache_context("cond")``, one state per CFG branch; the pipeline resets it
at the end of every call), and a hook on every other block that runs it or passes its input through; the last block
keeps the residual of the blocks after the first, which a skipped step adds to the first block's output. The one
host read of a step is where the Python branch needs the decision (``bool(compute)`` in ``FirstBlockHook``); a
compiled runtime branches on the device tensor with ``torch.cond`` instead (what fastcache_rt does).

``main()`` runs diffusers' FirstBlockCache and this one on the shipped model and prints their decisions side by side.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, StateManager

from fastcache_rt import ops
from fastcache_rt.ops.layout import S_ACC, S_REL_L1

HEAD_HOOK = "gate_fbcache_head"
BLOCK_HOOK = "gate_fbcache_block"


# ----------------------------------------------------------------------------------------------------------------
# the decision: fastcache_rt.ops in place of diffusers' _should_compute_remaining_blocks
# ----------------------------------------------------------------------------------------------------------------
class GateFBCache:
    """FirstBlockCache's decision for one stream of steps (one generation, one CFG branch), on the device."""

    def __init__(self, threshold: float, residual: torch.Tensor):
        dev = residual.device
        self.params = ops.gate_params(threshold, 1, force_last=False, device=dev)
        self.state = ops.gate_state(dev)  # step 0: computes
        self.keep = torch.ones(ops.STATE_LEN, device=dev)
        self.keep[S_ACC] = 0.0
        self.last = residual.detach().clone()  # step 0 compares with itself (d = 0) and computes anyway

    def step(self, residual: torch.Tensor) -> torch.Tensor:
        """``compute`` (bool 0-dim tensor on the residual's device): True = run the remaining blocks. No host read
        (``torch.compile(fullgraph=True)`` traces it)."""
        compute, new_state, _ = ops.gate_step(residual, self.last, self.state, self.params)
        self.state = new_state * self.keep
        self.last = torch.where(compute, residual, self.last)
        return compute

    @property
    def rel_l1(self) -> torch.Tensor:
        """The last step's relative L1 change (a device scalar; the state keeps it for diagnostics)."""
        return self.state[S_REL_L1]


# ----------------------------------------------------------------------------------------------------------------
# the hooks: diffusers' FirstBlockCache around it
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GateFBCacheConfig:
    """As diffusers' ``FirstBlockCacheConfig``: skip the blocks after the first while the relative L1 change of the
    first block's residual against the last computed step's is below ``threshold``."""

    threshold: float = 0.05

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or \
                not 0 < self.threshold < float("inf"):
            raise ValueError(f"threshold: must be a finite number > 0, got {self.threshold!r}")


class _Shared(BaseState):
    """One CFG branch's state: the gate, the first block's output of the last computed step, the residuals of
    the blocks after it, and this step's decision."""

    def __init__(self):
        self.gate: GateFBCache | None = None
        self.head_output = None
        self.tail_residuals = None
        self.should_compute = True

    def reset(self):
        self.gate = self.head_output = self.tail_residuals = None
        self.should_compute = True


class FirstBlockHook(ModelHook):
    _is_stateful = True  # diffusers sets the cache context on it and resets it at the end of a pipeline call

    def __init__(self, state_manager: StateManager, threshold: float, log: list):
        super().__init__()
        self.state_manager, self.threshold, self.log = state_manager, threshold, log

    def initialize_hook(self, module):
        self.meta = TransformerBlockRegistry.get(type(module))
        return module

    def new_forward(self, module, *args, **kwargs):
        meta = self.meta
        hidden_in = meta._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden = output[meta.return_hidden_states_index] if isinstance(output, tuple) else output
        residual = hidden - hidden_in
        shared: _Shared = self.state_manager.get_state()
        if shared.gate is None:
            shared.gate = GateFBCache(self.threshold, residual)
        compute = shared.gate.step(residual)
        self.log.append((self.state_manager.context.name, compute, shared.gate.rel_l1))
        shared.should_compute = bool(compute)  # the step's one host read: the Python branch below needs it
        if shared.should_compute:
            shared.head_output = self._split(output) if isinstance(output, tuple) else (output, None)
            return output
        if not isinstance(output, tuple):
            return shared.tail_residuals[0] + output
        out = [None] * len(output)
        out[meta.return_hidden_states_index] = shared.tail_residuals[0] + output[meta.return_hidden_states_index]
        if meta.return_encoder_hidden_states_index is not None:
            i = meta.return_encoder_hidden_states_index
            out[i] = shared.tail_residuals[1] + output[i]
        return tuple(out)

    def _split(self, output):
        meta = self.meta
        enc = None if meta.return_encoder_hidden_states_index is None else \
            output[meta.return_encoder_hidden_states_index]
        return output[meta.return_hidden_states_index], enc

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class OtherBlockHook(ModelHook):
    def __init__(self, state_manager: StateManager, is_last: bool):
        super().__init__()
        self.state_manager, self.is_last = state_manager, is_last

    def initialize_hook(self, module):
        self.meta = TransformerBlockRegistry.get(type(module))
        return module

    def new_forward(self, module, *args, **kwargs):
        meta = self.meta
        shared: _Shared = self.state_manager.get_state()
        if shared.should_compute:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_last:
                if isinstance(output, tuple):
                    enc = meta.return_encoder_hidden_states_index
                    shared.tail_residuals = (
                        output[meta.return_hidden_states_index] - shared.head_output[0],
                        None if enc is None else output[enc] - shared.head_output[1])
                else:
                    shared.tail_residuals = (output - shared.head_output[0], None)
            return output
        hidden = meta._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        out = [None, None]
        out[meta.return_hidden_states_index] = hidden
        out[meta.return_encoder_hidden_states_index] = meta._get_parameter_from_args_kwargs(
            "encoder_hidden_states", args, kwargs)
        return tuple(out)


def transformer_blocks(module) -> list[tuple[str, torch.nn.Module]]:
    """The blocks FirstBlockCache works on, in order: every block of the module's block lists (the same lists and
    order diffusers' ``apply_first_block_cache`` takes)."""
    out = []
    for name, child in module.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList):
            out += [(f"{name}.{i}", b) for i, b in enumerate(child)]
    if len(out) < 2:
        raise ValueError(f"module: FirstBlockCache needs at least two transformer blocks, {type(module).__name__} "
                         f"has {len(out)}")
    return out


def apply_gate_fbcache(module: torch.nn.Module, config: GateFBCacheConfig) -> list:
    """As diffusers' ``apply_first_block_cache(module, config)``. Returns the decision log: one ``(cache context
    name, compute, rel_l1)`` per call of the first block, device tensors (read them after the generation)."""
    blocks = [b for _, b in transformer_blocks(module)]
    manager = StateManager(_Shared)
    log: list = []
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(
        FirstBlockHook(manager, float(config.threshold), log), HEAD_HOOK)
    for i, block in enumerate(blocks[1:], 1):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            OtherBlockHook(manager, is_last=i == len(blocks) - 1), BLOCK_HOOK)
    # the pipeline's cache_context finds the stateful hooks through a cached list of the child registries
    HookRegistry.check_if_exists_or_initialize(module).invalidate_child_registries_cache()
    return log


def remove_gate_fbcache(module: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.remove_hook(HEAD_HOOK, recurse=True)
    registry.remove_hook(BLOCK_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()


# ----------------------------------------------------------------------------------------------------------------
# observing a run: which transformer calls ran the blocks after the first (the same probe for both caches)
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def block_runs(module):
    """Yields a list that gets, per call of ``module``, how many of the blocks after the first ran their own forward
    (all of them: a computed step; none: a cached step). Counts the calls of the blocks' sub-modules, which run only
    inside a block's original forward, whatever hooks wrap the block."""
    blocks = [b for _, b in transformer_blocks(module)][1:]
    counts: list[int] = []
    ran: set[int] = set()

    def start(_m, _a):
        ran.clear()
        counts.append(0)

    def end(_m, _a, _o):
        counts[-1] = len(ran)

    handles = [module.register_forward_pre_hook(start), module.register_forward_hook(end)]
    for i, block in enumerate(blocks):
        for child in block.children():
            handles.append(child.register_forward_pre_hook(lambda _m, _a, i=i: ran.add(i)))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def run(pipe, prompt: str, steps: int, seed: int = 0) -> tuple[torch.Tensor, list[bool]]:
    """One generation of the shipped model: (image tensor, per step True = the blocks after the first ran)."""
    from fastcache_rt.models import SAMPLE_DEFAULTS

    kw = {k: v for k, v in SAMPLE_DEFAULTS.items() if k != "num_inference_steps"}
    n_after = len(transformer_blocks(pipe.transformer)) - 1
    with block_runs(pipe.transformer) as counts, torch.no_grad():
        image = pipe(prompt=prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                     output_type="pt", **kw).images
    if any(c not in (0, n_after) for c in counts):
        raise RuntimeError(f"a call ran some but not all of the blocks after the first: {counts}")
    return image, [c == n_after for c in counts]


def compare(pipe, threshold: float, steps: int, prompts=("red circle",), seed: int = 0) -> dict:
    """diffusers' FirstBlockCache and the gate_step one on the same generations: their per-step decisions (observed
    with ``block_runs``), the gate's own decisions and relative changes, and the images."""
    from diffusers.hooks import FirstBlockCacheConfig

    out = {"diffusers": [], "gate_step": [], "gate_log": [], "images_diffusers": [], "images_gate_step": []}
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        for p in prompts:
            img, dec = run(pipe, p, steps, seed)
            out["diffusers"].append(dec)
            out["images_diffusers"].append(img)
    finally:
        pipe.transformer.disable_cache()
    log = apply_gate_fbcache(pipe.transformer, GateFBCacheConfig(threshold))
    try:
        for p in prompts:
            start = len(log)
            img, dec = run(pipe, p, steps, seed)
            out["gate_step"].append(dec)
            out["gate_log"].append([(name, bool(c), float(d)) for name, c, d in log[start:]])
            out["images_gate_step"].append(img)
    finally:
        remove_gate_fbcache(pipe.transformer)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", default="red circle")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from fastcache_rt.models import load_default

    pipe = load_default()
    res = compare(pipe, a.threshold, a.steps, (a.prompt,), a.seed)
    theirs, ours, log = res["diffusers"][0], res["gate_step"][0], res["gate_log"][0]
    print(f"FirstBlockCache, threshold {a.threshold:g}, {a.steps} steps, {a.prompt!r} (C = computed, . = cached)")
    print(f"{'step':>4}  {'diffusers':>9}  {'gate_step':>9}  {'rel-L1 change':>13}")
    for s, (t, o, (_, _, d)) in enumerate(zip(theirs, ours, log)):
        print(f"{s:>4}  {'C' if t else '.':>9}  {'C' if o else '.':>9}  {d:>13.5f}{'' if t == o else '  differs'}")
    diff = (res["images_diffusers"][0] - res["images_gate_step"][0]).abs().max().item()
    same = theirs == ours
    print(f"decisions {'identical' if same else 'DIFFER'}: {sum(theirs)} / {len(theirs)} steps computed; "
          f"images: max |difference| {diff:.3g}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
