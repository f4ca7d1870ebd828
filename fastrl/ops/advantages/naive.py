"""Naive oracles, in float64 with Python lists: `group_advantages` one group at a time;
the per-token estimators (GAE, REINFORCE++, ReMax) one row and one token at a time."""

import math

import torch

from fastrl.options import advantages as defaults


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    """Bessel-corrected standard deviation; NaN for fewer than two values (as TRL's nanstd)."""
    if len(xs) < 2:
        return math.nan
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def naive_group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    baseline: str = defaults.BASELINE,
    scale: str = defaults.SCALE,
    eps: float = defaults.EPS,
    weights=None,
    normalize: str = defaults.AGGREGATION,
) -> torch.Tensor:
    """Same contract as `fastrl.group_advantages`; returns float64 ``[B]``.

    NaN rewards are missing. A completion with no reward at all, a group with fewer than
    two scored completions or no reward variance gets 0.
    """
    r = rewards.detach().double().cpu()
    if r.dim() == 1:
        r = r[:, None]
    B, K = r.shape
    assert B % group_size == 0
    w = [1.0] * K if weights is None else [float(x) for x in weights]
    rows = [[float(v) for v in row] for row in r]
    groups = [list(range(i, i + group_size)) for i in range(0, B, group_size)]
    adv = [math.nan] * B

    def present(vals):
        return [v for v in vals if not math.isnan(v)]

    if normalize == "normalize_then_sum":
        assert baseline == "mean" and scale == "group"
        z = [[math.nan] * K for _ in range(B)]
        for idx in groups:
            for k in range(K):
                vals = present([rows[i][k] for i in idx])
                if not vals:
                    continue
                m = _mean(vals)
                flat = max(vals) == min(vals)
                for i in idx:
                    if not math.isnan(rows[i][k]):
                        z[i][k] = 0.0 if flat else (rows[i][k] - m) / (_std(vals) + eps)
        s = []
        for i in range(B):
            if all(math.isnan(v) for v in rows[i]):
                s.append(math.nan)
            else:
                s.append(sum(w[k] * z[i][k] for k in range(K) if not math.isnan(z[i][k])))
        vals = present(s)
        m = _mean(vals) if vals else math.nan
        sd = _std(vals) if B > 1 else 0.0
        for i in range(B):
            adv[i] = (s[i] - m) / (sd + eps)
        for idx in groups:
            if all(
                len(present([rows[i][k] for i in idx])) > 0
                and max(present([rows[i][k] for i in idx]))
                == min(present([rows[i][k] for i in idx]))
                for k in range(K)
            ):
                for i in idx:
                    adv[i] = 0.0
    else:
        s = []
        for i in range(B):
            if all(math.isnan(v) for v in rows[i]):
                s.append(math.nan)
            else:
                s.append(sum(w[k] * rows[i][k] for k in range(K) if not math.isnan(rows[i][k])))
        for idx in groups:
            vals = present([s[i] for i in idx])
            for i in idx:
                if math.isnan(s[i]) or len(vals) < 2 or max(vals) == min(vals):
                    adv[i] = 0.0  # no reward, or no signal in the group
                    continue
                if baseline == "mean":
                    b = _mean(vals)
                else:  # leave-one-out: the mean of the other scored completions
                    b = (sum(vals) - s[i]) / (len(vals) - 1)
                a = s[i] - b
                if scale == "group":
                    a = a / (_std(vals) + eps)
                adv[i] = a
        if scale == "batch":
            if baseline == "mean":
                sd = _std(present(s)) if B > 1 else 0.0
                adv = [a / (sd + eps) for a in adv]
            else:
                # Standardise the RLOO advantages over the batch. Groups with fewer than two
                # scored completions and unscored completions do not take part (TRL: NaN).
                part = []
                for idx in groups:
                    vals = present([s[i] for i in idx])
                    part += [adv[i] for i in idx if not math.isnan(s[i]) and len(vals) >= 2]
                m = _mean(part) if part else 0.0
                sd = _std(part) if B > 1 else 0.0
                adv = [(a - m) / (sd + eps) for a in adv]
                for idx in groups:  # no signal stays no signal
                    vals = present([s[i] for i in idx])
                    for i in idx:
                        if math.isnan(s[i]) or len(vals) < 2 or max(vals) == min(vals):
                            adv[i] = 0.0
    out = torch.tensor(adv, dtype=torch.float64)
    return torch.nan_to_num(out, nan=0.0)


# --------------------------------------------------------------------------- per-token


def _rows(mask):
    B, T = mask.shape
    return [[bool(mask[b, t]) for t in range(T)] for b in range(B)]


def naive_gae_advantages(rewards, values, mask, *, gamma=defaults.GAMMA, lam=defaults.LAM):
    """Same contract as `fastrl.gae_advantages`; float64 ``(advantages, returns)``.

    Row by row, right to left, over the unmasked tokens only (verl's skip of masked
    tokens): delta = r + gamma V_next - V, A = delta + gamma lam A_next.
    """
    keep = _rows(mask)
    B, T = mask.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        v_next, a_next = 0.0, 0.0
        for t in reversed(range(T)):
            if not keep[b][t]:
                continue
            r, v = float(rewards[b, t]), float(values[b, t])
            a = r + gamma * v_next - v + gamma * lam * a_next
            adv[b, t], ret[b, t] = a, a + v
            v_next, a_next = v, a
    return adv, ret


def _whiten(x, keep, normalize_std):
    """OpenRLHF's batch normalisation: biased variance over unmasked tokens, floor 1e-8."""
    vals = [x[b][t] for b in range(len(x)) for t in range(len(x[b])) if keep[b][t]]
    n = max(len(vals), 1)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / n
    rstd = 1 / math.sqrt(max(var, defaults.WHITEN_EPS)) if normalize_std else 1.0
    return [
        [(x[b][t] - mean) * rstd if keep[b][t] else 0.0 for t in range(len(x[b]))]
        for b in range(len(x))
    ]


def _returns(reward, kl_row, keep_row, kl_coef, gamma):
    """One row: KL-shaped per-token rewards, then discounted returns-to-go (OpenRLHF)."""
    T = len(keep_row)
    unmasked = [t for t in range(T) if keep_row[t]]
    r = [(-kl_coef * kl_row[t] if keep_row[t] and kl_row is not None else 0.0) for t in range(T)]
    if unmasked:
        r[unmasked[-1]] += reward
    out, g = [0.0] * T, 0.0
    for t in reversed(range(T)):
        g = r[t] + gamma * g
        out[t] = g if keep_row[t] else 0.0
    return out


def naive_reinforce_plus_plus_advantages(
    rewards, mask, *, kl=None, kl_coef=0.0, gamma=defaults.GAMMA, baseline="none",
    group_size=None, normalize_std=True,
):  # fmt: skip
    """Same contract as `fastrl.reinforce_plus_plus_advantages` (no validation); float64."""
    keep = _rows(mask)
    B, T = mask.shape
    r = [float(x) for x in rewards]
    if baseline == "mean":
        for g0 in range(0, B, group_size):
            group = r[g0 : g0 + group_size]
            mean = sum(group) / len(group)
            r[g0 : g0 + group_size] = [x - mean for x in group]
    kl_rows = [None] * B if kl is None else [[float(x) for x in row] for row in kl]
    returns = [_returns(r[b], kl_rows[b], keep[b], kl_coef, gamma) for b in range(B)]
    adv = _whiten(returns, keep, normalize_std)
    f64 = lambda x: torch.tensor(x, dtype=torch.float64).reshape(B, T)
    return f64(adv), f64(returns)


def naive_remax_advantages(rewards, baseline_rewards, mask):
    """Same contract as `fastrl.remax_advantages`; float64."""
    keep = _rows(mask)
    B, T = mask.shape
    returns = [_returns(float(rewards[b]), None, keep[b], 0.0, 1.0) for b in range(B)]
    adv = [
        [returns[b][t] - float(baseline_rewards[b]) if keep[b][t] else 0.0 for t in range(T)]
        for b in range(B)
    ]
    f64 = lambda x: torch.tensor(x, dtype=torch.float64).reshape(B, T)
    return f64(adv), f64(returns)
