"""Run a function on N torch.distributed ranks (gloo, CPU, 127.0.0.1) from a test, bounded in time.

    from tests.distributed.harness import run_ranks
    results = run_ranks(worker, 2, timeout=120, kwargs={"method": "teacache"})   # one dict per rank

``worker(rank, world_size, **kwargs) -> dict`` must be picklable (a module-level function of an importable
module): every rank is a fresh ``spawn``ed interpreter. The rank's process group is initialised before the worker
runs (gloo, a free TCP port on 127.0.0.1) and destroyed after it. What the worker returns (tensors, lists, numbers)
goes back to the parent through ``torch.save`` in a temporary directory.

Time bounds, so that a hang fails the test instead of blocking CI:
- every collective: the process group's ``timeout`` (gloo raises in the rank that waits);
- the whole run: ``timeout`` seconds in the parent; past it, every rank still alive is killed (SIGTERM, then
  SIGKILL) and ``RankTimeout`` is raised with the Python stacks of the hung ranks (``faulthandler``, dumped by each
  rank shortly before the parent's deadline);
- a rank that fails: its traceback is raised in the parent as ``RankError``; the others get ``grace`` seconds to
  finish (they usually fail in their next collective) and are then killed.

CPU-only torch and diffusers 0.42.1: ``ModelMixin._resolve_parallel_config`` computes
``rank % torch.accelerator.device_count()``, which is ``% 0`` without an accelerator; ``cpu_device_count_fix()``
(called in every rank before the worker) makes ``device_count`` return 1 there. The transformer must also be called
with ``return_dict=False`` (the output gather of ``return_dict=True`` fails).

``run_script`` launches a script with ``python -m torch.distributed.run`` (torchrun) under the same bounds.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

__all__ = ["RankError", "RankTimeout", "Runs", "cpu_device_count_fix", "cpu_ring_attention_fix", "free_port", "run_ranks",
           "run_script"]

REPO = Path(__file__).resolve().parents[2]


class RankError(RuntimeError):
    """A rank raised (or died); the message holds every failed rank's traceback."""


class RankTimeout(RankError):
    """The run did not finish in time (a hang: e.g. ranks that disagree on a collective)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_device_count_fix() -> None:
    """diffusers 0.42.1 computes ``rank % torch.accelerator.device_count()`` when it sets up parallelism
    (modeling_utils.py ``_resolve_parallel_config``); on a CPU-only torch that count is 0. Make it 1."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.device_count() == 0:
        acc.device_count = lambda: 1


def cpu_ring_attention_fix() -> None:
    """Ring attention on the CPU. diffusers 0.42.1's ring (``TemplatedRingAttention``, attention_dispatch.py) needs
    the log-sum-exp of every partial attention; of its context-parallel backends only ``native`` runs on a CPU, and
    its forward op refuses ``return_lse=True`` (``_native_attention_forward_op``: "Native attention does not support
    return_lse=True"); ``_native_flash`` calls ``aten::_scaled_dot_product_flash_attention``, which has no CPU kernel.
    This makes the native op return (out, lse) through ``aten::_scaled_dot_product_flash_attention_for_cpu`` (same
    math, CPU kernel). Test-only: on GPUs ring attention runs on diffusers' flash / cuDNN backends."""
    from diffusers.models import attention_dispatch as ad

    original = ad._native_attention_forward_op
    if getattr(original, "_fastcache_rt_cpu_lse", False):
        return

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse or query.device.type != "cpu":
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        if enable_gqa:
            raise ValueError("cpu_ring_attention_fix: enable_gqa is not supported")
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # model layout (B, S, H, D) -> (B, H, S, D)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        return out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()  # (B, S, H, D), (B, S, H)

    forward_op._fastcache_rt_cpu_lse = True
    ad._native_attention_forward_op = forward_op


def _entry(rank: int, world_size: int, port: int, worker, kwargs: dict, out_dir: str, collective_timeout: float,
           dump_after: float, threads: int) -> None:
    """One rank: env like torchrun's, the process group, the worker, its result to ``out_dir/rank<r>.pt``."""
    import torch.distributed as dist

    out = Path(out_dir)
    stack_file = open(out / f"rank{rank}.stacks", "w")  # noqa: SIM115 (faulthandler keeps writing to it)
    if dump_after > 0:
        faulthandler.dump_traceback_later(dump_after, repeat=False, file=stack_file, exit=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    if threads:
        torch.set_num_threads(threads)
    cpu_device_count_fix()
    cpu_ring_attention_fix()
    result: dict
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            t0 = time.perf_counter()
            result = dict(worker(rank, world_size, **kwargs) or {})
            result.setdefault("_seconds", time.perf_counter() - t0)
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 (reported to the parent)
        result = {"_error": traceback.format_exc()}
    tmp = out / f"rank{rank}.pt.tmp"
    torch.save(result, tmp)
    os.replace(tmp, out / f"rank{rank}.pt")  # the parent sees a complete file or none
    faulthandler.cancel_dump_traceback_later()
    # gloo's destructor can block on a peer that is stuck in a collective: leave without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


def run_ranks(worker, world_size: int, *, kwargs: dict | None = None, timeout: float = 120.0,
              collective_timeout: float | None = None, grace: float = 3.0, threads: int | None = None) -> list[dict]:
    """Run ``worker(rank, world_size, **kwargs)`` on ``world_size`` gloo ranks; returns their result dicts in rank
    order (each with ``_seconds``: the worker's wall time). Raises ``RankError`` if a rank fails and
    ``RankTimeout`` if the run exceeds ``timeout`` seconds (every rank still alive is killed first).

    ``collective_timeout``: gloo's per-collective timeout (default: ``timeout``/2, at least 10 s).
    ``threads``: torch threads per rank (default: the machine's cores / ranks, at least 1: ranks share the cores).
    ``grace``: seconds the other ranks get to finish once one has failed.
    A port taken between its choice and the rendezvous is retried once with another one.
    """
    try:
        return _run_ranks(worker, world_size, kwargs, timeout, collective_timeout, grace, threads)
    except RankError as e:
        if "Address already in use" not in str(e) or isinstance(e, RankTimeout):
            raise
        return _run_ranks(worker, world_size, kwargs, timeout, collective_timeout, grace, threads)


def _run_ranks(worker, world_size, kwargs, timeout, collective_timeout, grace, threads) -> list[dict]:
    kwargs = dict(kwargs or {})
    if collective_timeout is None:
        collective_timeout = max(10.0, timeout / 2)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="fcrt_dist_") as out_dir:
        out = Path(out_dir)
        port = free_port()
        start = time.monotonic()
        # the stacks of a hung rank are dumped a little before the parent's deadline (process start-up included)
        dump_after = max(1.0, timeout - 5.0)
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, worker, kwargs, out_dir, collective_timeout,
                                                  dump_after, threads), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        failed_at = None
        loaded: dict[int, dict] = {}
        try:
            while True:
                for r in range(world_size):
                    if r not in loaded and (out / f"rank{r}.pt").exists():
                        loaded[r] = _load(out / f"rank{r}.pt")
                done = [r in loaded for r in range(world_size)]
                dead = [not p.is_alive() and not done[r] for r, p in enumerate(procs)]
                errored = any(dead) or any("_error" in res for res in loaded.values())
                if all(done):
                    break
                now = time.monotonic()
                if errored and failed_at is None:
                    failed_at = now
                if failed_at is not None and now - failed_at > grace:
                    break
                if now - start > timeout:
                    break
                time.sleep(0.05)
        finally:
            _kill(procs)
        elapsed = time.monotonic() - start
        results, errors, missing = [], [], []
        for r in range(world_size):
            f = out / f"rank{r}.pt"
            if r in loaded or f.exists():
                res = loaded[r] if r in loaded else _load(f)
                if "_error" in res:
                    errors.append(f"--- rank {r} raised:\n{res['_error']}")
                results.append(res)
            else:
                stacks = (out / f"rank{r}.stacks")
                text = stacks.read_text() if stacks.exists() else ""
                code = procs[r].exitcode
                missing.append(f"--- rank {r}: no result (exit code {code})" +
                               (f"; its stacks before the deadline:\n{text}" if text.strip() else ""))
                results.append({})
        if errors or missing:
            msg = f"{world_size}-rank run of {getattr(worker, '__name__', worker)} failed after {elapsed:.1f}s:\n"
            msg += "\n".join(errors + missing)
            if not errors and elapsed >= timeout:
                raise RankTimeout(f"timed out ({timeout:.0f}s): " + msg)
            raise RankError(msg)
        return results


# Modules every rank needs, imported once by the forkserver (importing diffusers' transformers costs ~8 s of CPU
# per process; forked from the server, a rank starts in well under a second).
PRELOAD = ["torch", "torch.distributed", "diffusers", "diffusers.models.transformers.transformer_flux",
           "diffusers.models.transformers.transformer_wan", "diffusers.hooks.context_parallel", "fastcache_rt",
           "tests.distributed.harness", "fastcache_rt.testing.context_parallel"]
_CTX = None


def _context():
    """A ``forkserver`` context whose server preloads ``PRELOAD``: ranks are forked from a process that imported
    torch and diffusers but never ran a torch op (no OpenMP pool, no process group), so forking is safe and fast.
    FASTCACHE_RT_DIST_START=spawn switches to plain spawn."""
    global _CTX
    if _CTX is None:
        method = os.environ.get("FASTCACHE_RT_DIST_START", "forkserver")
        _CTX = mp.get_context(method)
        if method == "forkserver":
            _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def _load(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 (reported as the rank's error)
        return {"_error": f"the rank's result {path.name} could not be read: {e!r}"}


def run_script(script: str | os.PathLike, nproc: int, args: list[str] = (), *, timeout: float = 300.0,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc script args`` (as ``python -m torch.distributed.run``, on 127.0.0.1 with a
    free port), killed with its whole process group after ``timeout`` seconds (``RankTimeout``). Returns the
    completed process (stdout and stderr captured as text); does not check the exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)),
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=str(REPO), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise RankTimeout(f"{' '.join(cmd)} timed out after {timeout:.0f}s\n--- stdout:\n{out}\n--- stderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class Runs:
    """``run_ranks`` results kept per (worker, world size, kwargs), so that the tests of one test file share a launch;
    a failed launch is kept too and raised again for every test that asks for it. ``timeouts``: (run, collective)
    seconds, and ``compiled_timeouts`` those of a launch that compiles (each rank traces and compiles on its own
    before its first collective, and ranks sharing busy cores can finish that seconds apart)."""

    def __init__(self, timeouts: tuple[float, float], compiled_timeouts: tuple[float, float]):
        self.timeouts, self.compiled_timeouts = timeouts, compiled_timeouts
        self._done: dict = {}

    def __call__(self, worker, world_size: int, compiled: bool = False, **kwargs):
        key = (worker.__name__, world_size, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in self._done:
            run, collective = self.compiled_timeouts if compiled else self.timeouts
            try:
                self._done[key] = run_ranks(worker, world_size, kwargs=kwargs, timeout=run,
                                            collective_timeout=collective)
            except RankError as e:
                self._done[key] = e
        res = self._done[key]
        if isinstance(res, Exception):
            raise res
        return res
