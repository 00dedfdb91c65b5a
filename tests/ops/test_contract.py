"""The op contract: what another library may rely on in ``fastcache_rt.ops``, pinned by a snapshot
(``tests/ops/contract.json``).

The snapshot records, for every name in ``fastcache_rt.ops.__all__``, its Python signature (``inspect.signature``
string and parameters) or its value (constants), the schema of every op registered in the ``torch.ops.fastcache_rt``
namespace (``torch.ops.fastcache_rt.<op>.<overload>._schema``, the ``*_out`` variants included), the indices of the
state / params layout (``fastcache_rt.ops.layout``), and the fastcache_rt version (major.minor) it was recorded at.

Rules (semantic versioning of the contract):
- any difference from the snapshot fails ``test_contract_matches_snapshot``: a contract change is deliberate;
- breaking (a public name, parameter, default, annotation, schema, constant or layout index removed or changed)
  bumps the major version; additive (a new public name or registered op, a parameter with a default appended at
  the end) bumps the minor. While the major is 0 (initial development, semver's 0.y.z rule) a breaking change bumps
  the minor: 0.1.x -> 0.2.0;
- the snapshot's ``version`` equals ``fastcache_rt.__version__``'s major.minor (and pyproject's version is
  ``__version__``), and ``CHANGELOG.md`` has a section ``## [<__version__>]``.

Regenerate after a deliberate change (refused unless ``fastcache_rt.__version__`` was bumped as the rules say)::

    python -m tests.ops.test_contract --update
    FASTCACHE_RT_UPDATE_CONTRACT=1 python -m pytest -q tests/ops/test_contract.py     # the same, from pytest

The docstrings of the public ops carry the rest of the contract (shapes, dtypes, formula, reduction, capture /
compile behaviour) and an example, which ``test_op_docstrings_and_examples`` runs as a doctest.
"""

from __future__ import annotations

import argparse
import doctest
import inspect
import json
import os
import re
import sys
from pathlib import Path

import torch

import fastcache_rt
from fastcache_rt import ops
from fastcache_rt.ops import layout

SNAPSHOT = Path(__file__).resolve().with_name("contract.json")
REPO = Path(__file__).resolve().parents[2]
CHANGELOG = REPO / "CHANGELOG.md"
NAMESPACE = "fastcache_rt"
FORMAT = "fastcache_rt.ops.contract"
UPDATE_ENV = "FASTCACHE_RT_UPDATE_CONTRACT"
HOWTO = ("an op's contract changed: if this is deliberate, update the snapshot (python -m tests.ops.test_contract "
         "--update, or FASTCACHE_RT_UPDATE_CONTRACT=1), bump the version (fastcache_rt.__version__ and pyproject.toml: "
         "major for a breaking change, minor for an addition; while the major is 0, minor for both) and add a "
         "CHANGELOG.md entry; if not, undo the change")


# ---------------------------------------------------------------------------------------------------------------
# the contract as it is now
# ---------------------------------------------------------------------------------------------------------------
def _parameters(sig: inspect.Signature) -> list[list]:
    out = []
    for p in sig.parameters.values():
        default = None if p.default is inspect.Parameter.empty else repr(p.default)
        annotation = None if p.annotation is inspect.Parameter.empty else str(p.annotation)
        out.append([p.name, p.kind.name, default, annotation])
    return out


def registered_ops() -> dict[str, str]:
    """Every op of the ``torch.ops.fastcache_rt`` namespace: ``{"fastcache_rt::name[.overload]": schema}``."""
    names = sorted({n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith(NAMESPACE + "::")})
    out = {}
    for qual in names:
        packet = getattr(getattr(torch.ops, NAMESPACE), qual.split("::", 1)[1])
        for overload in sorted(packet.overloads()):
            key = qual if overload == "default" else f"{qual}.{overload}"
            out[key] = str(getattr(packet, overload)._schema)
    return out


def _is_registered(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def current_contract() -> dict:
    public = {}
    for name in sorted(ops.__all__):
        obj = getattr(ops, name)
        if callable(obj):
            sig = inspect.signature(obj)
            entry = {"kind": "function", "signature": str(sig), "parameters": _parameters(sig),
                     "returns": None if sig.return_annotation is inspect.Signature.empty else
                     str(sig.return_annotation)}
            if _is_registered(name):
                entry["op"] = f"{NAMESPACE}::{name}"
            public[name] = entry
        else:
            public[name] = {"kind": "constant", "value": obj}
    lay = {k: getattr(layout, k) for k in sorted(dir(layout)) if re.fullmatch(r"(S|P)_[A-Z0-9_]+|[A-Z]+_LEN", k)}
    return {"public": public, "registered": registered_ops(), "layout": lay}


def major_minor(version: str) -> str:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"version {version!r} is not major.minor[.patch]")
    return f"{m.group(1)}.{m.group(2)}"


def load_snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())


# ---------------------------------------------------------------------------------------------------------------
# differences, and whether they break callers
# ---------------------------------------------------------------------------------------------------------------
def diff(old: dict, new: dict) -> list[tuple[bool, str]]:
    """``[(breaking, description)]`` between two contracts (``public``, ``registered``, ``layout``)."""
    out = []
    for section in ("public", "registered", "layout"):
        a, b = old.get(section, {}), new.get(section, {})
        for name in sorted(set(a) | set(b)):
            if name not in b:
                out.append((True, f"{section}: {name} removed (was {_show(a[name])})"))
            elif name not in a:
                out.append((False, f"{section}: {name} added: {_show(b[name])}"))
            elif a[name] != b[name]:
                out.append((not _compatible(a[name], b[name]),
                            f"{section}: {name} changed: {_show(a[name])}  ->  {_show(b[name])}"))
    return out


def _show(entry) -> str:
    if isinstance(entry, dict):
        return entry.get("signature", repr(entry.get("value")))
    return str(entry)


def _compatible(a, b) -> bool:
    """A function whose old parameters are unchanged, with new parameters with defaults appended at the end (and
    the same return annotation and registered op): callers of the old one still work."""
    if not (isinstance(a, dict) and isinstance(b, dict) and a.get("kind") == b.get("kind") == "function"):
        return False
    if a.get("returns") != b.get("returns") or a.get("op") != b.get("op"):
        return False
    pa, pb = a["parameters"], b["parameters"]
    return pb[:len(pa)] == pa and all(p[2] is not None or p[1] in ("VAR_POSITIONAL", "VAR_KEYWORD")
                                      for p in pb[len(pa):])


def _bump_ok(old: str, new: str, breaking: bool) -> bool:
    (o_maj, o_min), (n_maj, n_min) = (tuple(int(x) for x in v.split(".")) for v in (old, new))
    if (n_maj, n_min) <= (o_maj, o_min):
        return False
    if breaking and o_maj >= 1:
        return n_maj > o_maj
    return True


def _dump(obj, level: int = 0) -> str:
    """JSON, one line per entry; a list of plain values (a parameter) on one line."""
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_dump(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(f"{inner}{_dump(v, level + 1)}" for v in obj) + f"\n{pad}]"
    return json.dumps(obj)


def update() -> str:
    """Write the snapshot of the current contract at the current version; refuses (``SystemExit``) a changed
    contract whose version was not bumped as the rules say. Returns what it did."""
    new = current_contract()
    version = major_minor(fastcache_rt.__version__)
    if SNAPSHOT.exists():
        old = load_snapshot()
        changes = diff(old, new)
        if not changes:
            if old.get("version") == version:
                return f"{SNAPSHOT}: unchanged (version {version})"
        else:
            breaking = any(b for b, _ in changes)
            kind = "breaking" if breaking else "additive"
            if not _bump_ok(str(old.get("version")), version, breaking):
                lines = "\n".join(f"  {'BREAKING' if b else 'added   '} {d}" for b, d in changes)
                raise SystemExit(
                    f"{SNAPSHOT}: not updated: the contract changed ({kind}) but fastcache_rt.__version__ is "
                    f"{fastcache_rt.__version__} (snapshot: {old.get('version')}): bump it first ("
                    f"{'major; while the major is 0, minor' if breaking else 'minor'}) and add a CHANGELOG.md "
                    f"entry.\n{lines}")
    SNAPSHOT.write_text(_dump({"format": FORMAT, "version": version, **new}) + "\n")
    return f"{SNAPSHOT}: written (version {version})"


# ---------------------------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------------------------
def test_contract_matches_snapshot():
    if os.environ.get(UPDATE_ENV):
        print(update())
    snap = load_snapshot()
    assert snap.get("format") == FORMAT
    changes = diff(snap, current_contract())
    assert not changes, HOWTO + ":\n" + "\n".join(f"  {'BREAKING' if b else 'added   '} {d}" for b, d in changes)


def test_snapshot_version_is_the_package_version():
    snap = load_snapshot()
    assert snap["version"] == major_minor(fastcache_rt.__version__), (
        f"the contract snapshot was recorded at {snap['version']}, fastcache_rt.__version__ is "
        f"{fastcache_rt.__version__}: " + HOWTO)
    pyproject = (REPO / "pyproject.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.MULTILINE)
    assert m and m.group(1) == fastcache_rt.__version__, "pyproject.toml's version differs from __version__"


def test_changelog_has_the_version():
    text = CHANGELOG.read_text()
    assert re.search(rf"^## \[{re.escape(fastcache_rt.__version__)}\]", text, re.MULTILINE), (
        f"CHANGELOG.md has no section '## [{fastcache_rt.__version__}]'")
    assert re.search(r"^## \[Unreleased\]", text, re.MULTILINE), "CHANGELOG.md has no '## [Unreleased]' section"


def test_every_public_name_is_in_the_snapshot_and_registered_ops_are_public():
    snap = load_snapshot()
    assert sorted(snap["public"]) == sorted(ops.__all__)
    public_ops = {e["op"] for e in snap["public"].values() if "op" in e}
    for qual in snap["registered"]:
        base = qual.split(".")[0]
        # every registered op is a public function's, or its ``*_out`` variant (what ``out=`` calls) or ``*_error``
        # variant (what ``error=`` calls: a new op rather than a changed schema, so the old schema stays as it was)
        assert any(base.removesuffix(suffix) in public_ops for suffix in ("", "_out", "_error")), qual


def test_op_docstrings_and_examples():
    """Every public function documents itself with an example; a registered op's wrapper names its
    ``torch.ops.fastcache_rt`` op and says how it behaves under capture / compile. The examples run."""
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for name in ops.__all__:
        obj = getattr(ops, name)
        if not callable(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        flat = " ".join(doc.split()).lower()
        assert "Example" in doc and ">>>" in doc, f"{name}: no example in its docstring"
        if _is_registered(name):
            for word in (f"torch.ops.{NAMESPACE}.{name}", "fake kernel", "torch.compile", "host sync", "reduction",
                         "capturable", "shape", "float32"):
                assert word.lower() in flat, f"{name}: its docstring does not mention {word!r}"
        for t in finder.find(obj, name, globs={"torch": torch, "ops": ops}):
            report: list[str] = []
            result = runner.run(t, out=report.append)
            assert result.failed == 0, f"{name}: its docstring example fails:\n" + "".join(report)
            assert result.attempted > 0


def test_diff_rules():
    """The classification ``update`` relies on: removed / changed = breaking, added / appended defaults = not."""
    f = {"kind": "function", "signature": "(a, *, b=1)", "returns": "T",
         "parameters": [["a", "POSITIONAL_OR_KEYWORD", None, None], ["b", "KEYWORD_ONLY", "1", None]]}
    g = dict(f, signature="(a, *, b=1, c=None)", parameters=f["parameters"] + [["c", "KEYWORD_ONLY", "None", None]])
    h = dict(f, signature="(a, *, b=2)", parameters=[f["parameters"][0], ["b", "KEYWORD_ONLY", "2", None]])
    base = {"public": {"f": f}, "registered": {"ns::f": "ns::f(Tensor a) -> Tensor"}, "layout": {"S_A": 0}}
    assert diff(base, base) == []
    assert [b for b, _ in diff(base, {**base, "public": {"f": g}})] == [False]
    assert [b for b, _ in diff(base, {**base, "public": {"f": h}})] == [True]
    assert [b for b, _ in diff(base, {**base, "public": {}})] == [True]
    assert [b for b, _ in diff(base, {**base, "registered": {**base["registered"], "ns::g": "x"}})] == [False]
    assert [b for b, _ in diff(base, {**base, "registered": {"ns::f": "ns::f(Tensor a, int b) -> Tensor"}})] == [True]
    assert [b for b, _ in diff(base, {**base, "layout": {"S_A": 1}})] == [True]
    assert _bump_ok("0.1", "0.2", True) and not _bump_ok("0.1", "0.1", False) and not _bump_ok("1.2", "1.3", True)
    assert _bump_ok("1.2", "2.0", True) and _bump_ok("1.2", "1.3", False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fastcache_rt's op contract snapshot")
    ap.add_argument("--update", action="store_true", help="write tests/ops/contract.json from the current ops")
    a = ap.parse_args(argv)
    if a.update:
        print(update())
        return 0
    changes = diff(load_snapshot(), current_contract())
    for b, d in changes:
        print(f"{'BREAKING' if b else 'added   '} {d}")
    print("contract unchanged" if not changes else HOWTO)
    return 1 if changes else 0


if __name__ == "__main__":
    sys.exit(main())
