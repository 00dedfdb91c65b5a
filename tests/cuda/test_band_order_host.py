"""Host reference of the CUDA band_l1 order, no GPU needed: tests/cuda/band_order_host.cpp (the exact group sum and
the whole tile / level-1 / level-2 band sum of csrc/cuda/band_order.h, the header the kernels use) is built with a
host C++ compiler and compared bit for bit with ``_reference.exact_group_sum`` and ``_reference.band_l1_gpu_order``
on random inputs of odd sizes with NaN, Inf, zeros, tiny and huge values. Skipped when no host compiler is found."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcache_rt.ops import _reference as ref

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
PROGRAM = Path(__file__).resolve().parent / "band_order_host.cpp"
HEADER = CSRC / "cuda" / "band_order.h"
CXX = next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)
LEVEL2_THREADS = 128  # kThreads of csrc/cuda/band_l1.cu: the last block's lanes

pytestmark = [
    pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++, c++, clang++) on PATH"),
    pytest.mark.slow,  # a host C++ compile
]


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("band_order_host") / "band_order_host"
    cmd = [
        shutil.which(CXX), "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
        "-I", str(CSRC), str(PROGRAM), "-o", str(exe),
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"host build of {PROGRAM.name} failed:\n{proc.stdout}{proc.stderr}"
    return exe


def _run(program: Path, *args: str) -> None:
    proc = subprocess.run([str(program), *args], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{program.name} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"


def _bits64(x: torch.Tensor) -> np.ndarray:
    return x.double().contiguous().numpy().view(np.uint64)


def _bits32(x: torch.Tensor) -> np.ndarray:
    return x.float().contiguous().numpy().view(np.uint32)


def test_level2_walk_visits_every_partial_once(program):
    _run(program, "walk")


# ---- exact_group_sum ------------------------------------------------------------------------------------------------


def _group_values(gen: torch.Generator, n: int, kind: str) -> torch.Tensor:
    """n non-negative float64 values over a wide exponent range, with the specials of ``kind``."""
    mant = torch.rand(n, generator=gen, dtype=torch.float64)
    if kind == "narrow":
        v = mant * 3.0
    elif kind == "wide":
        exp = torch.randint(-1000, 1000, (n,), generator=gen)
        v = torch.ldexp(mant, exp)
    elif kind == "tiny":  # down to the double subnormals, next to a normal maximum
        exp = torch.randint(-1080, -1000, (n,), generator=gen)
        v = torch.ldexp(mant, exp)
        v[0] = 2.0**-900
    elif kind == "subnormal":  # every value (the maximum too) a double subnormal: the quantum may underflow
        exp = torch.randint(-1074, -1022, (n,), generator=gen)
        v = torch.ldexp(mant, exp)
        v[0] = 2.0**-1023 + 2.0**-1070
    elif kind == "huge":  # sums that overflow to +Inf
        v = torch.ldexp(0.5 + 0.5 * mant, torch.full((n,), 1023))
    elif kind == "float32":  # the values the kernels see: float32 sums
        scale = 10.0 ** torch.randint(-40, 38, (n,), generator=gen)
        v = (torch.randn(n, generator=gen).abs() * scale).double()
    else:
        raise ValueError(kind)
    zeros = torch.rand(n, generator=gen) < 0.1
    v[zeros] = 0.0
    return v


GROUP_CASES = [
    (n, kind, special)
    for n in (1, 2, 3, 7, 100, 255, 256, 257, 1000)
    for kind in ("narrow", "wide", "tiny", "subnormal", "huge", "float32")
    for special in ("none", "nan", "inf", "both", "zeros")
]


def test_exact_group_sum_matches_reference(program, tmp_path):
    gen = torch.Generator().manual_seed(1234)
    groups = []
    for n, kind, special in GROUP_CASES:
        v = _group_values(gen, n, kind)
        if special in ("nan", "both"):
            v[torch.randint(0, n, (1,), generator=gen)] = math.nan
        if special in ("inf", "both"):
            v[torch.randint(0, n, (1,), generator=gen)] = math.inf
        if special == "zeros":
            v.zero_()
        log2_n = max(0, math.ceil(math.log2(n))) if n > 1 else 0
        for lg in {log2_n, log2_n + 3, 8 if n <= 256 else log2_n}:
            groups.append((v, lg))
    blob = [np.array([len(groups)], dtype=np.int64).tobytes()]
    for v, lg in groups:
        blob.append(np.array([v.numel(), lg], dtype=np.int64).tobytes())
        blob.append(v.numpy().astype(np.float64).tobytes())
    (tmp_path / "in.bin").write_bytes(b"".join(blob))
    _run(program, "group", str(tmp_path / "in.bin"), str(tmp_path / "out.bin"))
    got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float64))
    assert got.numel() == len(groups)
    want = torch.stack([ref.exact_group_sum(v.unsqueeze(0), 1, lg)[0] for v, lg in groups])
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = torch.isnan(got) | torch.from_numpy(_bits64(got) == _bits64(want))
    bad = torch.nonzero(~ok).flatten().tolist()
    assert not bad, "exact_group_sum differs: " + "; ".join(
        f"case {i} (n={groups[i][0].numel()}, log2_n={groups[i][1]}): host {got[i].item()!r} vs reference "
        f"{want[i].item()!r}"
        for i in bad[:5]
    )


def test_ceil_log2_matches_reference(program, tmp_path):
    n = torch.tensor(
        [0, 1, 2, 3, 4, 5, 255, 256, 257, 1000, 2**31 - 1, 2**31, 2**31 + 1, 2**40 + 1, 2**62, 2**63 - 1]
    )
    (tmp_path / "in.bin").write_bytes(np.array([n.numel()], dtype=np.int64).tobytes() + n.numpy().tobytes())
    _run(program, "log2", str(tmp_path / "in.bin"), str(tmp_path / "out.bin"))
    got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.int64))
    assert torch.equal(got, ref.ceil_log2(n)), (
        f"ceil_log2: host {got.tolist()} vs reference {ref.ceil_log2(n).tolist()}"
    )


# ---- the whole band sum ---------------------------------------------------------------------------------------------


def _bounds(gen: torch.Generator, D: int, nb: int) -> torch.Tensor:
    nb = min(nb, D)
    cuts = torch.randperm(D - 1, generator=gen)[: nb - 1] + 1 if nb > 1 else torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), cuts.sort().values, torch.tensor([D])])


def _features(gen: torch.Generator, shape, dtype, special: str) -> tuple[torch.Tensor, torch.Tensor]:
    cur = torch.randn(shape, generator=gen)
    prev = torch.randn(shape, generator=gen)
    n = cur.numel()

    def pick(frac):
        return torch.rand(shape, generator=gen) < frac

    if special == "scales":  # per-element magnitudes from 1e-40 (float32 subnormal) to 1e30
        cur = cur * 10.0 ** torch.randint(-40, 31, shape, generator=gen).float()
        prev = prev * 10.0 ** torch.randint(-40, 31, shape, generator=gen).float()
    elif special == "tiny":
        cur, prev = cur * 1e-42, prev * 1e-41
    elif special == "huge":  # float32 sums overflow to Inf
        cur, prev = cur * 3e38, prev * 1e38
    elif special == "zeros":
        cur[pick(0.5)] = 0.0
        prev = torch.where(pick(0.5), cur, prev)  # equal entries: zero differences
        prev[pick(0.3)] = 0.0
    elif special == "nonfinite" and n > 0:
        cur[pick(0.002)] = math.nan
        prev[pick(0.002)] = math.inf
        cur[pick(0.002)] = -math.inf
    return cur.to(dtype), prev.to(dtype)


BAND_SHAPES = [
    # (B, R, D, nb)
    (1, 1, 1, 1),
    (1, 64, 256, 1),
    (2, 65, 257, 3),
    (3, 7, 600, 4),
    (1, 130, 1000, 5),
    (2, 200, 513, 2),
    (5, 3, 37, 7),
    (1, 129, 2048, 8),
    (2, 64, 768, 16),
    (0, 5, 300, 2),
    (2, 0, 300, 2),
]
SPECIALS = ("plain", "scales", "tiny", "huge", "zeros", "nonfinite", "ties")


def _ties(gen: torch.Generator, shape, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Band sums at a float32 rounding midpoint (1 + 2^-24) plus two tiny values 2^-43 .. 2^-54 in other channels, rows
    and samples: whether a tiny value survives the level-1 / level-2 truncation (its quantum, log2_n) decides the
    rounding, so these inputs see every detail of the exact sums, not only the float32 result."""
    B, R, _ = shape
    v = torch.zeros(shape)
    for b in range(B if R > 0 else 0):
        for k in range(bounds.numel() - 1):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            v[b, 0, lo] = 1.0
            if hi - lo >= 2:
                v[b, 0, lo + 1] = 2.0**-24
            for _ in range(2):  # 2^-s next to 1: it survives a level-2 truncation iff s <= 52 - log2_n
                r = int(torch.randint(0, R, (1,), generator=gen))
                d = int(torch.randint(lo, hi, (1,), generator=gen))
                v[b, r, d] += 2.0 ** -int(torch.randint(43, 55, (1,), generator=gen))
    return 2.0 * v, v  # diff = |2v - v| = v, mag = v


@pytest.mark.parametrize("special", SPECIALS)
def test_band_sum_matches_gpu_order_reference(program, tmp_path, special):
    gen = torch.Generator().manual_seed(sum(map(ord, special)))
    for case, (B, R, D, nb) in enumerate(BAND_SHAPES):
        dtype = (torch.float32, torch.float16, torch.bfloat16)[case % 3]
        if special in ("tiny", "huge", "scales") and dtype != torch.float32:
            dtype = torch.float32 if case % 2 else dtype  # keep some low-precision cases (their own range)
        bounds = _bounds(gen, D, nb)
        nb = bounds.numel() - 1
        if special == "ties":
            cur, prev = _ties(gen, (B, R, D), bounds)
        else:
            cur, prev = _features(gen, (B, R, D), dtype, special)
        for per_sample in (False, True):
            rows = B if per_sample else 1
            want = torch.full((rows, nb, 2), -7.0)
            ref.band_l1_gpu_order(cur, prev, bounds, per_sample, want)
            head = np.array([B, R, D, nb, int(per_sample), LEVEL2_THREADS], dtype=np.int64).tobytes()
            body = bounds.numpy().astype(np.int64).tobytes()
            body += cur.float().contiguous().numpy().tobytes() + prev.float().contiguous().numpy().tobytes()
            (tmp_path / "in.bin").write_bytes(head + body)
            _run(program, "band", str(tmp_path / "in.bin"), str(tmp_path / "out.bin"))
            got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32)).view(rows, nb, 2)
            same = _bits32(got) == _bits32(want)
            assert same.all(), (
                f"{special} case {case} (B={B}, R={R}, D={D}, nb={nb}, {dtype}, per_sample={per_sample}): "
                f"host {got[torch.from_numpy(~same)][:6].tolist()} vs reference "
                f"{want[torch.from_numpy(~same)][:6].tolist()}"
            )
