"""Every model family side by side with the peers: on each family's tiny random-weight model
(``fastcache_rt.testing.families``), the same Euler loop run uncached, under four fastcache_rt presets, under
diffusers' own FirstBlockCache and under cache-dit's DBCache F1B0; per (family, method): does it run, NFE, and the
relative L2 of the final latent against the uncached one.

    python benchmarks/bench_families.py --out families.json    # every family in TINY, 20 steps (a few minutes)
    python benchmarks/bench_families.py --smoke --out f.json   # flux, wan, sd3 at 6 steps (CI)

Method. One model per family, batch 1, token grid "size 0", one intra-op thread, ``fastcache_rt.testing.families``'
``denoise`` (Euler steps from t = 1 to 1/S, one transformer call per step, no CFG). Methods, in table order:

- fastcache_rt ``fbcache`` (first-block cache) at ``--threshold``;
- fastcache_rt ``teacache`` with ``coeffs=(1.0, 0.0)`` (the relative change of the modulated input, unscaled: the
  published polynomials are for real checkpoints) at ``--teacache-threshold``;
- fastcache_rt ``spectrum`` and ``taylorseer`` at their preset defaults;
- diffusers ``model.enable_cache(FirstBlockCacheConfig(threshold=--threshold))`` / ``model.disable_cache()``, every
  call of the loop inside ``model.cache_context("cond")`` (diffusers' hooks read their state from a context);
- cache-dit ``DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=--threshold)`` with
  ``num_inference_steps=S``, ``enable_separate_cfg=False`` (one call per step here: cache-dit's CFG pairing would
  otherwise count two calls as one step for the families it registers as CFG-separate) and
  ``max_warmup_steps=--cache-dit-warmup`` (default 1: step 0 computes, as it does for the two other first-block
  methods, which have no warm-up; cache-dit's own default is 8). The simplest way that works, per family: first
  ``cache_dit.enable_cache(transformer, ...)`` (cache-dit's registered adapter for the class, on a bare transformer);
  where there is none, or it fails, a ``BlockAdapter`` built from fastcache_rt's family declaration (its block lists,
  each with the ``ForwardPattern`` of its call convention). ``cache_dit.disable_cache(transformer)`` after, and what
  cache-dit 1.5.3 leaves behind (instance ``forward``s, the order of child modules, see
  ``fastcache_rt/bench/methods.py``) is put back from a snapshot.

The three first-block methods get the same threshold; each compares its own first-block residual change with it.

NFE, the same way for every library: forward hooks on the leaf modules with parameters inside the last block of the
family's last block list (``fastcache_rt.families``), and a pre-hook on the transformer opening each call; a call in
which none of them ran is a cached step. (A hook on the block module itself is not enough: diffusers' and
fastcache_rt's block hooks keep the module call and replace only what it runs.) For fastcache_rt the watched steps
are also checked against ``fastcache_rt.stats(model)["computed"]``.

Isolation. Every method is disabled in a ``finally`` (also when enabling or running it failed), then the model is run
uncached once more and must reproduce the reference latent bitwise, and its module state (instance attributes,
children, diffusers hook registries, PyTorch hooks) must be what it was; a method that leaves anything behind is
reported in its cell and the model is rebuilt before the next method. The uncached reference itself must compute the
last block on every step.

Output: a Markdown table (one row per family; each cell "NFE/S · relL2" or "fails: reason"), totals per method and
per library, and with ``--out`` the JSON of everything (per cell: runs, error, nfe, computed steps, rel_l2, seconds,
how cache-dit was driven, leaks).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import platform
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

import fastcache_rt
from fastcache_rt.families import family_for
from fastcache_rt.testing.families import TINY, denoise

SMOKE_FAMILIES = ("flux", "wan", "sd3")
STEPS, SMOKE_STEPS = 20, 6
OURS, DIFFUSERS, CACHE_DIT = "fastcache_rt", "diffusers", "cache-dit"


# ----------------------------------------------------------------------------------------------------------------
# NFE watch
# ----------------------------------------------------------------------------------------------------------------
class Watch:
    """Per transformer call: did the last block of the family's last block list really run (any of its leaf
    modules with parameters)?"""

    def __init__(self, model):
        fam = family_for(model)
        last = getattr(model, fam.lists[-1].attr)[-1]
        leaves = [m for m in last.modules() if not list(m.children()) and any(True for _ in m.parameters(False))]
        if not leaves:
            raise RuntimeError(f"{fam.name}: the last block has no leaf module with parameters to watch")
        self.where = f"{fam.lists[-1].attr}[{len(getattr(model, fam.lists[-1].attr)) - 1}]"
        self.calls: list[bool] = []
        self._handles = [model.register_forward_pre_hook(self._open)]
        self._handles += [m.register_forward_hook(self._ran) for m in leaves]

    def _open(self, module, args):
        self.calls.append(False)

    def _ran(self, module, args, out):
        if self.calls:
            self.calls[-1] = True

    def remove(self):
        for h in self._handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# module state (what a method may leave behind)
# ----------------------------------------------------------------------------------------------------------------
_TORCH_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks")


def snapshot(model) -> dict:
    """Every module's instance attributes (by identity), children order and hook dictionaries."""
    snap = {}
    for name, m in model.named_modules(remove_duplicate=False):
        d = dict(m.__dict__)
        snap[id(m)] = dict(
            module=m, name=name or "<model>", attrs=d, children=list(m._modules.items()),
            hooks={k: list(getattr(m, k).keys()) for k in _TORCH_HOOK_DICTS if isinstance(getattr(m, k, None), dict)},
            registry=list(d["_diffusers_hook"].hooks) if "_diffusers_hook" in d else None)
    return snap


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, (bool, int, float, str, type(None))) and type(a) is type(b):
        return a == b
    return False


def diff_state(model, snap: dict) -> tuple[list[str], bool]:
    """What differs from a snapshot, one short line per module, and whether any of it is active (hooks still
    registered, an instance ``forward`` other than the class's own, children added or reordered); the rest (empty
    hook registries, flags) cannot change a call."""
    out, active = [], False
    for name, m in model.named_modules(remove_duplicate=False):
        where = name or "<model>"
        s = snap.get(id(m))
        if s is None:
            out.append(f"{where}: new module {type(m).__name__}")
            active = True
            continue
        d, old = m.__dict__, s["attrs"]
        parts = []
        added = sorted(set(d) - set(old))
        removed = sorted(set(old) - set(d))
        changed = sorted(k for k in set(d) & set(old) if not _same(d[k], old[k]))
        if added:
            parts.append("+" + ", +".join(added))
        if removed:
            parts.append("-" + ", -".join(removed))
        if changed:
            parts.append("changed " + ", ".join(changed))
        fwd = d.get("forward")
        if fwd is not None and fwd is not old.get("forward") and not (
                getattr(fwd, "__func__", None) is type(m).forward and getattr(fwd, "__self__", None) is m):
            parts.append("instance forward replaced")
            active = True
        if list(m._modules.items()) != s["children"]:
            parts.append("children changed")
            active = True
        hooks = {k: list(getattr(m, k).keys()) for k in _TORCH_HOOK_DICTS if isinstance(getattr(m, k, None), dict)}
        if hooks != s["hooks"]:
            parts.append("torch hooks changed")
            active = True
        reg = list(d["_diffusers_hook"].hooks) if "_diffusers_hook" in d else None
        if reg and reg != s["registry"]:
            parts.append(f"diffusers hooks {reg}")
            active = True
        if parts:
            out.append(f"{where}: {'; '.join(parts)}")
    return out, active


def restore(snap: dict) -> None:
    """Put every module's instance attributes and children back exactly (identity) as in the snapshot."""
    for s in snap.values():
        m = s["module"]
        d = m.__dict__
        for k in list(d):
            if k not in s["attrs"]:
                del d[k]
        for k, v in s["attrs"].items():
            d[k] = v
        m._modules.clear()
        m._modules.update(s["children"])


# ----------------------------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Method:
    key: str  # column key, e.g. "fastcache_rt/fbcache"
    library: str
    label: str  # column header
    config: str
    enable: Callable  # enable(model, family name, state: dict) -> None; may leave notes in state
    disable: Callable  # disable(model, state) -> None; also called after a failed enable (undo what is there)
    context: bool = False  # run each call inside model.cache_context("cond")


@dataclass
class Cfg:
    steps: int
    threshold: float
    teacache_threshold: float
    cache_dit_warmup: int


def _ours(preset: str, overrides: Callable[[Cfg], dict], label: str, config: Callable[[Cfg], str]) -> Callable:
    def make(cfg: Cfg) -> Method:
        def enable(model, name, state):
            fastcache_rt.enable(model, preset, num_steps=cfg.steps, **overrides(cfg))
            state["enabled"] = True

        def disable(model, state):
            if getattr(model, "_fastcache_rt", None) is not None:
                fastcache_rt.disable(model)

        return Method(f"{OURS}/{preset}", OURS, label, config(cfg), enable, disable)

    return make


def _diffusers_fbcache(cfg: Cfg) -> Method:
    def enable(model, name, state):
        from diffusers.hooks import FirstBlockCacheConfig

        if not hasattr(model, "enable_cache"):
            raise TypeError(f"{type(model).__name__} has no enable_cache (not a diffusers CacheMixin)")
        model.enable_cache(FirstBlockCacheConfig(threshold=cfg.threshold))
        state["enabled"] = True

    def disable(model, state):
        if getattr(model, "_cache_config", None) is not None:
            model.disable_cache()
            return
        # enable_cache raised before it recorded its config: disable_cache would do nothing, yet hooks it
        # registered on the way may be there; remove them as disable_cache would
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        names = (_FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK)
        found = [n or "<model>" for n, mod in model.named_modules()
                 if any(h in getattr(mod.__dict__.get("_diffusers_hook"), "hooks", {}) for h in names)]
        if found:
            where = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            msg = f"after the failed enable_cache, FirstBlockCache hooks on {len(found)} modules ({where})"
            state["left_behind"] = [msg]
            registry = HookRegistry.check_if_exists_or_initialize(model)
            registry.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=True)
            registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)
            registry.invalidate_child_registries_cache()

    return Method(f"{DIFFUSERS}/FirstBlockCache", DIFFUSERS, "diffusers FBCache", f"threshold={cfg.threshold:g}",
                  enable, disable, context=True)


# cache-dit ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet():
    """cache-dit (and diffusers) log and print on every enable/disable; keep the benchmark's output to its table."""
    names = ["cache_dit", "diffusers", "fastcache_rt"] + [n for n in logging.root.manager.loggerDict
                                                          if n.startswith(("cache_dit", "diffusers"))]
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in old.items():
            logging.getLogger(n).setLevel(lv)


def _pattern(blocks):
    """cache-dit's ForwardPattern for a fastcache_rt block list: its call takes (hidden, encoder) or (hidden,)
    positionally and returns (hidden, encoder), (encoder, hidden) or hidden."""
    from cache_dit import ForwardPattern

    if blocks.encoder is None:
        return {("hidden",): ForwardPattern.Pattern_3, ("hidden", "encoder"): ForwardPattern.Pattern_4,
                ("encoder", "hidden"): ForwardPattern.Pattern_5}[tuple(blocks.returns)]
    return {("hidden", "encoder"): ForwardPattern.Pattern_0, ("encoder", "hidden"): ForwardPattern.Pattern_1,
            ("hidden",): ForwardPattern.Pattern_2}[tuple(blocks.returns)]


def _declared_adapter(model):
    from cache_dit import BlockAdapter

    fam = family_for(model)
    return BlockAdapter(
        pipe=None, transformer=model, blocks=[getattr(model, b.attr) for b in fam.lists],
        blocks_name=[b.attr for b in fam.lists], forward_pattern=[_pattern(b) for b in fam.lists],
        check_forward_pattern=False, check_num_outputs=False, has_separate_cfg=False)


def _cache_dit_config(cfg: Cfg):
    from cache_dit import DBCacheConfig

    return DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=cfg.threshold,
                         max_warmup_steps=cfg.cache_dit_warmup, num_inference_steps=cfg.steps,
                         enable_separate_cfg=False)


def _cache_dit_ways(cfg: Cfg):
    """(short name, enable) in the order tried."""
    import cache_dit
    from cache_dit.caching.block_adapters import BlockAdapterRegister

    def registered(model):
        if not BlockAdapterRegister.is_supported(model):
            raise LookupError(f"no registered cache-dit adapter for {type(model).__name__}")
        cache_dit.enable_cache(model, cache_config=_cache_dit_config(cfg))

    def declared(model):
        cache_dit.enable_cache(_declared_adapter(model), cache_config=_cache_dit_config(cfg))

    return [("registered adapter", registered), ("BlockAdapter from the family declaration", declared)]


def cache_dit_version() -> str | None:
    try:
        with quiet():
            import cache_dit
    except Exception:  # noqa: BLE001 - not installed / not importable here: the column says so
        return None
    return getattr(cache_dit, "__version__", "?")


def _cache_dit_disable(model, state):
    import cache_dit

    try:
        with quiet():
            cache_dit.disable_cache(model)
    finally:
        # cache-dit 1.5.3's disable_cache leaves instance attributes behind (an instance `forward` on the
        # transformer, patch functors' forwards on blocks) and may reorder children: note them, put back what was
        # there
        if state.get("snapshot") is not None:
            state["left_behind"] = diff_state(model, state["snapshot"])[0]
            restore(state["snapshot"])


def _cache_dit(cfg: Cfg) -> Method:
    # The enable is tried way by way inside run_method (a way that enables but fails to run falls through to the
    # next); here it only prepares the state.
    def enable(model, name, state):
        state["snapshot"] = snapshot(model)
        state["enabled"] = True

    return Method(f"{CACHE_DIT}/DBCache F1B0", CACHE_DIT, "cache-dit F1B0",
                  f"threshold={cfg.threshold:g} warmup={cfg.cache_dit_warmup}", enable, _cache_dit_disable)


METHOD_FACTORIES = [
    _ours("fbcache", lambda c: dict(threshold=c.threshold), "fastcache_rt fbcache",
          lambda c: f"threshold={c.threshold:g}"),
    _ours("teacache", lambda c: dict(threshold=c.teacache_threshold, coeffs=(1.0, 0.0)), "fastcache_rt teacache",
          lambda c: f"threshold={c.teacache_threshold:g} coeffs=(1, 0)"),
    _ours("spectrum", lambda c: {}, "fastcache_rt spectrum", lambda c: "preset default"),
    _ours("taylorseer", lambda c: {}, "fastcache_rt taylorseer", lambda c: "preset default (interval 6, warmup 3)"),
    _diffusers_fbcache,
    _cache_dit,
]


# ----------------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------------
class _InContext:
    """The model called inside ``model.cache_context(name)`` (what a diffusers pipeline does around each call)."""

    def __init__(self, model, name: str = "cond"):
        self.model, self.name = model, name

    def __call__(self, *args, **kwargs):
        with self.model.cache_context(self.name):
            return self.model(*args, **kwargs)


def _note(cell: dict, kind: str, detail: str) -> None:
    """A check that failed on a cell that ran: ``kind`` groups the cells in the report, ``detail`` is per cell."""
    cell.setdefault("notes", []).append(dict(kind=kind, detail=detail))


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".strip()


def _rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


class FamilyRun:
    def __init__(self, name: str, steps: int):
        self.name, self.steps = name, steps
        self.model = TINY[name].build()
        self.watch = Watch(self.model)
        self.rebuilt = 0

    def run(self, context: bool = False) -> tuple[torch.Tensor, list[bool], float]:
        self.watch.calls = []
        m = _InContext(self.model) if context else self.model
        t0 = time.perf_counter()
        out = denoise(m, self.name, self.steps, seed=0, batch=1, size=0)
        sec = time.perf_counter() - t0
        return out.detach().clone(), list(self.watch.calls), sec

    def rebuild(self):
        self.watch.remove()
        self.model = TINY[self.name].build()
        self.watch = Watch(self.model)
        self.rebuilt += 1


def run_method(fr: FamilyRun, meth: Method, cfg: Cfg, ref: torch.Tensor, clean: dict) -> dict:
    cell: dict = dict(method=meth.key, library=meth.library, config=meth.config, runs=False, error=None, nfe=None,
                      steps=cfg.steps, computed=None, rel_l2=None, seconds=None, leak=None)
    state: dict = {}
    model = fr.model
    try:
        with quiet():
            meth.enable(model, fr.name, state)
        if meth.library == CACHE_DIT:
            out, flags, sec = _run_cache_dit(fr, cfg, state, cell)
        else:
            out, flags, sec = fr.run(context=meth.context)
        if len(flags) != cfg.steps:
            raise RuntimeError(f"the transformer was called {len(flags)} times for {cfg.steps} steps")
        cell.update(runs=True, nfe=sum(flags), computed=[i for i, f in enumerate(flags) if f], seconds=sec,
                    rel_l2=_rel_l2(out, ref), finite=bool(torch.isfinite(out).all()))
        if meth.library == OURS:
            st = fastcache_rt.stats(model)
            cell["stats_computed"] = list(st["computed"])
            if cell["stats_computed"] != cell["computed"]:
                _note(cell, "stats()['computed'] is not the steps in which the watched last block ran",
                      f"{len(cell['stats_computed'])} vs {cell['nfe']}")
        if cell["nfe"] == cfg.steps and cell["rel_l2"] > 1e-6:
            _note(cell, "every step computed, yet the output differs from uncached", f"rel L2 {cell['rel_l2']:.2g}")
    except Exception as e:  # noqa: BLE001 - a failing method is a result, not a crash
        cell["error"] = _first_line(e)
        cell["traceback"] = traceback.format_exc(limit=-4)
    finally:
        try:
            with quiet():
                meth.disable(model, state)
        except Exception as e:  # noqa: BLE001
            cell["disable_error"] = _first_line(e)
    # isolation: run the model uncached as the method left it; it must reproduce the reference bitwise
    if state.get("left_behind"):  # cache-dit: what its disable_cache left (put back from the snapshot since)
        cell["left_behind"] = state["left_behind"]
    left, active = diff_state(model, clean["snapshot"])
    try:
        out, flags, _ = fr.run()
        bitwise = torch.equal(out, ref) and sum(flags) == cfg.steps
        crashed = None
    except Exception as e:  # noqa: BLE001 - something left active breaks the uncached model
        bitwise, crashed = False, _first_line(e)
    if left:
        cell.setdefault("left_behind", left)
        restore(clean["snapshot"])  # the next method starts from exactly the same module state
    if active or not bitwise:
        what = []
        if active:
            what.append("still active: " + " | ".join(left[:3]) + (f" (+{len(left) - 3})" if len(left) > 3 else ""))
        if crashed:
            what.append(f"the uncached model raises after disable: {crashed}")
        elif not bitwise:
            what.append(f"uncached output after disable differs (rel L2 {_rel_l2(out, ref):.3g}, "
                        f"NFE {sum(flags)}/{cfg.steps})")
        cell["leak"] = "; ".join(what)
        fr.rebuild()
        clean["snapshot"] = snapshot(fr.model)
    if left or active or not bitwise:
        out, flags, _ = fr.run()
        if not torch.equal(out, ref) or diff_state(fr.model, clean["snapshot"])[0]:
            raise RuntimeError(f"{fr.name}: after {meth.key} the model could not be put back to its uncached state")
    return cell


def _run_cache_dit(fr: FamilyRun, cfg: Cfg, state: dict, cell: dict):
    import cache_dit

    tried = []
    for how, enable in _cache_dit_ways(cfg):
        try:
            with quiet():
                enable(fr.model)
            out = fr.run()
            cell["how"] = how
            if tried:
                cell["tried"] = tried
            cell["cache_dit_summary"] = _cache_dit_cached_steps(fr.model)
            return out
        except Exception as e:  # noqa: BLE001 - next way
            tried.append(f"{how}: {_first_line(e)}")
            with contextlib.suppress(Exception), quiet():
                cache_dit.disable_cache(fr.model)
            restore(state["snapshot"])
    cell["tried"] = tried
    raise RuntimeError(" / ".join(tried))


def _cache_dit_cached_steps(model):
    """cache-dit's own count of cached steps per context (for the JSON; NFE comes from the watch)."""
    try:
        cm = model._context_manager
        return {n: list(map(int, cm.get_context(n).get_cached_steps())) for n in model._context_names}
    except Exception:  # noqa: BLE001
        return None


def bench_family(name: str, methods: list[Method], cfg: Cfg, log=print) -> dict:
    t0 = time.perf_counter()
    fr = FamilyRun(name, cfg.steps)
    with quiet():
        ref, flags, sec = fr.run()
    if sum(flags) != cfg.steps or len(flags) != cfg.steps:
        raise RuntimeError(f"{name}: the uncached run computed the watched block {sum(flags)} times in "
                           f"{len(flags)} calls for {cfg.steps} steps")
    clean = dict(snapshot=snapshot(fr.model))
    res = dict(family=name, watched=fr.watch.where, uncached_seconds=sec, cells={})
    for meth in methods:
        with quiet():
            cell = run_method(fr, meth, cfg, ref, clean)
        res["cells"][meth.key] = cell
    res["rebuilt"] = fr.rebuilt
    res["seconds"] = time.perf_counter() - t0
    fr.watch.remove()
    log(f"  {name:<15} {res['seconds']:6.1f} s  " + "  ".join(_cell(res['cells'][m.key], cfg.steps, short=True)
                                                         for m in methods))
    return res


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
_REASONS = [  # (pattern of an exception's first line, short phrase)
    (r"has no enable_cache", "no enable_cache (not a CacheMixin)"),
    (r"Model class <class '[\w.]*\.(\w+)'> not registered", r"\1 not in diffusers' block registry"),
    (r"Parameter '(\w+)' not found in function signature", r"the block has no '\1' argument"),
    (r"no registered cache-dit adapter", "no registered adapter"),
    (r"Transformer class (\w+) not in allowed classes", r"registered adapter rejects \1"),
    (r"The size of tensor a \(\d+\) must match the size of tensor b", "tensor shape mismatch in a block"),
]


def short_reason(error: str) -> str:
    """One short phrase for a failure (the JSON keeps the exception's first line and traceback)."""
    for pat, phrase in _REASONS:
        m = re.search(pat, error)
        if m:
            return m.expand(phrase)
    err = error.replace("|", "/")
    return err if len(err) <= 72 else err[:69] + "..."


_CACHE_DIT_MARK = "†"


def _cell(cell: dict, steps: int, short: bool = False) -> str:
    if not cell["runs"]:
        return "fails" if short else f"fails: {short_reason(cell.get('error') or '')}"
    s = f"{cell['nfe']}/{steps} · {cell['rel_l2']:.2g}"
    if not cell.get("finite", True):
        s += " (non-finite)"
    if cell.get("library") == CACHE_DIT and cell.get("tried"):
        s += f" {_CACHE_DIT_MARK}"
    if cell.get("notes"):
        s += " (!)"
    if cell.get("leak"):
        s += " (leak)"
    return s


def report(results: list[dict], methods: list[Method], cfg: Cfg) -> str:
    lines = ["| family | " + " | ".join(m.label for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for r in results:
        lines.append(f"| {r['family']} | " + " | ".join(_cell(r["cells"][m.key], cfg.steps) for m in methods) + " |")
    n = len(results)
    runs = {m.key: sum(r["cells"][m.key]["runs"] for r in results) for m in methods}
    lines.append("| **runs** | " + " | ".join(f"**{runs[m.key]}/{n}**" for m in methods) + " |")
    out = "\n".join(lines)
    out += (f"\n\nCells: NFE/S (steps in which the last block of the last block list ran) · relative L2 of the final "
            f"latent against uncached. S = {cfg.steps}; first-block threshold {cfg.threshold:g} (fastcache_rt fbcache, "
            f"diffusers FBCache, cache-dit F1B0); teacache threshold {cfg.teacache_threshold:g}, coeffs (1, 0); "
            f"cache-dit warm-up {cfg.cache_dit_warmup}.")
    libs: dict = {}
    for m in methods:
        libs.setdefault(m.library, []).append(m)
    tot = []
    for lib, ms in libs.items():
        all_ = sum(all(r["cells"][m.key]["runs"] for m in ms) for r in results)
        tot.append(f"{lib} runs {all_}/{n} families" + (f" (all its {len(ms)} methods)" if len(ms) > 1 else ""))
    out += "\n\nTotals: " + "; ".join(tot) + "."
    # cells that ran but failed a check, grouped by method and check
    groups: dict = {}
    for r in results:
        for m in methods:
            for note in r["cells"][m.key].get("notes", []):
                groups.setdefault((m.key, note["kind"]), []).append(f"{r['family']} ({note['detail']})")
    if groups:
        out += "\n\n(!) checks failed:\n" + "\n".join(f"- {k} — {kind}: {', '.join(fs)}"
                                                       for (k, kind), fs in groups.items())
    leaks = [(r["family"], m.key, r["cells"][m.key]["leak"]) for r in results for m in methods
             if r["cells"][m.key].get("leak")]
    if leaks:
        out += "\n\n(leak) left active after disable (the model was rebuilt before the next method):\n" + "\n".join(
            f"- {f} / {k}: {w}" for f, k, w in leaks)
    else:
        out += ("\n\nIsolation: after every method the uncached model reproduced the reference bitwise and no hook "
                "was left active.")
    residue = []
    for m in methods:
        fams = [r["family"] for r in results if r["cells"][m.key].get("left_behind")]
        if fams:
            items = [(r["family"], r["cells"][m.key]["left_behind"][0]) for r in results if r["family"] in fams]
            failed = [i for i in items if "failed" in i[1]]
            lines = [f"- {m.key}: {len(fams)} families, e.g. {items[0][0]}: {items[0][1]}"]
            if failed:
                lines.append(f"  - {', '.join(f for f, _ in failed)}: {failed[0][1]} (removed by the benchmark)")
            residue += lines
    if residue:
        out += ("\n\nLeft behind by disable, put back from a snapshot before the next method (JSON: left_behind):\n"
                + "\n".join(residue))
    fallback = [(r["family"], r["cells"][m.key]) for r in results for m in methods
                if m.library == CACHE_DIT and r["cells"][m.key].get("tried") and r["cells"][m.key]["runs"]]
    cd = [m for m in methods if m.library == CACHE_DIT]
    if cd:
        reg = sum(r["cells"][cd[0].key].get("how") == "registered adapter" for r in results)
        out += f"\n\ncache-dit: its registered adapter on the bare transformer for {reg}/{n} families"
        if fallback:
            out += (f"; {_CACHE_DIT_MARK} a BlockAdapter from fastcache_rt's family declaration for "
                    + ", ".join(f"{f} (registered: {short_reason(c['tried'][0].split(': ', 1)[1])})"
                                for f, c in fallback))
        out += "."
    return out


def _json_safe(o):
    """Non-finite floats (a method's non-finite output) as null; anything else not JSON as its str."""
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help=f"{', '.join(SMOKE_FAMILIES)} at {SMOKE_STEPS} steps")
    ap.add_argument("--families", nargs="+", help="a subset of the families (default: every family in TINY)")
    ap.add_argument("--steps", type=int, help=f"denoising steps (default {STEPS}, --smoke {SMOKE_STEPS})")
    ap.add_argument("--threshold", type=float, default=0.1,
                    help="the threshold of the three first-block methods (default 0.1)")
    ap.add_argument("--teacache-threshold", type=float, default=0.3, help="fastcache_rt teacache (default 0.3)")
    ap.add_argument("--cache-dit-warmup", type=int, default=1, help="cache-dit max_warmup_steps (default 1)")
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)

    fams = list(args.families or (SMOKE_FAMILIES if args.smoke else sorted(TINY)))
    unknown = [f for f in fams if f not in TINY]
    if unknown:
        ap.error(f"--families: unknown {', '.join(unknown)}; known: {', '.join(sorted(TINY))}")
    steps = args.steps or (SMOKE_STEPS if args.smoke else STEPS)
    if steps < 2:
        ap.error("--steps: at least 2")
    cfg = Cfg(steps=steps, threshold=args.threshold, teacache_threshold=args.teacache_threshold,
              cache_dit_warmup=args.cache_dit_warmup)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cd_version = cache_dit_version()
    methods = [f(cfg) for f in METHOD_FACTORIES]
    if cd_version is None:
        methods = [m for m in methods if m.library != CACHE_DIT]
    import diffusers

    print(f"bench_families: {len(fams)} families, S={steps}, batch 1, size 0, 1 thread; "
          f"fastcache_rt / diffusers {diffusers.__version__} / cache-dit {cd_version or 'not installed'}; "
          f"first-block threshold {cfg.threshold:g}", flush=True)
    t0 = time.perf_counter()
    results = []
    try:
        for name in fams:
            results.append(bench_family(name, methods, cfg, log=lambda s: print(s, flush=True)))
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    table = report(results, methods, cfg)
    print()
    print(table)
    print(f"\n{len(fams)} families x {len(methods)} methods in {wall:.0f} s")
    if args.out:
        meta = dict(steps=steps, families=fams, batch=1, size=0, threads=1, threshold=cfg.threshold,
                    teacache_threshold=cfg.teacache_threshold, cache_dit_warmup=cfg.cache_dit_warmup,
                    methods={m.key: dict(library=m.library, label=m.label, config=m.config) for m in methods},
                    torch=torch.__version__, diffusers=diffusers.__version__, cache_dit=cd_version,
                    python=platform.python_version(), wall_seconds=wall)
        runs = {m.key: sum(r["cells"][m.key]["runs"] for r in results) for m in methods}
        doc = _json_safe(dict(meta=meta, totals=runs, results=results, table=table))
        Path(args.out).write_text(json.dumps(doc, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
