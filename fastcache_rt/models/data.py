"""Procedural class-conditional images for the shipped model.

Every class is a colour paired with a shape or a texture ("red circle", "yellow stripes", ...). Each sample draws
its own position, size, phase, colour jitter and a dark, low-saturation background, so a class is a distribution of
images rather than one picture. Generation is vectorised in torch and fully determined by a seed.

Images are float tensors of shape (B, 3, S, S) with values in [-1, 1] (the range the pipeline's VAE works in).
"""

from __future__ import annotations

import math

import torch

# (colour name, RGB in [0, 1]) and (shape or texture); the class prompt is "<colour> <shape>".
_SPECS: tuple[tuple[str, tuple[float, float, float], str], ...] = (
    ("red", (0.92, 0.12, 0.10), "circle"),
    ("blue", (0.15, 0.30, 0.95), "square"),
    ("green", (0.10, 0.80, 0.20), "triangle"),
    ("yellow", (0.95, 0.88, 0.10), "stripes"),
    ("magenta", (0.90, 0.15, 0.85), "ring"),
    ("cyan", (0.10, 0.85, 0.90), "cross"),
    ("orange", (1.00, 0.55, 0.05), "checkerboard"),
    ("white", (0.95, 0.95, 0.95), "dots"),
)

CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c, _, s in _SPECS)
COLOURS: dict[str, tuple[float, float, float]] = {f"{c} {s}": rgb for c, rgb, s in _SPECS}
IMAGE_SIZE = 32


def class_index(prompt: str) -> int:
    """Index of ``prompt`` in :data:`CLASSES`; ``ValueError`` naming the known classes otherwise."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    try:
        return CLASSES.index(prompt)
    except ValueError:
        raise ValueError(f"unknown prompt {prompt!r}: the model knows the classes {', '.join(CLASSES)}") from None


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _masks(shape: str, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Soft foreground masks (n, S, S) in [0, 1] for one shape/texture with per-sample random parameters."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in (0, 1)
    yy = coords[None, :, None]
    xx = coords[None, None, :]
    aa = 1.5 / size  # anti-aliasing width of edges, in image units

    def edge(d: torch.Tensor) -> torch.Tensor:  # d < 0 inside, > 0 outside
        return (0.5 - d / aa).clamp(0.0, 1.0)

    def col(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None]

    if shape in ("circle", "square", "triangle", "ring", "cross"):
        r = _uniform(g, n, 0.18, 0.32)  # half-extent
        cx = _uniform(g, n, 0.0, 1.0) * (1 - 2 * r) + r
        cy = _uniform(g, n, 0.0, 1.0) * (1 - 2 * r) + r
        dx, dy = xx - col(cx), yy - col(cy)
        if shape == "circle":
            return edge(torch.sqrt(dx * dx + dy * dy) - col(r))
        if shape == "square":
            return edge(torch.maximum(dx.abs(), dy.abs()) - col(r))
        if shape == "ring":
            d = torch.sqrt(dx * dx + dy * dy)
            return edge((d - col(r * 0.72)).abs() - col(r * 0.28))
        if shape == "cross":
            w = col(r * 0.33)
            bar_h = torch.maximum(dx.abs() - col(r), dy.abs() - w)
            bar_v = torch.maximum(dy.abs() - col(r), dx.abs() - w)
            return edge(torch.minimum(bar_h, bar_v))
        # upward-pointing isosceles triangle inscribed in the box of half-extent r
        ux, uy = dx / col(r), dy / col(r)  # box coordinates in [-1, 1], y down
        slope = (ux.abs() * 2.0 - 1.0 - uy) / math.sqrt(5.0)  # distance-like to the slanted sides (apex at top)
        d = torch.maximum(slope, uy - 1.0) * col(r)
        return edge(d)
    if shape == "stripes":
        period = _uniform(g, n, 0.18, 0.30)
        phase = _uniform(g, n, 0.0, 1.0)
        s = torch.sin(2 * math.pi * (yy / col(period) + col(phase)))
        return (s * 2.0 + 0.5).clamp(0.0, 1.0).expand(n, size, size)
    if shape == "checkerboard":
        cell = _uniform(g, n, 0.16, 0.26)
        px, py = _uniform(g, n, 0.0, 1.0), _uniform(g, n, 0.0, 1.0)
        s = torch.sin(math.pi * (xx / col(cell) + col(px))) * torch.sin(math.pi * (yy / col(cell) + col(py)))
        return (s * 3.0 + 0.5).clamp(0.0, 1.0)
    if shape == "dots":
        k = 7
        rad = _uniform(g, n, 0.045, 0.07)
        cx = torch.rand(n, k, generator=g) * 0.84 + 0.08
        cy = torch.rand(n, k, generator=g) * 0.84 + 0.08
        d = torch.sqrt((xx[:, None] - cx[:, :, None, None]) ** 2 + (yy[:, None] - cy[:, :, None, None]) ** 2)
        return edge(d.min(dim=1).values - col(rad))
    raise ValueError(f"unknown shape {shape!r}")


def generate(labels, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images for ``labels`` (a sequence or 1-D tensor of class indices), deterministic in ``seed``.

    Returns a float32 tensor (B, 3, size, size) in [-1, 1].
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"labels must lie in [0, {len(CLASSES) - 1}], got {labels.tolist()}")
    B = labels.numel()
    g = torch.Generator().manual_seed(seed)
    # background: dark, low-saturation colour with a faint linear gradient
    base = _uniform(g, B, 0.05, 0.30)[:, None] + (torch.rand(B, 3, generator=g) - 0.5) * 0.12
    grad_dir = torch.rand(B, generator=g) * 2 * math.pi
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    ramp = torch.cos(grad_dir)[:, None, None] * coords[None, None, :] + torch.sin(grad_dir)[:, None, None] * coords[None, :, None]
    bg = base[:, :, None, None] + 0.10 * ramp[:, None]
    img = bg.clone()
    jitter = (torch.rand(B, 3, generator=g) - 0.5) * 0.10
    # per-class masks drawn from a generator forked per class so each class's stream is independent of the others
    sub_seeds = torch.randint(0, 2**62, (len(CLASSES),), generator=g)
    for k, name in enumerate(CLASSES):
        idx = (labels == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        gk = torch.Generator().manual_seed(int(sub_seeds[k]))
        m = _masks(name.split(" ", 1)[1], idx.numel(), size, gk)[:, None]
        fg = (torch.tensor(COLOURS[name])[None] + jitter[idx]).clamp(0, 1)[:, :, None, None]
        img[idx] = img[idx] * (1 - m) + fg * m
    return (img.clamp(0, 1) * 2 - 1).contiguous()


def balanced_labels(batch: int, step: int) -> torch.Tensor:
    """Labels cycling through every class, so that each batch covers the classes evenly."""
    return (torch.arange(batch) + step * batch) % len(CLASSES)


FOREGROUND_THRESHOLD = 0.55  # backgrounds stay below this in every channel; every class colour exceeds it


def foreground_features(images: torch.Tensor) -> torch.Tensor:
    """(B, 4) features of images in [0, 1]: mean RGB of the foreground pixels (any channel above
    :data:`FOREGROUND_THRESHOLD`) and the foreground's area fraction. A crude, position-free description of
    "what colour is drawn, and how much of it" used to check that samples resemble their class."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float().clamp(0, 1)
    fg = (x.max(dim=1).values > FOREGROUND_THRESHOLD).float()  # (B, H, W)
    area = fg.mean(dim=(1, 2))
    colour = (x * fg[:, None]).sum(dim=(2, 3)) / fg.sum(dim=(1, 2)).clamp_min(1.0)[:, None]
    return torch.cat([colour, area[:, None]], dim=1)


def class_centroids(seed: int = 12345, per_class: int = 64) -> torch.Tensor:
    """(num_classes, 4) mean :func:`foreground_features` of generated training images of each class."""
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    feats = foreground_features((generate(labels, seed=seed) + 1) / 2)
    return feats.reshape(len(CLASSES), per_class, -1).mean(dim=1)


def nearest_class(images: torch.Tensor, centroids: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the class whose centroid is nearest to each image's foreground features (images in [0, 1])."""
    c = class_centroids() if centroids is None else centroids
    return torch.cdist(foreground_features(images), c).argmin(dim=1)
