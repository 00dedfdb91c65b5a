"""benchmarks/bench_families.py: its --smoke mode (flux, wan, sd3 at 6 steps) runs end to end and writes its table
and JSON, and a method that leaves something active behind is caught and does not reach the next method."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_families.py"
OURS = ("fastcache_rt/fbcache", "fastcache_rt/teacache", "fastcache_rt/spectrum", "fastcache_rt/taylorseer")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_families", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # benchmarks/bench_families.py --smoke in a subprocess
def test_smoke_mode(tmp_path):
    out = tmp_path / "families.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    assert "| family | fastcache_rt fbcache |" in printed and "| **runs** |" in printed and "Totals:" in printed
    for fam in ("flux", "wan", "sd3"):
        assert f"| {fam} |" in printed
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["steps"] == 6 and meta["families"] == ["flux", "wan", "sd3"] and meta["threads"] == 1
    assert [r["family"] for r in data["results"]] == ["flux", "wan", "sd3"]
    keys = list(meta["methods"])
    assert keys[:4] == list(OURS) and "diffusers/FirstBlockCache" in keys
    assert ("cache-dit/DBCache F1B0" in keys) == (meta["cache_dit"] is not None)
    for r in data["results"]:
        assert set(r["cells"]) == set(keys)
        for key, c in r["cells"].items():
            # a method never leaves anything active: the uncached model reproduced the reference after each one
            assert c["leak"] is None, (r["family"], key, c["leak"])
            if c["runs"]:
                assert 0 <= c["nfe"] <= 6 and c["nfe"] == len(c["computed"]), (r["family"], key)
                assert c["error"] is None
                # a non-finite output is a result for a peer (null in the JSON), a failure for fastcache_rt
                assert c["rel_l2"] is None or c["rel_l2"] >= 0
                if key in OURS:
                    assert c["finite"] and math.isfinite(c["rel_l2"]), (r["family"], key)
            else:
                assert c["error"], (r["family"], key)
        for key in OURS:  # fastcache_rt runs every family
            assert r["cells"][key]["runs"], (r["family"], key, r["cells"][key]["error"])
        for key in OURS[1:]:  # the gate's own account of its steps is what the watch saw
            assert r["cells"][key]["stats_computed"] == r["cells"][key]["computed"], (r["family"], key)
        for key in ("fastcache_rt/spectrum", "fastcache_rt/taylorseer"):  # schedules: their exact NFE
            assert 0 < r["cells"][key]["nfe"] < 6
    assert data["totals"] == {k: sum(r["cells"][k]["runs"] for r in data["results"]) for k in keys}


@pytest.fixture(scope="module")
def bench():
    return _bench()


def _leaky(bench, raise_in_enable: bool):
    """A method that registers a hook changing the first block's output and never removes it."""

    def enable(model, name, state):
        model.blocks[0].register_forward_hook(lambda mod, args, out: out * 1.5)
        if raise_in_enable:
            raise RuntimeError("enable failed half-way")

    return bench.Method("test/leaky", "test", "leaky", "", enable, lambda model, state: None)


@pytest.mark.parametrize("raise_in_enable", [False, True])
def test_a_method_left_active_is_caught_and_the_model_rebuilt(bench, raise_in_enable):
    cfg = bench.Cfg(steps=4, threshold=0.1, teacache_threshold=0.3, cache_dit_warmup=1)
    fr = bench.FamilyRun("wan", cfg.steps)
    ref, flags, _ = fr.run()
    assert flags == [True] * 4
    clean = dict(snapshot=bench.snapshot(fr.model))
    cell = bench.run_method(fr, _leaky(bench, raise_in_enable), cfg, ref, clean)
    assert cell["runs"] is not raise_in_enable
    assert cell["leak"] and "still active" in cell["leak"]
    assert fr.rebuilt == 1
    # the next method starts from a clean model: the uncached output is the reference, bitwise
    out, flags, _ = fr.run()
    assert torch.equal(out, ref) and flags == [True] * 4
    cell = bench.run_method(fr, bench.METHOD_FACTORIES[2](cfg), cfg, ref, clean)  # fastcache_rt spectrum
    assert cell["runs"] and cell["leak"] is None and cell["stats_computed"] == cell["computed"]
    fr.watch.remove()
