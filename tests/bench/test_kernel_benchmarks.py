"""The kernel-op microbenchmarks: the pytest-benchmark suite (benchmarks/test_kernels.py) runs in a quick mode and
writes a JSON that benchmarks/bench_table.py turns into the table; a saved run can be compared against
(--benchmark-save / --benchmark-storage, then --benchmark-compare); the suite is not collected by a plain
``python -m pytest``; benchmarks/bench_ops.py (the interleaved timer of the same cases) still prints its table;
and no timed call of ours makes a tensor from a Python value."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SUITE = BENCH / "test_kernels.py"

pytest.importorskip("pytest_benchmark")

STREAMING = ("band_l1", "gate_step", "chebyshev_forecast", "taylor_forecast", "hermite_forecast",
             "taylor_update")
SMALL = ("gate_decide", "chebyshev_weights")
# few rounds, no calibration beyond one round: this checks the plumbing, it measures nothing
QUICK = ["--kernel-quick", "--kernel-backends", "cpu,reference", "--benchmark-min-rounds=1",
         "--benchmark-max-time=0.000001", "--benchmark-min-time=0.000001", "--benchmark-warmup=off",
         "-p", "no:cacheprovider", "-q"]


def _load(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _pytest(*args, timeout=300):
    # the suite runs in a plain pytest: not as a pytest-xdist worker (pytest-benchmark disables itself there)
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("FASTCACHE_RT_BENCH_", "PYTEST_XDIST_"))}
    env.pop("TRITON_INTERPRET", None)  # the interpreter is not benchmarked here (and it is slow)
    proc = subprocess.run([sys.executable, "-m", "pytest", str(SUITE), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc


def test_suite_not_collected_by_default():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert cfg["testpaths"] == ["tests"]
    assert SUITE.exists() and not any(p.name == "tests" for p in SUITE.parents)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("pytest-benchmark") for d in extras["test"])
    assert any(d.startswith("pytest-benchmark") for d in extras["bench"])


@pytest.mark.slow  # a pytest-benchmark run in a subprocess (~30 s)
def test_quick_suite_json_table_and_compare(tmp_path, capsys):
    js = tmp_path / "kernels.json"
    storage = tmp_path / "storage"
    _pytest(*QUICK, f"--benchmark-json={js}", "--benchmark-save=base", f"--benchmark-storage=file://{storage}")
    doc = json.loads(js.read_text())
    benches = doc["benchmarks"]
    seen = {(b["extra_info"]["op"], b["extra_info"]["feature_dtype"], b["extra_info"]["role"],
             b["extra_info"]["impl"]) for b in benches}
    for dt in ("float32", "bfloat16"):
        for op in STREAMING:
            for role, impl in (("op", "cpu"), ("op", "reference"), ("copy", "copy")):
                assert (op, dt, role, impl) in seen, (op, dt, role, impl)
            assert any(s[0] == op and s[1] == dt and s[2] == "peer" for s in seen), (op, dt)
    for op in SMALL:
        assert (op, "float32", "op", "cpu") in seen
    for b in benches:
        ex = b["extra_info"]
        assert b["group"] == ex["case"]
        for k in ("op", "role", "impl", "dtype", "shape", "device", "bytes", "case"):
            assert k in ex, (b["name"], k)
        if ex["op"] in STREAMING:
            assert isinstance(ex["bytes"], int) and ex["bytes"] > 0
        assert ex["shape"] == [1, 64, 256]
    assert "fastcache_rt_commit" in doc["machine_info"]
    saved = list(storage.rglob("0001_base.json"))
    assert saved, list(storage.rglob("*"))

    # the table, from the JSON (the script's main): every streaming op x dtype with the cpu backend, ratios only
    assert _load("bench_table").main([str(js)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("op "))
    for col in ("vs peer", "of copy roof", "vs reference"):
        assert col in lines[header]
    rows = [ln.split() for ln in lines[header + 2:] if ln.strip() and not ln.startswith("peers")]
    rows = [r for r in rows if len(r) > 3 and r[2] == "cpu"]
    got = {(r[0].split("(")[0], r[1]) for r in rows}
    for dt in ("float32", "bfloat16"):
        for op in STREAMING:
            assert (op, dt) in got, (op, dt, table)
    for r in rows:
        if r[0].split("(")[0] in STREAMING:
            assert r[3].endswith("x") and r[4].endswith("%"), r  # vs peer, of copy roof
    assert not re.search(r"\d\s*(s|ms|us|µs|ns)\b", table), table  # ratios only, no bare times

    # a later run compared against the saved one
    cmp_ = _pytest(*QUICK, "-k", "band_l1 and float32", f"--benchmark-storage=file://{storage}",
                   "--benchmark-compare=0001")
    assert "0001_base" in cmp_.stdout and "NOW" in cmp_.stdout, cmp_.stdout[-3000:]


def test_table_module_ratios():
    tbl = _load("bench_table")
    doc = {"benchmarks": [], "machine_info": {}}

    def bench(role, impl, t, backend=None):
        doc["benchmarks"].append({"stats": {"min": t, "median": t, "rounds": 3}, "extra_info": {
            "op": "band_l1", "label": "band_l1", "role": role, "impl": impl, "backend": backend,
            "dtype": "float32", "shape": [1, 8, 8], "device": "cpu", "bytes": 512, "case": "g"}})

    bench("op", "cpu", 1.0, "cpu")
    bench("op", "reference", 4.0, "reference")
    bench("copy", "copy", 0.8)
    bench("peer", "FBCache", 2.0)
    (row,) = tbl.rows_from_json(doc)
    assert row["vs_peer"] == 2.0 and row["vs_reference"] == 4.0 and row["of_copy_roof"] == 0.8
    assert row["peer_of_roof"] == 0.4 and row["targets"] == "met"
    text = tbl.table(doc)
    assert "2.00x" in text and "80%" in text and "FBCache" in text


def test_bench_ops_prints_the_table(tmp_path, capsys):
    bench_ops = _load("bench_ops")
    out_csv = tmp_path / "ops.csv"
    rc = bench_ops.main(["--shape", "1,16,64", "--quick", "--dtypes", "float32",
                         "--ops", "band_l1,chebyshev_forecast,taylor_update", "--csv", str(out_csv)])
    assert rc == 0
    out = capsys.readouterr().out
    for op in ("band_l1", "chebyshev_forecast(n=14)", "taylor_update(order=2)"):
        assert op in out
    assert "vs peer" in out and "of copy roof" in out
    assert len(out_csv.read_text().splitlines()) == 4


def test_timed_calls_upload_nothing():
    """The timed call of every op passes device tensors and a preallocated out=: no tensor is made from a Python
    value in it (on a GPU each would be a host-to-device upload)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    kc = _load("kernel_cases")

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith(("aten.lift_fresh", "aten.scalar_tensor")):
                self.made.append(str(func))
            return func(*args, **(kwargs or {}))

    w = kc.Workload((1, 8, 32), torch.bfloat16, "cpu", history=5)
    for op, case in w.cases(kc.STREAMING + kc.SMALL).items():
        for backend in ("cpu", "reference"):
            fn = case.timed(backend)
            fn()
            with Count() as c:
                fn()
            assert not c.made, (op, backend, c.made)
            case.check(backend)
        if case.peer is not None:
            case.check("reference", peer=True)
