"""Naive oracle for `group_advantages`: one group at a time, in float64, with Python lists."""

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
