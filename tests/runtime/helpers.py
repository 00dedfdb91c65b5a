"""Test-only helpers of the runtime tests (the tiny FLUX model and its loop: ``fastcache_rt.testing.tiny_flux``)."""

import torch


def count_host_reads(monkeypatch) -> list:
    """From now on (until ``monkeypatch.undo()``), every Tensor method that reads data back to the host and every
    ``torch.tensor`` / ``torch.as_tensor`` upload appends its name to the returned list."""
    reads: list = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "numpy", "cpu", "__index__"):
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, _name=name, **k):
            reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for name in ("tensor", "as_tensor"):
        orig = getattr(torch, name)

        def uploading(*a, _orig=orig, _name=name, **k):
            reads.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(torch, name, uploading)
    return reads
