"""Input makers and comparison helpers for the op tests."""

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rand(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=device)


def make_view(kind: str, shape: tuple[int, ...], dtype, device, gen):
    """A tensor of ``shape`` laid out as ``kind``: contiguous, transposed (last two dims swapped in memory) or
    sliced (every other element of a larger buffer along the last dim, and an offset along the first)."""
    if kind == "contiguous":
        return rand(shape, dtype, device, gen)
    if kind == "transposed":
        if len(shape) < 2:
            return rand(shape, dtype, device, gen)
        base = rand((*shape[:-2], shape[-1], shape[-2]), dtype, device, gen)
        return base.transpose(-1, -2)
    if kind == "sliced":
        big = rand((shape[0] + 1, *shape[1:-1], 2 * shape[-1] + 1), dtype, device, gen)
        return big[1:, ..., 1::2]
    raise ValueError(kind)


def poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(float("nan"))


def assert_close(actual, expected, *, rtol, atol, what=""):
    actual = actual.float().cpu()
    expected = expected.float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN pattern differs at {torch.nonzero(nan_a ^ nan_e)[:5].tolist()}"
    a, e = actual[~nan_a], expected[~nan_e]
    inf_a = torch.isinf(a)
    assert torch.equal(inf_a, torch.isinf(e)) and torch.equal(a[inf_a], e[inf_a]), f"{what}: Inf pattern differs"
    a, e = a[~inf_a], e[~inf_a]
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = err > tol
    if bad.any():
        i = int(torch.argmax((err - tol)))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements off; worst at flat {i}: got {a[i].item()!r}, "
            f"expected {e[i].item()!r} (|err| {err[i].item():.3g} > tol {tol[i].item():.3g})"
        )


def out_tol(dtype):
    """Tolerance for outputs stored in ``dtype`` (one rounding of an fp32 result plus fp32 noise)."""
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=1e-5)
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=2e-3)
    return dict(rtol=1.6e-2, atol=1.6e-2)
