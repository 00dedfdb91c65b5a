"""The launches the ops make, at the sizes users run: one ``(label, call)`` per launcher and constexpr variant, shared
by ``aot.py`` (compiled for a GPU architecture with ``meta`` tensors) and the tests that run the same launches in the
Triton interpreter on CPU tensors (``tiny``), so that both see the same specializations.

Calls go to the launchers of ``band_l1.py``, ``chebyshev.py`` and ``taylor.py`` with the canonical arguments of
``fastcache_rt/ops/_backend.py`` (what ``fastcache_rt.ops`` passes through ``ops/_triton.py``): scalars the runtime
keeps on the device (tau_query, distance, gap, count, row) as 0-dim tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import band_l1 as _band_l1
from . import chebyshev as _chebyshev
from . import taylor as _taylor

SIZES = {
    # name: (feature shape (B, R, D), rows of the Chebyshev history)
    "flux": ((1, 4096, 3072), 16),  # FLUX.1 at 1024 x 1024: 4096 image tokens x 3072 channels
    "video": ((2, 32760, 3072), 16),  # HunyuanVideo 720p x 129 frames with its CFG pair: 32760 tokens x 3072
    "tiny": ((2, 24, 80), 5),  # the interpreter's stand-in (tests): odd sizes, the same launches
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEGREES = (4, 8, 16)  # the Chebyshev degrees: the default, and the policy's range up to its maximum


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cases(size: str, dtypes=DTYPES, degrees=DEGREES, device="meta", blends=(1.0, 0.5)) -> list[
        tuple[str, Callable[[], None]]]:
    """(label, call) of every launcher as the ops call it (``fastcache_rt.ops`` -> ``ops._triton`` -> these
    launchers), with tensors of the size's shapes: every constexpr variant the runtime uses. ``meta`` tensors
    (``aot.py``: compile only) are empty; on a real device they hold zeros, bands split at D / 2, a count of 0."""

    def _meta(shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device) if device == "meta" else torch.zeros(
            shape, dtype=dtype, device=device)

    (B, R, D), n_hist = SIZES[size]
    N = B * R * D
    out = []
    scalar_f, scalar_i = _meta(()), _meta((), torch.int64)
    state, params, coeffs = _meta((8,)), _meta((8,)), _meta((5,))
    for dt in dtypes:
        name = dtype_name(dt)
        feat = _meta((B, R, D), dt)
        for nb in (1, 2):
            bounds = _meta((nb + 1,), torch.int64)
            if device != "meta":
                bounds.copy_(torch.tensor([0, D] if nb == 1 else [0, D // 2, D]))
            sums = _meta((nb, 2))
            for gammas in (None, _meta((nb,))) if nb > 1 else (None,):
                tag = f"{name} bands={nb}" + (" gammas" if gammas is not None else "")
                out.append((f"gate_step {tag}", lambda f=feat, b=bounds, s=sums, g=gammas: _band_l1.gate_step(
                    f, f, b, state, params, coeffs, g, _meta((), torch.bool), _meta((8,)), s)))
            for per_sample in (False, True):
                o = _meta((B if per_sample else 1, nb, 2))
                out.append((f"band_l1 {name} bands={nb} per_sample={per_sample}",
                            lambda f=feat, b=bounds, o=o, p=per_sample: _band_l1.band_l1(f, f, b, p, o)))
        strided = _meta((B, D, R), dt).transpose(1, 2)  # channel stride R
        one_band = _meta((2,), torch.int64)
        if device != "meta":
            one_band[1] = D
        out.append((f"band_l1 {name} channel-strided", lambda s=strided, b=one_band: _band_l1.band_l1(
            s, s, b, False, _meta((1, 1, 2)))))
        hist, flat, taus = _meta((n_hist, N), dt), _meta((N,), dt), _meta((n_hist,))
        for degree in degrees:
            for blend in blends:  # 1.0: no blend (Chebyshev's default); 0.5: the spectrum preset's
                out.append((f"chebyshev_forecast {name} degree={degree} blend={blend}",
                            lambda h=hist, t=taus, d=degree, bl=blend, f=flat: _chebyshev.chebyshev_forecast(
                                h, t, scalar_f, scalar_i, d, 0.1, bl, f)))
        diffs = _meta((3, N), dt)  # order 2: three difference rows
        out.append((f"taylor_forecast {name}", lambda d=diffs, f=flat: _taylor.taylor_forecast(d, scalar_f, f)))
        out.append((f"hermite_forecast {name}",
                    lambda d=diffs, f=flat: _taylor.hermite_forecast(d, scalar_f, 0.71, f)))
        out.append((f"taylor_update {name}", lambda d=diffs, f=flat: _taylor.taylor_update(d, f, scalar_f, scalar_i)))
        out.append((f"taylor_update(error=) {name}", lambda d=diffs, f=flat: _taylor.taylor_update_error(
            d, f, scalar_f, scalar_i, _meta((3,)), _meta((B, 2)))))
        out.append((f"history_update {name}", lambda h=hist, f=flat: _chebyshev.history_update(
            h, f, scalar_i, _meta((n_hist,)), scalar_i, None)))
        out.append((f"history_update(error=) {name}", lambda h=hist, f=flat: _chebyshev.history_update(
            h, f, scalar_i, _meta((n_hist,)), scalar_i, _meta((B, 2)))))
    for degree in degrees:
        out.append((f"chebyshev_weights degree={degree}", lambda d=degree: _chebyshev.chebyshev_weights(
            _meta((n_hist,)), scalar_f, scalar_i, d, 0.1, 0.5, _meta((n_hist,)))))
    for nb, gammas in ((1, None), (2, _meta((2,)))):
        out.append((f"gate_decide bands={nb}" + (" gammas" if gammas is not None else ""),
                    lambda nb=nb, g=gammas: _band_l1.gate_decide(_meta((nb, 2)), state, params, coeffs, g,
                                                                 _meta((), torch.bool), _meta((8,)))))
    return out
