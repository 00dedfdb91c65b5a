"""The policy tuner: the search on a synthetic quality model (bisection finds each arm's fastest passing setting,
schedule settings that cannot win are not run, the Pareto front), policy files, the command line end to end on the
shipped model (the chosen policy re-measured from its file gives the reported quality), bad input, and a tiny
two-expert Wan pipeline."""

import json
import math

import pytest
import torch

import fastcache_rt
from fastcache_rt import tuning as T
from fastcache_rt.cli import main
from fastcache_rt.policy import (
    PRESETS,
    FixedInterval,
    Policy,
    Reuse,
    TeaCacheGate,
    load_policy,
    policy_from_dict,
    policy_to_dict,
    save_policy,
)
from tests.cli_helpers import expect_usage_error

models = pytest.importorskip("fastcache_rt.models")

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------- the search
class FakeEvaluator:
    """Quality of a policy as a known function of its knob, NFE as a known function too; counts generations."""

    steps = 50

    def __init__(self, quality, nfe):
        self.quality_of, self.nfe_of, self.generations = quality, nfe, 0

    def run(self, policy):
        self.generations += 1
        return policy, None, 1.0, self.nfe_of(policy)

    def quality(self, images, latents):
        return {"psnr": self.quality_of(images), "ssim": 1.0, "rel_l2": 0.0}


def _signal_arm(name, knobs):
    return T.Arm(name, lambda t: Policy(TeaCacheGate(threshold=t), Reuse(), "residual", name), list(knobs))


def test_bisection_finds_each_arms_fastest_passing_setting_with_few_generations():
    knobs = [0.01 * 1.5 ** i for i in range(16)]  # slow to fast
    # NFE falls and PSNR falls with the threshold; arm "b" is 3 dB better at every setting
    bonus = {"a": 0.0, "b": 3.0}
    ev = FakeEvaluator(lambda p: 60 - 8 * math.log(p.gate.threshold / 0.01) + bonus[p.name],
                       lambda p: max(2, round(50 - 10 * math.log(p.gate.threshold / 0.01))))
    tuner = T.Tuner(ev, [_signal_arm("a", knobs), _signal_arm("b", knobs)], progress=False)
    passing = tuner.search(T.Target("psnr", 40.0))
    best = passing[0]
    want = max(k for k in knobs if 60 - 8 * math.log(k / 0.01) + 3 >= 40)  # b's fastest passing knob
    assert best.policy.name == "b" and best.knob == want
    assert all(p.quality["psnr"] >= 40 for p in passing)
    assert ev.generations <= 2 * math.ceil(math.log2(len(knobs) + 1))  # not the 32 settings of the grid
    # a second target reuses what was run
    before = ev.generations
    tuner.search(T.Target("psnr", 40.0))
    assert ev.generations == before


def test_schedule_settings_that_cannot_win_are_not_run():
    steps = 50
    arm_fast = T._schedule_arm("fast", lambda k: FixedInterval(interval=k, warmup=1), [2, 3, 4, 5, 6, 8, 10],
                               Reuse(), "residual", steps)
    arm_slow = T._schedule_arm("slow", lambda k: FixedInterval(interval=k, warmup=1), [2, 3],
                               Reuse(), "residual", steps)
    ran = []

    def quality(p):
        ran.append((p.name, p.gate.interval))
        return 50.0 if p.gate.interval <= 6 else 30.0

    ev = FakeEvaluator(quality, lambda p: sum(p.gate.schedule(steps)))
    tuner = T.Tuner(ev, [arm_fast, arm_slow], progress=False)
    passing = tuner.search(T.Target("psnr", 45.0))
    assert passing[0].knob == 6 and passing[0].nfe == sum(FixedInterval(interval=6, warmup=1).schedule(steps))
    assert not [r for r in ran if r[0] == "slow"]  # every setting of the slow arm computes more steps than 6's


def test_front_and_candidates_by_speed():
    def pt(nfe, q, name="x"):
        return T.Point(name, nfe, None, nfe, {"psnr": q, "ssim": 1.0, "rel_l2": 0.0}, 1.0)

    pts = [pt(10, 30), pt(10, 35), pt(12, 33), pt(14, 40), pt(20, 39)]
    assert [(p.nfe, p.quality["psnr"]) for p in T.front(pts, "psnr")] == [(10, 35), (14, 40)]
    ordered = sorted(pts, key=lambda p: (p.nfe, -p.quality["psnr"]))
    assert [(p.nfe, p.quality["psnr"]) for p in T._by_speed(ordered)] == [(10, 35), (12, 33), (14, 40), (20, 39)]


def test_targets_are_checked():
    for metric, bad in (("psnr", -1), ("psnr", float("nan")), ("ssim", 1.5), ("rel_l2", 0), ("lpips", 1)):
        with pytest.raises(ValueError):
            T.check_targets(metric, bad)
    assert T.check_targets("psnr", [45, 40.5]) == [45.0, 40.5]


# ---------------------------------------------------------------------------------------------------- policy files
def test_policy_files_round_trip_every_preset_and_arm(tmp_path):
    pols = list(PRESETS.values()) + [a.make(a.knobs[0]) for a in T.arms(50, fit={"ratios": [1.0] * 50,
                                                                               "coeffs": (1.0, 0.0)})]
    for i, pol in enumerate(pols):
        path = tmp_path / f"p{i}.json"
        save_policy(pol, path)
        assert load_policy(path) == pol
        assert policy_from_dict(json.loads(path.read_text())) == pol
    with pytest.raises(ValueError, match="not a fastcache_rt policy"):
        policy_from_dict({"gate": {}})
    d = policy_to_dict(PRESETS["teacache"])
    d["gate"]["threshold"] = -1
    with pytest.raises(ValueError, match="threshold"):
        policy_from_dict(d)
    d = policy_to_dict(PRESETS["teacache"])
    d["gate"]["speed"] = 3
    with pytest.raises(ValueError, match="no field speed"):
        policy_from_dict(d)
    from fastcache_rt.policy import resolve_policy

    with pytest.raises(ValueError, match="cannot read"):
        resolve_policy(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_policy("spectrumm")


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow  # the tune command end to end (~35 s)
def test_cli_tune_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(["tune", "--quick", "--steps", "12", "--target-psnr", "35", "45", "--out", str(out),
                 "--no-progress"]) == 0
    assert "| target | chosen policy" in capsys.readouterr().out
    res = json.loads((out / "tune.json").read_text())
    assert (out / "tune_front.png").read_bytes()[:4] == b"\x89PNG" and (out / "tune.md").is_file()
    assert res["search"]["generations"] < res["search"]["settings_in_grid"]
    met = [e for e in res["targets"] if e["met"]]
    assert met, res["targets"]
    # the front: no point of the search is both faster and closer than a front point
    for f in res["front"]:
        assert not any(p["nfe"] < f["nfe"] and p["psnr"] >= f["psnr"] for p in res["points"])
    pipe = models.load_default()
    kw = dict(models.SAMPLE_DEFAULTS)
    kw.pop("num_inference_steps")
    held = T.Evaluator(pipe, res["holdout"]["prompts"], res["holdout"]["seeds"], 12, kw)
    for e in met:
        assert e["heldout_quality"]["psnr"] >= e["target"]
        assert e["heldout_nfe"] < 12
        # the file reproduces what was verified: same decisions, same quality on the held-out set
        path = out / f"policy_psnr{e['target']:g}.json"
        images, latents, _, nfe = held.run(load_policy(path))
        assert nfe == e["heldout_nfe"]
        assert held.quality(images, latents)["psnr"] == pytest.approx(e["heldout_quality"]["psnr"], abs=1e-6)
        h = fastcache_rt.enable(pipe, str(path))  # a path as the policy
        assert h.policy == load_policy(path)
        h.disable()


_bad = expect_usage_error


def test_cli_tune_bad_input(tmp_path, capsys):
    out = str(tmp_path / "t")
    _bad(["tune", "--out", out], capsys, "one of the arguments")
    _bad(["tune", "--out", out, "--target-psnr", "-3"], capsys, "--target-psnr", "between 0 and 100")
    _bad(["tune", "--out", out, "--target-ssim", "1.5"], capsys, "--target-ssim")
    _bad(["tune", "--out", out, "--target-rel-l2", "0"], capsys, "--target-rel-l2")
    _bad(["tune", "--out", out, "--target-psnr", "40", "--target-ssim", "0.9"], capsys, "not allowed with")
    _bad(["tune", "--out", out, "--target-psnr", "40", "--budget-minutes", "0"], capsys, "--budget-minutes")
    (tmp_path / "junk.json").write_text("[]")
    _bad(["tune", "--out", out, "--target-psnr", "40", "--profile", str(tmp_path / "junk.json")], capsys,
         "--profile")
    (tmp_path / "file").write_text("x")
    _bad(["tune", "--out", str(tmp_path / "file"), "--target-psnr", "40"], capsys, "--out")
    _bad(["tune", "--out", out, "--target-psnr", "40", "--prompts", str(tmp_path / "none.txt")], capsys, "--prompts")
    _bad(["tune", "--out", out, "--target-psnr", "40", "--device", "cuda:7"], capsys, "--device")
    _bad(["bench", "--policy", str(tmp_path / "junk.json")], capsys, "--policy")
    _bad(["tune", "--out", out, "--target-psnr", "40", "--true-cfg", "1"], capsys, "--true-cfg", "> 1")
    _bad(["tune", "--out", out, "--target-psnr", "40", "--true-cfg", "inf"], capsys, "--true-cfg", "finite")
    _bad(["tune", "--out", out, "--target-psnr", "40", "--negative-prompt", "x"], capsys, "--negative-prompt",
         "--true-cfg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "junk.json"]  # nothing written


@pytest.mark.slow
def test_tune_a_two_expert_wan_pipeline():
    from fastcache_rt.testing.pipelines import WAN_SHIPPED_T5_CALL as CALL
    from fastcache_rt.testing.pipelines import tiny_wan_shipped_t5

    pipe = tiny_wan_shipped_t5(two_experts=True)
    res = T.tune(pipe, [30], prompts=["red circle"], seeds=[0], holdout_seeds=[1], steps=8, call_kwargs=CALL,
                 progress=False)
    (e,) = res["targets"]
    assert e["met"] and e["heldout_quality"]["psnr"] >= 30 and e["heldout_nfe"] <= 8
    # both experts run the chosen policy (each its own state): NFE counts the steps where either computed
    h = fastcache_rt.enable(pipe, e["policy"])
    try:
        pipe(prompt="red circle", num_inference_steps=8, output_type="latent",
             generator=torch.Generator().manual_seed(1), **CALL)
        st = h.stats()
        assert set(st["models"]) == {"transformer", "transformer_2"}
        computed = set(st["models"]["transformer"]["computed"]) | set(st["models"]["transformer_2"]["computed"])
        assert len(computed) == e["heldout_nfe"]
    finally:
        h.disable()


# ---------------------------------------------------------------------------------------------------- adaptive, true CFG
def test_the_adaptive_arms_are_searched():
    """ErrorControl's search space: three arms (Taylor 1 / 2, Chebyshev at the hidden site), tolerances slow to
    fast; with a profile's fields 27 arms in all."""
    from fastcache_rt.policy.gates import ErrorControl

    fit = {"ratios": [1.0] * 50, "coeffs": (1.0, 0.0)}
    by = {a.name: a for a in T.arms(50, fit=fit)}
    assert len(by) == 27
    adaptive = [n for n in by if n.startswith("adaptive+")]
    assert adaptive == ["adaptive+taylor1", "adaptive+taylor2", "adaptive+chebyshev"]
    arm = by["adaptive+taylor1"]
    assert arm.nfe is None and arm.knobs == sorted(arm.knobs) and len(arm.knobs) >= 10  # tol: larger is faster
    pol = arm.make(0.3)
    assert isinstance(pol.gate, ErrorControl) and pol.gate.tol == 0.3 and pol.site == "hidden"
    assert pol.forecaster == PRESETS["adaptive"].forecaster


class _FakeController:
    def __init__(self, per_stream):
        self.per_stream = per_stream

    def stats(self):
        return {"computed": self.per_stream[0] if self.per_stream else [], "per_stream_computed": self.per_stream}


class _FakeHandle:
    def __init__(self, *controllers):
        self.controllers = {f"t{i}": c for i, c in enumerate(controllers)}


def test_nfe_is_the_mean_over_the_true_cfg_branches():
    from fastcache_rt.tuning.evaluate import _nfe

    # true CFG: cond and uncond decide apart (error control): 5 and 4 steps -> 4.5
    assert _nfe(_FakeHandle(_FakeController([[0, 1, 2, 5, 9], [0, 1, 3, 9]])), 10) == 4.5
    assert _nfe(_FakeHandle(_FakeController([[0, 2, 4], [0, 2, 4]])), 10) == 3  # the same steps: a whole count
    # two experts taking turns, one branch each: the union
    assert _nfe(_FakeHandle(_FakeController([[0, 1, 2]]), _FakeController([[5, 7]])), 10) == 5


def test_evaluator_runs_true_cfg_on_a_batch():
    """A str negative prompt with a batch of several images (the pipeline wants one per image); the fixed
    interval computes the same steps in both branches."""
    from fastcache_rt.testing.pipelines import CALL, tiny_pipeline

    pipe = tiny_pipeline()
    ev = T.Evaluator(pipe, ["red circle", "blue dots"], [0], 4, dict(CALL, true_cfg_scale=4.0, negative_prompt=""))
    assert ev.kw["negative_prompt"] == ["", ""]
    images, latents, _, nfe = ev.run(Policy(FixedInterval(interval=2, warmup=1), Reuse(), "residual", "f"))
    assert nfe == 2 and images.shape[0] == 2
    plain = T.Evaluator(pipe, ["red circle", "blue dots"], [0], 4, CALL)
    assert not torch.allclose(plain.ref_latents, ev.ref_latents)  # the guidance was applied
    assert ev.quality(images, latents)["psnr"] > 0


def test_cli_tune_with_true_cfg_states_the_setting(tiny_folder, tmp_path, capsys):
    """``fastcache-rt tune --true-cfg`` on a FLUX folder: the search (the adaptive arms among the rest) runs with the
    guidance, and tune.json / tune.md state the setting (~5 s)."""
    (tmp_path / "prompts.txt").write_text("red circle\n")
    out = tmp_path / "tune"
    assert main(["tune", "--model", str(tiny_folder), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "6",
                 "--height", "32", "--width", "32", "--max-sequence-length", "8", "--target-psnr", "25",
                 "--true-cfg", "4", "--out", str(out), "--no-progress"]) == 0
    assert "Setting: 6 steps, true CFG 4 (negative prompt ''" in capsys.readouterr().out
    res = json.loads((out / "tune.json").read_text())
    assert res["setting"]["true_cfg_scale"] == 4.0 and res["setting"]["negative_prompt"] == ""
    assert {"adaptive+taylor1", "adaptive+taylor2", "adaptive+chebyshev"} <= set(res["search"]["arms"])
    assert any(p["arm"].startswith("adaptive+") for p in res["points"])  # the adaptive arms ran
    assert (out / "tune.md").read_text().startswith("Setting: 6 steps, true CFG 4")
    assert (out / "tune_front.png").read_bytes()[:4] == b"\x89PNG"
