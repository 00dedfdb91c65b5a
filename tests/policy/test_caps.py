"""Caps (``fastcache_rt.policy.Caps``: max_cached_steps, max_consecutive, mask, refresh) hold under every gate x
forecaster: validated like every other knob; routed from ``enable(**overrides)`` and kept in policy files; on the
tiny FLUX model every preset with each cap keeps it (no longer run of cached steps, no more cached steps, the mask's
ones and the refresh steps computed), a cap that never binds changes nothing (the same decisions, the output bitwise),
``stats()`` names the steps the caps forced; the host and the device paths decide alike (unit level here, torch.compile
in the slow tests); a stream starting mid-generation (Wan 2.2's second expert) counts the generation's steps."""

from __future__ import annotations

import math
import re

import pytest
import torch

import fastcache_rt
from fastcache_rt.policy import (
    MASK_PRESETS,
    Caps,
    FixedInterval,
    Policy,
    SpectralCacheGate,
    StreamSpec,
    policy_from_dict,
    policy_to_dict,
    resolve_policy,
    steps_mask,
)
from fastcache_rt.policy.caps import CappedState
from fastcache_rt.stream import Step
from fastcache_rt.testing.tiny_flux import call, denoise, inputs, tiny_flux
from tests.runtime.helpers import count_host_reads, one_thread_module

S = 12
PRESETS = [p for p in sorted(fastcache_rt.PRESETS) if p != "none"]
# settings that make every preset cache some steps (and compute others) on the tiny FLUX model at S steps
OVERRIDES = {"magcache": {"ratios": (1.0,) + (0.97,) * (S - 1)}, "freqca": {"interval": 3, "grid": (8, 8)},
             "taylorseer": {"interval": 3}, "fora": {"interval": 4}, "spectrum": {"alpha": 3.0},
             "teacache": {"threshold": 0.3, "coeffs": (1.0, 0.0)},
             "spectralcache": {"threshold": 0.3, "coeffs": (1.0, 0.0), "max_cached": 5},
             "fbcache": {"threshold": 0.5}, "dbcache": {"threshold": 0.5, "warmup": None}, "adaptive": {"tol": 2.0, "warmup": 2}}
MASK = (True, False, False, True, False, False, False, True, False, False, True, False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread_module()


@pytest.fixture(scope="module")
def model():
    return tiny_flux()


# ------------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("field, value", [
    ("max_cached_steps", True), ("max_cached_steps", -1), ("max_cached_steps", 2.0), ("max_cached_steps", math.nan),
    ("max_cached_steps", "3"), ("max_consecutive", False), ("max_consecutive", -2), ("max_consecutive", 1.5),
    ("max_consecutive", math.inf), ("refresh", 0), ("refresh", True), ("refresh", 4.0), ("refresh", math.nan),
    ("refresh", -3), ("mask", True), ("mask", 1), ("mask", "turbo"), ("mask", ""), ("mask", []), ("mask", (0, 2)),
    ("mask", (1.0, 0.0)), ("mask", (1, math.nan)), ("mask", "10x1"), ("mask", {"fast": 1}), ("mask", (1, None)),
])
def test_bad_caps_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"Caps\.{field}: must be"):
        Caps(**{field: value})
    with pytest.raises(ValueError, match=rf"Caps\.{field}"):  # the same through enable()'s keywords
        resolve_policy("spectrum", **{field: value})


def test_caps_normalise_and_resolve():
    assert not Caps().active and Caps(refresh=3).active
    assert Caps(mask=[1, 0, True, False]).mask == (True, False, True, False)
    assert Caps(mask="1011").mask == (True, False, True, True)
    assert Caps(mask=" Fast ").mask == "fast"
    assert Caps(max_cached_steps=0, max_consecutive=0).active  # 0: nothing cached
    assert Caps(mask="0110", refresh=3).schedule(4) == [True, True, True, True]
    assert Caps(refresh=4).schedule(9) == [s % 4 == 0 for s in range(9)]
    assert Caps(mask="medium").schedule(28) == list(steps_mask(28, "medium"))
    with pytest.raises(ValueError, match="3 entries, the generation has 12 steps"):
        Caps(mask="101").schedule(12)
    assert repr(Caps()) == "Caps()" and repr(Caps(mask="101", refresh=2)) == "Caps(mask='101', refresh=2)"


def test_mask_presets_fit_every_step_count_and_match_the_docstring():
    for n in range(1, 101):
        counts = []
        for name, (warm, frac) in MASK_PRESETS.items():
            m = steps_mask(n, name)
            w = min(n, max(1, round(warm * n)))
            assert len(m) == n and m[0] and m[-1] and all(m[:w]), (n, name)
            assert sum(m) == min(n, max(w + 1, round(2 + frac * (n - 2)))), (n, name, m)
            counts.append(sum(m))
        assert counts == sorted(counts, reverse=True), (n, counts)  # slow >= medium >= fast >= ultra
    table = re.findall(r"^\s+(\d+) (\w+)\s+([01]+) \((\d+)\)$", steps_mask.__doc__, re.M)
    assert len(table) == 16
    for n, name, bits, count in table:
        assert "".join("1" if b else "0" for b in steps_mask(int(n), name)) == bits and bits.count("1") == int(count)
    with pytest.raises(ValueError, match="unknown preset"):
        steps_mask(8, "turbo")


def test_warmup_cap():
    assert Caps(warmup=3).schedule(5) == [True, True, True, False, False] and Caps(warmup=0).active
    assert Caps(warmup=9).schedule(4) == [True] * 4 and repr(Caps(warmup=2)) == "Caps(warmup=2)"
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"Caps\.warmup: must be"):
            resolve_policy("teacache", warmup=bad)
    assert resolve_policy("teacache", warmup=4).caps == Caps(warmup=4)
    sp = resolve_policy("spectrum", warmup=4)  # Spectrum's schedule has a warm-up of its own: it takes it
    assert sp.gate.warmup == 4 and not sp.caps.active
    pol = resolve_policy("dbcache")
    assert pol.caps == Caps(warmup=8) and policy_from_dict(policy_to_dict(pol)) == pol


def test_overrides_route_caps_and_gate_fields_first():
    pol = resolve_policy("spectrum", max_consecutive=3, refresh=8, mask="fast", max_cached_steps=20)
    assert pol.caps == Caps(max_cached_steps=20, max_consecutive=3, mask="fast", refresh=8)
    assert pol.gate == fastcache_rt.PRESETS["spectrum"].gate and pol.name == "spectrum"
    assert pol.with_overrides(alpha=1.0).caps == pol.caps  # other overrides keep the caps
    assert pol.with_overrides(caps=Caps(refresh=2)).caps == Caps(refresh=2)
    # SpectralCache's own consecutive cap keeps its meaning (a gate field goes to the gate)
    sc = resolve_policy("spectralcache", max_cached=4, max_consecutive=2)
    assert sc.gate.max_cached == 4 and sc.caps == Caps(max_consecutive=2)
    with pytest.raises(ValueError, match="nor a cap"):
        resolve_policy("fora", max_cached=3)
    with pytest.raises(ValueError, match="Policy.caps"):
        Policy(FixedInterval(), caps={"refresh": 3})
    assert Policy(FixedInterval(), caps=None).caps == Caps()
    # a policy without caps reads as before them
    assert "caps" not in repr(fastcache_rt.PRESETS["fora"]) and "caps=Caps(refresh=8)" in repr(pol.with_overrides(
        caps=Caps(refresh=8)))


def test_policy_file_round_trips_with_caps(tmp_path):
    for caps in (Caps(max_cached_steps=20, max_consecutive=3, mask="fast", refresh=8), Caps(mask=MASK)):
        pol = Policy(SpectralCacheGate(threshold=0.4), site="hidden", name="mine", caps=caps)
        data = policy_to_dict(pol)
        assert data["version"] == 1 and data["caps"] == caps.to_dict()
        path = tmp_path / "p.json"
        fastcache_rt.save_policy(pol, path)
        assert fastcache_rt.load_policy(path) == pol
    plain = policy_to_dict(fastcache_rt.PRESETS["fora"])
    assert "caps" not in plain  # written only where a cap is set; files without it read
    assert policy_from_dict(plain) == fastcache_rt.PRESETS["fora"]
    with pytest.raises(ValueError, match="caps has no field max_skip"):
        policy_from_dict(dict(plain, caps={"max_skip": 3}))
    with pytest.raises(ValueError, match=r"Caps\.refresh"):
        policy_from_dict(dict(plain, caps={"refresh": 0}))
    with pytest.raises(ValueError, match="caps must be an object"):
        policy_from_dict(dict(plain, caps=[3]))


# ------------------------------------------------------------------------------------- the host and device paths
class _Fixed:
    """A gate state deciding a fixed list (a host bool in eager mode, a device bool otherwise), recording what
    ``after`` tells it."""

    probe, uses_step = None, False

    def __init__(self, decisions):
        self.d = list(decisions)
        self.dev = torch.tensor(self.d + [True])
        self.seen: list = []

    def decide(self, step):
        if step.index is not None:
            return self.d[step.index]
        return self.dev.gather(0, step.tensor.clamp(max=len(self.d)).view(1)).reshape(())

    def after(self, step, compute, residual):
        self.seen.append(bool(compute))

    def reset(self):
        self.seen = []

    def start_at(self, index):
        pass

    def tensors(self):
        return [self.dev]


def _run_capped(decisions, caps, device: bool, start=0):
    n = len(decisions)
    st = CappedState(_Fixed(decisions), caps, n, "cpu")
    out, seen = [], False
    for s in range(start, n):
        c = st.decide(Step(None if device else s, torch.tensor(s)))
        c = bool(c | ~torch.tensor(seen)) if device else (c or not seen)  # the controller: the first step computes
        seen = seen or c
        st.after(None, torch.tensor(c) if device else c, None)
        out.append(c)
    assert st.inner.seen == out  # the gate sees the capped outcome
    return out, st.forced_steps(device, n)


def _check_caps(computed: list[bool], caps: Caps, start=0, total=None):
    """``computed``: the decisions of steps start, start + 1, ... of a generation of ``total`` steps."""
    run = cached = 0
    forced = caps.schedule(total or len(computed) + start)
    for s, c in enumerate(computed, start):
        if forced[s]:
            assert c, (s, computed)
        run = 0 if c else run + 1
        cached += not c
        if caps.max_consecutive is not None:
            assert run <= caps.max_consecutive, (s, computed)
    if caps.max_cached_steps is not None:
        assert cached <= caps.max_cached_steps, computed


def test_host_and_device_caps_decide_alike_and_hold():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 30, (1,), generator=g))
        decisions = (torch.rand(n, generator=g) < 0.3).tolist()  # a gate that caches a lot
        pick = torch.randint(0, 4, (5,), generator=g).tolist()
        caps = Caps(max_cached_steps=pick[0] * 3 if pick[0] else None, max_consecutive=pick[1] or None,
                    mask=(None, "fast", "ultra", tuple((torch.rand(n, generator=g) < 0.2).tolist()))[pick[2]],
                    refresh=pick[3] * 2 or None, warmup=pick[4] * 2 or None)
        start = trial % 3 if n > 3 else 0
        host = _run_capped(decisions, caps, False, start)
        dev = _run_capped(decisions, caps, True, start)
        assert host == dev, (decisions, caps)
        _check_caps(host[0], caps, start)
        assert set(host[1]) <= {s for s, c in enumerate(host[0], start) if c}


# -------------------------------------------------------------------------------------- every preset, every cap
def _generate(model, preset, steps=S, **caps):
    with fastcache_rt.cached(model, preset, num_steps=steps, **OVERRIDES.get(preset, {}), **caps):
        out = denoise(model, steps)
        st = fastcache_rt.stats(model)
    row = st["per_stream"][0]
    return out, [s in row["computed"] for s in range(steps)], row


CAPS = {"max_consecutive": Caps(max_consecutive=1), "max_cached_steps": Caps(max_cached_steps=2),
        "mask": Caps(mask=MASK), "mask_preset": Caps(mask="fast"), "refresh": Caps(refresh=5),
        "all": Caps(max_cached_steps=4, max_consecutive=2, mask="ultra", refresh=5)}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_keeps_every_cap(model, preset):
    out, plain, row = _generate(model, preset)
    assert 0 < sum(plain) < S and "forced" not in row, (preset, plain)  # it caches here
    for name, caps in CAPS.items():
        _, computed, row = _generate(model, preset, caps=caps)
        _check_caps(computed, caps)
        forced = row["forced"]
        assert all(computed[s] for s in forced), (name, forced)
        sched = caps.schedule(S)
        for s in forced:  # each forced step is one a cap asks for
            run = next((k for k in range(s) if computed[s - 1 - k]), s)  # cached steps right before s
            assert sched[s] or (caps.max_consecutive is not None and run >= caps.max_consecutive) or (
                caps.max_cached_steps is not None and computed[:s].count(False) >= caps.max_cached_steps), (name, s)
        assert forced, (preset, name, plain)  # each cap binds here: the settings are chosen so


@pytest.mark.parametrize("preset", PRESETS)
def test_caps_that_never_bind_change_nothing(model, preset):
    out, plain, _ = _generate(model, preset)
    runs, run = [0], 0
    for c in plain:
        run = 0 if c else run + 1
        runs.append(run)
    # each cap right at what the gate does by itself: its own computed steps as the mask, its longest run, its
    # number of cached steps, and a refresh that only asks for step 0
    tight = Caps(max_cached_steps=plain.count(False), max_consecutive=max(runs), mask=tuple(plain), refresh=S)
    got, computed, row = _generate(model, preset, caps=tight)
    assert computed == plain and row["forced"] == []
    assert torch.equal(got, out)


def test_a_second_generation_counts_afresh(model):
    with fastcache_rt.cached(model, "fora", num_steps=S, interval=6, max_cached_steps=3) as h:
        rows = []
        for _ in range(2):
            h.new_generation(S)
            denoise(model, S)
            rows.append(fastcache_rt.stats(model)["per_stream"][0])
    assert rows[0] == rows[1] and len(rows[0]["cached"]) == 3 and rows[0]["forced"], rows


def test_a_mask_of_another_length_is_an_error_naming_both(model):
    with pytest.raises(ValueError, match="Caps.mask: has 3 entries, the generation has 12 steps"):
        with fastcache_rt.cached(model, "fora", num_steps=S, mask=(1, 0, 1)):
            denoise(model, S)


def test_a_mask_of_another_length_is_a_clear_error_compiled_too():
    """Checked on the host when the generation is announced, before any call: under torch.compile too the
    message is the plain ValueError (not dynamo's "Observed exception")."""
    from fastcache_rt.testing.pipelines import CALL, tiny_pipeline

    pipe = tiny_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="eager")
    fastcache_rt.enable(pipe, "fora", mask=(1, 0, 1))
    try:
        with pytest.raises(ValueError, match="Caps.mask: has 3 entries, the generation has 4 steps"):
            pipe(prompt="red circle", num_inference_steps=4, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **CALL)
    finally:
        fastcache_rt.disable(pipe)


@pytest.mark.parametrize("preset, signal", [("fora", False), ("magcache", False), ("teacache", True)])
def test_caps_read_nothing_more_back(model, preset, signal, monkeypatch):
    """Eager: a schedule gate with caps still decides on the host with no read; a signal gate's decision stays the
    step's one read (and no step uploads a Python value)."""
    x, enc, pooled = inputs(0)
    with fastcache_rt.cached(model, preset, num_steps=S, max_consecutive=1, mask="fast", refresh=5,
                             max_cached_steps=4, **OVERRIDES.get(preset, {})):
        with torch.no_grad():
            call(model, x, enc, pooled, 1.0, 8, 8)
        reads = count_host_reads(monkeypatch)
        for s in range(1, S):
            with torch.no_grad():
                call(model, x, enc, pooled, 1.0 - s / S, 8, 8)
        monkeypatch.undo()
        st = fastcache_rt.stats(model)
    assert len(reads) == (S - 1 if signal else 0), reads[:20]
    assert st["per_stream"][0]["forced"]


def test_a_stream_starting_mid_generation_counts_the_generations_steps():
    """Wan 2.2's low-noise expert is first called mid-generation: the mask and refresh count the generation's
    steps, the cached-step counters its own; TeaCache with a huge threshold caches all it may."""
    from fastcache_rt.testing.pipelines import tiny_wan_embeds_pipeline

    pipe = tiny_wan_embeds_pipeline(True)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(100)
    pe, ne = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    mask = (1, 1) + (0,) * 8 + (1, 0)
    fastcache_rt.enable(pipe, "teacache", threshold=100.0, coeffs=(1.0, 0.0), max_consecutive=2, refresh=4,
                        mask=mask)
    try:
        with torch.no_grad():
            pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=4.0, num_inference_steps=12, height=32,
                 width=32, num_frames=5, output_type="latent", generator=torch.Generator().manual_seed(0))
        st = fastcache_rt.stats(pipe)
    finally:
        fastcache_rt.disable(pipe)
    caps = Caps(max_consecutive=2, refresh=4, mask=mask)
    first = None
    for name, rows in st["models"].items():
        for row in rows["per_stream"]:
            steps = row["computed"] + row["cached"]
            start = min(steps)
            computed = [s in row["computed"] for s in range(start, max(steps) + 1)]
            _check_caps(computed, caps, start, total=12)
            assert row["forced"] and set(row["forced"]) <= set(row["computed"]), row
            if name == "transformer_2":
                first = start
    assert first is not None and first > 0  # the second expert did start mid-generation


# ------------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_caps_take_the_eager_decisions(preset):
    """torch.compile(fullgraph=True): the caps on the device take the eager decisions and force the same steps,
    and a second generation compiles nothing more (the counters are device buffers, reset between generations)."""
    from torch._dynamo.utils import counters

    model = tiny_flux(layers=1, single=1)
    caps = Caps(max_cached_steps=4, max_consecutive=1, mask="fast", refresh=5)
    kw = dict(OVERRIDES.get(preset, {}), caps=caps)
    with fastcache_rt.cached(model, preset, num_steps=S, **kw):
        eager = denoise(model, S)
        ref = fastcache_rt.stats(model)["per_stream"][0]
    assert ref["forced"], ref  # the caps bind
    torch._dynamo.reset()
    counters.clear()
    try:
        with fastcache_rt.cached(model, preset, num_steps=S, **kw) as h:
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            rows, graphs = [], []
            for _ in range(2):
                h.new_generation(S)
                out = denoise(compiled, S)
                rows.append(fastcache_rt.stats(model)["per_stream"][0])
                graphs.append(counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()
    assert graphs[0] >= 1 and graphs[1] == graphs[0], graphs
    for row in rows:
        assert (row["computed"], row["forced"]) == (ref["computed"], ref["forced"]), (row, ref)
    _check_caps([s in ref["computed"] for s in range(S)], caps)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device_flag", [False, True])
def test_a_forced_step_restarts_a_signal_gates_count(device_flag):
    """A step the caps computed where TeaCache / SpectralCache had cached: the gate's fused state is set as if the
    gate had computed (accumulator and run of cached steps 0, one more computed step), so it counts from there."""
    from fastcache_rt.ops import layout as L
    from fastcache_rt.policy import SpectralCacheGate
    from fastcache_rt.policy.spec import StreamSpec

    st = SpectralCacheGate(threshold=10.0, coeffs=(1.0, 0.0)).make_state(StreamSpec((1, 16, 8), num_steps=S))
    probe = torch.randn(1, 16, 8)
    for i in range(3):  # step 0 computes; steps 1, 2 cache and accumulate their changes
        c = st.decide(Step(i, torch.tensor(i), probe=probe + 0.3 * i))
        assert bool(c) == (i == 0)
    before = st.state.clone()
    assert before[L.S_ACC] > 0 and before[L.S_CONSEC] == 2 and before[L.S_COMPUTED] == 1
    if device_flag:  # a device False changes nothing
        st.forced(torch.tensor(False))
        assert torch.equal(st.state, before)
    st.forced(torch.tensor(True) if device_flag else True)
    after = st.state
    assert after[L.S_ACC] == 0 and after[L.S_CONSEC] == 0 and after[L.S_HAS_CACHE] == 1
    assert after[L.S_LAST_COMPUTE] == 1 and after[L.S_COMPUTED] == 2 and after[L.S_STEP] == before[L.S_STEP]


def test_a_capped_signal_gate_counts_from_the_forced_step(model):
    """End to end: TeaCache with a mask forcing the first step it caches. Its accumulator starts again at the
    forced step, so its next computed step comes later than in the plain run (without the restart it came at the
    plain run's position: 1,1,0,0,1,... against 1,1,0,0,0,1,... here)."""
    _, plain, _ = _generate(model, "teacache")
    k = plain.index(False)  # the first cached step
    mask = tuple(s == k for s in range(S))
    _, computed, row = _generate(model, "teacache", caps=Caps(mask=mask))
    assert row["forced"] == [k] and computed[:k + 1] == [True] * (k + 1)
    nxt_plain = next(s for s in range(k + 1, S) if plain[s])
    nxt = next(s for s in range(k + 1, S) if computed[s])
    assert nxt > nxt_plain or nxt == S - 1, (plain, computed)
