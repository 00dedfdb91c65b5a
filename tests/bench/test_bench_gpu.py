"""benchmarks/bench_gpu.py --smoke: the GPU benchmark's code runs here on tiny CPU tensors (Triton in its
interpreter, plus the cpu and reference backends) and writes one JSON with a row per size x op x backend; the
determinism, concurrency and Python-scalar checks hold wherever they ran, and every number is marked smoke."""

import json
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
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "smoke.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    doc["_seconds"] = time.perf_counter() - t0
    doc["_stdout"] = proc.stdout
    return doc


@pytest.mark.slow  # the module's smoke fixture runs benchmarks/bench_gpu.py --smoke (~40 s)
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


@pytest.mark.slow
def test_smoke_needs_no_gpu_claim(smoke):
    assert "nothing claimed" in smoke["_stdout"]
    print(f"bench_gpu --smoke took {smoke['_seconds']:.0f} s")


def test_gpu_mode_refuses_without_gpu(tmp_path, capsys):
    import importlib.util

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path / "x.json"), "--sizes", "flux"]) == 2
    assert "--smoke" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
