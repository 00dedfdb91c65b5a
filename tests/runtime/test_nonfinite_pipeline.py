"""A computed step whose value is not finite, in a real pipeline run (the unit-level test is
tests/policy/test_nonfinite.py): it is counted in ``stats()["nonfinite"]``, the end of the generation warns what
happened, and the forecasts of the cached steps after it are finite: the value stayed out of the forecaster's history.
Every preset eager, and compiled the presets that trace every preset's step path, on the shipped FLUX model and the
tiny SD3 pipeline (CFG batched).

How the step is made non-finite and kept from feeding back:
- a forward hook on a sub-module of the last block (FLUX: the last single block's ``proj_out``; SD3: the last
  block's ``ff``), whose output is added to the block's output, writes NaN into one element (the last image token,
  first channel, of the first sample) while a flag tensor is set: the block's output, which is the value the cached
  site records, has one NaN. The flag is a tensor (its value is not a guard), set from the pipeline's step callback
  before the chosen step and cleared after it, so eager and compiled run the same hook; the hook runs only where the
  block really runs (a computed step).
- the NaN reaches the model's output in that token only (the output head is per token), and the scheduler's update
  in those latent elements only; the step callback puts back what the reference run (the same generation without
  the NaN) had in those elements, so the next step starts from the reference run's latent. What differs between
  the two runs after the chosen step is then what the forecaster holds.

The chosen step is a computed step followed by a cached step in the reference run (the same hook and callback, the
flag never set): a forecaster that recorded the NaN would forecast NaN at that cached step (Reuse returns the
recorded value; Taylor, Chebyshev and FreqCa combine the recorded values), so "every later output is finite" cannot
pass by itself."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

import fastcache_rt
from fastcache_rt.policy import Reuse
from tests.runtime.helpers import (
    CASES,
    COMPILED_PRESET_NAMES,
    PRESET_NAMES,
    STEPS,
    compile_transformer,
    compiled_graphs,
    one_thread_module,
    uncompile_transformer,
)

pytestmark = pytest.mark.slow

S = STEPS[1]
FLAG = torch.zeros((), dtype=torch.bool)  # poison the hooked sub-module's output while set


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread_module()


def _poison_hook(element):
    def hook(module, args, out):
        mask = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
        mask[element] = True
        return torch.where(mask & FLAG, torch.full_like(out, float("nan")), out)

    return hook


class Run:
    """One generation's model outputs (what the scheduler was given at each step) and latents after each step."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []
        self.latents: list[torch.Tensor] = []
        self.repaired = 0


def _generate(case, pipe, run: Run, bad: int | None = None, reference: Run | None = None):
    """A generation; with ``bad``: the flag is set for step ``bad``'s transformer call and the latent elements that
    step made non-finite are replaced by ``reference``'s."""

    def on_step_end(p, i, t, kw):
        lat = kw["latents"]
        out = {}
        if bad is not None and i == bad:
            FLAG.fill_(False)
            broken = ~torch.isfinite(lat)
            run.repaired = int(broken.sum())
            lat = torch.where(broken, reference.latents[i], lat)
            out["latents"] = lat
        if bad is not None and i == bad - 1:
            FLAG.fill_(True)
        run.latents.append(lat.clone())
        return out

    FLAG.fill_(False)
    try:
        return case.call(pipe, S, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    finally:
        FLAG.fill_(False)


class NotSaidAtTheEnd(AssertionError):
    """The non-finite warning came only when the next generation started."""


def _nonfinite_warnings(records) -> list[str]:
    return [r.getMessage() for r in records if r.name == "fastcache_rt" and "non-finite" in r.getMessage()]


def _params():
    # SD3's transformer has no diffusers cache context (not reset at the pipeline's end): its generation ends at
    # the scheduler's last step, and the warning comes then.
    # Compiled keeps COMPILED_PRESET_NAMES on both families (every gate state class, probe and forecaster, whose
    # history keeps the value out); the other presets' compiled step path is one of theirs (testing/presets.py).
    return [pytest.param(preset, case, mode, id=f"{preset}-{case}-{mode}")
            for preset in PRESET_NAMES for case in CASES for mode in ("eager", "compiled")
            if mode == "eager" or preset in COMPILED_PRESET_NAMES]


@pytest.mark.parametrize(("preset", "case", "mode"), _params())
def test_a_nonfinite_computed_step_in_a_pipeline(preset, case, mode, monkeypatch, caplog):
    case = CASES[case]
    pipe = case.build()
    path, *element = case.poison
    handle = pipe.transformer.get_submodule(path).register_forward_hook(_poison_hook(tuple(element)))
    runs: list[Run] = []
    step = type(pipe.scheduler).step

    @functools.wraps(step)
    def recording_step(self, model_output, *args, **kwargs):
        runs[-1].outputs.append(model_output.detach().clone())
        return step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(type(pipe.scheduler), "step", recording_step)  # (before enable: its patch calls this)
    case.enable(pipe, preset)
    compiled = False
    try:
        # the reference (eager): the same hook and callback, the flag never set
        ref = Run()
        runs.append(ref)
        with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
            ref_final = _generate(case, pipe, ref)
        ref_st = fastcache_rt.stats(pipe)
        assert ref_st["nonfinite"] == 0 and not _nonfinite_warnings(caplog.records)
        assert len(ref.outputs) == S and all(torch.isfinite(o).all() for o in ref.outputs)
        decided = set(ref_st["computed"])
        bad = next((s for s in range(1, S - 1) if s in decided and s + 1 not in decided), None)
        assert bad is not None, f"no computed step followed by a cached one: {ref_st['computed']}"

        if mode == "compiled":
            compile_transformer(pipe)
            compiled = True
        caplog.clear()
        got = Run()
        runs.append(got)
        with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
            final = _generate(case, pipe, got, bad, ref)
        at_end = _nonfinite_warnings(caplog.records)
        st = fastcache_rt.stats(pipe)
        if compiled:
            assert compiled_graphs() >= 1
        # the next generation (clean): a warning held back until now shows here
        caplog.clear()
        runs.append(Run())
        with caplog.at_level(logging.WARNING, logger="fastcache_rt"):
            _generate(case, pipe, runs[-1])
        later = _nonfinite_warnings(caplog.records)
        assert fastcache_rt.stats(pipe)["nonfinite"] == 0
    finally:
        FLAG.fill_(False)
        handle.remove()
        if compiled:
            uncompile_transformer(pipe)
        fastcache_rt.disable(pipe)

    # counted, and said (once)
    assert st["nonfinite"] == 1 and [r["nonfinite"] for r in st["per_stream"]] == [1], st["per_stream"]
    said = at_end + later
    assert len(said) == 1, said
    assert "1 computed step(s)" in said[0] and "kept out of the forecast history" in said[0], said[0]

    # the same run as the reference up to the poisoned step (compiled: the eager reference's values bitwise: the
    # compiled step path runs the eager ops); at that step NaN where the poisoned token lands and the reference's
    # values elsewhere; the callback repaired the latent
    assert len(got.outputs) == S
    for s in range(bad):
        assert torch.equal(got.outputs[s], ref.outputs[s]), f"step {s}, before the poisoned step {bad}"
    fin = torch.isfinite(got.outputs[bad])
    assert not fin.all(), f"step {bad} was not poisoned"
    assert torch.equal(got.outputs[bad][fin], ref.outputs[bad][fin])
    assert got.repaired > 0 and torch.equal(got.latents[bad], ref.latents[bad])

    # the decisions: the same up to the poisoned step, which computed; a cached step follows whose forecast reads
    # the poisoned step's slot of the history (Reuse: none computed in between; the other forecasters combine
    # several recorded steps: at most one; the error-controlled gate computes the step after a non-finite one)
    assert [c for c in st["computed"] if c <= bad] == [c for c in ref_st["computed"] if c <= bad]
    assert bad in st["computed"]
    cached_after = [c for c in st["cached"] if c > bad]
    assert cached_after, (bad, st["computed"])
    first = cached_after[0]
    between = [c for c in st["computed"] if bad < c < first]
    window = 1 if isinstance(fastcache_rt.PRESETS[preset].forecaster, Reuse) else 2
    assert len(between) < window, (bad, st["computed"], st["cached"])

    # every later step's model output is finite: the forecasts do not carry the NaN
    for s in range(bad + 1, S):
        assert torch.isfinite(got.outputs[s]).all(), f"step {s} after the poisoned step {bad} is not finite"
    assert torch.isfinite(final).all() and torch.isfinite(ref_final).all()
    # and the cached step's forecast is not the reference's (which recorded the poisoned step's value)
    assert not torch.equal(got.outputs[first], ref.outputs[first])
    # said when the generation ended, not when the next one began
    if not at_end:
        raise NotSaidAtTheEnd(f"the warning came only with the next generation: {later}")
