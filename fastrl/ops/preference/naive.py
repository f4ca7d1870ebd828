"""Naive oracles for `preference_loss`, `kto_loss` and `ld_tail_logps`, in float64.

Written for reading, not speed: one Python loop over pairs (or completions), each loss
type's formula spelled out on scalars as its paper (and TRL 1.16) writes it. Differentiable
in the policy log-probs, the tail log-probs and ``nll``.
"""

import math

import torch

from fastrl.options.preference import AVERAGED_LOSS_TYPES, KTOLossOptions, PreferenceLossOptions

_KTO = KTOLossOptions()  # the defaults, declared there


def _logsigmoid(x):
    return torch.nn.functional.logsigmoid(x)


def _sigmoid(x):
    return torch.sigmoid(x)


def _value(x):
    return float(x.detach())


def _mean(values):
    return sum(values[1:], values[0]) / len(values)


def naive_ld_tail_logps(logps, mask):
    """Same contract as `fastrl.ld_tail_logps`: walk each pair's completion tokens."""
    B = logps.shape[0] // 2
    lp = logps.double()
    tails = []
    for row in range(2 * B):
        pair = row % B
        tokens = [t for t in range(logps.shape[1]) if bool(mask[row, t])]
        n_c = sum(1 for t in range(logps.shape[1]) if bool(mask[pair, t]))
        n_r = sum(1 for t in range(logps.shape[1]) if bool(mask[pair + B, t]))
        shared = min(n_c, n_r)
        tail = torch.zeros((), dtype=torch.float64)
        for t in tokens[shared:]:
            tail = tail + lp[row, t]
        tails.append(tail)
    return torch.stack(tails[:B]), torch.stack(tails[B:])


def _score(logratio, f_divergence_type, coef):
    """f'(t) at t = pi / pi_ref, from the log-ratio."""
    if f_divergence_type == "forward_kl":
        return 1 - 1 / torch.exp(logratio)
    if f_divergence_type == "js_divergence":
        t = torch.exp(logratio)
        return torch.log(2 * t / (t + 1))
    if f_divergence_type == "alpha_divergence" and abs(coef - 1) >= 1e-6:
        exponent = torch.clamp((coef - 1) * logratio, max=80.0)
        return (torch.exp(exponent) - 1) / (coef - 1)
    return logratio


def naive_preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    nll: torch.Tensor | None = None,
    chosen_tail_logps: torch.Tensor | None = None,
    rejected_tail_logps: torch.Tensor | None = None,
    ref_chosen_tail_logps: torch.Tensor | None = None,
    ref_rejected_tail_logps: torch.Tensor | None = None,
    chosen_aligned_logps: torch.Tensor | None = None,
    rejected_aligned_logps: torch.Tensor | None = None,
    **options: object,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same contract as `fastrl.preference_loss` (no validation); float64 loss and metrics.

    `options`: those of `PreferenceLossOptions`, with its defaults (and what None stands
    for where an option applies)."""
    o = PreferenceLossOptions(**options).resolved()
    B = chosen_logps.shape[0]

    def d(x):
        return None if x is None else x.double()

    def const(x):
        return None if x is None else x.detach().double()

    pc, pr = d(chosen_logps), d(rejected_logps)
    nc = None if chosen_lengths is None else [float(n) for n in chosen_lengths]
    nr = None if rejected_lengths is None else [float(n) for n in rejected_lengths]

    def nll_term():  # mean NLL per chosen completion token
        if nll is not None:
            return nll.double().reshape(())
        return -sum(pc[i] for i in range(B)) / max(sum(nc), 1.0)

    if o.reference_free:
        return _naive_reference_free(o, pc, pr, nc, nr, nll_term)
    refs = (const(ref_chosen_logps), const(ref_rejected_logps))
    tails = (d(chosen_tail_logps), d(rejected_tail_logps))
    ref_tails = (const(ref_chosen_tail_logps), const(ref_rejected_tail_logps))
    wpo = [1.0] * B
    if o.use_weighting:
        for i in range(B):
            # exp of the mean aligned log-prob per token, chosen times rejected
            mean_c = float(chosen_aligned_logps[i]) / max(nc[i], 1.0)
            mean_r = float(rejected_aligned_logps[i]) / max(nr[i], 1.0)
            wpo[i] = math.exp(mean_c) * math.exp(mean_r)
    return _naive_dpo(o, pc, pr, refs, tails, ref_tails, nc, nr, wpo, nll_term)


def _naive_reference_free(o, pc, pr, nc, nr, nll_term):
    """The CPO family and ORPO, pair by pair."""
    B, kind, beta, eps = len(pc), o.loss_type[0], o.beta, o.label_smoothing
    c = [pc[i] / max(nc[i], 1.0) if kind in AVERAGED_LOSS_TYPES else pc[i] for i in range(B)]
    r = [pr[i] / max(nr[i], 1.0) if kind in AVERAGED_LOSS_TYPES else pr[i] for i in range(B)]
    metrics = {}
    if kind == "orpo":
        per_pair, log_odds_all, ratios = [], [], []
        for i in range(B):
            # odds(y) = p / (1 - p) with p = exp(mean token log-prob)
            log_odds_c = c[i] - torch.log(1 - torch.exp(c[i]))
            log_odds_r = r[i] - torch.log(1 - torch.exp(r[i]))
            log_odds = log_odds_c - log_odds_r
            ratio = _logsigmoid(log_odds)
            per_pair.append(beta * ratio)
            log_odds_all.append(log_odds.detach())
            ratios.append(ratio.detach())
        sft = nll_term()
        loss = sft - _mean(per_pair)
        metrics["nll_loss"] = sft.detach()
        metrics["log_odds_ratio"] = _mean(ratios)
        metrics["log_odds_chosen"] = _mean(log_odds_all)
        rew_c = [beta * x.detach() for x in c]
        rew_r = [beta * x.detach() for x in r]
    else:
        per_pair, rew_c, rew_r = [], [], []
        for i in range(B):
            if o.alpha != 0:  # AlphaPO: r(y) = (1 - p^-alpha) / alpha
                uc = (1 - torch.exp(c[i]) ** (-o.alpha)) / o.alpha
                ur = (1 - torch.exp(r[i]) ** (-o.alpha)) / o.alpha
            else:
                uc, ur = c[i], r[i]
            h = uc - ur
            if kind in ("simpo", "alphapo"):
                h = h - o.simpo_gamma / beta
            if kind in ("cpo", "simpo", "alphapo"):
                loss_i = -(1 - eps) * _logsigmoid(beta * h) - eps * _logsigmoid(-beta * h)
            elif kind == "cpo_hinge":
                loss_i = torch.clamp(1 - beta * h, min=0)
            else:
                loss_i = (h - 1 / (2 * beta)) ** 2
            per_pair.append(loss_i)
            rew_c.append(beta * uc.detach())
            rew_r.append(beta * ur.detach())
        w = o.cpo_alpha
        sft = nll_term() if w != 0 else torch.zeros((), dtype=torch.float64)
        loss = _mean(per_pair) + w * sft
        metrics["nll_loss"] = sft.detach()
    metrics.update(_rewards(rew_c, rew_r, c, r))
    return loss, _as64(metrics)


def _naive_dpo(o, pc, pr, refs, tails, ref_tails, nc, nr, wpo, nll_term):
    """The DPO loss types, pair by pair, summed with their weights."""
    B, beta, eps = len(pc), o.beta, o.label_smoothing
    refc, refr = refs
    have_ref = refc is not None
    if o.ld_alpha is not None:  # shared + ld_alpha * verbose tail
        a, (tc, tr) = o.ld_alpha, tails
        c = [pc[i] - tc[i] + a * tc[i] for i in range(B)]
        r = [pr[i] - tr[i] + a * tr[i] for i in range(B)]
        if have_ref:
            trc, trr = ref_tails
            rc = [refc[i] - trc[i] + a * trc[i] for i in range(B)]
            rr = [refr[i] - trr[i] + a * trr[i] for i in range(B)]
    else:
        c, r = [pc[i] for i in range(B)], [pr[i] for i in range(B)]
        if have_ref:
            rc, rr = [refc[i] for i in range(B)], [refr[i] for i in range(B)]

    lc = [c[i] - rc[i] for i in range(B)] if have_ref else None  # log pi/pi_ref, chosen
    lr = [r[i] - rr[i] for i in range(B)] if have_ref else None
    if have_ref:
        sc = [_score(x, o.f_divergence_type, o.f_alpha_divergence_coef) for x in lc]
        sr = [_score(x, o.f_divergence_type, o.f_alpha_divergence_coef) for x in lr]

    loss = torch.zeros((), dtype=torch.float64)
    for kind, weight in zip(o.loss_type, o.loss_weights, strict=True):
        per_pair = []
        if kind in ("aot", "aot_unpaired"):
            # pair the k-th smallest with the k-th smallest
            if kind == "aot":
                a = sorted([c[i] - r[i] for i in range(B)], key=_value)
                b = sorted([rc[i] - rr[i] for i in range(B)], key=_value)
            else:
                a = sorted(lc, key=_value)
                b = sorted(lr, key=_value)
            for i in range(B):
                z = beta * (a[i] - b[i])
                per_pair.append(-(1 - eps) * _logsigmoid(z) - eps * _logsigmoid(-z))
        for i in range(B if kind not in ("aot", "aot_unpaired") else 0):
            if have_ref:
                z = beta * (sc[i] - sr[i])
            if kind == "sigmoid":
                margin = sc[i] - sr[i]
                margin = margin - o.dpop_lambda * torch.clamp(rc[i] - c[i], min=0)
                z = beta * margin
                if o.rdpo_alpha != 0:
                    z = z - o.rdpo_alpha * (nc[i] - nr[i])
                loss_i = -(1 - eps) * _logsigmoid(z) - eps * _logsigmoid(-z)
            elif kind == "hinge":
                loss_i = torch.clamp(1 - z, min=0)
            elif kind in ("ipo", "sigmoid_norm"):
                h = sc[i] / max(nc[i], 1.0) - sr[i] / max(nr[i], 1.0)
                if kind == "ipo":
                    loss_i = (h - 1 / (2 * beta)) ** 2
                else:
                    loss_i = -_logsigmoid(beta * h)
            elif kind == "exo_pair":
                # KL between q = (sigmoid(z), sigmoid(-z)) and p = (1 - eps, eps)
                qw, ql = _sigmoid(z), _sigmoid(-z)
                loss_i = qw * (torch.log(qw) - math.log(1 - eps)) + ql * (
                    torch.log(ql) - math.log(eps)
                )
            elif kind == "nca_pair":
                zc, zr = beta * lc[i], beta * lr[i]
                loss_i = -_logsigmoid(zc) - 0.5 * _logsigmoid(-zc) - 0.5 * _logsigmoid(-zr)
            elif kind == "robust":
                loss_i = ((1 - eps) * -_logsigmoid(z) - eps * -_logsigmoid(-z)) / (1 - 2 * eps)
            elif kind == "bco_pair":
                loss_i = -_logsigmoid(beta * lc[i]) - _logsigmoid(-beta * lr[i])
            elif kind == "sppo_hard":
                loss_i = (lc[i] - 1 / (2 * beta)) ** 2 + (lr[i] + 1 / (2 * beta)) ** 2
            elif kind == "apo_zero":
                loss_i = (1 - _sigmoid(beta * lc[i])) + _sigmoid(beta * lr[i])
            elif kind == "apo_down":
                loss_i = _sigmoid(beta * lc[i]) + (1 - _sigmoid(beta * (lc[i] - lr[i])))
            elif kind == "discopop":
                mix = _sigmoid(z / o.discopop_tau)
                loss_i = (1 - mix) * -_logsigmoid(z) + mix * torch.exp(-z)
            else:  # sft
                loss_i = nll_term()
            per_pair.append(loss_i)
        per_pair = [per_pair[i] * wpo[i] for i in range(B)]
        loss = loss + weight * _mean(per_pair)

    if have_ref:
        metrics = _rewards([beta * x.detach() for x in lc], [beta * x.detach() for x in lr], c, r)
    else:
        metrics = {"logps/chosen": _mean([x.detach() for x in c])}
        metrics["logps/rejected"] = _mean([x.detach() for x in r])
    return loss, _as64(metrics)


def _rewards(rew_c, rew_r, c, r):
    B = len(rew_c)
    return {
        "rewards/chosen": _mean(rew_c),
        "rewards/rejected": _mean(rew_r),
        "rewards/accuracies": sum(float(rew_c[i] > rew_r[i]) for i in range(B)) / B,
        "rewards/margins": _mean([rew_c[i] - rew_r[i] for i in range(B)]),
        "logps/chosen": _mean([x.detach() for x in c]),
        "logps/rejected": _mean([x.detach() for x in r]),
    }


def _as64(metrics):
    return {k: torch.as_tensor(v, dtype=torch.float64).detach() for k, v in metrics.items()}


def naive_kto_loss(
    logps,
    ref_logps,
    labels,
    *,
    kl_logps=None,
    ref_kl_logps=None,
    loss_type=_KTO.loss_type,
    beta=_KTO.beta,
    desirable_weight=_KTO.desirable_weight,
    undesirable_weight=_KTO.undesirable_weight,
):
    """Same contract as `fastrl.kto_loss` (no validation); float64 loss and metrics."""
    B = logps.shape[0]
    lp = logps.double()
    ref = ref_logps.detach().double()
    if loss_type == "kto":
        diffs = [float(kl_logps[j]) - float(ref_kl_logps[j]) for j in range(kl_logps.shape[0])]
        z0 = max(sum(diffs) / len(diffs), 0.0)  # the KL reference point, no gradient
    else:
        z0 = 0.0
    losses, rew = [], {True: [], False: []}
    lps = {True: [], False: []}
    for i in range(B):
        good = bool(labels[i])
        r = lp[i] - ref[i]
        if loss_type == "kto":
            v = _sigmoid(beta * (r - z0)) if good else _sigmoid(beta * (z0 - r))
            loss_i = 1 - v
        else:
            loss_i = 1 - _sigmoid(beta * r) if good else _sigmoid(beta * r)
        losses.append((desirable_weight if good else undesirable_weight) * loss_i)
        rew[good].append(beta * r.item())
        lps[good].append(lp[i].item())
    finite = [x for x in losses if not math.isnan(x.item())]
    loss = _mean(finite)
    metrics = {"kl": z0}
    for kind, good in (("chosen", True), ("rejected", False)):
        n = len(rew[good])  # a kind without rows: NaN, as kto_loss
        metrics[f"rewards/{kind}"] = sum(rew[good]) / n if n else math.nan
        metrics[f"logps/{kind}"] = sum(lps[good]) / n if n else math.nan
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, _as64(metrics)
