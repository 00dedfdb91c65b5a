"""The Triton kernels compiled for sm_80 and sm_90 (``fastcache_rt.kernels.aot``, in a subprocess without the
interpreter): every launch the ops make at the FLUX and video sizes compiles, spills nothing, streams its tensors
with 16-byte loads, sizes a persistent grid from its compiled registers, and keeps enough bytes in flight per SM for
the memory bandwidth (Little's law). The interpreter tests run the same launches (``kernels/cases.py``, ``tiny``)
with the same constexprs, so the code a GPU runs is the code the CPU tests check."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)
SIZES = ("flux", "video")
DTYPES = ("bfloat16", "float32")
DEGREES = (4, 16)  # the default and the policy's largest: the smallest and the largest fitted system
BLENDS = (0.5,)  # the spectrum preset's; no blend (1.0) is the same kernel without the blend's extra registers


def _kernel_names() -> set[str]:
    """Every @triton.jit kernel of the kernel modules (a function whose name ends in ``_kernel``)."""
    names = set()
    for src in (ROOT / "kernels").glob("*.py"):
        names |= set(re.findall(r"^def (\w+_kernel)\(", src.read_text(), flags=re.MULTILINE))
    return names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One subprocess per architecture, side by side (~2.5 min of compiling each on this machine)."""
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for arch in ARCHS:
        cmd = [sys.executable, "-m", "fastcache_rt.kernels.aot", "--arch", str(arch), "--sizes", *SIZES,
               "--dtypes", *DTYPES, "--degrees", *map(str, DEGREES), "--blends", *map(str, BLENDS),
               "--json", str(tmp / f"sm_{arch}.json")]
        procs[arch] = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    doc = {"rows": [], "targets": {}}
    try:
        for arch, proc in procs.items():
            out, err = proc.communicate(timeout=1500)
            assert proc.returncode == 0, out[-3000:] + err[-5000:]
            part = json.loads((tmp / f"sm_{arch}.json").read_text())
            doc["rows"] += part["rows"]
            doc["targets"].update(part["targets"])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert doc["rows"], "no launch compiled"
    return doc


pytestmark = pytest.mark.slow


def _where(rows, pred) -> list[str]:
    return [f"sm_{r['arch']} {r['size']} {r['case']}" for r in rows if pred(r)]


def test_every_kernel_compiles_for_every_architecture_and_size(compiled):
    rows = compiled["rows"]
    for arch in ARCHS:
        for size in SIZES:
            got = {r["kernel"] for r in rows if r["arch"] == arch and r["size"] == size}
            assert got == _kernel_names(), (arch, size, _kernel_names() ^ got)
    # the CUDA-only code paths are the ones compiled: the launchers no longer pick anything by device type
    band = [r for r in rows if r["kernel"] == "band_l1_fwd_kernel"]
    assert band and all(r["constexprs"]["UNROLL"] == 8 for r in band)


def test_no_spills(compiled):
    bad = _where(compiled["rows"], lambda r: r["spill_stores"] or r["spill_loads"])
    assert not bad, f"spills in {bad}"


def test_ptxas_report_is_the_cubin_triton_built(compiled):
    # the registers counted by ptxas -v are those of the binary Triton built (cuobjdump on its cubin)
    bad = _where(compiled["rows"], lambda r: r["registers"] != r["cubin_registers"])
    assert not bad


def test_streamed_tensors_load_16_bytes_per_instruction(compiled):
    rows = [r for r in compiled["rows"] if r["streamed"]]
    assert {r["kernel"] for r in rows} == {"band_l1_fwd_kernel", "chebyshev_forecast_fwd_kernel",
                                           "weighted_rows_fwd_kernel", "taylor_update_fwd_kernel",
                                           "history_update_fwd_kernel"}
    # every global load of a streamed tensor is 16 bytes wide (bf16 and fp32, channel-strided input included)
    bad = _where(rows, lambda r: r["streamed_load_widths"] != [16])
    assert not bad, [(b, r["loads"]) for b, r in zip(bad, rows, strict=False)]


def test_channel_strided_input_is_copied_not_read_narrow(compiled):
    strided = [r for r in compiled["rows"] if "channel-strided" in r["case"]]
    assert strided
    for r in strided:  # the copy makes it the contiguous launch: unit channel stride, full-width loads
        assert r["constexprs"].get("s_cur_d") == 1 and r["streamed_load_widths"] == [16], r["case"]


def test_persistent_grid_follows_the_compiled_registers(compiled):
    sms = {int(a): t["sms"] for a, t in compiled["targets"].items()}
    rows = [r for r in compiled["rows"] if r["kernel"] == "chebyshev_forecast_fwd_kernel"]
    assert rows
    for r in rows:
        assert r["resident_per_sm"] >= 1, r["case"]
        assert r["registers"] <= 255
        blocks = None
        for size, n in (("flux", 1 * 4096 * 3072), ("video", 2 * 32760 * 3072)):
            if r["size"] == size:
                blocks = math.ceil(n / r["constexprs"]["BLOCK_N"])
        assert r["programs"] == min(blocks, r["resident_per_sm"] * sms[r["arch"]]), r["case"]


def test_bytes_in_flight_cover_littles_law(compiled):
    rows = [r for r in compiled["rows"] if "bytes_in_flight_per_sm" in r]
    assert rows
    bad = _where(rows, lambda r: r["bytes_in_flight_per_sm"] < r["littles_law_bytes_per_sm"])
    assert not bad, bad


def test_fixed_grids_fit_the_size(compiled):
    # grids fixed by the input's size: band_l1 has one program per (256 channels, 64 rows, sample) tile
    for r in compiled["rows"]:
        if r["kernel"] == "band_l1_fwd_kernel" and "channel-strided" not in r["case"]:
            B, R, D = (1, 4096, 3072) if r["size"] == "flux" else (2, 32760, 3072)
            assert r["programs"] == math.ceil(D / 256) * math.ceil(R / 64) * B


# ---- the same launches in the interpreter (this process: TRITON_INTERPRET=1 on a CPU machine) ----


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU tensors only")
def test_interpreter_launches_use_the_compiled_constexprs(compiled, monkeypatch):
    """Every launch of ``kernels/cases.py`` at the tiny size, run by the interpreter, passes the constexprs and warp
    count of a compiled launch of the same kernel: there is no CPU-only variant of any kernel."""
    from fastcache_rt.kernels import band_l1, cases, chebyshev, taylor

    seen = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def call(*args, **kwargs):
                seen.append((self.kernel.__name__, kwargs))
                return launch(*args, **kwargs)

            return call

        def __getattr__(self, name):
            return getattr(self.kernel, name)

    for mod in (band_l1, chebyshev, taylor):
        for name in dir(mod):
            if name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, Recorder(getattr(mod, name)))
    for _label, call in cases.cases("tiny", (torch.bfloat16, torch.float32), DEGREES, device="cpu", blends=BLENDS):
        call()
    assert {k for k, _ in seen} == _kernel_names()
    rows = compiled["rows"]
    for kernel, kwargs in seen:
        consts = {k: v for k, v in kwargs.items() if k.isupper()}
        match = [r for r in rows if r["kernel"] == kernel and r["num_warps"] == kwargs.get("num_warps", 4)
                 and all(r["constexprs"].get(k) == v for k, v in consts.items())]
        assert match, (kernel, kwargs)
