"""benchmarks/bench_step_ops.py --smoke: ops and host reads per skipped step for every fastcache_rt preset and
diffusers' hooks, on a tiny FLUX transformer. Targets are reported by the script, not asserted here; only what
the runtime guarantees is (schedule gates read nothing back in eager mode)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark script in a subprocess

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_step_ops.py"

OURS = {"fora", "teacache", "spectralcache", "fbcache", "magcache", "taylorseer", "freqca", "spectrum"}
DIFFUSERS = {("fbcache", "FirstBlockCache"), ("magcache", "MagCache"), ("taylorseer", "TaylorSeerCache"),
             ("taylorseer", "TaylorSeerCache lite")}
SCHEDULE = {"fora", "taylorseer", "freqca", "spectrum", "magcache"}


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool)


def test_smoke_writes_every_row(tmp_path):
    out = tmp_path / "ops.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ops outside model" in proc.stdout and "fastcache_rt rows met" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["mode"] == "smoke" and doc["batch"] == 4
    base = doc["baseline"]
    assert _is_count(base["outside"]) and 0 < base["outside"] < base["total"]
    assert base["identity_matches"], base["identity_blocks_ops"]
    assert doc["model_unchanged_after"]

    rows = doc["rows"]
    assert {r["method"] for r in rows if r["library"] == "fastcache_rt"} == OURS
    assert {(r["method"], r["name"]) for r in rows if r["library"] == "diffusers"} == DIFFUSERS
    assert len(rows) == len(OURS) + len(DIFFUSERS)
    for r in rows:
        name = f"{r['library']}/{r['name']}"
        assert r["skipped_steps"], name
        for k in ("ops_outside", "ops_total", "host_reads", "ops_outside_min", "ops_total_min", "host_reads_min"):
            assert _is_count(r[k]), (name, k, r[k])
        assert r["ops_total"] == r["ops_outside"] + base["outside"]
        assert r["ops_total_min"] <= r["ops_total"] and r["host_reads"] >= 0
        if r["library"] == "fastcache_rt":
            assert isinstance(r["met"], bool) and r["targets"], name
            assert all(isinstance(t["met"], bool) for t in r["targets"])
    for r in rows:
        if r["library"] == "fastcache_rt" and r["method"] in SCHEDULE:
            assert r["host_reads"] == 0, (r["method"], r["host_read_methods"])
