"""``fastcache_rt``, ``fastcache_rt.ops`` and ``fastcache_rt.policy`` need only the core dependencies (torch, numpy):
another library can use the ops and policies without diffusers. Run in a subprocess where diffusers, transformers
and accelerate cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # fresh interpreters (importing torch: 5-7 s each on 2 busy cores)

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"diffusers", "transformers", "accelerate", "cache_dit"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_ops_and_policies_import_and_run_without_diffusers():
    out = _run("""
        import torch
        import fastcache_rt.ops as ops
        import fastcache_rt
        from fastcache_rt.policy import PRESETS, StreamSpec, save_policy, load_policy
        cur, prev = torch.randn(1, 7, 5), torch.randn(1, 7, 5)
        sums = ops.band_l1(cur, prev)
        assert sums.shape == (1, 2), sums.shape
        st = PRESETS["spectrum"].forecaster.make_state(StreamSpec((1, 7, 5), num_steps=10))
        assert st.hist.shape[1:] == (1, 7, 5)
        bad = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not bad, bad
        assert "fastcache_rt.testing" not in sys.modules  # the tiny test models: tests and benchmarks import them
        print("ok")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_the_diffusers_entry_points_say_what_is_missing():
    """Without diffusers, ``fastcache_rt.enable`` fails at first use with the import error naming diffusers (not at
    ``import fastcache_rt``)."""
    out = _run("""
        import fastcache_rt
        try:
            fastcache_rt.enable
        except ImportError as e:
            print("ImportError:", e)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ImportError: diffusers" in out.stdout, out.stdout
