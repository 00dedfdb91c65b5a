"""What fastcache_rt sees under diffusers' context parallelism, per family, preset and hook order.

    python -m tests.distributed.diagnose                       # flux and wan, 2 Ulysses ranks, every preset
    python -m tests.distributed.diagnose --family wan --mode ring --ranks 2 --order before

For each case every rank reports: the hook chain of every module that has one (outermost last: diffusers'
``HookRegistry`` wraps the forward registered before), the token counts fastcache_rt's hooks see (the transformer
hook's ``hidden_states`` argument, the hidden tokens entering the first block list, the grid the family reads from the
transformer's arguments), the decisions, the cache bytes, and the error (last line and the fastcache_rt frames) when
the run fails. A run whose ranks hang is stopped by the collective timeout.
"""

from __future__ import annotations

import argparse
import traceback

from fastcache_rt.testing import context_parallel as tiny
from tests.distributed import workers
from tests.distributed.harness import RankError, run_ranks

PRESETS = workers.METHODS  # preset -> family -> overrides (the tests' cases)


def observe(rank, world_size, family, mode, steps, method, overrides, order):
    """One rank: the cached run with fastcache_rt's controller instrumented (read-only wrappers, in this process)."""
    import fastcache_rt
    from fastcache_rt.controller import Controller

    seen = {"transformer_hidden": [], "segment_hidden": [], "grid": []}
    begin, segment = Controller.begin_call, Controller.segment

    def begin_call(self, kwargs, context):
        h = kwargs.get(self.family.hidden_arg)
        seen["transformer_hidden"].append(tuple(h.shape) if h is not None else None)
        return begin(self, kwargs, context)

    def seg(self, call, li, start, stop, original, kw):
        if li == 0 and start == 0:
            spec = self.family.lists[li]
            seen["segment_hidden"].append(tuple(kw[spec.hidden].shape))
            seen["grid"].append(self.grid or (self.family.grid(self.model, call.kwargs) if self.family.grid else None))
        return segment(self, call, li, start, stop, original, kw)

    Controller.begin_call, Controller.segment = begin_call, seg
    m = tiny.build(family)
    if order == "before":
        fastcache_rt.enable(m, method, num_steps=steps, **overrides)
    m.enable_parallelism(config=workers.cp_config(mode, world_size))
    if order == "after":
        fastcache_rt.enable(m, method, num_steps=steps, **overrides)
    chains = {name or "<transformer>": list(mod._diffusers_hook._hook_order)
              for name, mod in m.named_modules() if hasattr(mod, "_diffusers_hook")}
    res = {"chains": chains}
    try:
        tiny.denoise(m, family, steps)
        st = fastcache_rt.stats(m)
        res.update(computed=st["computed"], cache_bytes=st["cache_bytes"])
    except Exception as e:  # noqa: BLE001 (reported)
        tb = traceback.format_exc().splitlines()
        res["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        res["frames"] = [ln.strip() for ln in tb if "fastcache_rt/" in ln and "File" in ln]
    res["seen"] = {k: v[:2] for k, v in seen.items()}
    return res


def single(family, steps, method, overrides):
    import fastcache_rt

    m = tiny.build(family)
    fastcache_rt.enable(m, method, num_steps=steps, **overrides)
    tiny.denoise(m, family, steps)
    st = fastcache_rt.stats(m)
    return st["computed"], st["cache_bytes"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=tiny.FAMILIES, action="append")
    p.add_argument("--mode", choices=("ulysses", "ring"), default="ulysses")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--order", choices=("after", "before"), action="append",
                   help="fastcache_rt enabled after (default) or before enable_parallelism")
    p.add_argument("--method", choices=list(PRESETS), action="append")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--timeout", type=float, default=8.0, help="collective timeout (s)")
    a = p.parse_args(argv)
    shown_chains = set()
    for family in a.family or tiny.FAMILIES:
        for order in a.order or ["after"]:
            for method in a.method or list(PRESETS):
                over = PRESETS[method][family]
                ref = single(family, a.steps, method, over)
                head = f"== {family} {a.mode}{a.ranks} {method} (enabled {order} enable_parallelism)"
                try:
                    res = run_ranks(observe, a.ranks, kwargs={"family": family, "mode": a.mode, "steps": a.steps,
                                                                  "method": method, "overrides": over, "order": order},
                                    timeout=60, collective_timeout=a.timeout)
                except RankError as e:
                    lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith(" ")]
                    print(head, "\n   RUN FAILED (ranks hung or aborted):", *lines[-4:], sep="\n   ")
                    continue
                print(head)
                if (family, order) not in shown_chains:
                    shown_chains.add((family, order))
                    print("   hook chains (innermost first):")
                    for name, chain in res[0]["chains"].items():
                        print(f"     {name}: {chain}")
                print(f"   single process: computed {ref[0]}, cache_bytes {ref[1]}")
                for r, x in enumerate(res):
                    s = x["seen"]
                    what = (f"transformer hook hidden_states {s['transformer_hidden'][:1]}, first list's hidden "
                            f"{s['segment_hidden'][:1]}, grid {s['grid'][:1]}")
                    if "error" in x:
                        print(f"   rank {r}: {what}\n     ERROR {x['error']}\n     at " + "\n        ".join(x["frames"]))
                    else:
                        print(f"   rank {r}: {what}; computed {x['computed']}, cache_bytes {x['cache_bytes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
