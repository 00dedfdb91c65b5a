"""The Triton kernels compiled for a GPU architecture on a machine without one: what a GPU would run, checked here.

    python -m fastcache_rt.kernels.aot                      # sm_80 and sm_90 at the FLUX and video sizes: a table
    python -m fastcache_rt.kernels.aot --arch 80 90 100 120 --json aot.json

Triton compiles for a target without a device (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``)
and ships NVIDIA's ``ptxas``. This module drives the **launchers themselves** (``band_l1.gate_step``,
``chebyshev.chebyshev_forecast``, ...) with ``meta`` tensors of the real shapes: inside ``compile_only(arch)`` every
launch compiles for that architecture and is recorded (kernel, grid, warps, constexprs, PTX, cubin) instead of run,
so the specializations checked are the ones the launchers produce and cannot drift from them. Triton's device
queries are answered by a stand-in driver from ``TARGETS`` (a data-centre part of each architecture), including
the registers of a compiled kernel (``ptxas -v`` on its PTX with Triton's own flags), so a launcher that sizes its
grid from the compiled kernel (``launch.persistent_programs``) takes the same path as on a GPU.

For every launch ``analyse`` reports registers, spill stores / loads and stack (``ptxas -v``), the programs that
fit on one SM (registers, threads, shared memory, the block limit), and the width of every global load and store
per kernel argument, found by following each address register back to the kernel parameter it derives from in the
PTX. A kernel module names its streamed arguments in ``STREAMED``: the tensors whose bytes are the op's traffic.

Run it in a process without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` kernels with Python).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator

import torch

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
    raise ImportError("fastcache_rt.kernels.aot compiles for a GPU: import it in a process without TRITON_INTERPRET")

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as _nv
from triton.runtime import driver as _driver
from triton.runtime.jit import JITFunction

from . import band_l1 as _band_l1
from . import chebyshev as _chebyshev
from . import launch
from . import taylor as _taylor
from .cases import DEGREES, DTYPES, SIZES, cases, dtype_name


@dataclasses.dataclass(frozen=True)
class Target:
    """One GPU of an architecture: what occupancy and Little's law need. Bandwidth is the part's datasheet figure;
    latency a typical loaded DRAM latency of the generation (an assumption, stated as such in the report)."""

    arch: int
    part: str
    sms: int
    smem_per_sm: int  # bytes usable by the blocks of one SM
    bandwidth_gbs: float  # DRAM, GB/s
    latency_ns: float
    regs_per_sm: int = 65536

    @property
    def bytes_in_flight_per_sm(self) -> float:
        """Little's law: bytes that must be outstanding per SM to sustain the bandwidth at the latency."""
        return self.bandwidth_gbs * self.latency_ns / self.sms

    def resident(self, regs: int, num_warps: int, shared: int) -> int:
        return launch.resident(self.arch, self.regs_per_sm, regs, num_warps, shared, self.smem_per_sm)


TARGETS = {
    80: Target(80, "A100-SXM4-80GB", 108, 164 * 1024, 2039.0, 600.0),
    90: Target(90, "H100-SXM5-80GB", 132, 228 * 1024, 3350.0, 650.0),
    100: Target(100, "B200", 148, 228 * 1024, 8000.0, 700.0),
    120: Target(120, "RTX 5090", 170, 100 * 1024, 1792.0, 650.0),
}


# ----------------------------------------------------------------------------------------------------------------
# ptxas and the PTX
# ----------------------------------------------------------------------------------------------------------------


def ptxas_report(ptx: str, arch: int, fp_fusion: bool, kernel: str) -> dict:
    """``ptxas -v`` on the PTX with the flags Triton's backend uses for the cubin: registers, spills, stack."""
    tool = _nv.get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        cmd = [tool, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={_nv.sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return parse_ptxas(proc.stderr, kernel)


def parse_ptxas(log: str, kernel: str) -> dict:
    """Registers and stack frame of ``kernel`` in a ``ptxas -v`` log, and the spill stores / loads of every function
    in it (the kernel and the ``.func`` helpers ptxas compiled beside it, such as the float64 trig slow path)."""
    regs = re.search(rf"entry function '{re.escape(kernel)}'[^\n]*\n(?:.*\n)*?.*?Used (\d+) registers", log)
    props = re.findall(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                       r"(\d+) bytes spill loads", log)
    own = [p for p in props if p[0] == kernel]
    if regs is None or not own:
        raise ValueError(f"ptxas -v printed no report of {kernel}:\n{log}")
    return {
        "registers": int(regs.group(1)),
        "spill_stores": sum(int(p[2]) for p in props),
        "spill_loads": sum(int(p[3]) for p in props),
        "stack": int(own[0][1]),
        "functions": len(props),
    }


def cubin_registers(cubin: bytes) -> int:
    """Registers of the kernel in Triton's own cubin (``cuobjdump -res-usage``): the binary a GPU would load."""
    tool = os.path.join(os.path.dirname(_nv.get_ptxas(80).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1))


_REG = re.compile(r"%[a-z]+\d+")
_TYPE_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16}


def _split_operands(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _entry_body(ptx: str) -> str:
    """The text of the PTX's kernel (its ``.entry``), without the ``.func`` helpers ptxas may have beside it (their
    registers are their own)."""
    start = ptx.index(".entry")
    i = ptx.index("{", ptx.index(")", start))
    depth = 0
    for j in range(i, len(ptx)):
        depth += {"{": 1, "}": -1}.get(ptx[j], 0)
        if depth == 0:
            return ptx[start:j + 1]
    raise ValueError("unbalanced PTX")


def _instructions(ptx: str) -> list[tuple[str, list[str]]]:
    """(opcode, operands) of every instruction of the PTX's kernel (inline-asm blocks included), predicates
    stripped."""
    out = []
    for raw in _entry_body(ptx).splitlines()[1:]:
        line = raw.split("//")[0].strip()
        if not line or line.endswith(":") or line.startswith((".", "{", "}", ")")):
            continue
        line = line.rstrip(";").strip()
        if line.startswith("@"):
            line = line.split(None, 1)[1] if " " in line else ""
        if not line:
            continue
        parts = line.split(None, 1)
        out.append((parts[0], _split_operands(parts[1]) if len(parts) > 1 else []))
    return out


def memory_widths(ptx: str, names: list[str]) -> dict:
    """{"loads": {arg: {bytes: count}}, "stores": {...}}: every ld.global / st.global of the PTX, by the kernel
    argument its address derives from (followed through every register it flows through, to a fixed point) and the
    bytes it moves per thread. ``names`` are the PTX parameters' argument names, in order."""
    insts = _instructions(ptx)
    taint: dict[str, frozenset] = {}
    param = re.compile(r"\[\s*\w+_param_(\d+)\s*\]")
    changed = True
    while changed:
        changed = False
        for op, args in insts:
            if not args or op.startswith(("st.", "bra", "ret", "bar", "red.", "fence", "membar", "prefetch")):
                continue
            dst = _REG.findall(args[0])
            if op.startswith("ld.param"):
                m = param.search(args[1]) if len(args) > 1 else None
                src = frozenset({int(m.group(1))}) if m else frozenset()
            elif op.startswith("ld."):  # a loaded value is data, not an address derived from the one it was read at
                continue
            else:  # predicates only select: an address is not derived from the values compared to choose it
                src = frozenset().union(*(taint.get(r, frozenset()) for a in args[1:] for r in _REG.findall(a)
                                          if not r.startswith("%p")))
            if not src:
                continue
            for r in dst:
                new = taint.get(r, frozenset()) | src
                if new != taint.get(r):
                    taint[r] = new
                    changed = True
    result = {"loads": {}, "stores": {}}
    for op, args in insts:
        kind = "loads" if op.startswith("ld.global") else "stores" if op.startswith("st.global") else None
        if kind is None:
            continue
        pieces = op.split(".")
        vec = next((int(p[1:]) for p in pieces if re.fullmatch(r"v\d", p)), 1)
        bits = next((p[1:] for p in reversed(pieces) if re.fullmatch(r"[bfsu]\d+", p)), "32")
        width = vec * _TYPE_BYTES[bits]
        addr = next(a for a in args if a.startswith("["))
        regs = _REG.findall(addr)
        for idx in sorted(frozenset().union(*(taint.get(r, frozenset()) for r in regs))):
            if idx < len(names) and names[idx]:
                tally = result[kind].setdefault(names[idx], Counter())
                tally[width] += 1
    return {k: {n: dict(sorted(c.items())) for n, c in v.items()} for k, v in result.items()}


# ----------------------------------------------------------------------------------------------------------------
# compile-only launches
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple
    num_warps: int
    constexprs: dict
    params: list  # the PTX parameters' argument names, in order
    types: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    compiled: object  # triton CompiledKernel (asm: ttgir, ptx, cubin)
    report: dict  # ptxas -v


class _Utils:
    def __init__(self, target: Target, reports: dict):
        self.target = target
        self.reports = reports

    def get_device_properties(self, device):
        t = self.target
        return {"max_shared_mem": t.smem_per_sm, "max_num_regs": t.regs_per_sm, "multiprocessor_count": t.sms,
                "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0, "mem_bus_width": 0}

    def load_binary(self, name, kernel, shared, device):
        report = self.reports[bytes(kernel)]
        spills = report["spill_stores"] // 4
        return None, None, report["registers"], spills, 1024


class _Driver:
    """Triton's view of a device of ``target`` (no device behind it): target, properties, register counts."""

    def __init__(self, target: Target):
        self.target = target
        self.reports: dict[bytes, dict] = {}
        self.utils = _Utils(target, self.reports)
        self.launcher_cls = lambda src, metadata: None

    def get_current_target(self):
        return GPUTarget("cuda", self.target.arch, 32)

    def get_current_device(self):
        return 1000 + self.target.arch  # a device id of its own per architecture (Triton caches per device id)

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list[Launch]]:
    """Inside: every Triton launch compiles for ``arch`` and is appended to the yielded list instead of running."""
    target = TARGETS[arch]
    drv = _Driver(target)
    launches: list[Launch] = []
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        dump = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of its own ptxas run (a fresh compile only)
        try:
            with contextlib.redirect_stdout(log):
                kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        finally:
            knobs.nvidia.dump_ptxas_log = dump
        cubin = bytes(kernel.asm["cubin"])
        if cubin not in drv.reports:
            try:
                drv.reports[cubin] = parse_ptxas(log.getvalue(), kernel.name)
            except ValueError:  # from Triton's cache: no ptxas ran; run it with Triton's flags
                drv.reports[cubin] = ptxas_report(kernel.asm["ptx"], arch, kernel.metadata.enable_fp_fusion,
                                                  kernel.name)
        if not warmup:
            sig = kernel.src.signature
            # pointer arguments by name, the others blank: an address derives from exactly one pointer
            names = [n if str(ty).startswith("*") else "" for n, ty in sig.items() if ty != "constexpr"]
            consts = {self.arg_names[k[0]]: v for k, v in kernel.src.constants.items() if len(k) == 1}
            g = grid(kwargs) if callable(grid) else tuple(grid)
            launches.append(Launch(self.__name__, g, kernel.metadata.num_warps, consts, names,
                                   {n: str(ty) for n, ty in sig.items()}, kernel, drv.reports[cubin]))
        return kernel

    JITFunction.run = run
    previous = _driver._active  # None on a machine without a GPU (reading .active would look for one)
    _driver.set_active(drv)
    try:
        yield launches
    finally:
        JITFunction.run = orig_run
        _driver._active = previous


# ----------------------------------------------------------------------------------------------------------------
# the facts of a compiled launch
# ----------------------------------------------------------------------------------------------------------------

STREAMED = {**_band_l1.STREAMED, **_chebyshev.STREAMED, **_taylor.STREAMED}
IN_FLIGHT = {**_band_l1.IN_FLIGHT, **_chebyshev.IN_FLIGHT, **_taylor.IN_FLIGHT}
_ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "i64": 8, "i32": 4}


def analyse(launch: Launch, target: Target) -> dict:
    """The facts of one compiled launch (see the module docstring); for a streaming kernel also the bytes in flight
    per SM (resident programs, at most the grid's share of an SM, times a program's bytes in flight) against what
    Little's law asks of the target."""
    k = launch.compiled
    widths = memory_widths(k.asm["ptx"], launch.params)
    shared = int(k.metadata.shared)
    fit = target.resident(launch.report["registers"], launch.num_warps, shared)
    programs = math.prod(launch.grid)
    streamed = STREAMED.get(launch.kernel, ())
    row = {
        "kernel": launch.kernel,
        "grid": list(launch.grid),
        "programs": programs,
        "num_warps": launch.num_warps,
        "constexprs": {n: (v if isinstance(v, (int, float, bool, str)) else str(v))
                       for n, v in launch.constexprs.items()},
        **launch.report,
        "cubin_registers": cubin_registers(k.asm["cubin"]),
        "shared": shared,
        "resident_per_sm": fit,
        "waves": programs / (fit * target.sms) if fit else math.inf,
        "loads": widths["loads"],
        "stores": widths["stores"],
        "streamed": list(streamed),
        "streamed_load_widths": sorted({w for a in streamed for w in widths["loads"].get(a, {})}),
    }
    if launch.kernel in IN_FLIGHT:
        element = _ELEMENT[launch.types[streamed[0]].lstrip("*")]
        per_program = IN_FLIGHT[launch.kernel](row["constexprs"], element)
        per_sm = min(fit, math.ceil(programs / target.sms))
        row.update(bytes_per_program=per_program, programs_per_sm=per_sm, bytes_in_flight_per_sm=per_sm * per_program,
                   littles_law_bytes_per_sm=target.bytes_in_flight_per_sm)
    return row


def run(archs=(80, 90), sizes=("flux", "video"), dtypes=DTYPES, degrees=DEGREES, blends=(1.0, 0.5),
        progress=None) -> list[dict]:
    """Every case of every size compiled for every architecture: one dict per (arch, size, case)."""
    rows = []
    for arch in archs:
        target = TARGETS[arch]
        for size in sizes:
            for label, call in cases(size, dtypes, degrees, device="meta", blends=blends):
                with compile_only(arch) as launches:
                    call()
                if len(launches) != 1:
                    raise AssertionError(f"{label}: {len(launches)} launches, every op is one launch")
                rows.append({"arch": arch, "part": target.part, "size": size, "case": label,
                             **analyse(launches[0], target)})
                if progress is not None:
                    progress(rows[-1])
    return rows


def occupancy_table(rows: list[dict]) -> str:
    """Markdown: the streaming kernels' grid, residency and bytes in flight per SM against Little's law."""
    lines = [("| GPU | size | op (dtype) | grid | warps | registers | resident / SM | programs / SM | "
              "in flight / program | in flight / SM | Little's law / SM |"),
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "bytes_in_flight_per_sm" not in r:
            continue
        lines.append(f"| sm_{r['arch']} ({r['part']}) | {r['size']} | {r['case']} | {r['programs']} | "
                     f"{r['num_warps']} | {r['registers']} | {r['resident_per_sm']} | {r['programs_per_sm']} | "
                     f"{r['bytes_per_program'] / 1024:g} KiB | {r['bytes_in_flight_per_sm'] / 1024:.0f} KiB | "
                     f"{r['littles_law_bytes_per_sm'] / 1024:.1f} KiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(TARGETS))
    ap.add_argument("--sizes", nargs="+", default=["flux", "video"], choices=list(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=[dtype_name(d) for d in DTYPES])
    ap.add_argument("--degrees", type=int, nargs="+", default=list(DEGREES), help="Chebyshev degrees")
    ap.add_argument("--blends", type=float, nargs="+", default=[1.0, 0.5], help="Chebyshev blends")
    ap.add_argument("--json", help="write every row to this file")
    ap.add_argument("--markdown", help="write the occupancy table of the streaming kernels to this file")
    args = ap.parse_args(argv)
    dtypes = tuple(getattr(torch, d) for d in args.dtypes)

    def show(r):
        loads = ",".join(str(w) for w in r["streamed_load_widths"]) or "-"
        print(f"sm_{r['arch']:<4}{r['size']:6s} {r['case']:48s} regs {r['registers']:3d} spill "
              f"{r['spill_stores']:3d}/{r['spill_loads']:<3d} warps {r['num_warps']:2d} grid {r['programs']:7d} "
              f"resident/SM {r['resident_per_sm']:2d} streamed loads {loads} B", flush=True)

    rows = run(args.arch, args.sizes, dtypes, tuple(args.degrees), tuple(args.blends), progress=show)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"triton": triton.__version__,
                       "targets": {a: {**dataclasses.asdict(TARGETS[a]),
                                       "bytes_in_flight_per_sm": TARGETS[a].bytes_in_flight_per_sm}
                                   for a in args.arch},
                       "rows": rows}, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(occupancy_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
