"""Image and latent distances against the uncached output.

Images are float tensors (N, C, H, W) in [0, 1]; every metric is computed per image and then averaged over the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# A per-image MSE below this floor counts as identical: PSNR is capped at 10 * log10(1 / 1e-10) = 100 dB, so the
# tables never hold an infinity.
MSE_FLOOR = 1e-10
PSNR_CAP = 10.0 * math.log10(1.0 / MSE_FLOOR)


def _check_images(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{name}: expected a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor in [0, 1], got {x.dtype}")


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_images("a", a)
    _check_images("b", b)
    if a.shape != b.shape:
        raise ValueError(f"b: shape {tuple(b.shape)} differs from a's {tuple(a.shape)}")


def psnr_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(N,) float64: 10 log10(range^2 / MSE) per image, MSE floored at ``MSE_FLOOR`` (so at most 100 dB for range 1)."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(MSE_FLOOR * data_range**2))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean over the batch of the per-image PSNR in dB."""
    return float(psnr_per_image(a, b, data_range).mean())


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    """(size, size) normalised Gaussian kernel (outer product of the 1-D one)."""
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"size: must be an odd int >= 1, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma: must be > 0, got {sigma!r}")
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, size: int = 11,
                   sigma: float = 1.5) -> torch.Tensor:
    """(N,) float64 SSIM (Wang et al. 2004): Gaussian window ``size`` x ``size``, std ``sigma``, K1 0.01, K2 0.03,
    local statistics over 'valid' window positions, averaged over positions and channels."""
    _check_pair(a, b)
    _, c, h, w = a.shape
    if h < size or w < size:
        raise ValueError(f"a: images of {h}x{w} are smaller than the {size}x{size} SSIM window")
    win = gaussian_window(size, sigma).to(a.device)[None, None].expand(c, 1, size, size)
    x, y = a.double(), b.double()

    def blur(t):
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean over the batch of the per-image SSIM."""
    return float(ssim_per_image(a, b, data_range).mean())


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref||_2 / ||ref||_2 over the whole tensor, in float64."""
    if x.shape != ref.shape:
        raise ValueError(f"x: shape {tuple(x.shape)} differs from ref's {tuple(ref.shape)}")
    r = ref.double()
    return float((x.double() - r).norm() / r.norm().clamp_min(1e-300))
