"""GPU benchmarks. One command on a GPU (under 8 minutes on one H100), one JSON and one Markdown summary:

    python benchmarks/bench_gpu.py --all --out DIR                   # DIR/bench_gpu.json and DIR/bench_gpu.md
    python benchmarks/bench_gpu.py --all --smoke --out DIR           # here / CI: the same four parts on the CPU

``--all`` runs four parts (benchmarks/gpu_all.py), each recorded with its command, status (ok / empty / skipped /
failed, with the reason) and wall time; the exit code is 1 when a part failed:

1. the GPU test subset, ``python -m pytest -m gpu -q`` in a subprocess (counts from its --junitxml; exit code 5,
   no test selected, is status "empty"); ``--smoke``: ``-m "gpu and not slow" --collect-only`` (what the subset
   holds, not whether it passes: run here its tests would take minutes in the Triton interpreter);
2. the op benchmark below (FLUX and video sizes; ``--smoke`` its smoke mode);
3. per step of a generation, CUDA kernel launches (``torch.profiler`` kernel events of each transformer call) and
   device-to-host reads for uncached, fbcache, teacache, spectrum and taylorseer, and benchmarks/bench_step_ops.py
   (ops and host reads per skipped step of every preset; ``--smoke`` its smoke mode, launches n/a on a CPU);
4. one generation of the shipped model (``fastcache_rt.load_default()``, spectrum) uncached eager, cached eager,
   cached under ``torch.compile(fullgraph=True)`` (inductor) and cached with ``backend="cudagraphs"``: wall time
   after a warm-up generation, NFE (``fastcache_rt.stats``), PSNR / max abs difference against the uncached image;
   ``--smoke``: 8 steps, one thread, aot_eager instead of inductor (inductor's CPU warm-up took 31-68 s on 2 shared
   cores, over the ~60 s smoke budget; ``--smoke-compiler inductor`` to run it), cudagraphs skipped (needs a CUDA
   device). A smoke run's Markdown says at its top that nothing in it is
   a GPU measurement.

The op benchmark alone (part 2), one JSON:

    python benchmarks/bench_gpu.py --out gpu.json                    # on a GPU: FLUX and video sizes
    python benchmarks/bench_gpu.py --out gpu.json --sizes flux       # FLUX size only
    python benchmarks/bench_gpu.py --smoke --out smoke.json          # here / CI: tiny CPU tensors, no claims

For each op (band_l1, gate_step, gate_decide, chebyshev_forecast, chebyshev_weights, taylor_forecast,
hermite_forecast, taylor_update) and backend (triton, cuda when built; ``--backends`` to add reference) at each
size (bf16 by default):

- FLUX: features (1, 4096, 3072), a 14-row Chebyshev history, order-2 Taylor/Hermite differences (3 rows);
- video: features (2, 32760, 3072), history 14 x 2 x 32760 x 3072 (5.6 GB in bf16; one op's tensors are alive at
  a time, and an op whose tensors do not fit in free memory is skipped with the reason);

it records:

- GPU time per call by CUDA-graph replay (``torch.cuda.CUDAGraph``; warm-up on a side stream first, as the torch
  docs prescribe; a graph of G calls replayed R times between CUDA events; median and min per call);
- CPU (host) time per call: the wall time of issuing back-to-back calls (no synchronisation inside);
- bytes the op must move and a same-bytes copy (uint8 ``copy_`` into a preallocated tensor, timed the same way):
  the fraction of the copy roof, t(copy) / t(op);
- kernels per call: CUDA kernel events (and memcpy / memset events separately) counted with ``torch.profiler``;
- determinism: 200 runs on the same inputs, every output (including the gate's decision and new state) compared
  with ``torch.equal`` against the first;
- concurrency: two ``torch.cuda.Stream``s each running the op on different inputs at the same time, every result
  bit-compared with the same calls run in order on one stream;
- capture with Python scalars: a CUDA graph captured with tau_query / distance / gap / count as Python numbers and
  the default gate coeffs, replayed and compared with the eager call (plus the eager Python-scalar call against the
  device-tensor one, and the count of tensors made from Python values per call, which are host-to-device uploads
  on a GPU).

``--smoke`` runs the same code on tiny CPU tensors (FLUX stand-in (1, 16, 64), video stand-in (2, 24, 64), same row
counts) with the triton backend under the Triton interpreter (``TRITON_INTERPRET=1`` is set by this script before
torch and triton are imported) and the cpu and reference backends. There is no CUDA graph and no GPU there: the
"GPU time" is null, host times are CPU wall times of the whole computation, concurrency is two Python threads,
capture is not run (null, with the reason) and kernels per call are n/a (the CPU ops the profiler sees are counted
instead). The interpreter costs 0.05-0.5 s per call, so its rows make fewer calls (determinism over
``--interpreter-runs`` = 3 runs, one call per thread, its calls serialised by a lock because the interpreter keeps
its launch state in globals); each row records what it ran. Every number of a smoke run is marked
``"smoke": true`` and claims nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from kernel_meta import git_commit

OPS = ("band_l1", "gate_step", "gate_decide", "chebyshev_forecast", "chebyshev_weights", "taylor_forecast",
       "hermite_forecast", "taylor_update")
SIZES = {
    # name: (feature shape, smoke stand-in, history rows)
    "flux": ((1, 4096, 3072), (1, 16, 64), 14),
    "video": ((2, 32760, 3072), (2, 24, 64), 14),
}
ORDER = 2
DEGREE = 4
LAM = 0.1
DEFAULT_OUT = "bench_gpu.json"
DEFAULT_ALL_OUT = "bench_gpu_all"
ALL_JSON, ALL_MD = "bench_gpu.json", "bench_gpu.md"

_INTERPRETER_LOCK = threading.Lock()
torch = None  # imported in main(), after TRITON_INTERPRET is set for --smoke
ops = None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help=f"JSON to write (default {DEFAULT_OUT}); with --all the directory of {ALL_JSON} and "
                         f"{ALL_MD} (default {DEFAULT_ALL_OUT})")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU tensors, Triton interpreter; nothing claimed")
    ap.add_argument("--all", action="store_true",
                    help="the four parts (GPU tests, this op benchmark, step-level launches and host reads, a cached "
                         "generation eager and compiled) into one JSON and one Markdown summary in --out DIR")
    ap.add_argument("--gpu-tests-timeout", type=float, default=None,
                    help="--all: seconds for the pytest subprocess of part 1 (default 300; --smoke 180)")
    ap.add_argument("--smoke-compiler", choices=("aot_eager", "inductor"), default="aot_eager",
                    help="--all --smoke: backend of part 4's 'inductor' variant (default aot_eager: inductor's warm-up "
                         "took 31-68 s on 2 shared cores, over the ~60 s smoke budget; on a GPU it is always "
                         "inductor)")
    ap.add_argument("--sizes", default="flux,video", help="comma list of " + ", ".join(SIZES))
    ap.add_argument("--ops", default=",".join(OPS), help="comma list of ops")
    ap.add_argument("--backends", default=None,
                    help="comma list (default: triton,cuda on a GPU; triton,cpu,reference with --smoke)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--runs", type=int, default=200, help="runs of the determinism check (default 200)")
    ap.add_argument("--interpreter-runs", type=int, default=3,
                    help="--smoke: determinism runs of the Triton interpreter (slow; default 3)")
    ap.add_argument("--graph-calls", type=int, default=10, help="calls captured per CUDA graph (default 10)")
    ap.add_argument("--replays", type=int, default=20, help="timed graph replays (default 20)")
    ap.add_argument("--host-calls", type=int, default=20, help="calls per host-time sample (default 20)")
    ap.add_argument("--concurrent-iters", type=int, default=10, help="calls per stream / thread (default 10)")
    ap.add_argument("--check-reference", choices=("auto", "yes", "no"), default="auto",
                    help="compare each backend with the reference backend (auto: not at the video size on a GPU,"
                         " where the fp32 reference needs ~3x the history's memory)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clone(outs):
    return tuple(o.clone() for o in outs)


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
                                    for x, y in zip(a, b))


def _bits(t):
    """A view whose == is a bitwise comparison (NaN == NaN, -0 != +0)."""
    if t.dtype.is_floating_point:
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _bits_equal_device(a, b):
    """0-dim device bool: every tensor of ``a`` is bitwise equal to ``b`` (no host read)."""
    flags = [(_bits(x) == _bits(y)).all() for x, y in zip(a, b)]
    return torch.stack(flags).all()


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def _stats_us(samples):
    return {"median": statistics.median(samples) * 1e6, "min": min(samples) * 1e6, "samples": len(samples)}


def _commit():
    try:
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10, check=False).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": git_commit(short=False), "dirty": dirty}


# ---------------------------------------------------------------------------------------------------------------
# the op cases: variant A (timed, checked), B (other inputs, for concurrency), A with Python scalars (capture)
# ---------------------------------------------------------------------------------------------------------------


class OpCase:
    """One op at one size: inputs for variants "A" and "B", ``call(variant, backend, py=False)`` -> outputs tuple,
    ``reset(variant)`` before a call that must see pristine inputs (in-place ops)."""

    inplace = False

    def __init__(self, op, feature, rows, dtype, device, seed=0):
        self.op, self.feature, self.rows, self.dtype, self.device = op, tuple(feature), rows, dtype, device
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.numel = 1
        for s in self.feature:
            self.numel *= s
        self.elsize = torch.empty((), dtype=dtype).element_size()

    def randn(self, *shape):
        return torch.randn(shape, generator=self.g, device=self.device, dtype=self.dtype)

    def scalar(self, v, dtype=None):
        return torch.tensor(v, device=self.device, dtype=dtype or torch.float32)

    def reset(self, variant):
        pass

    def nbytes(self):
        return None


class BandCase(OpCase):
    """band_l1 (and, with ``gate=True``, gate_step): B swaps cur and prev (other sums, other decision)."""

    def __init__(self, op, *a, **k):
        super().__init__(op, *a, **k)
        self.cur = self.randn(*self.feature)
        self.prev = (self.cur.float() + 0.05 * torch.randn(self.feature, generator=self.g, device=self.device)
                     ).to(self.dtype)
        D = self.feature[-1]
        self.bounds = [0, D // 2, D]
        if op == "gate_step":
            self.state = {"A": self.scalar([5, 0.1, 0, 1, 1, 0.1, 0, 3]),
                          "B": self.scalar([7, 0.0, 1, 1, 0, 0.2, 0, 4])}
            self.params = ops.gate_params(0.6, 50, tads=(0.5, 1.5), max_cached=2, device=self.device)
            self.identity = self.scalar([1.0, 0.0])  # the default coeffs as a device tensor
            self.gammas = self.scalar([0.8, 1.5])

    def nbytes(self):
        return 2 * self.numel * self.elsize

    def call(self, variant, backend, py=False):
        a, b = (self.cur, self.prev) if variant == "A" else (self.prev, self.cur)
        if self.op == "band_l1":
            return (ops.band_l1(a, b, self.bounds, backend=backend),)
        if py:  # default coeffs (a Python tuple)
            return tuple(ops.gate_step(a, b, self.state[variant], self.params, bounds=self.bounds,
                                       gammas=self.gammas, backend=backend))
        return tuple(ops.gate_step(a, b, self.state[variant], self.params, self.identity, bounds=self.bounds,
                                   gammas=self.gammas, backend=backend))


class DecideCase(OpCase):
    def __init__(self, op, *a, **k):
        super().__init__(op, *a, **k)
        self.sums = {"A": self.scalar([[10.0, 200.0], [30.0, 250.0]]),
                     "B": self.scalar([[1.0, 200.0], [3.0, 250.0]])}
        self.state = {"A": self.scalar([5, 0.01, 0, 1, 1, 0.1, 0, 3]),
                      "B": self.scalar([6, 0.0, 0, 1, 1, 0.1, 0, 4])}
        self.params = ops.gate_params(0.6, 50, tads=(0.5, 1.5), max_cached=2, device=self.device)
        self.identity = self.scalar([1.0, 0.0])
        self.gammas = self.scalar([0.8, 1.5])

    def call(self, variant, backend, py=False):
        if py:
            return tuple(ops.gate_decide(self.sums[variant], self.state[variant], self.params, gammas=self.gammas,
                                         backend=backend))
        return tuple(ops.gate_decide(self.sums[variant], self.state[variant], self.params, self.identity,
                                     gammas=self.gammas, backend=backend))


class ChebyshevCase(OpCase):
    """chebyshev_forecast / chebyshev_weights: B has other taus, tau_query and count (the history is shared)."""

    def __init__(self, op, *a, **k):
        super().__init__(op, *a, **k)
        n = self.rows
        self.taus = {"A": torch.linspace(-1, 0.7, n, device=self.device),
                     "B": torch.linspace(-1, 0.5, n, device=self.device)}
        self.q_val = {"A": 0.75, "B": 0.6}
        self.count_val = {"A": n, "B": max(n - 2, 1)}
        self.q = {k: self.scalar(v) for k, v in self.q_val.items()}
        self.count = {k: self.scalar(v, torch.int64) for k, v in self.count_val.items()}
        if op == "chebyshev_forecast":
            self.history = self.randn(n, *self.feature)
            self.out = {"A": torch.empty(self.feature, dtype=self.dtype, device=self.device),
                        "B": torch.empty(self.feature, dtype=self.dtype, device=self.device)}

    def nbytes(self):
        return (self.rows + 1) * self.numel * self.elsize if self.op == "chebyshev_forecast" else None

    def call(self, variant, backend, py=False):
        q = self.q_val[variant] if py else self.q[variant]
        c = self.count_val[variant] if py else self.count[variant]
        if self.op == "chebyshev_weights":
            return (ops.chebyshev_weights(self.taus[variant], q, DEGREE, LAM, count=c, validate=False,
                                          backend=backend),)
        return (ops.chebyshev_forecast(self.history, self.taus[variant], q, DEGREE, LAM, count=c, validate=False,
                                       out=self.out[variant], backend=backend),)


class TaylorCase(OpCase):
    """taylor_forecast / hermite_forecast: B has another distance (the differences are shared)."""

    def __init__(self, op, *a, **k):
        super().__init__(op, *a, **k)
        self.diffs = self.randn(ORDER + 1, *self.feature)
        self.x_val = {"A": 2.0, "B": 3.0}
        self.x = {k: self.scalar(v) for k, v in self.x_val.items()}
        self.out = {"A": torch.empty(self.feature, dtype=self.dtype, device=self.device),
                    "B": torch.empty(self.feature, dtype=self.dtype, device=self.device)}
        self.fn = ops.taylor_forecast if op == "taylor_forecast" else ops.hermite_forecast

    def nbytes(self):
        return (ORDER + 2) * self.numel * self.elsize

    def call(self, variant, backend, py=False):
        x = self.x_val[variant] if py else self.x[variant]
        return (self.fn(self.diffs, x, out=self.out[variant], backend=backend),)


class UpdateCase(OpCase):
    """taylor_update, in place: A and B have buffers of their own (reset from one pristine copy), other gap,
    count and feature."""

    inplace = True

    def __init__(self, op, *a, **k):
        super().__init__(op, *a, **k)
        self.pristine = self.randn(ORDER + 1, *self.feature)
        self.buf = {"A": self.pristine.clone(), "B": self.pristine.clone()}
        self.feat = {"A": self.randn(*self.feature), "B": self.randn(*self.feature)}
        self.gap_val = {"A": 1.0, "B": 2.0}
        self.count_val = {"A": ORDER, "B": ORDER + 1}
        self.gap = {k: self.scalar(v) for k, v in self.gap_val.items()}
        self.count = {k: self.scalar(v, torch.int64) for k, v in self.count_val.items()}

    def nbytes(self):
        return 2 * (ORDER + 1) * self.numel * self.elsize

    def reset(self, variant):
        self.buf[variant].copy_(self.pristine)

    def call(self, variant, backend, py=False):
        g = self.gap_val[variant] if py else self.gap[variant]
        c = self.count_val[variant] if py else self.count[variant]
        ops.taylor_update(self.buf[variant], self.feat[variant], g, count=c, backend=backend)
        return (self.buf[variant],)


CASES = {"band_l1": BandCase, "gate_step": BandCase, "gate_decide": DecideCase,
         "chebyshev_forecast": ChebyshevCase, "chebyshev_weights": ChebyshevCase,
         "taylor_forecast": TaylorCase, "hermite_forecast": TaylorCase, "taylor_update": UpdateCase}


def bytes_needed(op, feature, rows, elsize, with_copy=True) -> int:
    """Device memory an op's case holds (inputs, outputs, the same-bytes copy's two buffers)."""
    n = 1
    for s in feature:
        n *= s
    f = n * elsize
    held = {"band_l1": 2 * f, "gate_step": 2 * f, "gate_decide": 0, "chebyshev_weights": 0,
            "chebyshev_forecast": (rows + 2) * f, "taylor_forecast": (ORDER + 3) * f,
            "hermite_forecast": (ORDER + 3) * f, "taylor_update": 3 * (ORDER + 1) * f + 2 * f}[op]
    moved = {"band_l1": 2 * f, "gate_step": 2 * f, "chebyshev_forecast": (rows + 1) * f,
             "taylor_forecast": (ORDER + 2) * f, "hermite_forecast": (ORDER + 2) * f,
             "taylor_update": 2 * (ORDER + 1) * f}.get(op, 0)
    return held + (moved if with_copy else 0) + 2 * f  # + outputs of the checks (clones)


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------


def device_time(fn, device, graph_calls, replays):
    """Seconds per call on the GPU by CUDA-graph replay; None on the CPU (smoke)."""
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):  # warm-up on a side stream before capture (torch.cuda.graphs docs)
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    torch.cuda.synchronize(device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):  # captured on the warmed-up stream (per-stream scratch / constants exist)
        for _ in range(graph_calls):
            fn()
    g.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(replays):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / graph_calls)
    del g
    return samples


def host_time(fn, device, calls, reps, warm=True):
    """Wall seconds per call of issuing ``calls`` back-to-back calls (synchronised before and after each sample,
    never inside; after one warm-up call). On the CPU this is the whole computation."""
    if warm:
        fn()
    samples = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    _sync(device)
    return samples


def copy_fn(nbytes, device):
    """A same-bytes uint8 copy into a preallocated tensor (reads nbytes / 2, writes nbytes / 2); when that does not
    fit in free GPU memory, the largest copy that does (the row says which: ``copy_bytes``)."""
    half = max(nbytes // 2, 1)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        half = min(half, int(free * 0.4))
    src = torch.empty(half, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * half


def count_kernels(fn, device, calls=5, warm=True):
    from torch.profiler import ProfilerActivity, profile

    if warm:
        fn()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    evs = list(prof.events())
    if device.type == "cuda":
        dev = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA]
        mem = [e for e in dev if e.name.lower().startswith(("memcpy", "memset"))]
        ker = [e for e in dev if e not in mem]
        return {"kernels_per_call": len(ker) / calls, "memcpy_memset_per_call": len(mem) / calls,
                "kernel_names": sorted({e.name for e in ker})[:20], "method": "torch.profiler CUDA events"}
    top = [e for e in evs if e.cpu_parent is None]
    return {"kernels_per_call": None, "memcpy_memset_per_call": None,
            "note": "n/a: no GPU (smoke); the profiler sees CPU ops only",
            "cpu_top_level_ops_per_call": len(top) / calls, "cpu_ops_per_call": len(evs) / calls,
            "method": "torch.profiler CPU events"}


def host_value_tensors(fn) -> int:
    """Tensors made from Python values during one call (torch.tensor & co.: a host-to-device upload on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if name.startswith(("aten.lift_fresh", "aten.scalar_tensor")):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def bitwise_runs(case, backend, runs):
    case.reset("A")
    first = _clone(case.call("A", backend))
    bad = []
    for i in range(1, runs):
        case.reset("A")
        if not _equal(case.call("A", backend), first):
            bad.append(i)
    return {"runs": runs, "identical": not bad, "mismatched_runs": len(bad),
            "first_mismatch": bad[0] if bad else None,
            "compared": "torch.equal of every output vs run 0"}, first


def concurrent(case, backend, device, iters, interpreted=False, ref_a=None):
    if ref_a is None:
        case.reset("A")
        ref_a = _clone(case.call("A", backend))
    case.reset("B")
    ref_b = _clone(case.call("B", backend))
    _sync(device)
    if device.type == "cuda":
        mode = "two torch.cuda.Streams, calls issued alternately, then one synchronize"
        cur = torch.cuda.current_stream(device)
        streams = {"A": torch.cuda.Stream(device), "B": torch.cuda.Stream(device)}
        refs = {"A": ref_a, "B": ref_b}
        flags = {"A": [], "B": []}
        for s in streams.values():
            s.wait_stream(cur)
        for _ in range(iters):
            for v, s in streams.items():
                with torch.cuda.stream(s):
                    case.reset(v)
                    flags[v].append(_bits_equal_device(case.call(v, backend), refs[v]))
        torch.cuda.synchronize(device)
        ok = {v: bool(torch.stack(f).all()) for v, f in flags.items()}
        del flags
    else:
        mode = "two Python threads (no GPU: smoke), started together by a barrier"
        if interpreted:
            # The Triton interpreter keeps its launch state (grid index, patched triton.language) in globals: two
            # launches at once corrupt each other whatever the kernel. Its calls are serialised here; the threads
            # still interleave them (each thread is its own stream for the kernels' per-stream scratch).
            mode += "; Triton interpreter calls serialised by a lock (the interpreter is not thread-safe)"
        lock = _INTERPRETER_LOCK if interpreted else contextlib.nullcontext()
        barrier = threading.Barrier(2)
        results = {"A": [], "B": []}
        errors = []

        def worker(v):
            try:
                barrier.wait()
                for _ in range(iters):
                    with lock:
                        case.reset(v)
                        out = _clone(case.call(v, backend))
                    results[v].append(out)
            except BaseException as exc:  # noqa: BLE001 - reported in the JSON
                errors.append(_err(exc))

        threads = [threading.Thread(target=worker, args=(v,)) for v in ("A", "B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            return {"mode": mode, "iterations": iters, "equal": False, "error": errors[0]}
        ok = {"A": all(_equal(r, ref_a) for r in results["A"]), "B": all(_equal(r, ref_b) for r in results["B"])}
    return {"mode": mode, "iterations": iters, "equal": ok["A"] and ok["B"], "equal_A": ok["A"],
            "equal_B": ok["B"],
            "inputs_differ": not _equal(ref_a, ref_b)}


def capture_python_scalars(case, backend, device, eager_t=None):
    res = {}
    if eager_t is None:
        case.reset("A")
        eager_t = _clone(case.call("A", backend))
    got = []
    for key in ("host_value_tensors_first_call", "host_value_tensors_per_call"):  # the 2nd: steady state
        case.reset("A")
        res[key] = host_value_tensors(lambda: got.append(_clone(case.call("A", backend, py=True))))
    eager_py = got[0]
    res["python_scalars_equal_tensor_scalars"] = _equal(eager_t, eager_py) and _equal(got[1], eager_py)
    if device.type != "cuda":
        res.update(ran=False, capture_ok=None, reason="no CUDA device (smoke): CUDA-graph capture not run; the "
                   "eager Python-scalar call is compared with the device-tensor call instead")
        return res

    def step():
        case.reset("A")
        return case.call("A", backend, py=True)

    res["ran"] = True
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(s)
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            static = step()
        g.replay()
        torch.cuda.synchronize(device)
        res["capture_ok"] = _equal(static, eager_py)
        res["replay_equals_eager"] = res["capture_ok"]
        del g, static
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        res["capture_ok"] = False
        res["error"] = _err(exc)
        with contextlib.suppress(Exception):  # a failed capture may leave an error to clear
            torch.cuda.synchronize(device)
    return res


def reference_check(case, backend, first):
    from kernel_cases import assert_close

    case.reset("A")
    ref = case.call("A", "reference")
    try:
        for a, b in zip(first, ref):
            assert_close(a, b, f"{case.op} {backend}")
        return {"matches_reference": True}
    except AssertionError as exc:
        return {"matches_reference": False, "reference_error": str(exc)[:300]}


# ---------------------------------------------------------------------------------------------------------------
# one row
# ---------------------------------------------------------------------------------------------------------------


def measure_row(case, backend, device, args, smoke, interpreted, check_ref):
    row = {"available": True, "errors": {}, "step_seconds": {}}
    nbytes = case.nbytes()
    row["bytes"] = nbytes

    def step(name, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure is recorded in the row, the run goes on
            row["errors"][name] = _err(exc)
            if os.environ.get("BENCH_GPU_TRACEBACK"):
                traceback.print_exc()
            return None
        finally:
            row["step_seconds"][name] = round(time.perf_counter() - t0, 3)

    timed = lambda: case.call("A", backend)
    graph_calls = args.graph_calls
    # how many calls each step makes: the Triton interpreter costs 0.05-0.5 s per call, so it gets the fewest
    if interpreted:
        host_calls, host_reps, kernel_calls, runs, iters = 1, 1, 1, min(args.runs, args.interpreter_runs), 1
    elif smoke:
        host_calls, host_reps, kernel_calls, runs, iters = 3, 3, 3, args.runs, args.concurrent_iters
    else:
        host_calls, host_reps, kernel_calls, runs, iters = args.host_calls, 5, 5, args.runs, args.concurrent_iters
    dev_t = step("device_time", lambda: device_time(timed, device, graph_calls, args.replays))
    host_t = step("host_time", lambda: host_time(timed, device, host_calls, host_reps, warm=not interpreted))
    timing = {"smoke": smoke, "device_time_us": _stats_us(dev_t) if dev_t else None,
              "host_time_us": _stats_us(host_t) if host_t else None,
              "method": (f"CUDA-graph replay of {graph_calls} calls x {args.replays} replays (device); "
                         f"{host_calls} back-to-back calls x {host_reps} (host)") if device.type == "cuda" else
              f"CPU wall time, {host_calls} calls x {host_reps} (smoke: no GPU, no CUDA graph)"}
    if nbytes:
        cp = step("copy", lambda: copy_fn(nbytes, device))
        if cp is not None:
            fn, copy_bytes = cp
            cdev = step("copy_device_time", lambda: device_time(fn, device, graph_calls, args.replays))
            chost = step("copy_host_time", lambda: host_time(fn, device, max(host_calls, 3), max(host_reps, 3)))
            del fn
            timing["copy_bytes"] = copy_bytes
            timing["roof_basis"] = "same-bytes copy" if copy_bytes >= nbytes - 1 else (
                f"copy of {copy_bytes} bytes (the same-bytes copy does not fit), scaled to the op's bytes")
            timing["copy_device_time_us"] = _stats_us(cdev) if cdev else None
            timing["copy_host_time_us"] = _stats_us(chost) if chost else None
            scale = nbytes / copy_bytes
            op_t = dev_t if dev_t else host_t
            cp_t = cdev if dev_t else chost
            if op_t and cp_t:
                timing["fraction_of_copy_roof"] = statistics.median(cp_t) * scale / statistics.median(op_t)
                timing["fraction_of_copy_roof_basis"] = "device time" if dev_t else "CPU wall time (smoke)"
    row["timing"] = timing
    row["kernels"] = step("kernels", lambda: count_kernels(timed, device, kernel_calls, warm=not interpreted))
    # the timed call passes device tensors for every scalar: it should make no tensor from a Python value
    row["timed_call_host_value_tensors"] = step("uploads", lambda: host_value_tensors(timed))
    bw = step("bitwise", lambda: bitwise_runs(case, backend, runs))
    row["bitwise"] = bw[0] if bw else None
    if bw and check_ref and backend != "reference":
        row.update(step("reference", lambda: reference_check(case, backend, bw[1])) or {})
    first = bw[1] if bw else None  # run 0 of the determinism check: the eager result of variant A
    row["concurrent"] = step("concurrent", lambda: concurrent(case, backend, device, iters, interpreted, first))
    row["capture"] = step("capture", lambda: capture_python_scalars(case, backend, device, first))
    return row


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def _machine(device):
    m = {"node": platform.node(), "platform": platform.platform(), "processor": platform.processor() or
         platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_memory_bytes=p.total_memory,
                 sm_count=p.multi_processor_count)
    else:
        m["gpu"] = None
    return m


def _versions():
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    from fastcache_rt import __version__

    v["fastcache_rt"] = __version__
    return v


def _flag(x):
    return "-" if x is None else ("yes" if x else "NO")


def _setup(smoke: bool) -> None:
    """Import torch and fastcache_rt.ops into this module's globals (after ``TRITON_INTERPRET=1`` for --smoke)."""
    global torch, ops
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before torch / triton / fastcache_rt's triton backend are imported
    for p in (str(ROOT), str(HERE)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch as _torch

    torch = _torch
    from fastcache_rt import ops as _ops

    ops = _ops


def main(argv=None) -> int:
    args = parse_args(argv)
    _setup(args.smoke)
    if args.all:  # the four parts (benchmarks/gpu_all.py), this op benchmark being part 2
        import types

        import gpu_all

        bench = types.SimpleNamespace(run_op_benchmark=run_op_benchmark, parse_args=parse_args, machine=_machine,
                                      versions=_versions, commit=_commit, default_all_out=DEFAULT_ALL_OUT,
                                      all_json=ALL_JSON, all_md=ALL_MD)
        return gpu_all.run_all(bench, args, argv)
    code, doc = run_op_benchmark(args, argv)
    if doc is None:
        return code
    out = Path(args.out or DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {out} ({len(doc['rows'])} rows, mode {doc['mode']}{', nothing claimed' if doc['smoke'] else ''}; "
          f"bitwise {_flag(doc['summary']['bitwise_identical'])}, concurrent "
          f"{_flag(doc['summary']['concurrent_equal'])}, capture {_flag(doc['summary']['capture_ok'])})")
    return code


def run_op_benchmark(args, argv=None, command=None):
    """The op benchmark (every op x backend x size; ``main``'s work without --all): returns (exit code, the JSON
    document, or None when the arguments are bad). ``_setup`` must have run. ``command``: what the document
    records as its command line (default: this process's)."""
    smoke = bool(args.smoke)
    if not smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; run with --smoke for the CPU smoke mode", file=sys.stderr)
        return 2, None
    device = torch.device("cuda" if not smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    default_backends = "triton,cpu,reference" if smoke else "triton,cuda"
    backends = [b.strip() for b in (args.backends or default_backends).split(",") if b.strip()]
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    op_names = [o.strip() for o in args.ops.split(",") if o.strip()]
    for s in sizes:
        if s not in SIZES:
            print(f"bench_gpu: unknown size {s!r} (choose from {', '.join(SIZES)})", file=sys.stderr)
            return 2, None
    for o in op_names:
        if o not in OPS:
            print(f"bench_gpu: unknown op {o!r} (choose from {', '.join(OPS)})", file=sys.stderr)
            return 2, None
    info = ops.backends()
    t_start = time.perf_counter()
    rows = []
    for size in sizes:
        feature_nominal, feature_smoke, n_rows = SIZES[size]
        feature = feature_smoke if smoke else feature_nominal
        check_ref = {"yes": True, "no": False}.get(args.check_reference, smoke or size != "video")
        for op in op_names:
            row_rows = n_rows if op.startswith("chebyshev") else (ORDER + 1 if op.startswith(("taylor", "hermite"))
                                                                   else None)
            base = {"size": size, "op": op, "dtype": args.dtype, "feature_shape": list(feature),
                    "nominal_feature_shape": list(feature_nominal), "rows": row_rows, "device": device.type,
                    "smoke": smoke}
            usable = [b for b in backends
                      if info.get(b, {}).get("available") and device.type in info[b]["devices"]]
            for b in backends:
                if b not in usable:
                    reason = (info.get(b) or {}).get("reason") or f"does not run on {device.type} tensors"
                    rows.append({**base, "backend": b, "available": False, "reason": reason})
            if not usable:
                continue
            if device.type == "cuda":
                need = bytes_needed(op, feature, n_rows, torch.empty((), dtype=dtype).element_size())
                free, _ = torch.cuda.mem_get_info(device)
                if need > free:
                    for b in usable:
                        rows.append({**base, "backend": b, "available": True, "skipped":
                                     f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
                    continue
            case = CASES[op](op, feature, n_rows, dtype, device)
            for b in usable:
                t0 = time.perf_counter()
                interpreted = b == "triton" and device.type == "cpu"
                row = {**base, "backend": b, **measure_row(case, b, device, args, smoke, interpreted, check_ref)}
                row["wall_seconds"] = time.perf_counter() - t0  # of this row's whole measurement
                rows.append(row)
                print(f"{size:6s} {op:20s} {b:10s} bitwise {_flag((row.get('bitwise') or {}).get('identical'))}  "
                      f"concurrent {_flag((row.get('concurrent') or {}).get('equal'))}  "
                      f"capture {_flag((row.get('capture') or {}).get('capture_ok'))}  "
                      f"roof {(row['timing'].get('fraction_of_copy_roof') or 0) * 100:5.0f}%"
                      f"{' (smoke)' if smoke else ''}  kernels/call "
                      f"{(row.get('kernels') or {}).get('kernels_per_call', 'n/a')}"
                      + (f"  errors: {row['errors']}" if row["errors"] else ""), flush=True)
            del case
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    doc = {
        "schema": 1,
        "mode": "smoke" if smoke else "gpu",
        "smoke": smoke,
        "claims": ("none: smoke mode runs tiny CPU tensors (Triton in its interpreter); its timings are not GPU "
                   "timings and no number here is a speed") if smoke else
        "GPU timings by CUDA-graph replay on the machine below",
        "command": command or [Path(sys.argv[0]).name] + list(sys.argv[1:] if argv is None else argv),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": _commit(),
        "versions": _versions(),
        "machine": _machine(device),
        "backends": info,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "settings": {"sizes": {s: {"feature": list(SIZES[s][1] if smoke else SIZES[s][0]),
                                   "nominal_feature": list(SIZES[s][0]), "history_rows": SIZES[s][2],
                                   "taylor_rows": ORDER + 1} for s in sizes},
                     "ops": op_names, "backends": backends, "dtype": args.dtype, "runs": args.runs,
                     "interpreter_runs": args.interpreter_runs, "graph_calls": args.graph_calls,
                     "replays": args.replays, "host_calls": args.host_calls,
                     "concurrent_iters": args.concurrent_iters, "degree": DEGREE, "lam": LAM},
        "rows": rows,
        "wall_seconds": time.perf_counter() - t_start,
    }
    ran = [r for r in rows if r.get("available") and not r.get("skipped")]
    doc["summary"] = {
        "rows": len(rows),
        "measured": len(ran),
        "bitwise_identical": all((r.get("bitwise") or {}).get("identical") for r in ran),
        "concurrent_equal": all((r.get("concurrent") or {}).get("equal") for r in ran),
        "capture_ok": (None if smoke else all((r.get("capture") or {}).get("capture_ok") for r in ran)),
        "errors": {f"{r['size']}/{r['op']}/{r['backend']}": r["errors"] for r in ran if r.get("errors")},
    }
    return 0, doc


if __name__ == "__main__":
    raise SystemExit(main())
