"""Compile check of the CUDA kernels, no GPU needed: every csrc/cuda/*.cu builds with nvcc for sm_80 and sm_90
without warnings, and ptxas (-Xptxas -v) reports 0 bytes of spill stores and loads for every function.

All (file, arch) compiles run concurrently once per module; each test then checks one of them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


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
