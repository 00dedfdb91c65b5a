"""Compile check of the CUDA kernels, no GPU needed: every csrc/cuda/*.cu builds with nvcc for sm_80 and sm_90
without warnings, and ptxas (-Xptxas -v) reports 0 bytes of spill stores and loads for every function. Also: the
summation-order header csrc/cuda/band_order.h compiles as plain host C++ (the host reference test,
tests/cuda/test_band_order_host.py, runs it), and the pybind11 bindings compile against the launchers' declarations
when pybind11 (torch ships it), the Python headers and the CUDA headers are at hand.

All (file, arch) compiles run concurrently once per module; each test then checks one of them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")
_CXX_NAMES = (os.environ.get("CXX"), "g++", "c++", "clang++")
CXX = next((shutil.which(c) for c in _CXX_NAMES if c and shutil.which(c)), None)

pytestmark = pytest.mark.slow  # nvcc / host compiler runs (the module's compiles take ~50 s)

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++, c++, clang++) on PATH")


def _compile(src: Path, arch: str, out_dir: Path) -> subprocess.CompletedProcess:
    cmd = [
        NVCC, "-c", "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-I", str(CSRC),
        str(src), "-o", str(out_dir / f"{src.stem}.{arch}.o"),
    ]  # fmt: skip
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[tuple[Path, str], subprocess.CompletedProcess]:
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    jobs = [(src, arch) for src in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda job: _compile(job[0], job[1], out_dir), jobs))
    return dict(zip(jobs, results))


def _function_reports(log: str) -> list[tuple[str, int, int]]:
    """(function, spill store bytes, spill load bytes) for every 'Function properties for' block of ptxas -v."""
    reports = []
    current = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            reports.append((current, int(m.group(1)), int(m.group(2))))
            current = None
    return reports


def test_sources_found():
    assert SOURCES, f"no CUDA sources under {CSRC / 'cuda'}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_compiles_cleanly_without_spills(builds, src, arch):
    proc = builds[(src, arch)]
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {src.name} for {arch}:\n{log[-6000:]}"
    warnings = [line for line in log.splitlines() if re.search(r"\bwarning\b", line, re.IGNORECASE)]
    assert not warnings, f"{src.name} ({arch}) compiles with warnings:\n" + "\n".join(warnings[:20])
    entries = re.findall(rf"Compiling entry function '([^']+)' for '{arch}'", log)
    assert entries, (
        f"ptxas reported no kernel for {src.name} ({arch}); is -Xptxas -v honoured?\n{log[-2000:]}"
    )
    reports = _function_reports(log)
    assert len(reports) >= len(entries), f"missing 'Function properties' lines for {src.name} ({arch})"
    spilling = [r for r in reports if r[1] or r[2]]
    assert not spilling, f"{src.name} ({arch}) spills registers: " + "; ".join(
        f"{name}: {st} bytes stores, {ld} bytes loads" for name, st, ld in spilling
    )


@needs_cxx
def test_order_header_is_plain_host_cpp(tmp_path):
    """band_order.h (used by the kernels and by the host reference) needs no CUDA header outside nvcc."""
    src = tmp_path / "tu.cpp"
    src.write_text(
        '#include "cuda/band_order.h"\nint main() { return fastcache_rt::cuda::order::ceil_log2(5) - 3; }\n'
    )
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC), str(src)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"band_order.h does not compile as host C++:\n{proc.stdout}{proc.stderr}"


def _binding_includes() -> list[str] | None:
    """-I flags for bindings.cpp: pybind11 (its package, or the copy torch ships), Python, the CUDA runtime API."""
    dirs = []
    try:
        import pybind11

        dirs.append(pybind11.get_include())
    except ImportError:
        try:
            import torch.utils.cpp_extension as ext
        except ImportError:
            return None
        dirs.extend(d for d in ext.include_paths() if (Path(d) / "pybind11" / "pybind11.h").is_file())
    python_inc = sysconfig.get_paths().get("include")
    if not dirs or not python_inc or not (Path(python_inc) / "Python.h").is_file():
        return None
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        roots.append(str(Path(NVCC).resolve().parents[1]))
        if Path(NVCC).stat().st_size < 4096:  # a wrapper script: the nvcc it runs
            text = Path(NVCC).read_text(errors="ignore")
            roots.extend(str(Path(m).parents[1]) for m in re.findall(r"(/\S+/bin/nvcc)\b", text))
    roots.append("/usr/local/cuda")
    found = [
        Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cuda_runtime_api.h").is_file()
    ]
    if not found:
        return None
    cuda_inc = found[0]
    return [f"-I{d}" for d in (*dirs, python_inc, str(cuda_inc))]


@needs_cxx
def test_bindings_compile_against_launchers():
    includes = _binding_includes()
    if includes is None:
        pytest.skip("pybind11, the Python headers or the CUDA headers are missing")
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-I", str(CSRC), *includes,
           str(CSRC / "cuda" / "bindings.cpp")]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"csrc/cuda/bindings.cpp does not compile:\n{(proc.stdout + proc.stderr)[-6000:]}"
    )
