"""Every ```python block of README.md runs, in order, each as its own test; and every relative link of README.md and
docs/*.md points at an existing file.

The blocks are fragments. Each one runs (``exec``) in a fresh namespace that holds:

- ``pipe``: the shipped model, ``fastcache_rt.models.load_default()`` (a tiny FLUX pipeline; 50 steps at its
  sampling settings ``SAMPLE_DEFAULTS`` take about a second on a CPU), loaded anew for every block;
- ``prompt = "red circle"`` and ``prompts = ["red circle", "blue square"]`` (two of its classes);
- the modules ``fastcache_rt`` and ``torch``.

Anything else a block needs it imports itself, as a reader would. The working directory is the test's ``tmp_path``
(a block that writes ``profile.json`` or a policy file writes it there), torch runs one intra-op thread, and the
model-family registry is restored after every block (a block may ``register_family``).

A block does not run only when the line right before its opening fence is a marker:

- ``<!-- readme-test: skip REASON -->``: skipped with REASON (a GPU, several processes, the network);
- ``<!-- readme-test: requires MODULE -->``: runs where MODULE imports (a package outside the ``test`` extra),
  skipped elsewhere (``pytest.importorskip``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# README.md has at least this many ```python blocks; fewer means the extractor (or the README) broke
MIN_BLOCKS = 8

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_MARKER = re.compile(r"^\s*<!--\s*readme-test:(.*?)-->\s*$")
_MARKER_BODY = re.compile(r"^\s*(skip|requires)(?:\s+(.*?))?\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence in README.md
    heading: str  # the nearest heading above it
    code: str
    marker: str | None  # the text of a readme-test marker right before the fence, if any

    @property
    def id(self) -> str:
        return f"{_slug(self.heading)}-L{self.line}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _fenced_spans(lines: list[str]):
    """(info string, opening index, closing index) of every fenced code block; 0-based indices."""
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines):
            c = _FENCE.match(lines[j])
            if c and c.group(1)[0] == fence[0] and len(c.group(1)) >= len(fence) and not c.group(2):
                break
            j += 1
        yield info, i, j
        i = j + 1


def extract_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    spans = list(_fenced_spans(lines))
    inside = {k for _, i, j in spans for k in range(i, j + 1)}
    headings = [(k, _HEADING.match(s).group(2)) for k, s in enumerate(lines)
                if k not in inside and _HEADING.match(s)]
    blocks = []
    for info, i, j in spans:
        if info != "python":
            continue
        heading = next((h for k, h in reversed(headings) if k < i), "top")
        prev = lines[i - 1] if i > 0 else ""
        m = _MARKER.match(prev)
        blocks.append(Block(i + 1, heading, "\n".join(lines[i + 1:j]) + "\n", m.group(1).strip() if m else None))
    return blocks


def parse_marker(marker: str) -> tuple[str, str]:
    """("skip", reason) or ("requires", module); ValueError for anything else or an empty argument."""
    m = _MARKER_BODY.match(marker)
    if not m or not (m.group(2) or "").strip():
        raise ValueError(f"bad readme-test marker {marker!r}: expected 'skip REASON' or 'requires MODULE'")
    return m.group(1), m.group(2).strip()


BLOCKS = extract_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) >= MIN_BLOCKS, f"found {len(BLOCKS)} ```python blocks in README.md, expected >= {MIN_BLOCKS}"
    assert all(b.code.strip() for b in BLOCKS), [b.id for b in BLOCKS if not b.code.strip()]
    assert len({b.id for b in BLOCKS}) == len(BLOCKS)


def test_every_marker_is_well_formed_and_sits_on_a_python_block():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    on_blocks = {b.line - 1 for b in BLOCKS if b.marker is not None}
    for k, line in enumerate(lines):
        m = _MARKER.match(line)
        if m:
            assert k + 1 in on_blocks, f"README.md:{k + 1}: a readme-test marker not right before a ```python fence"
            _, arg = parse_marker(m.group(1))  # raises on an empty reason / module
            assert arg
        else:
            assert "readme-test" not in line, f"README.md:{k + 1}: malformed readme-test marker {line!r}"


def test_the_extractor_on_a_sample():
    sample = ("# T\n\n## Sec `a`\n<!-- readme-test: skip needs a GPU -->\n```python\nx = 1\n```\n\n```bash\nls\n```\n"
              "````markdown\n```python\nnot a block\n```\n````\n### Sub\n```python\ny = 2\n\n```\n")
    got = extract_blocks(sample)
    assert [(b.line, b.heading, b.code, b.marker) for b in got] == [
        (5, "Sec `a`", "x = 1\n", "skip needs a GPU"), (18, "Sub", "y = 2\n\n", None)]
    assert [b.id for b in got] == ["sec-a-L5", "sub-L18"]
    assert parse_marker("skip needs a GPU") == ("skip", "needs a GPU")
    assert parse_marker(" requires cache_dit ") == ("requires", "cache_dit")
    for bad in ("skip", "skip   ", "requires", "run now"):
        with pytest.raises(ValueError):
            parse_marker(bad)


@pytest.fixture
def block_env(tmp_path, monkeypatch):
    """The directory and registry side of a block's run: cwd = tmp_path, the family registry restored after."""
    import torch

    from fastcache_rt import families

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(families, "_REGISTRY", list(families._REGISTRY))
    # one intra-op thread, as the suite's xdist workers use (conftest.py): the shipped model is too small to gain
    # from more, and on a shared machine a second thread only contends with other jobs (10x slower under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def _namespace() -> dict:
    import torch

    import fastcache_rt
    from fastcache_rt.models import load_default

    return {"__name__": "__readme__", "fastcache_rt": fastcache_rt, "torch": torch, "pipe": load_default(),
            "prompt": "red circle", "prompts": ["red circle", "blue square"]}


# README sections whose blocks run many generations: marked slow (the full suite runs them). Heading slug -> why.
SLOW_SECTIONS = {"calibrating-a-new-model-tuning-a-policy": "calibrates and tunes a policy on the shipped model"}


def _block_param(b: Block):
    return pytest.param(b, id=b.id, marks=pytest.mark.slow if _slug(b.heading) in SLOW_SECTIONS else ())


@pytest.mark.parametrize("block", [_block_param(b) for b in BLOCKS])
def test_readme_block(block: Block, block_env):
    if block.marker is not None:
        kind, arg = parse_marker(block.marker)
        if kind == "skip":
            pytest.skip(arg)
        pytest.importorskip(arg)
    ns = _namespace()
    # leading newlines: a traceback names the block's own README.md line
    exec(compile("\n" * block.line + block.code, str(README), "exec"), ns)  # noqa: S102 (the point of the test)


# ---------------------------------------------------------------------------------------------------------------
# links
# ---------------------------------------------------------------------------------------------------------------
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(path: Path) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    inside = {k for _, i, j in _fenced_spans(lines) for k in range(i, j + 1)}
    return {_slug(m.group(2)) for k, s in enumerate(lines) if k not in inside and (m := _HEADING.match(s))}


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link or image outside code blocks that is not a URL."""
    lines = path.read_text(encoding="utf-8").splitlines()
    inside = {k for _, i, j in _fenced_spans(lines) for k in range(i, j + 1)}
    out = []
    for k, line in enumerate(lines):
        if k in inside:
            continue
        for m in _LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            out.append((k + 1, target))
    return out


def test_docs_exist():
    assert (ROOT / "docs" / "results.md").is_file()
    assert len(DOCS) >= 2


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_resolve(doc: Path):
    bad = []
    for line, target in relative_links(doc):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        where = f"{doc.relative_to(ROOT)}:{line}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{where} (no heading #{anchor} in {dest.name})")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_link_scanner_on_a_sample(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# Head (1)\n[x](b.md) ![i](img/p.png \"t\") [u](https://e.org) [s](#head-1)\n```\n[c](no.md)\n```\n",
                   encoding="utf-8")
    assert relative_links(doc) == [(2, "b.md"), (2, "img/p.png"), (2, "#head-1")]
    assert _anchors(doc) == {"head-1"}
