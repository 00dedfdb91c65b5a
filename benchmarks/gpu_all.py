"""The four parts of ``python benchmarks/bench_gpu.py --all --out DIR`` (one command on a GPU; ``--smoke`` on a CPU),
written as one JSON (``DIR/bench_gpu.json``) and one Markdown summary (``DIR/bench_gpu.md``). Each part records its
command, its status (``ok`` / ``empty`` / ``skipped`` / ``failed``, with the reason) and its wall time; the process
exits 1 when a part failed, 0 otherwise.

1. ``gpu_tests``: ``python -m pytest -m gpu -q`` in a subprocess, counts from its ``--junitxml`` (the summary line
   as a fallback); pytest's exit code 5 (no test selected) is status ``empty``. ``--smoke``: ``-m "gpu and not
   slow" --collect-only`` (the subset runs the Triton kernels in the CPU interpreter: minutes on 2 cores), so the
   part says how many tests the GPU subset holds, not whether they pass.
2. ``kernels``: the op benchmark of bench_gpu.py (``run_op_benchmark``; ``--smoke`` its smoke mode).
3. ``step_counts``: ``benchmarks/bench_step_ops.py`` (``--smoke`` on a CPU) in a subprocess, started first and run
   alongside part 1 (it is done before part 2's timings start), for the dispatched ops and host reads per skipped
   step of every preset; then, in this process, per transformer call of one generation for a few presets
   (:data:`STEP_PRESETS`) and uncached: CUDA kernel launches (``torch.profiler`` kernel events of that call, each
   call its own profiler session) and host reads, per computed and per skipped step. Two generations per preset:
   bench_step_ops' ``Workload.run`` counting dispatched ops and host reads, then the same generation without the
   dispatch mode under the profiler. On a CPU launches are n/a (null, with the reason).
4. ``generation``: the shipped model (``fastcache_rt.load_default()``) generating one image uncached eager, cached
   (:data:`GEN_PRESET`) eager, cached with ``torch.compile(fullgraph=True)`` (inductor; in place:
   ``pipe.transformer.compile``) and cached with ``backend="cudagraphs"``; per variant the wall time of a generation
   after a warm-up generation (which compiles), NFE (computed steps from ``fastcache_rt.stats``; uncached: the
   transformer calls), and PSNR / largest absolute difference of the image against the uncached one. ``--smoke``:
   8 steps on one CPU thread, ``aot_eager`` in place of inductor (``--smoke-compiler inductor`` to run inductor),
   cudagraphs skipped ("needs a CUDA device"). A variant's error is recorded and the next variant runs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PARTS = {
    "gpu_tests": "1. GPU test subset",
    "kernels": "2. Kernel benchmarks against the copy roof",
    "step_counts": "3. Step-level kernel launches and host reads",
    "generation": "4. One cached generation of the shipped model, eager and compiled",
}
STATUSES = ("ok", "empty", "skipped", "failed")
STEP_PRESETS = ("fbcache", "teacache", "spectrum", "taylorseer")
SMOKE_STEP_STEPS = 12  # bench_step_ops' smoke step count (its tiny FLUX transformer)
GEN_PRESET = "spectrum"
PROMPT = "red circle"
SMOKE_GEN_STEPS = 8
INDUCTOR_SMOKE_BUDGET = 60.0  # s: the smoke run's budget for the compiled variant's warm-up
INDUCTOR_SMOKE_MEASURED = "31-68 s"  # inductor's warm-up of this variant, 8 steps, 2 shared CPU cores (3 runs)
GPU_TESTS_TIMEOUT = {"gpu": 300.0, "smoke": 180.0}
STEP_OPS_TIMEOUT = 600.0


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def _shown(cmd) -> str:
    """A command line as a person types it (``python`` for this interpreter, paths relative to the checkout)."""
    parts = ["python" if c == sys.executable else c for c in cmd]
    parts = [str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT) + os.sep) else c for c in parts]
    return shlex.join(parts)


def _child_env() -> dict:
    """This environment without what an enclosing pytest run puts there for its own workers."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_CURRENT_TEST", "PYTEST_XDIST"))}


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:] if text else ""


# ---------------------------------------------------------------------------------------------------------------
# part 1: the GPU test subset
# ---------------------------------------------------------------------------------------------------------------

_COUNT_WORDS = {"passed": "passed", "failed": "failed", "skipped": "skipped", "error": "errors", "errors": "errors",
                "deselected": "deselected", "xfailed": "xfailed", "xpassed": "xpassed", "warning": "warnings",
                "warnings": "warnings"}


def parse_pytest_summary(text: str) -> dict:
    """Counts from pytest's last summary line: ``3 passed, 1 failed, 2 skipped in 4.2s``, ``12/4453 tests collected
    (4441 deselected) in 6s`` (``--collect-only -q``) or ``no tests collected (4453 deselected)``. Missing kinds are
    0; ``line`` is the line read (None when there is none)."""
    lines = [ln.strip().strip("=").strip() for ln in (text or "").splitlines() if ln.strip()]
    counts = {k: 0 for k in sorted(set(_COUNT_WORDS.values()))}
    counts["collected"] = None
    counts["line"] = None
    for ln in reversed(lines):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)\b", ln)
        coll = re.search(r"(?:(\d+)/)?(\d+) tests? collected", ln)
        if found or coll or "no tests collected" in ln or "no tests ran" in ln:
            for n, word in found:
                counts[_COUNT_WORDS[word]] += int(n)
            if coll:
                counts["collected"] = int(coll.group(1) or coll.group(2))
            elif "no tests collected" in ln:
                counts["collected"] = 0
            counts["line"] = ln
            break
    return counts


def parse_junit(path) -> dict:
    """Counts and failed test ids from a pytest ``--junitxml`` file (its ``testsuite`` elements summed)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = Counter()
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            tot[k] += int(s.get(k, 0) or 0)
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return {"tests": tot["tests"], "passed": tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
            "failed": tot["failures"], "errors": tot["errors"], "skipped": tot["skipped"], "failed_tests": failed[:50]}


def gpu_tests(smoke: bool, timeout: float, tmp: Path) -> dict:
    junit = tmp / "pytest_gpu.xml"
    if smoke:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu and not slow", "--collect-only", "-q", "-p", "no:xdist",
               "-p", "no:cacheprovider"]
        mode = ("collect-only: the GPU subset is collected, not run (in smoke mode its tests would run the Triton "
                "kernels in the CPU interpreter: minutes on 2 cores)")
    else:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        mode = "run"
    rec = {"command": _shown(cmd), "argv": cmd, "result": {"mode": mode, "timeout_seconds": timeout}}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rec["result"].update(stdout_tail=_tail(out))
        return {**rec, "status": "failed", "reason": f"timed out after {timeout:.0f} s (--gpu-tests-timeout)"}
    res = rec["result"]
    res["exit_code"] = proc.returncode
    res["summary"] = parse_pytest_summary(proc.stdout)
    if junit.is_file():
        res["junit"] = parse_junit(junit)
    counts = res.get("junit") or res["summary"]
    for k in ("passed", "failed", "errors", "skipped"):
        res[k] = counts.get(k)
    res["collected"] = res["summary"].get("collected")
    res["counts_from"] = "junitxml" if "junit" in res else "summary line"
    if proc.returncode == 0:
        status, reason = "ok", None
    elif proc.returncode == 5:
        status, reason = "empty", ("pytest exit code 5: no test selected by the marker expression (tests/conftest.py "
                                   "marks the cases of the cuda / triton backend matrices gpu)")
    else:
        status = "failed"
        reason = f"pytest exit code {proc.returncode}" + (
            f": {res['summary']['line']}" if res["summary"].get("line") else "")
        res["stdout_tail"] = _tail(proc.stdout, 3000)
        res["stderr_tail"] = _tail(proc.stderr, 2000)
    return {**rec, "status": status, "reason": reason}


# ---------------------------------------------------------------------------------------------------------------
# part 2: the op benchmark
# ---------------------------------------------------------------------------------------------------------------

_OP_FLAGS = ("sizes", "ops", "backends", "dtype", "runs", "interpreter_runs", "graph_calls", "replays", "host_calls",
             "concurrent_iters", "check_reference")


def kernels(bench, args, smoke: bool) -> dict:
    defaults = vars(bench.parse_args([]))
    cmd = ["python", "benchmarks/bench_gpu.py"] + (["--smoke"] if smoke else [])
    for k in _OP_FLAGS:
        v = getattr(args, k)
        if v != defaults[k]:
            cmd += ["--" + k.replace("_", "-"), str(v)]
    code, doc = bench.run_op_benchmark(args, command=cmd[1:])
    rec = {"command": shlex.join(cmd) + " (in this process)"}
    if doc is None:
        return {**rec, "status": "failed", "reason": f"bad arguments (exit code {code})", "result": None}
    s = doc["summary"]
    problems = []
    if s["errors"]:
        first = next(iter(s["errors"].items()))
        problems.append(f"{len(s['errors'])} row(s) with errors, first {first[0]}: {first[1]}")
    if not s["bitwise_identical"]:
        problems.append("a row is not bitwise identical run to run")
    if not s["concurrent_equal"]:
        problems.append("a row's concurrent results differ from the serial ones")
    if s["capture_ok"] is False:
        problems.append("a CUDA-graph capture with Python scalars failed or differed")
    if problems:
        return {**rec, "status": "failed", "reason": "; ".join(problems), "result": doc}
    if not s["measured"]:
        return {**rec, "status": "skipped", "reason": "no row measured (no backend available or no memory)",
                "result": doc}
    note = ("smoke: tiny CPU tensors, Triton in its interpreter; CPU wall times, no GPU time, no capture" if smoke
            else None)
    return {**rec, "status": "ok", "reason": None, "note": note, "result": doc}


# ---------------------------------------------------------------------------------------------------------------
# part 3: step-level launches and host reads
# ---------------------------------------------------------------------------------------------------------------


class StepOpsJob:
    """``benchmarks/bench_step_ops.py`` in a subprocess (CPU work), started before part 1 and waited for before
    part 2 (so that nothing else runs on the host while part 2 times its calls)."""

    def __init__(self, smoke: bool, tmp: Path):
        self.out = tmp / "step_ops.json"
        self.cmd = [sys.executable, str(HERE / "bench_step_ops.py")] + (["--smoke"] if smoke else []) + [
            "--out", str(self.out)]
        self.log = tmp / "step_ops.log"
        self.proc = None
        self.t0 = self.seconds = None
        self.error = None

    def start(self):
        self.t0 = time.perf_counter()
        try:
            with open(self.log, "w") as f:
                self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=_child_env(), stdout=f,
                                             stderr=subprocess.STDOUT, text=True)
        except OSError as exc:
            self.error = _err(exc)
        return self

    def wait(self, timeout=STEP_OPS_TIMEOUT):
        if self.proc is None or self.seconds is not None:
            return
        try:
            self.proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - self.t0)))
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the process this object started
            self.proc.wait()
            self.error = f"timed out after {timeout:.0f} s"
        self.seconds = time.perf_counter() - self.t0

    def result(self) -> dict:
        self.wait()
        res = {"command": _shown(["python"] + self.cmd[1:-2] + ["--out", "step_ops.json"]), "wall_seconds":
               self.seconds, "ran": "alongside part 1, in a subprocess"}
        if self.error is None and self.proc.returncode != 0:
            self.error = f"exit code {self.proc.returncode}"
        if self.error is None and not self.out.is_file():
            self.error = "wrote no JSON"
        if self.error:
            log = self.log.read_text(errors="replace") if self.log.is_file() else ""
            return {**res, "error": self.error, "log_tail": _tail(log, 3000)}
        return {**res, "error": None, "doc": json.loads(self.out.read_text())}


class _Uncounted:
    """Stands in for bench_step_ops.OpCounter in the launch pass: no dispatch mode, nothing counted."""

    def __init__(self, *a, **k):
        self.counts, self.outside = Counter(), Counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Profiled:
    """Stands in for the transformer in ``Workload.run``: each call in its own ``torch.profiler`` session,
    synchronised inside it, its device events counted into ``sink``."""

    def __init__(self, tr, device, sink):
        self.tr, self.device, self.sink = tr, device, sink

    def cache_context(self, name):
        return self.tr.cache_context(name)

    def __call__(self, *a, **k):
        import torch
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize(self.device)
        with profile(activities=acts) as prof:
            out = self.tr(*a, **k)
            if cuda:
                torch.cuda.synchronize(self.device)
        self.sink.append(_device_events(prof, cuda))
        return out


def _device_events(prof, cuda: bool) -> dict:
    import torch

    evs = list(prof.events())
    if not cuda:
        return {"kernels": None, "memcpy_memset": None, "dtoh_memcpy": None,
                "cpu_top_level_ops": sum(1 for e in evs if e.cpu_parent is None)}
    dev = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA]
    mem = [e for e in dev if e.name.lower().startswith(("memcpy", "memset"))]
    return {"kernels": len(dev) - len(mem), "memcpy_memset": len(mem),
            "dtoh_memcpy": sum(1 for e in mem if "dtoh" in e.name.lower().replace(" ", "")),
            "kernel_names": sorted({e.name for e in dev if e not in mem})[:40]}


def _spread(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "max": max(vals), "median": statistics.median(vals), "steps": len(vals)}


def _step_workload(bso, smoke: bool, device):
    import torch

    if smoke:
        w = bso.tiny_workload(SMOKE_STEP_STEPS)
    else:  # the shipped model as bench_step_ops builds it (batch 4, 50 steps), moved to the GPU
        w = bso.shipped_workload()
        w.tr.to(device)
        w.latents = w.latents.to(device)
        w.static = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in w.static.items()}
    w.tr.eval()
    return w


def _preset_counts(bso, w, preset, overrides: dict, device) -> dict:
    """One preset (None: uncached) on the workload: per transformer call ops dispatched and host reads (pass 1,
    bench_step_ops' counting), kernel launches (pass 2, the profiler, no dispatch mode); per computed / skipped
    step their spread."""
    import fastcache_rt

    def run(launch_sink=None):
        if preset:
            fastcache_rt.enable(w.tr, preset, num_steps=w.steps, **overrides)
        real = w.tr
        try:
            if launch_sink is None:
                with bso.HostReads() as reads:
                    calls = w.run(reads)
            else:
                w.tr = _Profiled(real, device, launch_sink)
                with mock.patch.object(bso, "OpCounter", _Uncounted), bso.HostReads() as reads:
                    calls = w.run(reads)
            cached = fastcache_rt.stats(real)["cached"] if preset else []
        finally:
            w.tr = real
            if preset:
                fastcache_rt.disable(real)
        return calls, cached

    calls, cached = run()
    launches = []
    calls2, cached2 = run(launches)
    skipped = [i for i, c in enumerate(calls) if not c["ran"]]
    skipped2 = [i for i, c in enumerate(calls2) if not c["ran"]]
    per_step = []
    for i, (c, c2, ln) in enumerate(zip(calls, calls2, launches)):
        per_step.append({"step": i, "computed": c["ran"], "ops": sum(c["ops"].values()), "host_reads": len(c["reads"]),
                         "host_read_methods": sorted(set(c["reads"])), "host_reads_profiled_pass": len(c2["reads"]),
                         "kernel_launches": ln["kernels"], "memcpy_memset": ln["memcpy_memset"],
                         "dtoh_memcpy": ln["dtoh_memcpy"], "cpu_top_level_ops": ln.get("cpu_top_level_ops"),
                         "kernel_names": ln.get("kernel_names")})
    consistent = ((not preset or (cached == skipped and cached2 == skipped2)) and skipped == skipped2
                  and len(launches) == len(calls))

    def side(computed: bool) -> dict:
        rows = [s for s in per_step if s["computed"] == computed]
        return {"steps": [s["step"] for s in rows], "kernel_launches": _spread(s["kernel_launches"] for s in rows),
                "memcpy_memset": _spread(s["memcpy_memset"] for s in rows),
                "host_reads": _spread(s["host_reads"] for s in rows), "ops": _spread(s["ops"] for s in rows)}

    return {"preset": preset or "uncached", "overrides": {k: v for k, v in overrides.items()}, "steps": len(calls),
            "computed": side(True), "skipped": side(False), "consistent": consistent,
            "consistency": "the last-block watch's skipped steps equal fastcache_rt.stats()['cached'] and are the "
                           "same in both passes", "per_step": per_step}


def step_counts(smoke: bool, device, job: StepOpsJob) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import bench_step_ops as bso

    presets_cmd = ", ".join(STEP_PRESETS)
    rec = {"command": f"{_shown(['python'] + job.cmd[1:-2])} (subprocess) + in this process: per transformer call of "
                      f"one generation (bench_step_ops.Workload; torch.profiler kernel events, one session per call) "
                      f"for uncached, {presets_cmd}"}
    res = {"bench_step_ops": job.result()}
    problems = []
    if res["bench_step_ops"]["error"]:
        problems.append(f"bench_step_ops: {res['bench_step_ops']['error']}")
    settings = (bso.SMOKE if smoke else bso.FULL)["ours"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as bench_step_ops measures
    try:
        w = _step_workload(bso, smoke, device)
        res["workload"] = {"model": w.name, "batch": bso.BATCH, "steps": w.steps, "device": device.type,
                           "threads": 1}
        res["launches"] = ("torch.profiler CUDA kernel events per transformer call (memcpy / memset counted "
                           "apart)" if device.type == "cuda" else
                           "n/a: no GPU (smoke); kernel_launches is null, the CPU ops the profiler sees at top "
                           "level are counted instead (cpu_top_level_ops)")
        res["presets"] = []
        for p in (None,) + STEP_PRESETS:
            try:
                row = _preset_counts(bso, w, p, dict(settings.get(p, {})) if p else {}, device)
                if not row["consistent"]:
                    problems.append(f"{row['preset']}: the skipped steps disagree between the watch, stats() and "
                                    f"the two passes")
            except Exception as exc:  # noqa: BLE001 - recorded, the next preset runs
                row = {"preset": p or "uncached", "error": _err(exc), "traceback": traceback.format_exc()[-3000:]}
                problems.append(f"{p or 'uncached'}: {_err(exc)}")
            res["presets"].append(row)
    finally:
        torch.set_num_threads(n)
    status = "failed" if problems else "ok"
    return {**rec, "status": status, "reason": "; ".join(problems) or None, "result": res,
            "note": None if device.type == "cuda" else "smoke: kernel launches n/a (no GPU); ops and host reads "
                                                        "from bench_step_ops' smoke mode (tiny FLUX transformer)"}


# ---------------------------------------------------------------------------------------------------------------
# part 4: a cached generation of the shipped model, eager and compiled
# ---------------------------------------------------------------------------------------------------------------


def _quality(img, ref) -> dict:
    """PSNR (dB, images in [0, 1]) and the largest absolute difference of ``img`` against ``ref``."""
    import torch

    if img.shape != ref.shape:
        return {"psnr_db": None, "max_abs_diff": None, "error": f"shapes {tuple(img.shape)} vs {tuple(ref.shape)}"}
    d = img.double() - ref.double()
    mse = float((d * d).mean())
    return {"psnr_db": (10 * math.log10(1.0 / mse) if mse > 0 else None), "identical": mse == 0,
            "max_abs_diff": float(d.abs().max()), "finite": bool(torch.isfinite(img).all())}


def generation(smoke: bool, device, compiler: str) -> dict:
    import torch

    from fastcache_rt.models import SAMPLE_DEFAULTS

    steps = SMOKE_GEN_STEPS if smoke else SAMPLE_DEFAULTS["num_inference_steps"]
    kw = dict(SAMPLE_DEFAULTS, num_inference_steps=steps)
    call = (f"pipe({PROMPT!r}, **SAMPLE_DEFAULTS, num_inference_steps={steps}, output_type='pt', "
            f"generator=torch.Generator().manual_seed(0))")
    threads = torch.get_num_threads()
    if smoke:  # a tiny model on a shared 2-core machine: a second intra-op thread mostly waits (and varies 50x)
        torch.set_num_threads(1)
    try:
        return _generation(smoke, device, compiler, steps, kw, call)
    finally:
        torch.set_num_threads(threads)


def _generation(smoke, device, compiler, steps, kw, call) -> dict:
    import torch
    from torch._dynamo.utils import counters

    import fastcache_rt
    from fastcache_rt.models import load_default

    rec = {"command": f"in this process: pipe = fastcache_rt.load_default(device={device.type!r}); per variant a "
                      f"warm-up and a timed {call}"}
    t0 = time.perf_counter()
    pipe = load_default(device=device)
    pipe.set_progress_bar_config(disable=True)
    res = {"model": "fastcache_rt.load_default() (the shipped FLUX pipeline)", "load_seconds":
           time.perf_counter() - t0, "device": device.type, "steps": steps, "height": kw["height"],
           "width": kw["width"], "prompt": PROMPT, "preset": GEN_PRESET, "variants": [],
           "intra_op_threads": torch.get_num_threads(),
           "quality_against": "the uncached eager image (PSNR in dB of images in [0, 1]; max_abs_diff)"}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def gen():
        with torch.no_grad():
            out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
        sync()
        return out

    inductor_backend = "inductor" if not smoke else compiler
    variants = [("uncached_eager", "uncached, eager", None, None),
                ("cached_eager", f"cached ({GEN_PRESET}), eager", GEN_PRESET, None),
                ("cached_inductor", f"cached ({GEN_PRESET}), torch.compile fullgraph, {inductor_backend}",
                 GEN_PRESET, inductor_backend),
                ("cached_cudagraphs", f"cached ({GEN_PRESET}), torch.compile fullgraph, cudagraphs", GEN_PRESET,
                 "cudagraphs")]
    images = {}
    problems = []
    for vid, name, preset, backend in variants:
        v = {"id": vid, "name": name, "preset": preset, "backend": backend,
             "compile": None if backend is None else
             "pipe.transformer.compile(fullgraph=True" + ("" if backend == "inductor" else f", backend={backend!r}")
             + ")  # torch.compile of the transformer, in place"}
        if vid == "uncached_eager":
            v["note"] = "the reference image of the quality columns"
        if vid == "cached_inductor" and smoke:
            v["note"] = (f"smoke, --smoke-compiler {compiler}: " + (
                f"aot_eager (AOTAutograd, no code generation) stands in for inductor, whose CPU warm-up took "
                f"{INDUCTOR_SMOKE_MEASURED} on this project's 2-core machine, over the ~{INDUCTOR_SMOKE_BUDGET:.0f} s "
                f"smoke budget" if compiler == "aot_eager" else
                f"inductor on the CPU (C++ code generation); over_smoke_budget says whether its warm-up took more "
                f"than {INDUCTOR_SMOKE_BUDGET:.0f} s"))
        t_v = time.perf_counter()
        if backend == "cudagraphs" and device.type != "cuda":
            v.update(status="skipped", reason="needs a CUDA device", wall_seconds=0.0)
            res["variants"].append(v)
            continue
        enabled = compiled = False
        hook = None
        try:
            if preset:
                fastcache_rt.enable(pipe, preset)
                enabled = True
            if backend:
                torch._dynamo.reset()
                counters.clear()
                pipe.transformer.compile(fullgraph=True, **({} if backend == "inductor" else {"backend": backend}))
                compiled = True
            else:  # eager: count the transformer calls (uncached, every call computes every block)
                n_calls = [0]
                hook = pipe.transformer.register_forward_pre_hook(
                    lambda m, a, _n=n_calls: _n.__setitem__(0, _n[0] + 1))
            t = time.perf_counter()
            warm = gen()
            v["warmup_seconds"] = time.perf_counter() - t
            if hook is not None:
                n_calls[0] = 0
            t = time.perf_counter()
            img = gen()
            v["seconds"] = time.perf_counter() - t
            v["steps"] = steps
            if preset:
                st = fastcache_rt.stats(pipe)
                v["computed"], v["cached"] = st["computed"], st["cached"]
                v["nfe"] = sum(len(c) for c in st["per_stream_computed"])
                v["num_steps"] = st["num_steps"]
                v["nfe_from"] = "fastcache_rt.stats(pipe)['per_stream_computed']"
            else:
                v["nfe"] = n_calls[0]
                v["computed"], v["cached"] = list(range(n_calls[0])), []
                v["nfe_from"] = "transformer calls (forward pre-hook), uncached"
            if backend:
                v["graphs"] = counters["stats"]["unique_graphs"]
                if counters["inductor"].get("cudagraph_skips"):
                    v["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
            img = img.detach().float().cpu()
            v["warmup_equals_timed"] = bool(torch.equal(warm.detach().float().cpu(), img))
            images[vid] = img
            if vid != "uncached_eager":
                if "uncached_eager" in images:
                    v["quality"] = _quality(img, images["uncached_eager"])
                else:
                    v["quality"] = None
                    v["quality_reason"] = "no uncached image (its variant failed)"
                if backend and "cached_eager" in images:
                    v["max_abs_diff_vs_cached_eager"] = float((img.double() - images["cached_eager"].double())
                                                              .abs().max())
            if smoke and vid == "cached_inductor" and compiler == "inductor":
                v["over_smoke_budget"] = v["warmup_seconds"] > INDUCTOR_SMOKE_BUDGET
            v.update(status="ok", reason=None)
        except Exception as exc:  # noqa: BLE001 - one variant's failure is recorded, the next one runs
            v.update(status="failed", reason=_err(exc), traceback=traceback.format_exc()[-3000:])
            problems.append(f"{vid}: {_err(exc)}")
        finally:
            if hook is not None:
                hook.remove()
            if compiled:
                pipe.transformer._compiled_call_impl = None
                torch._dynamo.reset()
            if enabled:
                with contextlib.suppress(Exception):
                    fastcache_rt.disable(pipe)
            v["wall_seconds"] = time.perf_counter() - t_v
        res["variants"].append(v)
    return {**rec, "status": "failed" if problems else "ok", "reason": "; ".join(problems) or None, "result": res}


# ---------------------------------------------------------------------------------------------------------------
# the Markdown summary
# ---------------------------------------------------------------------------------------------------------------


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(head, rows) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out + [""]


def _range(s) -> str:
    if not s:
        return "-"
    return str(s["min"]) if s["min"] == s["max"] else f"{s['min']}..{s['max']}"


def _status(p) -> str:
    return p["status"] + (f": {p['reason']}" if p.get("reason") else "")


def markdown(doc) -> str:
    smoke = doc["smoke"]
    m, v, g = doc["machine"], doc["versions"], doc["git"]
    title = "smoke, CPU" if smoke else (m.get("gpu") or "GPU")
    L = [f"# bench_gpu --all: {title}", ""]
    if smoke:
        L += [("**SMOKE RUN ON A CPU: nothing in this file is a GPU measurement.** Tiny tensors, the Triton "
               "interpreter, tiny models and CPU wall times; no number here says anything about speed on a GPU "
               "(kernel launches are n/a, the cudagraphs variant is skipped)."), ""]
    L += [(f"- machine: {m.get('node')} ({m.get('processor')}, {m.get('cpu_count')} CPUs); GPU: "
           f"{m.get('gpu') or 'none (smoke, CPU)'}"),
          (f"- versions: python {v.get('python')}, torch {v.get('torch')} (CUDA {v.get('cuda')}), triton "
           f"{v.get('triton')}, diffusers {v.get('diffusers')}, fastcache_rt {v.get('fastcache_rt')}"),
          f"- commit: {g.get('commit')}" + (" (with uncommitted changes)" if g.get("dirty") else ""),
          (f"- command: `{doc['command']}`; {doc['created']}; {doc['wall_seconds']:.0f} s; exit code "
           f"{doc['exit_code']}"), ""]
    L += _table(("part", "status", "wall (s)", "command"),
                [(p["title"], _status(p), p["wall_seconds"], f"`{p['command']}`") for p in doc["parts"].values()])

    p = doc["parts"]["gpu_tests"]
    L += [f"## {p['title']}", "", f"`{p['command']}`: {_status(p)}", ""]
    r = p.get("result") or {}
    L += [f"Mode: {r.get('mode')}.", ""]
    L += _table(("exit code", "collected", "passed", "failed", "errors", "skipped", "counts from"),
                [(r.get("exit_code"), r.get("collected"), r.get("passed"), r.get("failed"), r.get("errors"),
                  r.get("skipped"), r.get("counts_from"))])
    for t in (r.get("junit") or {}).get("failed_tests", [])[:20]:
        L.append(f"- failed: `{t}`")

    p = doc["parts"]["kernels"]
    L += [f"## {p['title']}", "", f"`{p['command']}`: {_status(p)}", ""]
    kd = p.get("result") or {}
    if kd:
        L += [f"{kd.get('claims')}. Roof = t(same-bytes copy) / t(op)" + (" on CPU wall times (smoke)." if smoke
              else " on CUDA-graph replay times."), ""]
        rows = []
        for row in kd.get("rows", []):
            if not row.get("available"):
                rows.append((row["size"], row["op"], row["backend"], "unavailable: " + str(row.get("reason")),
                             None, None, None, None, None, None))
                continue
            if row.get("skipped"):
                rows.append((row["size"], row["op"], row["backend"], "skipped: " + row["skipped"], None, None, None,
                             None, None, None))
                continue
            t = row.get("timing") or {}
            dev = (t.get("device_time_us") or {}).get("median")
            host = (t.get("host_time_us") or {}).get("median")
            roof = t.get("fraction_of_copy_roof")
            k = row.get("kernels") or {}
            rows.append((row["size"], row["op"], row["backend"],
                         "errors: " + "; ".join(row["errors"]) if row.get("errors") else "ok", dev, host,
                         None if roof is None else f"{roof * 100:.0f}%", k.get("kernels_per_call", "n/a"),
                         (row.get("bitwise") or {}).get("identical"), (row.get("concurrent") or {}).get("equal")))
        L += _table(("size", "op", "backend", "status", "GPU µs", "host µs", "copy roof", "kernels/call", "bitwise",
                     "concurrent"), rows)

    p = doc["parts"]["step_counts"]
    L += [f"## {p['title']}", "", f"`{p['command']}`: {_status(p)}", ""]
    r = p.get("result") or {}
    if r.get("workload"):
        wl = r["workload"]
        L += [(f"Per transformer call of one generation: {wl['model']}, batch {wl['batch']}, {wl['steps']} steps, "
               f"{wl['device']}. Kernel launches: {r.get('launches')}."), ""]
        rows = []
        for row in r.get("presets", []):
            if row.get("error"):
                rows.append((row["preset"], "failed: " + row["error"]) + (None,) * 6)
                continue
            c, s = row["computed"], row["skipped"]
            rows.append((row["preset"], f"{len(c['steps'])} / {len(s['steps'])}", _range(c["kernel_launches"]),
                         _range(s["kernel_launches"]), _range(c["host_reads"]), _range(s["host_reads"]),
                         _range(c["ops"]), _range(s["ops"])))
        L += _table(("preset", "computed / skipped steps", "launches per computed step", "launches per skipped step",
                     "host reads per computed step", "host reads per skipped step", "ops per computed step",
                     "ops per skipped step"), rows)
    so = r.get("bench_step_ops") or {}
    L += [f"`{so.get('command')}` ({so.get('ran')}, {(so.get('wall_seconds') or 0):.0f} s)"
          + (f": failed: {so['error']}" if so.get("error") else ""), ""]
    if so.get("doc"):
        d = so["doc"]
        L += [(f"Per SKIPPED step, largest over the skipped steps ({d['model']}, batch {d['batch']}, {d['steps']} "
               f"steps); ops outside model = total - the model's own {d['baseline']['outside']} ops outside its "
               f"blocks."), ""]
        L += _table(("method", "library", "ops outside model", "total ops", "host reads", "skipped", "targets"),
                    [(x["method"], x["library"] if x["library"] == "fastcache_rt" else f"diffusers {x['name']}",
                      x.get("ops_outside"), x.get("ops_total"), x.get("host_reads"),
                      f"{len(x['skipped_steps'])}/{len(x['skipped_steps']) + len(x['computed_steps'])}",
                      "-" if x.get("met") is None else ("met" if x["met"] else "not met: " + "; ".join(
                          t["target"] for t in x["targets"] if not t["met"]))) for x in d["rows"]])

    p = doc["parts"]["generation"]
    L += [f"## {p['title']}", "", f"`{p['command']}`: {_status(p)}", ""]
    r = p.get("result") or {}
    if r.get("variants"):
        L += [(f"{r['model']}, {r['device']}, {r['steps']} steps at {r['height']}x{r['width']}; quality against "
               f"{r['quality_against']}. Times after a warm-up generation (the warm-up compiles)."), ""]
        rows = []
        for x in r["variants"]:
            q = x.get("quality") or {}
            rows.append((x["name"], _status(x), x.get("warmup_seconds"), x.get("seconds"),
                         None if x.get("nfe") is None else f"{x['nfe']} / {x.get('steps')}",
                         ("identical" if q.get("identical") else q.get("psnr_db")) if q else None,
                         q.get("max_abs_diff"), x.get("note")))
        L += _table(("variant", "status", "warm-up (s)", "generation (s)", "NFE / steps", "PSNR (dB)",
                     "max abs diff", "note"), rows)
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------


def _run_part(key: str, fn) -> dict:
    print(f"bench_gpu --all: {PARTS[key]} ...", flush=True)
    t0 = time.perf_counter()
    try:
        rec = fn()
    except Exception as exc:  # noqa: BLE001 - a part's crash is its status
        rec = {"command": None, "status": "failed", "reason": _err(exc), "result": None,
               "traceback": traceback.format_exc()[-3000:]}
    rec = {"part": list(PARTS).index(key) + 1, "title": PARTS[key], **rec,
           "wall_seconds": time.perf_counter() - t0}
    assert rec["status"] in STATUSES, rec["status"]
    print(f"bench_gpu --all: {PARTS[key]}: {_status(rec)} ({rec['wall_seconds']:.0f} s)", flush=True)
    return rec


def run_all(bench, args, argv=None) -> int:
    import torch

    smoke = bool(args.smoke)
    if not smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; run with --smoke for the CPU smoke mode", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    out_dir = Path(args.out or bench.default_all_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timeout = args.gpu_tests_timeout or GPU_TESTS_TIMEOUT["smoke" if smoke else "gpu"]
    parts = {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_all_") as tmp:
        tmp = Path(tmp)
        job = StepOpsJob(smoke, tmp).start()
        try:
            parts["gpu_tests"] = _run_part("gpu_tests", lambda: gpu_tests(smoke, timeout, tmp))
            job.wait()  # nothing else on the host while part 2 times its calls
            parts["kernels"] = _run_part("kernels", lambda: kernels(bench, args, smoke))
            parts["step_counts"] = _run_part("step_counts", lambda: step_counts(smoke, device, job))
            parts["generation"] = _run_part("generation", lambda: generation(smoke, device, args.smoke_compiler))
        finally:
            if job.proc is not None and job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()
    failed = [k for k, p in parts.items() if p["status"] == "failed"]
    versions = bench.versions()
    with contextlib.suppress(ImportError):
        import diffusers

        versions["diffusers"] = diffusers.__version__
    doc = {
        "schema": 1,
        "mode": "smoke" if smoke else "gpu",
        "smoke": smoke,
        "claims": ("none: a smoke run on a CPU; nothing in it is a GPU measurement" if smoke else
                   "GPU measurements on the machine below"),
        "command": shlex.join(["python", "benchmarks/bench_gpu.py"] + list(sys.argv[1:] if argv is None else argv)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": bench.commit(),
        "versions": versions,
        "machine": bench.machine(device),
        "parts": parts,
        "failed_parts": failed,
        "exit_code": 1 if failed else 0,
        "wall_seconds": time.perf_counter() - t0,
    }
    (out_dir / bench.all_json).write_text(json.dumps(doc, indent=1, default=str))
    (out_dir / bench.all_md).write_text(markdown(doc))
    print(f"wrote {out_dir / bench.all_json} and {out_dir / bench.all_md} ({doc['wall_seconds']:.0f} s"
          f"{', smoke: nothing claimed' if smoke else ''}); "
          + "; ".join(f"{k} {p['status']}" for k, p in parts.items()))
    return doc["exit_code"]
