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
# band_l1, GPU order: the exact summation order both GPU backends (triton, cuda) implement
# ----------------------------------------------------------------------------------------------------------------

# The partition is fixed by the input's size alone (never by the GPU's SM count): channel blocks of BAND_BLOCK_D
# channels, row chunks of BAND_CHUNK_R rows, one (sample, row chunk, channel block) tile per program / block.
BAND_BLOCK_D = 256
BAND_CHUNK_R = 64
# Level-1 groups hold at most BAND_BLOCK_D = 2^8 values.
BAND_L1_LOG2 = 8


def exact_group_sum(v: torch.Tensor, dim: int, log2_n: torch.Tensor | int) -> torch.Tensor:
    """Order-free sum of non-negative values along ``dim`` (at most 2^log2_n of them), float64.

    Each value is truncated to a multiple of q = 2^(e + 1 + log2_n - 53), e the exponent of the group's maximum
    (a max is exact in any order); the multiples then add up exactly in float64 in any order (their total is below
    2^53 q). So the result is a function of the set of values, not of the order or tree of the additions: both GPU
    backends, every grid, every GPU give the same bits. Relative error <= n * 2^(log2_n - 52) (never worse than
    2^-36 for the level-1 groups). NaN in the group -> NaN, else +Inf -> +Inf."""
    v = v.double()
    nan = torch.isnan(v).any(dim)
    inf = torch.isinf(v).any(dim)
    finite = torch.where(torch.isfinite(v), v, torch.zeros((), dtype=v.dtype, device=v.device))
    m = finite.amax(dim, keepdim=True)
    _, e = torch.frexp(m)  # m = f * 2^e with f in [0.5, 1): the exponent of m is e - 1
    if isinstance(log2_n, torch.Tensor):
        log2_n = log2_n.to(e.dtype).unsqueeze(dim)
    q = torch.ldexp(torch.ones_like(m), e + log2_n - 53)
    s = (torch.floor(finite / q) * q).sum(dim)
    s = torch.where(inf, torch.full_like(s, math.inf), s)
    return torch.where(nan, torch.full_like(s, math.nan), s)


def ceil_log2(n: torch.Tensor) -> torch.Tensor:
    """ceil(log2(n)) for integer n >= 1 (0 for n <= 1), int64."""
    n = n.to(torch.int64).clamp_min(1)
    out = torch.zeros_like(n)
    for k in range(62):
        out = out + (n > (1 << k)).to(torch.int64)
    return out


def band_l1_gpu_order(
    cur: torch.Tensor, prev: torch.Tensor, bounds: torch.Tensor, per_sample: bool, out: torch.Tensor
) -> None:
    """band_l1 computed in the exact order of the GPU kernels; their results equal this bitwise.

    Level 0 (sequential, float32): per sample b, row chunk c (rows [64c, 64c + 64)) and channel d, the sum of
    fp32(|fp32(cur) - fp32(prev)|) (and of |fp32(prev)|) over the chunk's rows in increasing order, from 0.
    Level 1 (order-free): per (b, c, channel block j of 256 channels, band k), ``exact_group_sum`` of the level-0
    sums of the block's channels in band k (log2_n = 8), float64.
    Level 2 (order-free): per (output row, band k), ``exact_group_sum`` of the level-1 sums of the samples of the
    row, every chunk and every block that overlaps band k (log2_n = ceil(log2(their count))), rounded to float32."""
    B, R, D = cur.shape
    nb = bounds.shape[0] - 1
    W, RC = BAND_BLOCK_D, BAND_CHUNK_R
    dev = cur.device
    C = -(-R // RC)
    J = -(-D // W)
    if B == 0 or C == 0:
        out.zero_()
        return
    x = cur.float()
    y = prev.float()
    diff = torch.zeros((B, C * RC, J * W), dtype=torch.float32, device=dev)
    mag = torch.zeros_like(diff)
    diff[:, :R, :D] = (x - y).abs()
    mag[:, :R, :D] = y.abs()
    diff = diff.view(B, C, RC, J * W)
    mag = mag.view(B, C, RC, J * W)
    s_diff = torch.zeros((B, C, J * W), dtype=torch.float32, device=dev)
    s_mag = torch.zeros_like(s_diff)
    for i in range(RC):  # level 0: sequential over the chunk's rows (padding rows add +0: exact)
        s_diff = s_diff + diff[:, :, i]
        s_mag = s_mag + mag[:, :, i]
    ch = torch.arange(J * W, device=dev)
    lo = bounds[:-1].to(dev).view(-1, 1)
    hi = bounds[1:].to(dev).view(-1, 1)
    member = (ch >= lo) & (ch < hi)  # [nb, J*W]
    zero = torch.zeros((), dtype=torch.float32, device=dev)

    def level1(s):  # [B, C, J*W] -> [B, C, J, nb]
        v = torch.where(member.view(1, 1, nb, J * W), s.unsqueeze(2), zero)  # [B, C, nb, J*W]
        v = v.view(B, C, nb, J, W)
        return exact_group_sum(v, 4, BAND_L1_LOG2).transpose(2, 3)

    p_diff, p_mag = level1(s_diff), level1(s_mag)
    j_first = bounds[:-1].to(dev) // W
    j_last = (bounds[1:].to(dev) - 1) // W
    groups = [(b, b + 1) for b in range(B)] if per_sample else [(0, B)]
    rows = []
    for b0, b1 in groups:
        n = (b1 - b0) * C * (j_last - j_first + 1)  # [nb] values per band (non-overlapping blocks hold 0)
        lg = ceil_log2(n)
        sd = exact_group_sum(p_diff[b0:b1].permute(3, 0, 1, 2).reshape(nb, -1), 1, lg)
        sm = exact_group_sum(p_mag[b0:b1].permute(3, 0, 1, 2).reshape(nb, -1), 1, lg)
        rows.append(torch.stack((sd, sm), dim=-1))
    out.copy_(torch.stack(rows).float())


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


def _scalar(x: torch.Tensor | float | int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A canonical scalar (0-dim tensor or Python number) as a 0-dim tensor of ``dtype``: a Python number is
    rounded to ``dtype`` as the kernels round their argument (torch.full: a fill, no host-to-device copy)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype).reshape(())
    return torch.full((), x, dtype=dtype, device=device)


def _valid_rows(n: int, count: torch.Tensor | int | None, device: torch.device) -> torch.Tensor:
    j = torch.arange(n, device=device)
    if count is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return j < _scalar(count, torch.int64, device)


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
    q = _scalar(tau_query, torch.float32, dev).double()
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
        # Two equal largest taus give no slope: hold the last row (the limit of a vanishing extrapolation).
        has_prev = torch.isfinite(t_prev) & (t_prev < t_last)
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


def _fact(i: int) -> float:
    """i! as a float (inf beyond the float64 range; it is rounded to float32 where it divides)."""
    return float(math.factorial(i)) if i <= 170 else math.inf


def _pow(x: float, k: int) -> float:
    try:
        return x**k
    except OverflowError:
        return math.copysign(math.inf, x) if k % 2 else math.inf


def taylor_weights(order_plus_one: int, distance: torch.Tensor | float, device=None) -> torch.Tensor:
    """c_i = distance^i / i!, float32 (K,). Beyond 34! the float32 factorial is inf and c_i is 0."""
    x = _scalar(distance, torch.float32, device if device is not None else "cpu")
    return torch.stack([x**i / _fact(i) for i in range(order_plus_one)])


def hermite_weights(order_plus_one: int, distance: torch.Tensor | float, scale: float, device=None) -> torch.Tensor:
    """c_0 = 1, c_k = H_k(scale * distance) * scale^k / k! with physicists' Hermite H_k, float32 (K,)."""
    y = _scalar(distance, torch.float32, device if device is not None else "cpu") * scale
    h = [torch.ones_like(y), 2.0 * y]
    for k in range(2, order_plus_one):
        h.append(2.0 * y * h[-1] - 2.0 * (k - 1) * h[-2])
    return torch.stack([h[k] * _pow(scale, k) / _fact(k) for k in range(order_plus_one)])


def _weighted_rows(diffs: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_((w.unsqueeze(1) * diffs.float()).sum(dim=0))


def taylor_forecast(diffs: torch.Tensor, distance: torch.Tensor, out: torch.Tensor) -> None:
    """out = sum_i diffs[i] * distance^i / i!. diffs: (K, N) any strides; out: (N,) in diffs' dtype."""
    _weighted_rows(diffs, taylor_weights(diffs.shape[0], distance, diffs.device).to(diffs.device), out)


def hermite_forecast(diffs: torch.Tensor, distance: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out = diffs[0] + sum_{k>=1} diffs[k] * H_k(scale*distance) * scale^k / k! (FreqCa's high-band forecast)."""
    _weighted_rows(diffs, hermite_weights(diffs.shape[0], distance, scale, diffs.device).to(diffs.device), out)


def taylor_update(
    diffs: torch.Tensor, feature: torch.Tensor, gap: torch.Tensor | float, count: torch.Tensor | int | None
) -> None:
    """In place: new[0] = feature; new[i+1] = (new[i] - old[i]) / gap while old[i] was valid (i < count), else 0.
    count = number of valid orders held before the call (None: all K). diffs: (K, N); feature: (N,)."""
    K = diffs.shape[0]
    g = _scalar(gap, torch.float32, diffs.device)
    old = diffs.float()
    rows = [feature.float()]
    for i in range(K - 1):
        if count is None:
            ok = torch.ones((), dtype=torch.bool, device=diffs.device)
        else:
            ok = _scalar(count, torch.int64, diffs.device) > i
        nxt = torch.where(ok, (rows[i] - torch.where(ok, old[i], torch.zeros((), device=diffs.device))) / g, 0.0)
        rows.append(nxt)
    diffs.copy_(torch.stack(rows))


# ----------------------------------------------------------------------------------------------------------------
# The forecast error of an update (taylor_update_error, history_update)
# ----------------------------------------------------------------------------------------------------------------


def forecast_rows(rows: torch.Tensor, w: torch.Tensor, count: torch.Tensor | int | None) -> torch.Tensor:
    """pred[c] = sum_{k < min(count, n)} w[k] * rows[k, c] in float32: rows added in order k = 0, 1, ... starting
    from +0.0, each a product then an add (no FMA). Every backend forms the same sum in the same order, so its pred
    (and each error term) is bitwise this. Rows k >= count (and their weights) never enter it, even if they hold NaN.
    rows: (n, N) any strides; w: float32 (n,). Returns float32 (N,)."""
    n, N = rows.shape
    dev = rows.device
    acc = torch.zeros(N, dtype=torch.float32, device=dev)
    valid = _valid_rows(n, count, dev)
    for k in range(n):
        acc = torch.where(valid[k], acc + w[k] * rows[k].float(), acc)
    return acc


def error_sums(pred: torch.Tensor, value: torch.Tensor, error: torch.Tensor) -> None:
    """error[b] = (sum (pred - value)^2, sum value^2) over sample b, the b-th of B = error.shape[0] equal
    consecutive slices of the flat (N,) vectors. Each term in float32 (e = pred - value, then e * e; value * value),
    the sums in float64, rounded once to float32 (so every backend, whatever its order of float64 additions, agrees
    with this to about one float32 ulp). NaN / Inf propagate. error: float32 (B, 2), written."""
    B = error.shape[0]
    if B == 0:
        return
    v = value.float()
    e = pred - v
    terms = torch.stack((e * e, v * v)).view(2, B, v.shape[0] // B)
    error.copy_(terms.double().sum(-1).t().float())


def taylor_update_error(
    diffs: torch.Tensor,
    feature: torch.Tensor,
    gap: torch.Tensor | float,
    count: torch.Tensor | int | None,
    weights: torch.Tensor,
    error: torch.Tensor,
) -> None:
    """taylor_update, and the error the forecast of this step from the old differences would have made:
    pred = sum_{i < min(count, K)} weights[i] * old diffs[i] (``forecast_rows``), error = ``error_sums(pred,
    feature)``. diffs: (K, N); feature: (N,); weights: float32 (K,); error: float32 (B, 2)."""
    error_sums(forecast_rows(diffs, weights, count), feature, error)
    taylor_update(diffs, feature, gap, count)


def history_update(
    history: torch.Tensor,
    value: torch.Tensor,
    row: torch.Tensor | int,
    weights: torch.Tensor,
    count: torch.Tensor | int | None,
    error: torch.Tensor | None,
) -> None:
    """With ``error``: error = ``error_sums(forecast_rows(history, weights, count), value)`` (the history before the
    write); then history[row] = value (a copy of the bits). A row tensor outside [0, n) writes nothing.
    history: (n, N) any strides; value: (N,); weights: float32 (n,); error: float32 (B, 2) or None."""
    if error is not None:
        error_sums(forecast_rows(history, weights, count), value, error)
    n = history.shape[0]
    if isinstance(row, torch.Tensor):
        hit = (torch.arange(n, device=history.device) == row.reshape(())).unsqueeze(1)
        history.copy_(torch.where(hit, value.unsqueeze(0), history))
    elif 0 <= row < n:
        history[row].copy_(value)
