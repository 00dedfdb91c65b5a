"""The kernel-op table from a pytest-benchmark JSON of ``benchmarks/test_kernels.py``: ratios only, never bare
seconds as a claim.

    python -m pytest benchmarks/test_kernels.py --benchmark-json kernels.json
    python benchmarks/bench_table.py kernels.json [--stat min|median|mean] [--markdown]
    python benchmarks/bench_table.py --run [--quick] [--json kernels.json] [-- more pytest args]   # both in one

Per op, dtype and backend (one benchmark group of the JSON each), with t = the chosen statistic of each
benchmark's rounds (default: min, the run least disturbed by other load):

- vs peer:      t(peer eager way) / t(op)      (the peer of each op is listed under the table)
- of copy roof: t(copy) / t(op), the copy moving the bytes the op must read + write, into a preallocated tensor:
                the op's bytes/s as a fraction of this machine's copy bandwidth (forecasts write into out=)
- allocating:   the same for the forecast allocating its result (no out=)
- vs reference: t(reference backend) / t(op)
- peer / ref of roof: t(copy) / t(peer), t(copy) / t(reference)
- targets:      band_l1 and chebyshev_forecast: >= 3x the reference and >= 70 % of the copy roof
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from kernel_meta import PEERS, ratios, targets

COLUMNS = [
    ("op", "op", 28, "s"),
    ("dtype", "dtype", 9, "s"),
    ("backend", "backend", 9, "s"),
    ("vs_peer", "vs peer", 9, "x"),
    ("of_copy_roof", "of copy roof", 13, "%"),
    ("allocating_of_roof", "allocating", 11, "%"),
    ("vs_reference", "vs reference", 13, "x"),
    ("peer_of_roof", "peer of roof", 13, "%"),
    ("reference_of_roof", "ref of roof", 12, "%"),
    ("targets", "targets", 8, "s"),
]


def rows_from_json(doc: dict, stat: str = "min") -> list[dict]:
    """One row per (benchmark group, non-reference backend) of a test_kernels.py JSON (a reference-only group gives
    a reference row). Rows keep the group's order of first appearance."""
    groups: dict[str, dict] = {}
    for b in doc.get("benchmarks", []):
        ex = b.get("extra_info") or {}
        role = ex.get("role")
        if role not in ("op", "alloc", "copy", "peer"):
            continue
        g = groups.setdefault(ex["case"], {"times": {}, "backends": [], "info": ex, "peer": None})
        key = {"op": ex.get("backend"), "alloc": f"alloc:{ex.get('backend')}", "copy": "copy",
               "peer": "peer"}[role]
        g["times"][key] = b["stats"][stat]
        if role == "op" and ex.get("backend") not in g["backends"]:
            g["backends"].append(ex.get("backend"))
        if role == "peer":
            g["peer"] = ex.get("impl")
    rows = []
    for case, g in groups.items():
        fast = [b for b in g["backends"] if b != "reference"] or g["backends"]
        info = g["info"]
        for backend in fast:
            r = ratios(g["times"], backend)
            r.update(op=info["label"], op_name=info["op"], dtype=info["dtype"], backend=backend, case=case,
                     shape="x".join(str(s) for s in info["shape"]), device=info["device"], bytes=info.get("bytes"),
                     peer=PEERS.get(info["op"], (None,))[0])
            if backend == "reference":
                r["vs_reference"] = None
            r["targets"] = targets(info["op"], r)
            rows.append(r)
    return rows


def _cell(value, kind: str, width: int) -> str:
    if value is None or value == "":
        return f"{'-':>{width}s}" if kind != "s" else f"{'':{width}s}"
    if kind == "x":
        return f"{value:{width - 1}.2f}x"
    if kind == "%":
        return f"{value * 100:{width - 1}.0f}%"
    return f"{value!s:{width}s}"


def format_text(rows: list[dict]) -> str:
    header = " ".join(f"{title:{w}s}" if kind == "s" else f"{title:>{w}s}" for _k, title, w, kind in COLUMNS)
    lines = [header.rstrip(), "-" * len(header.rstrip())]
    for r in rows:
        lines.append(" ".join(_cell(r.get(k), kind, w) for k, _t, w, kind in COLUMNS).rstrip())
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(t for _k, t, _w, _kd in COLUMNS) + " |",
             "| " + " | ".join("---" if kd == "s" else "---:" for _k, _t, _w, kd in COLUMNS) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k), kd, 1).strip() for k, _t, _w, kd in COLUMNS) + " |")
    return "\n".join(lines)


def legend(rows: list[dict]) -> str:
    seen = []
    for r in rows:
        if r.get("op_name") in PEERS and r["op_name"] not in seen:
            seen.append(r["op_name"])
    out = ["peers (the eager way, same inputs, checked against the reference before timing):"]
    for op in seen:
        name, expr = PEERS[op]
        out.append(f"  {op:20s} {name}: {expr}")
    return "\n".join(out)


def describe(doc: dict, rows: list[dict], stat: str) -> str:
    m = doc.get("machine_info") or {}
    c = doc.get("commit_info") or {}
    shapes = sorted({r["shape"] for r in rows})
    devices = sorted({r["device"] for r in rows})
    rounds = [b["stats"]["rounds"] for b in doc.get("benchmarks", [])]
    commit = m.get("fastcache_rt_commit") or (c.get("id") or "")[:7] or "unknown"
    dirty = " (+ uncommitted changes)" if c.get("dirty") else ""
    return (f"fastcache_rt {m.get('fastcache_rt', '?')} (commit {commit}{dirty}), torch {m.get('torch', '?')}, "
            f"{m.get('torch_threads', '?')} threads, "
            f"{m.get('cpu', {}).get('brand_raw') or m.get('processor') or '?'}"
            f"; shape {', '.join(shapes)}; device {', '.join(devices)}; t = {stat} of "
            f"{min(rounds) if rounds else 0}-{max(rounds) if rounds else 0} rounds per benchmark")


def table(doc: dict, stat: str = "min", markdown: bool = False) -> str:
    rows = rows_from_json(doc, stat)
    body = format_markdown(rows) if markdown else format_text(rows)
    return "\n".join([describe(doc, rows, stat), "", body, "", legend(rows)])


def run_suite(json_path: Path, quick: bool, extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", str(HERE / "test_kernels.py"), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={json_path}"]
    if quick:
        cmd += ["--kernel-quick", "--benchmark-max-time=0.05"]
    cmd += extra
    print("running:", " ".join(cmd), file=sys.stderr)
    # pytest's own report goes to stderr: stdout is the table alone
    return subprocess.run(cmd, cwd=ROOT, check=False, stdout=sys.stderr).returncode


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="*", help="pytest-benchmark JSON file(s) of benchmarks/test_kernels.py")
    ap.add_argument("--stat", default="min", choices=("min", "median", "mean", "max"))
    ap.add_argument("--markdown", action="store_true", help="a Markdown table instead of fixed-width text")
    ap.add_argument("--run", action="store_true", help="run the suite first (pytest args after --)")
    ap.add_argument("--quick", action="store_true", help="with --run: the tiny size")
    ap.add_argument("--json-out", "--json-path", dest="json_out", default=None,
                    help="with --run: keep the JSON here")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.json]
    if args.run:
        if args.json_out:
            out = Path(args.json_out)
        else:
            fd, name = tempfile.mkstemp(prefix="kernels-", suffix=".json")
            os.close(fd)
            out = Path(name)
        rc = run_suite(out, args.quick, extra)
        if rc != 0:
            print(f"the benchmark suite failed (exit {rc}); no table", file=sys.stderr)
            return rc
        paths.append(out)
    if not paths:
        ap.error("give a JSON file or --run")
    for p in paths:
        doc = json.loads(p.read_text())
        if not doc.get("benchmarks"):
            print(f"{p}: no benchmarks in this JSON (run without --benchmark-disable)", file=sys.stderr)
            return 1
        print(table(doc, args.stat, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
