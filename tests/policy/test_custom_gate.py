"""A gate written by a user: one class deriving from ``Gate`` with ``make_state(spec)``, registered by name, runs in
a pipeline, is saved to and read from a policy file; an unregistered one is refused with the fix in the message."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import fastcache_rt
from fastcache_rt.policy import (
    GATES,
    Gate,
    Policy,
    Reuse,
    ScheduleState,
    StreamSpec,
    load_policy,
    register_gate,
    save_policy,
)


@register_gate
@dataclass(frozen=True)
class EveryOther(Gate):
    """Compute on even steps (a schedule gate)."""

    offset: int = 0
    name = "test_every_other"

    def schedule(self, num_steps: int) -> list[bool]:
        return [(s + self.offset) % 2 == 0 for s in range(num_steps)]

    def make_state(self, spec: StreamSpec):
        return ScheduleState(self.schedule(spec.num_steps), spec.device)


@dataclass(frozen=True)
class Unregistered(Gate):
    name = "test_unregistered"

    def make_state(self, spec: StreamSpec):
        return ScheduleState([True] * spec.num_steps, spec.device)


def test_registered_gate_round_trips_through_a_policy_file(tmp_path):
    pol = Policy(EveryOther(offset=1), Reuse(), "residual", "odd")
    path = tmp_path / "odd.json"
    save_policy(pol, path)
    back = load_policy(path)
    assert back == pol
    assert GATES["test_every_other"] is EveryOther


def test_unregistered_gate_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="register_gate"):
        save_policy(Policy(Unregistered()), tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_registry_refuses_a_name_taken_by_another_class_and_a_missing_name():
    with pytest.raises(ValueError, match="taken"):
        register_gate(dataclass(frozen=True)(type("Other", (Gate,), {"name": "teacache"})))
    with pytest.raises(ValueError, match="name"):
        register_gate(dataclass(frozen=True)(type("NoName", (Gate,), {})))


def test_policy_file_with_an_unknown_gate_lists_the_registered_ones(tmp_path):
    from fastcache_rt.policy import policy_to_dict

    data = policy_to_dict(Policy(EveryOther()))
    data["gate"]["type"] = "nonesuch"
    with pytest.raises(ValueError, match="teacache"):
        fastcache_rt.policy.policy_from_dict(data)


def test_custom_gate_runs_in_the_shipped_pipeline():
    from fastcache_rt.models import SAMPLE_DEFAULTS, load_default

    pipe = load_default()
    kw = dict(SAMPLE_DEFAULTS, num_inference_steps=9)
    with fastcache_rt.cached(pipe, Policy(EveryOther(), Reuse(), "residual", "even")):
        pipe(prompt="red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
        st = fastcache_rt.stats(pipe)
    assert st["computed"] == [0, 2, 4, 6, 8]
    assert st["cached"] == [1, 3, 5, 7]
    assert dataclasses.asdict(EveryOther()) == {"offset": 0}
