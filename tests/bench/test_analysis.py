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


# ------------------------------------------------------------------------------------------ spread, timing, setting
def test_quality_spread_over_the_images():
    from fastcache_rt.bench.harness import quality_spread

    per = [dict(psnr=30.0, ssim=0.9, rel_l2=0.1), dict(psnr=40.0, ssim=0.8, rel_l2=0.3),
           dict(psnr=35.0, ssim=1.0, rel_l2=0.2)]
    q = quality_spread(per)
    assert q["psnr"] == pytest.approx(35.0) and q["psnr_min"] == 30.0 and q["psnr_max"] == 40.0
    assert q["psnr_std"] == pytest.approx((50 / 3) ** 0.5)  # population sd of 30, 40, 35
    assert q["ssim"] == pytest.approx(0.9) and q["ssim_min"] == 0.8
    assert q["rel_l2_mean"] == pytest.approx(0.2) and q["rel_l2_max"] == 0.3 and "rel_l2" not in q
    ref = quality_spread([dict(psnr=None, ssim=1.0, rel_l2=0.0)])  # the uncached row
    assert ref["psnr"] is None and ref["psnr_min"] is None and ref["ssim_std"] == 0.0


def test_skipped_step_cost_only_where_the_rounds_agree():
    from fastcache_rt.bench.harness import skip_cost, timing_spread

    calls, nfe = 10, 4  # a full call costs u / 10; a skipped one c u / 10: t = (4 + 6 c) u / 10
    def pair(c, u=1.0):
        return ((nfe + (calls - nfe) * c) * u / calls, u)

    ok = skip_cost([pair(0.20), pair(0.22), pair(0.21)], nfe, calls)
    assert ok["skipped_step_cost_measurable"] and ok["skipped_step_cost"] == pytest.approx(0.21)
    assert ok["skipped_step_cost_min"] == pytest.approx(0.20) and ok["skipped_step_cost_max"] == pytest.approx(0.22)
    # the rounds disagree by more than the value (today's negative shares): not measurable, but kept
    noisy = skip_cost([pair(-0.05), pair(0.10)], nfe, calls)
    assert noisy["skipped_step_cost"] is None and noisy["skipped_step_cost_measurable"] is False
    assert noisy["skipped_step_cost_median"] == pytest.approx(0.025)
    negative = skip_cost([pair(-0.10), pair(-0.09)], nfe, calls)  # a narrow range, but below 0
    assert negative["skipped_step_cost"] is None
    assert skip_cost([pair(0.2)], nfe, calls)["skipped_step_cost"] is None  # one round: no range to judge by
    assert skip_cost([pair(0.2)], calls, calls)["skipped_step_cost_median"] is None  # nothing skipped
    assert timing_spread([2.0, 1.0, 4.0], "speedup") == dict(speedup=2.0, speedup_min=1.0, speedup_max=4.0)


def _spread_row(r, psnr_min=None):
    p = r["psnr"]
    return dict(r, psnr_min=psnr_min if p is not None else None, psnr_max=p, psnr_std=1.5 if p else None,
                ssim_min=0.8, ssim_max=1.0, ssim_std=0.05, rel_l2_mean=0.1, rel_l2_min=0.05, rel_l2_max=0.2,
                rel_l2_std=0.03, speedup_min=r["speedup"] * 0.9, speedup_max=r["speedup"] * 1.1,
                skipped_step_cost=None, skipped_step_cost_median=-0.04, skipped_step_cost_min=-0.2,
                skipped_step_cost_max=0.1, skipped_step_cost_measurable=False, true_cfg_scale=4.0, steps=28,
                calls=56)


def test_markdown_states_the_setting_spread_and_ranges():
    rows = [_spread_row(dict(r, steps=28), psnr_min=(r["psnr"] or 0) - 3) for r in ROWS]
    meta = dict(steps=28, true_cfg_scale=4.0, negative_prompt="", calls_per_step=2, calls=56, batch=8,
                prompts=["a"] * 8, seeds=[0], height=32, width=32, rounds=3, uncached_time_s=5.6)
    an = A.analyse(rows, meta)
    assert an["setting"]["steps"] == 28 and an["setting"]["true_cfg_scale"] == 4.0
    assert an["spread"]["fastcache_rt/spectrum/a"]["psnr"] == dict(mean=30.0, min=27.0, max=30.0, std=1.5)
    assert "skipped" in an["budgets"]  # 28 steps: the 50-step budgets do not apply
    md = A.markdown(an, meta)
    assert "28 steps, true CFG 4 (negative prompt '', 2 transformer calls per step)" in md
    assert "| fastcache_rt/spectrum/a | 14 | 30.00 | 27.00 | 1.50 |" in md  # mean, min, sd of the PSNR
    assert "| 3.15-3.85 |" in md  # the speedup's range over the rounds
    assert "n/m (median -4%, range -20% to 10%)" in md and "skipped call / full call" in md
    assert "-4.0%" not in md  # no negative share given as a value
    off = A.markdown(A.analyse(ROWS), dict(steps=50, batch=1, prompts=["a"], seeds=[0]))
    assert "50 steps, no true CFG" in off


def test_budgets_count_full_steps_per_branch_under_true_cfg():
    rows = [dict(r, nfe=2 * r["nfe"], calls=100) for r in ROWS]  # 50 steps, two calls a step
    b = A.budgets(rows)
    assert b["14"]["nfe_matched"] and b["14"]["entries"]["spectrum"]["nfe"] == 14


def test_pareto_plot_draws_adaptive_as_its_own_series():
    from fastcache_rt.bench import report as R

    rows = ROWS + [row("fastcache_rt", "adaptive", f"tol={t}", n, s, p)
                   for t, n, s, p in ((0.1, 31, 1.5, 58.0), (0.3, 16, 2.9, 48.8), (0.5, 14, 3.3, 45.0))]
    series = {s["label"]: s for s in R.pareto_series(rows)}
    ad = series["adaptive [fastcache_rt]"]
    assert ad["marker"] == "*" and sorted(ad["points"]) == [(45.0, 3.3), (48.8, 2.9), (58.0, 1.5)]
    assert ad["frontier"] == [(45.0, 3.3), (48.8, 2.9), (58.0, 1.5)]
    assert series["spectrum [fastcache_rt]"]["marker"] == "o"
    png = R.pareto_png(rows, dict(steps=28, true_cfg_scale=4.0, negative_prompt="", calls_per_step=2, batch=8))
    assert png[:4] == b"\x89PNG"
    assert "tol=0.3" in R.csv_bytes(rows).decode()


def test_tolerance_plot_reads_the_tolerance_of_each_adaptive_row():
    from fastcache_rt.bench import report as R

    ada = [dict(row("fastcache_rt", "adaptive", f"tol={t}", n, s, p), settings=dict(tol=t), psnr_min=p - 2,
                psnr_max=p + 1) for t, n, s, p in ((0.5, 14, 3.3, 45.0), (0.1, 31, 1.5, 58.0), (0.3, 16, 2.9, 48.8))]
    assert [r["settings"]["tol"] for r in R.tolerance_rows(ROWS + ada)] == [0.1, 0.3, 0.5]  # sorted by tol
    assert R.tolerance_rows(ROWS) == [] and R.tolerance_png(ROWS) is None  # no adaptive rows: no plot
    png = R.tolerance_png(ROWS + ada, dict(steps=50, batch=8))
    assert png[:4] == b"\x89PNG"


def test_error_control_targets_on_known_rows():
    fixed = [dict(row("fastcache_rt", "spectrum", f"a{n}", n, 3.0, p), psnr_std=s)
             for n, p, s in ((20, 56.0, 3.0), (13, 46.0, 2.0), (10, 40.5, 4.0))]
    peers = [row("diffusers", "TaylorSeerCache lite", "i6", 11, 4.7, 40.0), row("cache-dit", "DBCache", "t", 27, 1.5, 56.8)]
    ada = [dict(row("fastcache_rt", "adaptive", f"tol={t}", n, 3.0, p), psnr_std=s)
           for t, n, p, s in ((0.1, 22, 57.0, 1.0), (0.3, 13, 47.0, 2.5), (0.8, 8, 41.0, 1.0))]
    e = A.error_control([ROWS[0]] + fixed + peers + ada)
    by = {x["peer"]: x for x in e["peers"]}
    lite = by["diffusers/TaylorSeerCache lite/i6"]
    assert lite["by"] == "fastcache_rt/adaptive/tol=0.8" and lite["limit"] == pytest.approx(11 / 1.3) and lite["met"]
    db = by["cache-dit/DBCache/t"]  # 22 steps for 56.8 dB: more than 27 / 1.3
    assert db["by_nfe"] == 22 and not db["met"] and e["peers_met"] == 1
    t = {x["target"]: x for x in e["targets"]}
    assert t[40.0]["fixed_nfe"] == 10 and t[40.0]["adaptive_nfe"] == 8 and t[40.0]["met"]  # 8 <= 0.85 * 10
    assert t[45.0]["fixed_nfe"] == 13 and t[45.0]["adaptive_nfe"] == 13 and not t[45.0]["met"]
    assert t[55.0]["saving"] == pytest.approx(1 - 22 / 20) and not t[55.0]["met"]
    assert t[50.0]["met"] is False and e["targets_met"] == 1 and e["targets_compared"] == 4
    e2 = A.error_control([ROWS[0]] + fixed[1:] + peers + ada)  # no fixed row reaches 50 or 55 dB: not compared
    assert [x["met"] for x in e2["targets"]] == [True, False, None, None] and e2["targets_compared"] == 2
    sp = {x["adaptive"]: x for x in e["spreads"]}
    assert sp["fastcache_rt/adaptive/tol=0.3"]["fixed_std"] == 2.0 and not sp["fastcache_rt/adaptive/tol=0.3"]["steadier"]
    # against the best fixed schedule at that NFE (the highest PSNR), not the steadiest
    worse = dict(row("fastcache_rt", "fora", "i", 13, 3.0, 30.0), psnr_std=0.1)
    sp2 = {x["adaptive"]: x for x in A.error_control([ROWS[0]] + fixed + [worse] + ada)["spreads"]}
    assert sp2["fastcache_rt/adaptive/tol=0.3"]["fixed"] == "fastcache_rt/spectrum/a13"
    assert "fastcache_rt/adaptive/tol=0.8" not in sp  # no fixed row within one step
    assert A.error_control(ROWS) == dict(present=False)
    md = A.markdown(A.analyse([ROWS[0]] + fixed + peers + ada, dict(steps=50)), dict(steps=50))
    assert "## (f)" in md and "1 of 2 peer points met" in md and "1 of 4 comparable targets met" in md
