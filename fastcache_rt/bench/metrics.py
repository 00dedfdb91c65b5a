"""Image and latent distances against the uncached output.

Images are float tensors (N, C, H, W) in [0, 1]; every metric is computed per image and then averaged over the batch.
PSNR and SSIM are torchmetrics' (a maintained implementation); tests/bench/test_metrics.py checks them against
the formulas written out in float64.
"""

from __future__ import annotations

import math

import torch

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


def _torchmetrics():
    try:
        from torchmetrics.functional import image
    except ImportError as e:
        raise ImportError("the image metrics use torchmetrics: pip install 'fastcache_rt[bench]' (or torchmetrics)"
                          ) from e
    return image


def psnr_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(N,) float64: 10 log10(range^2 / MSE) per image (torchmetrics' ``peak_signal_noise_ratio`` over each image),
    capped at ``PSNR_CAP`` (100 dB: an MSE below ``MSE_FLOOR`` counts as identical)."""
    _check_pair(a, b)
    v = _torchmetrics().peak_signal_noise_ratio(a.double(), b.double(), data_range=float(data_range),
                                                reduction="none", dim=(1, 2, 3))
    return v.clamp(max=PSNR_CAP)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean over the batch of the per-image PSNR in dB."""
    return float(psnr_per_image(a, b, data_range).mean())


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """(N,) float64 SSIM (Wang et al. 2004): torchmetrics' ``structural_similarity_index_measure`` map (Gaussian
    window of std ``sigma`` and size 2 * int(3.5 sigma + 0.5) + 1, 11 for 1.5; K1 0.01, K2 0.03), averaged over
    the window positions inside the image and over channels, as the authors' reference code does (torchmetrics' own
    mean also counts the border positions it computes on a reflect-padded image)."""
    _check_pair(a, b)
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma: must be > 0, got {sigma!r}")
    size = 2 * int(3.5 * sigma + 0.5) + 1
    h, w = a.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"a: images of {h}x{w} are smaller than the {size}x{size} SSIM window")
    _, full = _torchmetrics().structural_similarity_index_measure(
        a.double(), b.double(), gaussian_kernel=True, sigma=float(sigma), reduction="none",
        data_range=float(data_range), k1=0.01, k2=0.03, return_full_image=True)
    p = (size - 1) // 2
    return full[..., p:h - p, p:w - p].flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean over the batch of the per-image SSIM."""
    return float(ssim_per_image(a, b, data_range).mean())


def rel_l2_per_image(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N,) float64: ``rel_l2`` of each sample (the first dimension) on its own."""
    if x.shape != ref.shape:
        raise ValueError(f"x: shape {tuple(x.shape)} differs from ref's {tuple(ref.shape)}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x: expected a batch of samples, got shape {tuple(x.shape)}")
    r = ref.double().flatten(1)
    return (x.double().flatten(1) - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-300)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref||_2 / ||ref||_2 over the whole tensor, in float64."""
    if x.shape != ref.shape:
        raise ValueError(f"x: shape {tuple(x.shape)} differs from ref's {tuple(ref.shape)}")
    r = ref.double()
    return float((x.double() - r).norm() / r.norm().clamp_min(1e-300))
