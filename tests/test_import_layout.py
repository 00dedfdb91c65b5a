"""The repository root is on ``sys.path`` whenever Python runs there (``python -m pytest``, ``python -c``): nothing
in it may shadow an installed distribution. The top-level ``kernels/`` folder (the Triton kernels' source) has no
``__init__.py``, so it is at most a namespace portion, which Python uses only when no regular package of that name
exists anywhere on the path; Hugging Face's ``kernels`` distribution (which diffusers imports when it is installed)
stays the one found."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = {"fastcache_rt"}  # this repository's own distribution


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    # ``python -c`` puts the working directory first on sys.path, as ``python -m pytest`` does
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_root_name_shadows_an_installed_distribution():
    """Every top-level name an installed distribution provides resolves, from the repository root, to the
    distribution's files, never to a file or folder of this repository."""
    names = sorted(n for n in importlib.metadata.packages_distributions() if n.isidentifier() and n not in OWN)
    assert names, "no installed distribution found"
    code = f"""
import importlib.util, json, sys
root = {str(ROOT)!r}
bad = {{}}
for name in {names!r}:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        continue
    if spec is None:
        continue
    places = [spec.origin or ""] + list(spec.submodule_search_locations or [])
    mine = [p for p in places if p and p.startswith(root + "/")]
    if mine:
        bad[name] = mine
print(json.dumps(bad))
"""
    out = _run_from_root(code)
    assert out.returncode == 0, out.stderr[-2000:]
    shadowed = json.loads(out.stdout.strip().splitlines()[-1])
    assert shadowed == {}, f"names of the repository root shadow installed distributions: {shadowed}"


def test_root_holds_no_regular_package_named_like_a_distribution():
    """The static side of the same rule: a ``*.py`` file or a folder with ``__init__.py`` at the root is a regular
    module or package and would win over any installed one of that name."""
    dists = importlib.metadata.packages_distributions()
    importable = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    clash = {n: dists[n] for n in sorted(importable - OWN) if n in dists}
    assert clash == {}, f"root modules named like installed distributions: {clash}"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a folder, not a package"


@pytest.mark.slow  # fresh interpreters importing diffusers
def test_diffusers_and_fastcache_rt_import_from_the_root():
    """With Hugging Face's ``kernels`` installed (transformers depends on it), diffusers' import of it and the model
    classes work from the repository root, and ``fastcache_rt.kernels`` is the Triton kernels' package."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels distribution is not installed: nothing to shadow")
    out = _run_from_root(
        "import diffusers\n"
        "from diffusers import FluxTransformer2DModel\n"
        "import fastcache_rt, kernels\n"
        "from fastcache_rt.kernels import band_l1, launch\n"
        "print(kernels.__file__)\n"
        "print(band_l1.__file__)\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    hf, ours = out.stdout.strip().splitlines()[-2:]
    assert not hf.startswith(str(ROOT) + "/"), hf
    assert ours == str(ROOT / "kernels" / "band_l1.py") or "site-packages" in ours, ours
