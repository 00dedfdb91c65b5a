"""The gate state / params layout has one source, ``fastcache_rt/ops/layout.py``: the C++ / CUDA header is generated
from it, the compiled modules export what they were built with, and a backend built for another layout is refused
(with the fields that differ) instead of reading the wrong slots."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastcache_rt.ops import _cpu, _cuda, layout

ROOT = Path(__file__).resolve().parents[2]


def test_committed_header_is_the_generated_one():
    committed = (ROOT / layout.HEADER).read_text()
    assert committed == layout.header(), (
        f"{layout.HEADER} differs from fastcache_rt/ops/layout.py: regenerate it with\n"
        "python -c \"from fastcache_rt.ops import layout; print(layout.header(), end='')\" > csrc/gate_layout.h")


def test_no_source_declares_the_layout_by_hand():
    """The C++ and CUDA sources include the header; none spells an index out."""
    for path in [*(ROOT / "csrc").rglob("*.cpp"), *(ROOT / "csrc").rglob("*.cu"), *(ROOT / "csrc").rglob("*.h")]:
        if path.name == "gate_layout.h":
            continue
        text = path.read_text()
        for name, value in layout.fields().items():
            assert f"{name} = {value}" not in text and f"{name}={value}" not in text, (path, name)
    band = (ROOT / "csrc" / "cpu" / "band_l1.cpp").read_text() + (ROOT / "csrc" / "cuda" / "band_l1.cu").read_text()
    assert band.count('#include "gate_layout.h"') == 2


def test_fields_are_dense_and_within_their_lengths():
    f = layout.fields()
    state = sorted(v for k, v in f.items() if k.startswith("S_"))
    params = sorted(v for k, v in f.items() if k.startswith("P_"))
    assert state == list(range(f["STATE_LEN"])) and params == list(range(f["PARAMS_LEN"]))


def test_built_cpu_module_exports_the_layout():
    if _cpu._C is None:
        pytest.skip(_cpu._IMPORT_ERROR)
    assert dict(_cpu._C.GATE_LAYOUT) == layout.fields()
    assert _cpu.available() is None


def test_mismatch_names_the_fields_that_differ(monkeypatch):
    changed = dict(layout.fields(), S_ACC=5)
    assert "S_ACC: 5 built, 1 here" in layout.mismatch(changed)
    assert layout.mismatch(None)
    assert layout.mismatch(layout.fields()) == ""
    if _cpu._C is not None:
        class Stale:
            GATE_LAYOUT = changed

        monkeypatch.setattr(_cpu, "_C", Stale())
        assert "S_ACC" in _cpu.available()
    monkeypatch.setattr(_cuda, "_C", type("Stale", (), {"GATE_LAYOUT": changed})())
    assert "another gate layout" in _cuda.available()
