"""PSNR, SSIM (torchmetrics underneath) and relative L2 against known values and the formulas written out in
float64."""

import itertools
import math

import numpy as np
import pytest
import torch

from fastcache_rt.bench import memory, metrics


def test_psnr_of_known_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.full((3, 3, 16, 16), 0.5)
    signs = torch.randint(0, 2, a.shape, generator=g).float() * 2 - 1
    b = a + 0.125 * signs  # dyadic, so exact in float32: MSE 1/64 -> 10 log10(64) dB
    # torchmetrics computes the logarithm in float32: 1e-6 dB
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(64), abs=1e-5)
    per = metrics.psnr_per_image(a, torch.cat([b[:1], a[1:2] + 0.0625 * signs[1:2], b[2:]]))
    assert per.tolist() == pytest.approx([10 * math.log10(64), 10 * math.log10(256), 10 * math.log10(64)], abs=1e-5)
    assert metrics.psnr(a, a) == pytest.approx(metrics.PSNR_CAP)  # identical: capped, not infinite


def test_psnr_matches_direct_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 9, 7, generator=g)
    y = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    want = (10 * torch.log10(1.0 / mse)).tolist()
    assert metrics.psnr_per_image(x, y).tolist() == pytest.approx(want, abs=1e-5)
    assert metrics.psnr_per_image(x, y, data_range=2.0).tolist() == pytest.approx(
        [v + 20 * math.log10(2) for v in want], abs=1e-5)


def _ssim_direct(x: np.ndarray, y: np.ndarray, size=11, sigma=1.5) -> float:
    """One channel, every valid window position, sums written out in float64."""
    c1, c2 = 0.01**2, 0.03**2
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx = (w * (px - mx) ** 2).sum()
            vy = (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 15, 13, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    got = metrics.ssim_per_image(x, y)
    for n in range(2):
        want = np.mean([_ssim_direct(x[n, c].double().numpy(), y[n, c].double().numpy()) for c in range(3)])
        assert got[n].item() == pytest.approx(want, abs=1e-12)


def test_ssim_identity_and_monotone_in_noise():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    noise = torch.randn(x.shape, generator=g)
    vals = [metrics.ssim(x, (x + s * noise).clamp(0, 1)) for s in (0.01, 0.05, 0.1, 0.3)]
    assert all(a > b for a, b in itertools.pairwise(vals)), vals
    assert vals[0] < 1.0


def test_rel_l2_and_bad_input():
    a = torch.tensor([3.0, 4.0])
    assert metrics.rel_l2(a * 1.1, a) == pytest.approx(0.1)
    assert metrics.rel_l2(torch.tensor([3.0, 0.0]), a) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="b: shape"):
        metrics.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        metrics.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="a: expected a"):
        metrics.ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    assert math.isfinite(metrics.psnr(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)))


def test_memory_walk_counts_cache_state_once():
    model = torch.nn.Linear(4, 4)
    big = torch.zeros(100)  # 400 bytes
    view = big[10:20]  # same storage

    class State:
        def __init__(self):
            self.buf = {"a": big, "b": [view]}
            self.weights = model.weight  # a parameter: not cache

    st = State()
    small = torch.ones(3, dtype=torch.float64)  # 24 bytes, held by a closure

    def hook():
        return small

    model.state = st
    model.hook = hook
    exclude = memory.model_storages(model)
    assert memory.cache_bytes([model], exclude=exclude) == 400 + 24
    assert memory.cache_bytes([model], stop=[st], exclude=exclude) == 24
