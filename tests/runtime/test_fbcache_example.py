"""examples/fbcache_on_gate_step.py: diffusers' FirstBlockCache with its decision on ``ops.gate_step`` takes, on the
shipped model, the same per-step decisions as diffusers' own ``FirstBlockCacheConfig`` hook (observed the same way
for both: which transformer calls ran the blocks after the first), gives the same images, and its decision reads
nothing back to the host."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tests.runtime.helpers import count_host_reads

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fbcache_on_gate_step.py"
STEPS = 16
THRESHOLD = 0.2  # 16 steps: about half the steps cached, every relative change at least 0.005 from the threshold
PROMPTS = ("red circle", "blue square")


def _load():
    name = "fbcache_on_gate_step"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def ex():
    return _load()


@pytest.fixture(scope="module")
def pipe():
    from fastcache_rt.models import load_default

    return load_default()


@pytest.fixture(scope="module")
def result(ex, pipe):
    # two generations in a row: the second starts from a clean state (the pipeline resets the stateful hooks)
    return ex.compare(pipe, THRESHOLD, STEPS, PROMPTS)


def test_decisions_identical_to_diffusers_first_block_cache(result):
    for theirs, ours, log in zip(result["diffusers"], result["gate_step"], result["gate_log"]):
        assert len(theirs) == len(ours) == STEPS
        assert ours == theirs
        assert 3 <= sum(not c for c in theirs) <= STEPS - 4, theirs  # a mix of computed and cached steps
        # the gate's own decisions are what the blocks did; one state per cache context ("cond")
        assert [c for _, c, _ in log] == ours and {n for n, _, _ in log} == {"cond"}
        assert ours[0] and log[0][2] == 0.0  # step 0 computes (the step counter, not the change, forces it)


def test_images_equal_to_diffusers(result):
    for a, b in zip(result["images_diffusers"], result["images_gate_step"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_relative_change_is_diffusers_formula(ex, pipe, monkeypatch):
    """The gate's change is diffusers' ``mean|r - r_last| / mean|r_last|`` against the last computed step's
    residual, and every change is far enough from the threshold that float rounding cannot flip a decision."""
    seen = []
    step = ex.GateFBCache.step

    def recording(self, residual):
        c = step(self, residual)
        seen.append((residual.clone(), bool(c), float(self.rel_l1)))
        return c

    monkeypatch.setattr(ex.GateFBCache, "step", recording)
    ex.apply_gate_fbcache(pipe.transformer, ex.GateFBCacheConfig(THRESHOLD))
    try:
        ex.run(pipe, PROMPTS[0], STEPS)
    finally:
        ex.remove_gate_fbcache(pipe.transformer)
    assert len(seen) == STEPS
    last = None
    for s, (r, computed, d_gate) in enumerate(seen):
        if last is not None:
            d = ((r - last).abs().mean() / last.abs().mean()).item()
            assert d_gate == pytest.approx(d, rel=1e-5), s
            assert abs(d - THRESHOLD) > 1e-3, s
            assert computed == (d > THRESHOLD), s
        if computed:
            last = r


def test_decision_reads_nothing_back(ex, monkeypatch):
    """``GateFBCache.step`` makes no device-to-host read and uploads no Python value (counted through every Tensor
    method that reads data back), and ``torch.compile(fullgraph=True)`` traces it."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2, 16, 8, generator=g)
    steps = [r + 0.05 * i * torch.randn(r.shape, generator=g) for i in range(6)]
    gate = ex.GateFBCache(0.1, r)
    gate.step(steps[0])  # the coeffs constant is uploaded (and cached) at the first call
    reads = count_host_reads(monkeypatch)
    decisions = [gate.step(x) for x in steps[1:]]
    monkeypatch.undo()
    assert reads == []
    assert all(isinstance(c, torch.Tensor) and c.dtype == torch.bool and c.dim() == 0 for c in decisions)

    eager = ex.GateFBCache(0.1, r)
    compiled = ex.GateFBCache(0.1, r)
    step = torch.compile(compiled.step, fullgraph=True, backend="eager")
    for x in steps:
        assert torch.equal(step(x), eager.step(x))
        assert torch.equal(compiled.state, eager.state)


def test_gate_matches_fastcache_rt_fbcache_rule(ex):
    """The example's decision, step by step, against a plain re-statement of FirstBlockCache's rule (compute at step
    0 and when mean|r - r_last| / mean|r_last| > threshold; r_last only moves on computed steps)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 32, 16, generator=g)
    xs = [base + 0.1 * i * torch.randn(base.shape, generator=g) for i in range(12)]
    gate, last, th = ex.GateFBCache(0.3, xs[0]), None, 0.3
    for x in xs:
        want = True if last is None else bool(((x - last).abs().mean() / last.abs().mean()) > th)
        assert bool(gate.step(x)) == want
        if want:
            last = x
    assert int(gate.state[ex.ops.layout.S_COMPUTED]) < len(xs)


def test_remove_restores_the_pipeline(ex, pipe):
    ref, _ = ex.run(pipe, PROMPTS[0], 6)
    ex.apply_gate_fbcache(pipe.transformer, ex.GateFBCacheConfig(0.2))
    ex.remove_gate_fbcache(pipe.transformer)
    out, dec = ex.run(pipe, PROMPTS[0], 6)
    assert torch.equal(out, ref) and all(dec)


def test_config_is_checked(ex):
    for bad in (0, -1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="threshold"):
            ex.GateFBCacheConfig(bad)


def test_main_prints_both_decisions(ex, capsys):
    assert ex.main(["--steps", "12", "--threshold", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "decisions identical" in out and "diffusers" in out and "gate_step" in out
    assert len([line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]) == 12
