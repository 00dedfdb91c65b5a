"""benchmarks/bench_calibration.py --smoke: the calibrated-vs-published comparison runs end to end; its matched
rows pair points of one gate at one NFE, and the profile's own seeds are refused as held-out seeds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark script in a subprocess

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_calibration.py"


def test_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "calibration.json").read_text())
    assert len(doc["points"]) == 8 and {p["coeffs"] for p in doc["points"]} == {"FLUX.1", "calibrated"}
    for r in doc["matched"]:
        for side, key in (("calibrated", "calibrated_psnr"), ("FLUX.1", "flux_psnr")):
            assert any(p["gate"] == r["gate"] and p["nfe"] == r["nfe"] and p["coeffs"] == side and p["psnr"] == r[key]
                       for p in doc["points"])
    assert (tmp_path / "calibration.png").read_bytes()[:4] == b"\x89PNG"


def test_refuses_the_profiles_seeds(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--seeds", "0", "--out", str(tmp_path)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "made the profile" in proc.stderr
    assert not (tmp_path / "calibration.json").exists()
