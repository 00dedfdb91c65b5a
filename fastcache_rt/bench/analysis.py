"""The questions the benchmark answers, computed from its table rows (dicts as written to table.json)."""

from __future__ import annotations

import itertools
import math

from .methods import BUDGET_STEPS, CACHE_DIT, DIFFUSERS, OURS

OVERHEAD_TARGET = 0.95  # achieved wall speedup / ideal S/NFE


def setting_line(meta: dict) -> str:
    """The setting a table was measured at: steps and guidance, e.g. "28 steps, true CFG 4 (negative prompt '',
    2 transformer calls per step)"."""
    steps = meta.get("steps")
    cfg = meta.get("true_cfg_scale")
    if cfg:
        guidance = (f"true CFG {cfg:g} (negative prompt {meta.get('negative_prompt') or ''!r}, "
                    f"{meta.get('calls_per_step', 2)} transformer calls per step)")
    else:
        guidance = "no true CFG (1 transformer call per step)"
    return f"{steps} steps, {guidance}"


def _cached_rows(rows):
    return [r for r in rows if r["library"] != "-"]


def _psnr(r) -> float:
    return r["psnr"] if r["psnr"] is not None else math.inf


def overhead(rows) -> dict:
    """(a) achieved speedup >= 95% of S/NFE, per configuration and per method (all its settings)."""
    per_cfg = []
    for r in _cached_rows(rows):
        full_skip = "every step" not in r.get("note", "") and "MLPs run" not in r.get("note", "")
        per_cfg.append(dict(key=r["key"], method=r["method"], library=r["library"], nfe=r["nfe"],
                            ideal=r["ideal_speedup"], speedup=r["speedup"], speedup_min=r.get("speedup_min"),
                            speedup_max=r.get("speedup_max"), ratio=r["achieved_of_ideal"],
                            passed=r["achieved_of_ideal"] >= OVERHEAD_TARGET, full_skip=full_skip,
                            controller_ms_per_step=r.get("controller_ms_per_step"),
                            skipped_step_cost=r.get("skipped_step_cost"),
                            skipped_step_cost_median=r.get("skipped_step_cost_median"),
                            skipped_step_cost_min=r.get("skipped_step_cost_min"),
                            skipped_step_cost_max=r.get("skipped_step_cost_max"),
                            skipped_step_cost_measurable=r.get("skipped_step_cost_measurable")))
    methods: dict = {}
    for c in per_cfg:
        m = methods.setdefault(f"{c['library']}/{c['method']}", dict(passed=True, worst=math.inf, configs=0))
        m["passed"] = m["passed"] and c["passed"]
        m["worst"] = min(m["worst"], c["ratio"])
        m["configs"] += 1
    return dict(target=OVERHEAD_TARGET, configs=per_cfg, methods=methods,
                passed=[k for k, v in methods.items() if v["passed"]],
                failed=[k for k, v in methods.items() if not v["passed"]])


def budgets(rows) -> dict:
    """(b) at 50 steps, 14 and 10 full steps: PSNR of Spectrum, TaylorSeer, FreqCa and FORA at exactly the same
    NFE; is Spectrum > TaylorSeer/FreqCa > FORA?"""
    out = {}
    steps = {r["steps"] for r in rows}
    if steps != {BUDGET_STEPS}:
        return dict(skipped=f"needs a {BUDGET_STEPS}-step run (this one: {sorted(steps)})")
    for n in (14, 10):
        entries = {}
        for r in rows:
            if r["library"] == OURS and f"budget{n}" in r.get("tags", []) and \
                    r["method"] in ("spectrum", "taylorseer", "freqca", "fora"):
                # full steps: computed transformer calls per branch (true CFG runs two a step)
                per_step = r.get("calls", r["steps"]) // r["steps"] or 1
                entries[r["method"]] = dict(key=r["key"], nfe=r["nfe"] // per_step, psnr=r["psnr"], ssim=r["ssim"],
                                            rel_l2=r["rel_l2"], speedup=r["speedup"])
        matched = len({e["nfe"] for e in entries.values()}) == 1 and all(e["nfe"] == n for e in entries.values())
        res = dict(entries=entries, nfe_matched=matched)
        if {"spectrum", "taylorseer", "freqca", "fora"} <= set(entries):
            p = {k: _psnr(v) for k, v in entries.items()}
            res["order"] = sorted(p, key=lambda k: -p[k])
            res["paper_order_holds"] = p["spectrum"] > max(p["taylorseer"], p["freqca"]) and \
                min(p["taylorseer"], p["freqca"]) > p["fora"]
            res["spectrum_best"] = p["spectrum"] > max(p["taylorseer"], p["freqca"], p["fora"])
        out[str(n)] = res
    return out


def frontier(points):
    """Pareto frontier of (psnr, speedup) points, both higher-is-better, sorted by PSNR ascending."""
    pts = sorted(points, key=lambda p: (-p[0], -p[1]))
    front, best = [], -math.inf
    for p in pts:
        if p[1] > best:
            front.append(p)
            best = p[1]
    return sorted(front)


def _interp(front, psnr):
    """Speedup on a frontier (sorted by PSNR) at a PSNR, linear between points; None outside its range."""
    if not front or psnr < front[0][0] or psnr > front[-1][0]:
        return None
    for (x0, y0), (x1, y1) in itertools.pairwise(front):
        if x0 <= psnr <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (psnr - x0) / (x1 - x0)
    return front[-1][1] if psnr == front[-1][0] else None


def matched_quality(rows, a="spectralcache", b="teacache", field="speedup") -> dict:
    """(c) speed of ``a`` over ``b`` at equal PSNR: at each of a's points, b's frontier interpolated at that PSNR
    (linear in PSNR between b's points); only PSNRs inside b's measured range count."""
    pa = [(_psnr(r), r[field]) for r in rows if r["library"] == OURS and r["method"] == a]
    pb = [(_psnr(r), r[field]) for r in rows if r["library"] == OURS and r["method"] == b]
    fa, fb = frontier(pa), frontier(pb)
    comps = []
    for psnr, sp in fa:
        other = _interp(fb, psnr)
        if other is not None and other > 0:
            comps.append(dict(psnr=psnr, **{a: sp, b: other}, gain=sp / other - 1))
    mean_gain = sum(c["gain"] for c in comps) / len(comps) if comps else None
    return dict(field=field, frontier={a: fa, b: fb}, comparisons=comps, mean_gain=mean_gain,
                claim=0.16, a=a, b=b)


def pareto(rows, field="speedup") -> dict:
    """(d) for each peer configuration: a fastcache_rt configuration at least as fast and at least as close?"""
    ours = [r for r in rows if r["library"] == OURS]
    res = []
    for p in rows:
        if p["library"] not in (DIFFUSERS, CACHE_DIT):
            continue
        dom = [o for o in ours if o[field] >= p[field] and _psnr(o) >= _psnr(p)]
        best = max(dom, key=lambda o: (o[field], _psnr(o))) if dom else None
        res.append(dict(peer=p["key"], peer_speedup=p[field], peer_psnr=p["psnr"], covered=best is not None,
                        by=best["key"] if best else None, by_speedup=best[field] if best else None,
                        by_psnr=best["psnr"] if best else None))
    return dict(field=field, points=res, exceptions=[r["peer"] for r in res if not r["covered"]])


# the error-controlled method's targets (issue-style acceptance, measured on the benchmark's own rows): fewer computed
# steps than every peer point by this factor at the peer's PSNR, and than the best fixed-schedule preset at each
# PSNR target by this share
ADAPTIVE = "adaptive"
FIXED_SCHEDULES = ("spectrum", "taylorseer", "freqca", "fora")
PEER_FACTOR = 1.3
FIXED_TARGETS = (40.0, 45.0, 50.0, 55.0)
FIXED_SHARE = 0.85


def _fewest(rows, psnr: float):
    """The row with the fewest computed steps reaching ``psnr`` (ties: the higher PSNR), or None."""
    ok = [r for r in rows if _psnr(r) >= psnr]
    return min(ok, key=lambda r: (r["nfe"], -_psnr(r))) if ok else None


def error_control(rows) -> dict:
    """(f) the error-controlled rows against (1) every peer point: an adaptive setting reaching the peer's PSNR
    with at most the peer's NFE / 1.3; (2) the best fixed-schedule preset at 40, 45, 50 and 55 dB: at most 85 % of
    its NFE; (3) the PSNR spread over the images at equal NFE (against the best fixed-schedule row of the same NFE,
    else within one step). A target no fixed-schedule row of the sweep reaches is not compared (``met`` None)."""
    ours = [r for r in rows if r["library"] == OURS]
    ada = [r for r in ours if r["method"] == ADAPTIVE]
    if not ada:
        return dict(present=False)
    fixed = [r for r in ours if r["method"] in FIXED_SCHEDULES]
    peers = []
    for p in rows:
        if p["library"] not in (DIFFUSERS, CACHE_DIT) or p["psnr"] is None:
            continue
        best = _fewest(ada, p["psnr"])
        limit = p["nfe"] / PEER_FACTOR
        peers.append(dict(peer=p["key"], peer_nfe=p["nfe"], peer_psnr=p["psnr"], limit=limit,
                          by=best["key"] if best else None, by_nfe=best["nfe"] if best else None,
                          by_psnr=best["psnr"] if best else None, met=best is not None and best["nfe"] <= limit))
    targets = []
    for t in FIXED_TARGETS:
        a, f = _fewest(ada, t), _fewest(fixed, t)
        # None: no fixed-schedule row of the sweep reaches the target (nothing to compare with)
        met = None if f is None else (a is not None and a["nfe"] <= FIXED_SHARE * f["nfe"])
        targets.append(dict(target=t, adaptive=a["key"] if a else None, adaptive_nfe=a["nfe"] if a else None,
                            adaptive_psnr=a["psnr"] if a else None, fixed=f["key"] if f else None,
                            fixed_nfe=f["nfe"] if f else None, fixed_psnr=f["psnr"] if f else None,
                            saving=(1 - a["nfe"] / f["nfe"]) if a and f else None, met=met))
    spreads = []
    for a in ada:
        near = [f for f in fixed if abs(f["nfe"] - a["nfe"]) <= 1 and f.get("psnr_std") is not None]
        if not near or a.get("psnr_std") is None:
            continue
        # the best fixed schedule at that NFE: the closest NFE, then the highest PSNR
        f = min(near, key=lambda f: (abs(f["nfe"] - a["nfe"]), -_psnr(f)))
        spreads.append(dict(adaptive=a["key"], nfe=a["nfe"], psnr=a["psnr"], std=a["psnr_std"],
                            fixed=f["key"], fixed_nfe=f["nfe"], fixed_psnr=f["psnr"], fixed_std=f["psnr_std"],
                            steadier=a["psnr_std"] < f["psnr_std"]))
    return dict(present=True, peer_factor=PEER_FACTOR, fixed_share=FIXED_SHARE, peers=peers, targets=targets,
                spreads=spreads, peers_met=sum(x["met"] for x in peers), targets_met=sum(x["met"] is True for x in targets),
                targets_compared=sum(x["met"] is not None for x in targets),
                steadier=sum(x["steadier"] for x in spreads))


def memory(rows) -> dict:
    """(e) cache bytes per configuration, and per method the largest."""
    per = {}
    for r in _cached_rows(rows):
        k = f"{r['library']}/{r['method']}"
        per[k] = max(per.get(k, 0), int(r["cache_bytes"] or 0))
    return dict(per_method=per, per_config={r["key"]: r["cache_bytes"] for r in _cached_rows(rows)})


QUALITY = ("psnr", "ssim", "rel_l2")


def spread(rows) -> dict:
    """Per configuration, each quality metric over the images of the batch (prompts x seeds): mean, min, max and
    standard deviation (``rel_l2``: of the per-image relative L2; the table's ``rel_l2`` is the whole batch's)."""
    out = {}
    for r in _cached_rows(rows):
        e = dict(key=r["key"], method=r["method"], library=r["library"], nfe=r["nfe"])
        for m in QUALITY:
            mean = r.get("rel_l2_mean") if m == "rel_l2" else r.get(m)
            e[m] = dict(mean=mean, min=r.get(f"{m}_min"), max=r.get(f"{m}_max"), std=r.get(f"{m}_std"))
        out[r["key"]] = e
    return out


def setting(rows, meta: dict | None = None) -> dict:
    """The setting the table was measured at: steps and guidance (from the run's meta, else from its rows)."""
    meta = dict(meta or {})
    if "steps" not in meta:
        meta["steps"] = next((r["steps"] for r in rows), None)
    if "true_cfg_scale" not in meta:
        meta["true_cfg_scale"] = next((r.get("true_cfg_scale") for r in rows), None)
    keys = ("steps", "true_cfg_scale", "negative_prompt", "calls_per_step", "batch", "rounds")
    out = {k: meta.get(k) for k in keys}
    out["text"] = setting_line(meta)
    return out


def analyse(rows, meta: dict | None = None) -> dict:
    return dict(setting=setting(rows, meta), spread=spread(rows), overhead=overhead(rows), budgets=budgets(rows),
                spectralcache_vs_teacache=matched_quality(rows),
                spectralcache_vs_teacache_ideal=matched_quality(rows, field="ideal_speedup"),
                pareto=pareto(rows), pareto_ideal=pareto(rows, field="ideal_speedup"), memory=memory(rows),
                error_control=error_control(rows))


def _f(v, fmt="{:.2f}"):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def _signed(v, fmt) -> str:
    t = fmt.format(v)
    return t[1:] if t.startswith("-") and fmt.format(-v) == t[1:] and float(t.rstrip("%x")) == 0 else t  # no "-0%"


def _range(lo, hi, fmt="{:.2f}") -> str:
    if lo is None or hi is None:
        return "-"
    a, b = _signed(lo, fmt), _signed(hi, fmt)
    sep = " to " if a.startswith("-") or b.startswith("-") else "-"  # "-3% to 4%", not "-3%-4%"
    return f"{a}{sep}{b}"


def _skip_cell(c) -> str:
    """The skipped call's share of a full one: its median over the rounds where measurable, else "n/m" with what
    the rounds gave (the median and range), "-" where nothing was skipped."""
    if c.get("skipped_step_cost") is not None:
        return f"{c['skipped_step_cost']:.1%} ({_range(c.get('skipped_step_cost_min'), c.get('skipped_step_cost_max'), '{:.0%}')})"
    if c.get("skipped_step_cost_median") is None:
        return "-"
    return f"n/m (median {_signed(c['skipped_step_cost_median'], '{:.0%}')}, range " \
           f"{_range(c.get('skipped_step_cost_min'), c.get('skipped_step_cost_max'), '{:.0%}')})"


def markdown(an: dict, meta: dict) -> str:
    L = []
    st = an.get("setting") or setting([], meta)
    cps = meta.get("calls_per_step") or 1
    unit = "call" if cps > 1 else "step"
    L.append(f"# Benchmark analysis\n\nSetting: **{st['text']}**. {meta.get('batch')} images per call "
             f"({len(meta.get('prompts', []))} prompts x {len(meta.get('seeds', []))} seeds), {meta.get('height')}x"
             f"{meta.get('width')}, {meta.get('rounds')} timing round(s); uncached call "
             f"{_f(meta.get('uncached_time_s'), '{:.2f}')} s (median).\n")
    if cps > 1:
        L.append(f"With true CFG the pipeline calls the transformer {cps} times per step (cond, then uncond: one cache "
                 f"stream each); NFE counts the transformer calls that ran in full, of {meta.get('calls')}.\n")
    L.append("Speedups are the median over the timing rounds (each against the uncached calls next to it), with "
             "the rounds' min-max range; PSNR / SSIM are means over the images, their spread below.\n")
    L.append("## Quality over prompts x seeds\n")
    L.append("| configuration | NFE | PSNR mean | PSNR min | PSNR sd | SSIM mean | SSIM min | SSIM sd "
             "| rel L2 mean | rel L2 max | rel L2 sd |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for e in an.get("spread", {}).values():
        p, q, r = e["psnr"], e["ssim"], e["rel_l2"]
        L.append(f"| {e['key']} | {e['nfe']} | {_f(p['mean'])} | {_f(p['min'])} | {_f(p['std'])} "
                 f"| {_f(q['mean'], '{:.4f}')} | {_f(q['min'], '{:.4f}')} | {_f(q['std'], '{:.4f}')} "
                 f"| {_f(r['mean'], '{:.4f}')} | {_f(r['max'], '{:.4f}')} | {_f(r['std'], '{:.4f}')} |")
    L.append("\nPer image (prompt x seed) against the uncached image of the same prompt and seed; sd is the "
             "population standard deviation over the images; rel L2 of the final latents, per image (the table's "
             "rel L2 is the whole batch's). An identical image counts as 100 dB.\n")
    o = an["overhead"]
    L.append(f"## (a) Achieved wall speedup vs ideal S/NFE (target >= {o['target']:.0%})\n")
    L.append(f"| configuration | NFE | ideal | achieved (median) | rounds min-max | achieved/ideal "
             f"| skipped {unit} / full {unit} | controller ms/{unit} | pass |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in o["configs"]:
        L.append(f"| {c['key']} | {c['nfe']} | {_f(c['ideal'])} | {_f(c['speedup'])} "
                 f"| {_range(c.get('speedup_min'), c.get('speedup_max'))} | {_f(c['ratio'], '{:.0%}')} "
                 f"| {_skip_cell(c)} | {_f(c['controller_ms_per_step'])} "
                 f"| {'yes' if c['passed'] else 'no'}"
                 f"{'' if c['full_skip'] else ' (partial skip)'} |")
    L.append(f"\nMethods passing at every setting: {', '.join(o['passed']) or 'none'}.  ")
    L.append(f"Methods failing at some setting: {', '.join(o['failed']) or 'none'}.  ")
    calls = meta.get("calls") or meta.get("steps", 1)
    t_call = meta.get("uncached_time_s", 0) / max(calls, 1)
    L.append(f"A full {unit} of the uncached call takes {1e3 * t_call:.1f} ms here. 'skipped {unit} / full {unit}' is "
             f"what a cached {unit} cost, inferred from each round's timed call (its time minus NFE full {unit}s, "
             f"over the skipped ones): the model's embedders, output head, scheduler step and the controller still "
             f"run on it. It is a small difference of two noisy times, so it is given (median over the rounds, "
             f"with their range) only where the range is smaller than the median, from two rounds on; elsewhere "
             f"'n/m' (not measurable here), with what the rounds gave.  ")
    L.append("FBCache-type methods (ours, diffusers FirstBlockCache, cache-dit DBCache) run the first block on every "
             "step and diffusers' TaylorSeerCache runs every MLP on every step, so S/NFE overstates what they can "
             "reach (marked 'partial skip').\n")
    b = an["budgets"]
    L.append("## (b) Spectrum's budgets at 50 steps: PSNR at matched NFE\n")
    if "skipped" in b:
        L.append(f"Skipped: {b['skipped']}.\n")
    else:
        for n, res in b.items():
            L.append(f"**{n} full steps** (NFE matched: {'yes' if res['nfe_matched'] else 'NO'})\n")
            L.append("| method | configuration | NFE | PSNR | SSIM | rel L2 |")
            L.append("| --- | --- | --- | --- | --- | --- |")
            for m, e in sorted(res["entries"].items(), key=lambda kv: -_psnr(kv[1])):
                L.append(f"| {m} | {e['key'].split('/', 2)[-1]} | {e['nfe']} | {_f(e['psnr'])} | {_f(e['ssim'], '{:.4f}')} "
                         f"| {_f(e['rel_l2'], '{:.4f}')} |")
            if "order" in res:
                L.append(f"\nOrder by PSNR: {' > '.join(res['order'])}. Paper's ordering (Spectrum > TaylorSeer/FreqCa "
                         f"> FORA) {'reproduces' if res['paper_order_holds'] else 'does NOT reproduce'}; Spectrum "
                         f"{'is' if res['spectrum_best'] else 'is not'} the best.\n")
    for key, title in (("spectralcache_vs_teacache", "measured wall speedup"),
                       ("spectralcache_vs_teacache_ideal", "ideal S/NFE")):
        c = an[key]
        L.append(f"## (c) SpectralCache vs TeaCache at matched PSNR ({title})\n")
        if c["comparisons"]:
            L.append("| PSNR | SpectralCache | TeaCache (interpolated) | gain |")
            L.append("| --- | --- | --- | --- |")
            for x in c["comparisons"]:
                L.append(f"| {_f(x['psnr'])} | {_f(x[c['a']])} | {_f(x[c['b']])} | {x['gain']:+.1%} |")
            L.append(f"\nMean gain {c['mean_gain']:+.1%} (the paper claims +16%).\n")
        else:
            L.append("No SpectralCache point lies inside TeaCache's measured PSNR range: no matched-quality "
                     "comparison possible from this sweep.\n")
    for key, title in (("pareto", "measured wall speedup"), ("pareto_ideal", "ideal S/NFE")):
        p = an[key]
        L.append(f"## (d) Pareto: is every peer point covered by a fastcache_rt point ({title})?\n")
        L.append("| peer configuration | speedup | PSNR | covered by | its speedup | its PSNR |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for x in p["points"]:
            L.append(f"| {x['peer']} | {_f(x['peer_speedup'])} | {_f(x['peer_psnr'])} | {x['by'] or '**not covered**'} "
                     f"| {_f(x['by_speedup'])} | {_f(x['by_psnr'])} |")
        L.append(f"\nExceptions: {', '.join(p['exceptions']) or 'none'}.\n")
    m = an["memory"]
    L.append("## (e) Cache memory per method (largest over its settings)\n")
    L.append("| method | cache bytes |")
    L.append("| --- | --- |")
    for k, v in sorted(m["per_method"].items(), key=lambda kv: kv[1]):
        L.append(f"| {k} | {v:,} |")
    L.append("")
    e = an.get("error_control") or {}
    if e.get("present"):
        L.append("## (f) Error-controlled caching (adaptive) against its targets\n")
        L.append(f"Peer points: the fewest computed steps of an adaptive setting reaching the peer's PSNR, against "
                 f"the peer's NFE / {e['peer_factor']:g}.\n")
        L.append("| peer configuration | NFE | PSNR | limit | adaptive | its NFE | its PSNR | met |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for x in e["peers"]:
            L.append(f"| {x['peer']} | {x['peer_nfe']} | {_f(x['peer_psnr'])} | {x['limit']:.1f} | {x['by'] or 'none'} "
                     f"| {_f(x['by_nfe'], '{}')} | {_f(x['by_psnr'])} | {'yes' if x['met'] else '**no**'} |")
        L.append(f"\n{e['peers_met']} of {len(e['peers'])} peer points met.\n")
        L.append(f"PSNR targets: the fewest computed steps reaching each, adaptive against the best fixed-schedule "
                 f"preset ({', '.join(FIXED_SCHEDULES)}); met at {e['fixed_share']:.0%} of its NFE or fewer.\n")
        L.append("| target dB | adaptive | NFE | PSNR | best fixed schedule | NFE | PSNR | saving | met |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for x in e["targets"]:
            L.append(f"| {x['target']:g} | {x['adaptive'] or 'none'} | {_f(x['adaptive_nfe'], '{}')} "
                     f"| {_f(x['adaptive_psnr'])} | {x['fixed'] or 'none'} | {_f(x['fixed_nfe'], '{}')} "
                     f"| {_f(x['fixed_psnr'])} | {_f(x['saving'], '{:+.0%}')} "
                 f"| {'n/a' if x['met'] is None else 'yes' if x['met'] else '**no**'} |")
        L.append(f"\n{e['targets_met']} of {e['targets_compared']} comparable targets met (n/a: no fixed-schedule "
                 f"setting of the sweep reaches the target).\n")
        if e["spreads"]:
            L.append("PSNR spread over the images at equal NFE (the best fixed-schedule row of the same NFE, else "
                     "within one step):\n")
            L.append("| adaptive | NFE | PSNR | sd | fixed schedule | NFE | PSNR | sd | steadier |")
            L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for x in e["spreads"]:
                L.append(f"| {x['adaptive']} | {x['nfe']} | {_f(x['psnr'])} | {_f(x['std'])} | {x['fixed']} "
                         f"| {x['fixed_nfe']} | {_f(x['fixed_psnr'])} | {_f(x['fixed_std'])} "
                         f"| {'yes' if x['steadier'] else 'no'} |")
            L.append("")
    return "\n".join(L)
