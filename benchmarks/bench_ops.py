"""Kernel-tier benchmark, interleaved: each op through a fast backend beside the eager torch reference, the eager
way peers compute the same thing and a same-bytes tensor copy (the memory-bandwidth roof), timed side by side in
one run, round-robin, so that machine noise hits all alike. The same calls as the pytest-benchmark suite
(``benchmarks/test_kernels.py``; both take their cases from ``benchmarks/kernel_cases.py``).

    python benchmarks/bench_ops.py                 # FLUX-like size (1, 4096, 3072), fp32 and bf16, backend cpu
    python benchmarks/bench_ops.py --quick         # fewer repeats
    python benchmarks/bench_ops.py --csv out.csv   # also append rows (machine, commit, version) to a CSV

Reported per op: ratios of best-of-R interleaved times (never bare seconds as a claim), the columns of
``benchmarks/bench_table.py``: the speedup over the peer's eager way and over the reference, and the fraction of
the copy's bytes/s reached, where the op's bytes are what it must read + write and the copy moves the same bytes
into a preallocated tensor; the forecasts write into a preallocated ``out=`` for that column, "allocating" is the
same fraction when the forecast allocates its result (on the CPU a fresh feature-sized allocation costs page
faults, often more than the op itself). Timed calls pass device tensors for every scalar and read nothing back
(the peers do what they do: FBCache reads its ratio back with ``.item()``).
Refuses to report when the backend or a peer disagrees with the reference on the benchmark inputs.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_table import format_text
from kernel_cases import (
    ALL_OPS,
    FLUX_SHAPE,
    FORECASTS,
    HOST,
    PEERS,
    SMALL,
    TARGET_ROOF,
    TARGET_SPEEDUP,
    Workload,
    copy_roof,
    parse_shape,
    ratios,
    shape_str,
    targets,
)
from kernel_meta import git_commit

from fastcache_rt import __version__, ops


def _time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best of ``repeats`` rounds, each round timing every function once in turn: the best time is the one least
    disturbed by other load on a shared machine, and interleaving exposes all functions to the same conditions."""
    for fn in fns.values():  # warm-up
        fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in samples.items()}


def measure(backend: str, shape, dtype: torch.dtype, history: int, repeats: int, op_names=None) -> list[dict]:
    """Rows (the ratios of ``kernel_cases.ratios`` + identification) of every op at one dtype."""
    w = Workload(shape, dtype, "cpu", history=history)
    names = [o for o in (op_names or ALL_OPS) if o not in HOST]
    if dtype != torch.float32:
        names = [o for o in names if o not in SMALL]  # float32 inputs whatever the feature dtype: once
    rows = []
    for op in names:
        case = w.cases((op,))[op]
        try:
            case.check(backend)
            if case.peer is not None:
                case.check("reference", peer=True)
        except AssertionError as exc:
            raise SystemExit(f"refusing to report: {exc}") from None
        fns = {backend: case.timed(backend), "reference": case.timed("reference")}
        if case.nbytes is not None:
            fns["copy"] = copy_roof(case.nbytes, "cpu")
        if case.peer is not None:
            fns["peer"] = case.peer[2]
        if op in FORECASTS:
            fns[f"alloc:{backend}"] = case.alloc(backend)
        t = _time_interleaved(fns, repeats)
        r = ratios(t, backend)
        r.update(op=case.label, op_name=op, dtype=str(dtype).replace("torch.", ""), backend=backend,
                 shape=shape_str(shape), device="cpu", bytes=case.nbytes, peer=PEERS.get(op, (None,))[0])
        r["targets"] = targets(op, r)
        rows.append(r)
        del fns
    del w
    gc.collect()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cpu", help="fast backend to measure (default cpu)")
    ap.add_argument("--shape", default=",".join(map(str, FLUX_SHAPE)), help="feature shape (default 1,4096,3072)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--history", type=int, default=14, help="Chebyshev history rows (default 14)")
    ap.add_argument("--ops", default=None, help="comma list of ops (default all but the host-side packers)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--csv", default=None, help="append the rows to this CSV file")
    args = ap.parse_args(argv)

    info = ops.backends()[args.backend]
    if not info["available"] or "cpu" not in info["devices"]:
        print(f"backend {args.backend!r} unavailable on CPU tensors: {info['reason']}", file=sys.stderr)
        return 2
    shape = parse_shape(args.shape)
    repeats = 7 if args.quick else 15
    op_names = [o.strip() for o in args.ops.split(",")] if args.ops else None
    if op_names and set(op_names) - set(ALL_OPS):
        ap.error(f"--ops: unknown {sorted(set(op_names) - set(ALL_OPS))}")
    print(f"fastcache_rt {__version__} ({git_commit()}), backend {args.backend}, shape {shape}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; best of {repeats} "
          f"interleaved rounds")
    rows = []
    for dname in args.dtypes.split(","):
        rows += measure(args.backend, shape, getattr(torch, dname.strip()), args.history, repeats, op_names)
    print(format_text(rows))
    print(f"\ntargets (band_l1, chebyshev_forecast): >= {TARGET_SPEEDUP:.0f}x the eager reference and >= "
          f"{TARGET_ROOF * 100:.0f}% of the copy's bytes/s; peers: "
          + "; ".join(f"{op} {name}" for op, (name, _e) in PEERS.items()))
    if args.csv:
        path = Path(args.csv)
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "commit": git_commit(), "version": __version__}
        fields = list(meta) + ["backend", "op", "dtype", "shape", "bytes", "peer", "vs_peer", "of_copy_roof",
                               "allocating_of_roof", "vs_reference", "peer_of_roof", "reference_of_roof",
                               "targets"]
        with path.open("a", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if new:
                wr.writeheader()
            for r in rows:
                wr.writerow({**meta, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}})
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    raise SystemExit(main())
