"""benchmarks/bench_gpu.py --smoke: the GPU benchmark's code runs here on tiny CPU tensors (Triton in its
interpreter, plus the cpu and reference backends) and writes one JSON with a row per size x op x backend; the
determinism, concurrency and Python-scalar checks hold wherever they ran, and every number is marked smoke.
``--all --smoke``: the four parts (GPU test subset, op benchmark, step-level counts, a cached generation of the
shipped model eager and compiled) in one JSON and one Markdown summary, with their statuses and reasons."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"

OPS = ("band_l1", "gate_step", "gate_decide", "chebyshev_forecast", "chebyshev_weights", "taylor_forecast",
       "hermite_forecast", "taylor_update")
BACKENDS = ("triton", "cpu", "reference")
SIZES = ("flux", "video")


def _optional():
    return {s.strip() for s in os.environ.get("FASTCACHE_RT_TEST_OPTIONAL", "").split(",") if s.strip()}


@pytest.fixture(scope="module")
def smoke(all_smoke):
    """The op benchmark's smoke document: part 2 of the ``--all --smoke`` run below (``run_op_benchmark``, the
    function ``--smoke`` alone runs too), so the suite runs the benchmark's smoke mode once."""
    part = all_smoke["doc"]["parts"]["kernels"]
    assert part["status"] == "ok", part.get("reason")
    return part["result"]


@pytest.mark.slow  # the smoke fixture is part 2 of benchmarks/bench_gpu.py --all --smoke (~1.5 min)
def test_smoke_header(smoke):
    assert smoke["mode"] == "smoke" and smoke["smoke"] is True
    assert smoke["claims"].startswith("none")
    assert smoke["triton_interpret"] == "1"
    for k in ("python", "torch", "triton", "fastcache_rt"):
        assert k in smoke["versions"]
    assert smoke["git"]["commit"]
    assert smoke["machine"]["gpu"] is None and smoke["machine"]["cpu_count"]
    assert set(smoke["settings"]["sizes"]) == set(SIZES)
    assert smoke["settings"]["sizes"]["video"]["nominal_feature"] == [2, 32760, 3072]
    assert smoke["settings"]["sizes"]["flux"]["nominal_feature"] == [1, 4096, 3072]


@pytest.mark.slow
def test_smoke_every_row(smoke):
    rows = {(r["size"], r["op"], r["backend"]): r for r in smoke["rows"]}
    assert len(rows) == len(smoke["rows"])
    assert set(rows) == {(s, o, b) for s in SIZES for o in OPS for b in BACKENDS}
    for key, r in rows.items():
        assert r["smoke"] is True, key
        if not r["available"]:
            assert key[2] in _optional(), (key, r.get("reason"))
            continue
        assert not r["errors"], (key, r["errors"])
        t = r["timing"]
        assert t["smoke"] is True and t["device_time_us"] is None and t["host_time_us"]["median"] > 0, key
        if r["op"] not in ("gate_decide", "chebyshev_weights"):
            assert r["bytes"] > 0 and t["copy_bytes"] == r["bytes"] and t["fraction_of_copy_roof"] > 0, key
        k = r["kernels"]
        assert k["kernels_per_call"] is None and k["note"].startswith("n/a"), key
        assert k["cpu_top_level_ops_per_call"] >= 1, key
        bw = r["bitwise"]
        assert bw["identical"] is True and bw["runs"] >= (3 if key[2] == "triton" else 200), (key, bw)
        c = r["concurrent"]
        assert c["equal"] is True and c["inputs_differ"] is True and "thread" in c["mode"], (key, c)
        cap = r["capture"]
        assert cap["ran"] is False and cap["capture_ok"] is None and cap["reason"], (key, cap)
        assert cap["python_scalars_equal_tensor_scalars"] is True, key
        # Python numbers for tau_query / distance / gap / count and the default coeffs make no tensor from a
        # Python value once the op's constants are cached (on a GPU: no upload, capturable)
        assert cap["host_value_tensors_per_call"] == 0, (key, cap)
        assert r["timed_call_host_value_tensors"] == 0, key  # device tensors for every scalar when timed
        if key[2] != "reference":
            assert r["matches_reference"] is True, (key, r.get("reference_error"))
    s = smoke["summary"]
    assert s["bitwise_identical"] and s["concurrent_equal"] and s["capture_ok"] is None and not s["errors"]


@pytest.mark.parametrize("argv,out", [(["--sizes", "flux"], "x.json"), (["--all"], "d")])
def test_gpu_mode_refuses_without_gpu(tmp_path, capsys, argv, out):
    import importlib.util

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([*argv, "--out", str(tmp_path / out)]) == 2
    assert "--smoke" in capsys.readouterr().err
    assert not (tmp_path / out).exists()


# ---------------------------------------------------------------------------------------------------------------
# --all: the four parts in one JSON and one Markdown summary (benchmarks/gpu_all.py)
# ---------------------------------------------------------------------------------------------------------------

PARTS = ("gpu_tests", "kernels", "step_counts", "generation")
STEP_PRESETS = ("fbcache", "teacache", "spectrum", "taylorseer")


def _gpu_all():
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("gpu_all")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def all_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_all")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--all", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    js, md = out / "bench_gpu.json", out / "bench_gpu.md"
    return {"proc": proc, "seconds": time.perf_counter() - t0, "doc": json.loads(js.read_text()) if js.is_file()
            else None, "md": md.read_text() if md.is_file() else None}


@pytest.mark.slow  # the fixture runs benchmarks/bench_gpu.py --all --smoke (~1.5-2.5 min on 2 cores)
def test_all_smoke_exits_zero_with_four_parts(all_smoke):
    proc, doc = all_smoke["proc"], all_smoke["doc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert doc is not None and all_smoke["md"] is not None
    assert doc["mode"] == "smoke" and doc["smoke"] is True and doc["claims"].startswith("none")
    assert doc["exit_code"] == 0 and doc["failed_parts"] == []
    assert doc["git"]["commit"] and doc["versions"]["torch"] and doc["machine"]["gpu"] is None
    assert list(doc["parts"]) == list(PARTS)
    for i, (key, p) in enumerate(doc["parts"].items(), 1):
        assert p["part"] == i and p["title"].startswith(f"{i}. "), key
        assert isinstance(p["command"], str) and p["command"], key
        assert p["wall_seconds"] > 0, key
        assert p["status"] in ("ok", "empty", "skipped"), (key, p["status"], p.get("reason"))
        if p["status"] != "ok":
            assert p["reason"], key
    assert 0 < doc["wall_seconds"] < 400, f"--all --smoke took {doc['wall_seconds']:.0f} s (target: ~4 min)"
    print(f"bench_gpu --all --smoke took {all_smoke['seconds']:.0f} s")


@pytest.mark.slow
def test_all_smoke_gpu_tests_part(all_smoke):
    p = all_smoke["doc"]["parts"]["gpu_tests"]
    r = p["result"]
    assert "-m 'gpu and not slow'" in p["command"] and "--collect-only" in p["command"]
    assert r["mode"].startswith("collect-only")
    # tests/conftest.py marks the cuda / triton cases of the backend matrices: the subset is not empty
    assert p["status"] == "ok" and r["exit_code"] == 0 and r["collected"] > 100, (p["status"], r)


@pytest.mark.slow
def test_all_smoke_kernels_part(all_smoke):
    p = all_smoke["doc"]["parts"]["kernels"]
    assert p["status"] == "ok" and p["command"].startswith("python benchmarks/bench_gpu.py --smoke")
    doc = p["result"]
    assert doc["mode"] == "smoke" and doc["triton_interpret"] == "1"
    assert {(r["size"], r["op"], r["backend"]) for r in doc["rows"]} == {
        (s, o, b) for s in SIZES for o in OPS for b in BACKENDS}
    s = doc["summary"]
    assert s["bitwise_identical"] and s["concurrent_equal"] and not s["errors"]


@pytest.mark.slow
def test_all_smoke_step_part_has_host_reads(all_smoke):
    p = all_smoke["doc"]["parts"]["step_counts"]
    assert p["status"] == "ok", p["reason"]
    r = p["result"]
    assert r["launches"].startswith("n/a")  # no GPU: no kernel launches to count
    rows = {x["preset"]: x for x in r["presets"]}
    assert set(rows) == {"uncached", *STEP_PRESETS}
    assert rows["uncached"]["skipped"]["steps"] == [] and len(rows["uncached"]["computed"]["steps"]) == 12
    for name in STEP_PRESETS:
        x = rows[name]
        assert x["consistent"], name
        assert x["skipped"]["steps"] and x["computed"]["steps"], name
        assert len(x["per_step"]) == 12 and all(s["kernel_launches"] is None for s in x["per_step"]), name
        assert all(isinstance(s["host_reads"], int) and s["cpu_top_level_ops"] > 0 for s in x["per_step"]), name
        reads = x["skipped"]["host_reads"]
        # eager: a schedule gate decides on the host (no read), a signal gate reads its branch back once
        assert reads["max"] == (0 if name in ("spectrum", "taylorseer") else 1), (name, reads)
        # a skipped step dispatches fewer ops than a computed one
        assert x["skipped"]["ops"]["max"] < x["computed"]["ops"]["min"], name
    so = r["bench_step_ops"]
    assert so["error"] is None and "bench_step_ops.py --smoke" in so["command"]
    assert so["doc"]["mode"] == "smoke"
    ours = {x["method"]: x for x in so["doc"]["rows"] if x["library"] == "fastcache_rt"}
    assert set(STEP_PRESETS) <= set(ours)
    assert all(isinstance(x["host_reads"], int) for x in ours.values())


@pytest.mark.slow
def test_all_smoke_generation_part(all_smoke):
    p = all_smoke["doc"]["parts"]["generation"]
    assert p["status"] == "ok", p["reason"]
    r = p["result"]
    v = {x["id"]: x for x in r["variants"]}
    assert list(v) == ["uncached_eager", "cached_eager", "cached_inductor", "cached_cudagraphs"]
    base = v["uncached_eager"]
    assert base["status"] == "ok" and base["nfe"] == base["steps"] == r["steps"] == 8
    for vid in ("cached_eager", "cached_inductor"):
        x = v[vid]
        assert x["status"] == "ok", (vid, x.get("reason"))
        assert x["seconds"] > 0 and x["warmup_seconds"] > 0, vid
        assert 0 < x["nfe"] < base["nfe"] and len(x["computed"]) == x["nfe"], (vid, x["computed"])
        q = x["quality"]
        assert q["psnr_db"] is not None and math.isfinite(q["psnr_db"]) and q["psnr_db"] > 20, (vid, q)
        assert 0 < q["max_abs_diff"] < 1, (vid, q)
    comp = v["cached_inductor"]
    assert comp["backend"] == "aot_eager" and "smoke" in comp["note"] and comp["graphs"] >= 1
    assert comp["computed"] == v["cached_eager"]["computed"]  # compiled decides as eager
    assert comp["max_abs_diff_vs_cached_eager"] < 1e-3
    cg = v["cached_cudagraphs"]
    assert cg["status"] == "skipped" and cg["reason"] == "needs a CUDA device" and cg["backend"] == "cudagraphs"


@pytest.mark.slow
def test_all_smoke_markdown_names_every_part(all_smoke):
    md, doc = all_smoke["md"], all_smoke["doc"]
    head = "\n".join(md.splitlines()[:4])
    assert "smoke, CPU" in head and "nothing in this file is a GPU measurement" in head
    assert doc["git"]["commit"] in md and doc["versions"]["torch"] in md
    for p in doc["parts"].values():
        assert f"## {p['title']}" in md, p["title"]
        assert f"| {p['title']} | {p['status']}" in md, p["title"]
    assert "skipped: needs a CUDA device" in md


def test_pytest_summary_and_junit_parsing(tmp_path):
    g = _gpu_all()
    s = g.parse_pytest_summary("....\n=== 3 passed, 1 failed, 2 skipped, 4 deselected in 4.20s ===\n")
    assert (s["passed"], s["failed"], s["skipped"], s["deselected"], s["errors"]) == (3, 1, 2, 4, 0)
    assert g.parse_pytest_summary("12/4453 tests collected (4441 deselected) in 6.1s")["collected"] == 12
    assert g.parse_pytest_summary("no tests collected (4453 deselected) in 5.90s")["collected"] == 0
    assert g.parse_pytest_summary("")["line"] is None
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" skipped="1">'
                   '<testcase classname="tests.a" name="t_ok"/><testcase classname="tests.a" name="t_bad">'
                   '<failure message="x"/></testcase><testcase classname="tests.b" name="t_err"><error/></testcase>'
                   '</testsuite></testsuites>')
    j = g.parse_junit(xml)
    assert (j["tests"], j["passed"], j["failed"], j["errors"], j["skipped"]) == (5, 2, 1, 1, 1)
    assert j["failed_tests"] == ["tests.a::t_bad", "tests.b::t_err"]
