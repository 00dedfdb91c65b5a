"""The analysis on hand-made table rows with known answers."""

import pytest

from fastcache_rt.bench import analysis as A


def row(lib, method, config, nfe, speedup, psnr, tags=(), note="", steps=50):
    return dict(key=f"{lib}/{method}/{config}", library=lib, method=method, config=config, nfe=nfe, steps=steps,
                ideal_speedup=steps / nfe, speedup=speedup, achieved_of_ideal=speedup / (steps / nfe), psnr=psnr,
                ssim=0.9, rel_l2=0.1, cache_bytes=100 * nfe, tags=list(tags), note=note,
                controller_ms_per_step=None, skipped_step_cost=None)


ROWS = [
    dict(row("-", "uncached", "every step", 50, 1.0, None), psnr=None),
    row("fastcache_rt", "spectrum", "a", 14, 3.5, 30.0, ["budget14"]),
    row("fastcache_rt", "taylorseer", "a", 14, 3.5, 28.0, ["budget14"]),
    row("fastcache_rt", "freqca", "a", 14, 3.3, 27.0, ["budget14"]),
    row("fastcache_rt", "fora", "a", 14, 3.6, 25.0, ["budget14"]),
    row("fastcache_rt", "spectrum", "b", 10, 4.9, 22.0, ["budget10"]),
    row("fastcache_rt", "taylorseer", "b", 10, 4.9, 24.0, ["budget10"]),
    row("fastcache_rt", "freqca", "b", 10, 4.8, 21.0, ["budget10"]),
    row("fastcache_rt", "fora", "b", 10, 5.0, 20.0, ["budget10"]),
    row("fastcache_rt", "teacache", "t1", 25, 2.0, 40.0),
    row("fastcache_rt", "teacache", "t2", 12, 4.0, 30.0),
    row("fastcache_rt", "spectralcache", "s1", 20, 3.3, 35.0),
    row("diffusers", "MagCache", "m", 20, 2.0, 29.0),
    row("cache-dit", "DBCache", "d", 50, 1.2, 45.0, note="first block runs every step"),
]


def test_budgets_ordering():
    b = A.budgets(ROWS)
    assert b["14"]["nfe_matched"] and b["14"]["order"] == ["spectrum", "taylorseer", "freqca", "fora"]
    assert b["14"]["paper_order_holds"] and b["14"]["spectrum_best"]
    assert b["10"]["order"][0] == "taylorseer" and not b["10"]["paper_order_holds"]
    assert "skipped" in A.budgets([dict(r, steps=20) for r in ROWS])


def test_matched_quality_interpolates_on_the_frontier():
    c = A.matched_quality(ROWS)
    # TeaCache frontier (30 dB, 4.0x) - (40 dB, 2.0x): at 35 dB, 3.0x; SpectralCache 3.3x there: +10%
    (comp,) = c["comparisons"]
    assert comp["psnr"] == 35.0 and comp["teacache"] == pytest.approx(3.0) and comp["gain"] == pytest.approx(0.1)
    assert A.frontier([(1, 5), (2, 4), (3, 1), (2, 3), (0, 4)]) == [(1, 5), (2, 4), (3, 1)]


def test_pareto_exceptions_and_overhead():
    p = A.pareto(ROWS)
    by = {x["peer"]: x for x in p["points"]}
    # 2.0x at 29 dB: covered by several; the fastest of them is reported (teacache t2, 4.0x at 30 dB)
    assert by["diffusers/MagCache/m"]["covered"]
    assert by["diffusers/MagCache/m"]["by"] == "fastcache_rt/teacache/t2"
    assert p["exceptions"] == ["cache-dit/DBCache/d"]  # 45 dB at 1.2x: nothing of ours is that close
    o = A.overhead(ROWS)
    assert "fastcache_rt/spectrum" in o["passed"] and "fastcache_rt/teacache" in o["passed"]
    assert "diffusers/MagCache" in o["failed"]  # 2.0x of an ideal 2.5x: 80%
