"""Plain-torch reference of every op: the specification, the test oracle and the always-available fallback.

Every function here takes the *canonical* arguments that the public functions in ``fastcache_rt.ops`` build after
validation (see ``_backend.py`` for the protocol) and writes its result into the ``out`` tensors it is given.
Nothing here reads a device value back to the host, so the reference also runs under ``torch.compile`` and in CUDA
graphs.
"""

from __future__ import annotations

import math

import torch

from .layout import (
    P_FORCE_LAST,
    P_MAX_CACHED,
    P_NUM_STEPS,
    P_TADS_MAX,
    P_TADS_MIN,
    P_TAU,
    S_ACC,
    S_COMPUTED,
    S_CONSEC,
    S_HAS_CACHE,
    S_NONFINITE,
    S_STEP,
    STATE_LEN,
)

# ----------------------------------------------------------------------------------------------------------------
# band_l1
# ----------------------------------------------------------------------------------------------------------------


def band_l1(cur: torch.Tensor, prev: torch.Tensor, bounds: torch.Tensor, per_sample: bool, out: torch.Tensor) -> None:
    """out[b, k] = (sum |cur - prev|, sum |prev|) over channels bounds[k]:bounds[k+1] (and rows, and samples
    unless per_sample). cur, prev: (B, R, D); bounds: int64 (nb+1,); out: float32 (B or 1, nb, 2)."""
    B, R, D = cur.shape
    x = cur.float()
    y = prev.float()
    # Reduce rows first: (B, D) per-channel sums in fp32 (torch's pairwise summation keeps this accurate).
    diff = (x - y).abs().sum(dim=1)
    mag = y.abs().sum(dim=1)
    if not per_sample:
        diff = diff.sum(dim=0, keepdim=True)
        mag = mag.sum(dim=0, keepdim=True)
    # Per-band sums through a one-hot channel->band matrix (no host read of bounds).
    ch = torch.arange(D, device=cur.device)
    lo = bounds[:-1].view(-1, 1)
    hi = bounds[1:].view(-1, 1)
    member = (ch >= lo) & (ch < hi)  # [nb, D]
    band_diff = _masked_band_sum(diff, member)
    band_mag = _masked_band_sum(mag, member)
    out.copy_(torch.stack((band_diff, band_mag), dim=-1))


def _masked_band_sum(per_channel: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    # per_channel: [B, D]; member: bool [nb, D] -> [B, nb]. where(), not a matmul, so that NaN/Inf in one band
    # stays in that band (0 * inf would be NaN).
    x = per_channel.unsqueeze(1)
    return torch.where(member, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# gate: epilogue (decision + state update) and the fused step
# ----------------------------------------------------------------------------------------------------------------


def _rel(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # 0/0 (nothing changed, nothing there) is 0; x/0 with x > 0 is inf; NaN stays NaN.
    return torch.where((num == 0) & (den == 0), torch.zeros_like(num), num / den)


def gate_decide(
    sums: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: torch.Tensor,
    gammas: torch.Tensor | None,
    decision_out: torch.Tensor,
    state_out: torch.Tensor,
) -> None:
    """The gate epilogue. sums: float32 (nb, 2); state: float32 (STATE_LEN,); params: float32 (PARAMS_LEN,);
    coeffs: float32 (P,), highest power first; gammas: float32 (nb,) or None. Writes decision_out (bool, 0-dim,
    True = compute) and state_out (float32, STATE_LEN). All arithmetic in float32."""
    sums = sums.float()
    num = sums[:, 0].sum()
    den = sums[:, 1].sum()
    d = _rel(num, den)

    s = state[S_STEP]
    acc = state[S_ACC]
    consec = state[S_CONSEC]
    has = state[S_HAS_CACHE]
    tau = params[P_TAU]
    n_steps = params[P_NUM_STEPS]

    bell = (1.0 - torch.cos(2.0 * math.pi * s / n_steps)) * 0.5
    tau_eff = tau * (params[P_TADS_MIN] + (params[P_TADS_MAX] - params[P_TADS_MIN]) * bell)

    poly = torch.zeros_like(d)
    for i in range(coeffs.shape[0]):  # Horner, numpy.polyval order
        poly = poly * d + coeffs[i]
    acc_new = acc + poly

    nonfinite = ~torch.isfinite(d)
    if gammas is not None:
        band_rel = _rel(sums[:, 0], sums[:, 1])
        fdc_ok = (band_rel <= tau_eff * gammas.float()).all()
    else:
        fdc_ok = torch.ones((), dtype=torch.bool, device=sums.device)

    forced = (s == 0) | ((params[P_FORCE_LAST] > 0) & (s >= n_steps - 1)) | (has <= 0) | nonfinite
    skip = (~forced) & (acc_new < tau_eff) & (consec < params[P_MAX_CACHED]) & fdc_ok
    compute = ~skip
    cf = compute.float()
    zero = torch.zeros_like(acc)
    new = torch.stack(
        [
            s + 1.0,
            torch.where(compute, zero, acc_new),
            torch.where(compute, zero, consec + 1.0),
            torch.maximum(has, cf),
            cf,
            d,
            state[S_NONFINITE] + nonfinite.float(),
            state[S_COMPUTED] + cf,
        ]
    )
    assert new.shape[0] == STATE_LEN
    state_out.copy_(new)
    decision_out.copy_(compute)


def gate_step(
    cur: torch.Tensor,
    prev: torch.Tensor,
    bounds: torch.Tensor,
    state: torch.Tensor,
    params: torch.Tensor,
    coeffs: torch.Tensor,
    gammas: torch.Tensor | None,
    decision_out: torch.Tensor,
    state_out: torch.Tensor,
    sums_out: torch.Tensor,
) -> None:
    """band_l1 over the whole tensor (cur, prev: (B, R, D)) into sums_out (nb, 2), then gate_decide."""
    band_l1(cur, prev, bounds, False, sums_out.view(1, -1, 2))
    gate_decide(sums_out, state, params, coeffs, gammas, decision_out, state_out)


# ----------------------------------------------------------------------------------------------------------------
# Chebyshev ridge forecast
# ----------------------------------------------------------------------------------------------------------------


def _valid_rows(n: int, count: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    j = torch.arange(n, device=device)
    if count is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return j < count.to(torch.int64)


def chebyshev_weights(
    taus: torch.Tensor,
    tau_query: torch.Tensor,
    count: torch.Tensor | None,
    degree: int,
    lam: float,
    blend: float,
    out: torch.Tensor,
) -> None:
    """w = Phi (Phi^T Phi + lam I)^-1 phi(q), Phi[j, m] = T_m(taus[j]) over the valid rows j < min(count, n).

    Solved in float64 by Cholesky; if it fails (lam = 0 and too few distinct rows) the Gram matrix gets a jitter of
    1e-6 * mean(diag). With blend != 1 the weights become blend * w + (1 - blend) * w_lin, where w_lin extrapolates
    linearly from the two valid rows of largest tau. No valid row -> NaN weights. out: float32 (n,)."""
    n = taus.shape[0]
    dev = taus.device
    valid = _valid_rows(n, count, dev)
    t = torch.where(valid, taus.double(), torch.zeros((), dtype=torch.float64, device=dev))
    q = tau_query.double().reshape(())
    cols_t = [torch.ones_like(t), t]
    cols_q = [torch.ones_like(q), q]
    for _ in range(2, degree + 1):
        cols_t.append(2.0 * t * cols_t[-1] - cols_t[-2])
        cols_q.append(2.0 * q * cols_q[-1] - cols_q[-2])
    phi = torch.stack(cols_t[: degree + 1], dim=1) * valid.double().unsqueeze(1)  # [n, M+1]
    phi_q = torch.stack(cols_q[: degree + 1])  # [M+1]
    eye = torch.eye(degree + 1, dtype=torch.float64, device=dev)
    gram = phi.T @ phi + lam * eye
    chol, info = torch.linalg.cholesky_ex(gram)
    jitter = 1e-6 * torch.diagonal(gram).mean()
    chol_j, _ = torch.linalg.cholesky_ex(gram + jitter * eye)
    chol = torch.where(info == 0, chol, chol_j)
    z = torch.cholesky_solve(phi_q.unsqueeze(1), chol).squeeze(1)
    w = phi @ z

    if blend != 1.0:
        neg = torch.full((), -math.inf, dtype=torch.float64, device=dev)
        tv = torch.where(valid, taus.double(), neg)
        j_last = torch.argmax(tv)
        t_last = tv[j_last]
        tv2 = tv.clone()
        tv2[j_last] = -math.inf
        j_prev = torch.argmax(tv2)
        t_prev = tv2[j_prev]
        has_prev = torch.isfinite(t_prev)
        k = torch.where(has_prev, (q - t_last) / (t_last - torch.where(has_prev, t_prev, t_last - 1.0)), 0.0 * q)
        w_lin = torch.zeros_like(w)
        w_lin[j_last] = 1.0 + k
        w_lin = w_lin + torch.where(
            has_prev & (torch.arange(n, device=dev) == j_prev), -k, torch.zeros_like(w_lin)
        )
        w = blend * w + (1.0 - blend) * w_lin

    any_valid = valid.any()
    w = torch.where(any_valid, w, torch.full_like(w, math.nan))
    out.copy_(w.float())


def chebyshev_forecast(
    history: torch.Tensor,
    taus: torch.Tensor,
    tau_query: torch.Tensor,
    count: torch.Tensor | None,
    degree: int,
    lam: float,
    blend: float,
    out: torch.Tensor,
) -> None:
    """out = sum over valid rows j of w_j * history[j] (fp32 accumulation). history: (n, N) any strides;
    out: (N,) in history's dtype. Invalid rows (j >= count) are never read into the sum, even if they hold NaN."""
    n = history.shape[0]
    w = torch.empty(n, dtype=torch.float32, device=history.device)
    chebyshev_weights(taus, tau_query, count, degree, lam, blend, w)
    valid = _valid_rows(n, count, history.device).unsqueeze(1)
    h = torch.where(valid, history.float(), torch.zeros((), device=history.device))
    out.copy_((w.unsqueeze(1) * h).sum(dim=0))


# ----------------------------------------------------------------------------------------------------------------
# Taylor / Hermite forecasts over finite differences
# ----------------------------------------------------------------------------------------------------------------


def taylor_weights(order_plus_one: int, distance: torch.Tensor) -> torch.Tensor:
    """c_i = distance^i / i!, float32 (K,)."""
    x = distance.float().reshape(())
    return torch.stack([x**i / math.factorial(i) for i in range(order_plus_one)])


def hermite_weights(order_plus_one: int, distance: torch.Tensor, scale: float) -> torch.Tensor:
    """c_0 = 1, c_k = H_k(scale * distance) * scale^k / k! with physicists' Hermite H_k, float32 (K,)."""
    y = distance.float().reshape(()) * scale
    h = [torch.ones_like(y), 2.0 * y]
    for k in range(2, order_plus_one):
        h.append(2.0 * y * h[-1] - 2.0 * (k - 1) * h[-2])
    return torch.stack([h[k] * (scale**k) / math.factorial(k) for k in range(order_plus_one)])


def _weighted_rows(diffs: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_((w.unsqueeze(1) * diffs.float()).sum(dim=0))


def taylor_forecast(diffs: torch.Tensor, distance: torch.Tensor, out: torch.Tensor) -> None:
    """out = sum_i diffs[i] * distance^i / i!. diffs: (K, N) any strides; out: (N,) in diffs' dtype."""
    _weighted_rows(diffs, taylor_weights(diffs.shape[0], distance).to(diffs.device), out)


def hermite_forecast(diffs: torch.Tensor, distance: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out = diffs[0] + sum_{k>=1} diffs[k] * H_k(scale*distance) * scale^k / k! (FreqCa's high-band forecast)."""
    _weighted_rows(diffs, hermite_weights(diffs.shape[0], distance, scale).to(diffs.device), out)


def taylor_update(diffs: torch.Tensor, feature: torch.Tensor, gap: torch.Tensor, count: torch.Tensor | None) -> None:
    """In place: new[0] = feature; new[i+1] = (new[i] - old[i]) / gap while old[i] was valid (i < count), else 0.
    count = number of valid orders held before the call (None: all K). diffs: (K, N); feature: (N,)."""
    K = diffs.shape[0]
    g = gap.float().reshape(())
    old = diffs.float()
    rows = [feature.float()]
    for i in range(K - 1):
        if count is None:
            ok = torch.ones((), dtype=torch.bool, device=diffs.device)
        else:
            ok = count.to(torch.int64).reshape(()) > i
        nxt = torch.where(ok, (rows[i] - torch.where(ok, old[i], torch.zeros((), device=diffs.device))) / g, 0.0)
        rows.append(nxt)
    diffs.copy_(torch.stack(rows))
