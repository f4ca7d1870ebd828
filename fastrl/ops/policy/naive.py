"""Naive oracle for `policy_loss`: token by token, sequence by sequence, in float64.

Written for reading, not speed: one Python loop over sequences and tokens, the formula of
each loss type spelled out. Differentiable in ``logps`` and ``entropy``.
"""

import math

import torch

from fastrl.options.policy import DEFAULTS as _D  # the options' defaults, as the loss's

# the loss types with PPO's clipped surrogate (the oracle's own list: it defines the loss)
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _kl(lp, ref, estimator):
    d = ref - lp  # log(pi_ref / pi)
    if estimator == "k3":
        return torch.exp(d) - d - 1
    if estimator == "k2":
        return 0.5 * d**2
    return -d


def _token_loss(loss_type, w, a, lp, eps_low, eps_high, delta, tau_pos, tau_neg):
    """One token's loss term for ratio `w`, advantage `a`, log-prob `lp`; and the ratio the
    clip metrics compare."""
    if loss_type in _CLIPPED:
        clipped_w = torch.clamp(w, 1 - eps_low, 1 + eps_high)
        r = w if delta is None else torch.clamp(w, max=delta)
        return -torch.minimum(r * a, clipped_w * a), r
    if loss_type == "cispo":
        return -torch.clamp(w, max=eps_high).detach() * a * lp, w
    tau = tau_pos if a > 0 else tau_neg  # sapo
    return -torch.sigmoid(tau * (w - 1)) * 4 / tau * a, w


def _vespo_phi(log_w, a, k_pos, lam_pos, k_neg, lam_neg):
    """VESPO's Gamma weight of a sequence's log-ratio sum `log_w` (float, unclamped), for
    advantage `a` (TRL's get_gamma_weights): e^lam w^k e^(-lam w), TRL's clamps."""
    log_w = min(max(log_w, math.log(1e-8)), 20.0)
    k, lam = (k_pos, lam_pos) if a >= 0 else (k_neg, lam_neg)
    lam = max(lam, 1e-4)
    try:
        phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
    except OverflowError:
        return 0.0
    return phi if math.isfinite(phi) else 0.0


def _high_entropy(ent, keep, toks, quantile):
    """Keep tokens at or above the (1 - quantile) quantile of the masked entropies."""
    B, T = ent.shape
    vals = [ent[b, t].item() for b in range(B) for t in toks[b]]
    thr = torch.quantile(torch.tensor(vals, dtype=torch.float64), 1 - quantile)
    return [[keep[b][t] and ent[b, t].item() >= thr for t in range(T)] for b in range(B)]


def _sampler_weights(old, samp, keep, mode, clip_min, clip_max):
    """Sampler importance weights pi_old / pi_sampler, per token."""
    B, T = old.shape
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    is_w = [[1.0] * T for _ in range(B)]
    for b in range(B):
        d = []
        for t in range(T):
            x = (old[b, t] - samp[b, t]).item() if keep[b][t] else 0.0
            d.append(0.0 if math.isnan(x) else x)
        ws = [math.exp(sum(d))] * T if mode.startswith("sequence") else [math.exp(x) for x in d]
        for t in range(T):
            w = ws[t]
            if mode.endswith("truncate"):
                w = min(max(w, lo), hi)
            elif w < lo or w > hi:
                w = 0.0
            is_w[b][t] = w
    return is_w


def _normalise(loss_type, rows, B, GA, spg, max_completion_length, num_items, num_processes):
    """TRL's normalisers over `rows` (per sequence, the losses of its masked tokens):
    (loss, the logged policy_loss)."""
    zero = torch.zeros((), dtype=torch.float64)
    total = sum((sum(r, zero) for r in rows), zero)
    if loss_type in ("dapo", "cispo", "vespo"):
        normalizer = max(float(num_items), 1.0) / num_processes * GA / spg
        loss = total / normalizer
        return loss, loss.detach()
    if loss_type in ("grpo", "sapo"):
        loss = sum((sum(r, zero) / max(len(r), 1) for r in rows), zero) / B
    elif loss_type == "bnpo":
        loss = total / max(sum(len(r) for r in rows), 1)
    elif loss_type == "dr_grpo":
        loss = total / (B * max_completion_length)
    else:  # luspo
        loss = total / B
    return loss / GA, loss.detach()


def _clip_metrics(loss_type, clip_ratios, A, toks, per_seq, eps_low, eps_high):
    """The fraction of tokens (sequences, per_seq) the clip acts on, as TRL logs it."""
    B, T = len(clip_ratios), len(clip_ratios[0])
    if loss_type == "cispo":
        names = {"high": lambda r, a: r > eps_high and a > 0}
    else:
        names = {
            "low": lambda r, a: r < 1 - eps_low and a < 0,
            "high": lambda r, a: r > 1 + eps_high and a > 0,
            "region": lambda r, a: (r < 1 - eps_low and a < 0) or (r > 1 + eps_high and a > 0),
        }
    metrics = {}
    for name, pred in names.items():
        flags = [
            [float(pred(clip_ratios[b][t].item(), A(b, t).item())) for t in range(T)]
            for b in range(B)
        ]
        if per_seq:
            seq_vals = [flags[b][0] for b in range(B)]
            mean = sum(seq_vals) / B
        else:
            seq_vals = [
                sum(flags[b][t] for t in toks[b]) / len(toks[b]) if toks[b] else math.nan
                for b in range(B)
            ]
            vals = [flags[b][t] for b in range(B) for t in toks[b]]
            mean = sum(vals) / max(len(vals), 1)
        if loss_type == "cispo":
            metrics["cispo_clip_ratio"] = mean
            continue
        metrics[f"clip_ratio/{name}_mean"] = mean
        finite = [v for v in seq_vals if not math.isnan(v)]
        if name == "low":
            metrics["clip_ratio/low_min"] = min(finite) if finite else math.nan
        if name == "high":
            metrics["clip_ratio/high_max"] = max(finite) if finite else math.nan
    return metrics


def _sampling_metrics(old, samp, toks, is_w, mode):
    B = len(toks)
    diffs = [
        abs((old[b, t] - samp[b, t]).item())
        for b in range(B)
        for t in toks[b]
        if not math.isnan(samp[b, t].item())
    ]
    if mode.startswith("sequence"):
        ws = [is_w[b][0] for b in range(B)]
    else:
        ws = [is_w[b][t] for b in range(B) for t in toks[b]]
    return {
        "sampling/sampling_logp_difference/mean": sum(diffs) / len(diffs) if diffs else 0.0,
        "sampling/sampling_logp_difference/max": max(diffs) if diffs else 0.0,
        "sampling/importance_sampling_ratio/min": min(ws) if ws else 0.0,
        "sampling/importance_sampling_ratio/mean": sum(ws) / len(ws) if ws else 0.0,
        "sampling/importance_sampling_ratio/max": max(ws) if ws else 0.0,
    }


def naive_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    loss_type: str = _D.loss_type,
    epsilon: float = _D.epsilon,
    epsilon_high: float | None = _D.epsilon_high,
    delta: float | None = _D.delta,
    beta: float = _D.beta,
    kl_estimator: str = _D.kl_estimator,
    use_bias_correction_kl: bool = _D.use_bias_correction_kl,
    importance_sampling_level: str = _D.importance_sampling_level,
    max_completion_length: int | None = _D.max_completion_length,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    gradient_accumulation_steps: int = _D.gradient_accumulation_steps,
    steps_per_generation: int | None = _D.steps_per_generation,
    num_processes: int = _D.num_processes,
    sapo_temperature_pos: float = _D.sapo_temperature_pos,
    sapo_temperature_neg: float = _D.sapo_temperature_neg,
    vespo_k_pos: float = _D.vespo_k_pos,
    vespo_lambda_pos: float = _D.vespo_lambda_pos,
    vespo_k_neg: float = _D.vespo_k_neg,
    vespo_lambda_neg: float = _D.vespo_lambda_neg,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = _D.entropy_coef,
    top_entropy_quantile: float = _D.top_entropy_quantile,
    sampling_logps: torch.Tensor | None = None,
    sampling_correction: str | None = _D.sampling_correction,
    sampling_clip_min: float | None = _D.sampling_clip_min,
    sampling_clip_max: float | None = _D.sampling_clip_max,
    off_policy_mask_threshold: float | None = _D.off_policy_mask_threshold,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same contract as `fastrl.policy_loss` (no validation); float64 loss and metrics.

    One loop over sequences and tokens, on purpose: the loss reads top to bottom as TRL
    defines it (the steps around it, the normalisers and metrics, are functions above).
    """
    B, T = logps.shape
    lp = logps.double()
    old = lp.detach() if old_logps is None else old_logps.detach().double()
    adv = advantages.detach().double()
    per_seq_adv = adv.dim() == 1 or adv.shape[1] == 1
    adv = adv.reshape(B, -1)
    ref = None if ref_logps is None else ref_logps.detach().double()
    ent = None if entropy is None else entropy.double()
    samp = None if sampling_logps is None else sampling_logps.detach().double()
    keep = [[bool(mask[b, t]) for t in range(T)] for b in range(B)]
    toks = [[t for t in range(T) if keep[b][t]] for b in range(B)]
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    GA = gradient_accumulation_steps
    spg = GA if steps_per_generation is None else steps_per_generation
    seq_level = importance_sampling_level == "sequence"
    correct = samp is not None and sampling_correction is not None

    def A(b, t):
        return adv[b, 0] if per_seq_adv else adv[b, t]

    high_entropy = None
    if top_entropy_quantile < 1.0:
        high_entropy = _high_entropy(ent, keep, toks, top_entropy_quantile)
    is_w = None
    if correct:
        is_w = _sampler_weights(
            old, samp, keep, sampling_correction, sampling_clip_min, sampling_clip_max
        )

    rows = []  # per sequence: list of per-token losses over its masked tokens
    kls, clip_ratios, phis = [], [], []
    vespo = loss_type == "vespo"
    for b in range(B):
        n = len(toks[b])
        if vespo:  # the sum (not mean) of the clamped token log-ratios, + the sampler's
            log_w = sum(min(max((lp[b, t] - old[b, t]).item(), -20.0), 20.0) for t in toks[b])
            if is_w is not None:  # over the whole row, as TRL (masked positions: ratio 1)
                log_w += sum(
                    min(max(math.log(w) if w > 0 else -math.inf, math.log(1e-8)), 20.0)
                    for w in is_w[b]
                )
            vespo_args = (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
            if per_seq_adv:
                phis.append(_vespo_phi(log_w, A(b, 0).item(), *vespo_args))
        if seq_level:
            s = sum((lp[b, t] - old[b, t] for t in toks[b]), torch.zeros((), dtype=torch.float64))
            seq_w = torch.exp(s / max(n, 1))
        # Off-policy sequence mask (DeepSeek-V3.2).
        opsm = 1.0
        if off_policy_mask_threshold is not None:
            src = samp if samp is not None else old
            d = [(src[b, t] - lp[b, t]).item() for t in toks[b]]
            mean_kl = sum(0.0 if math.isnan(x) else x for x in d) / max(n, 1)
        row, row_kl, row_rc = [], [], []
        for t in range(T):
            w = seq_w if seq_level else torch.exp(lp[b, t] - old[b, t])
            a = A(b, t)
            loss_t, r = _token_loss(
                loss_type, w, a, lp[b, t], eps_low, eps_high, delta,
                sapo_temperature_pos, sapo_temperature_neg,
            )  # fmt: skip
            if vespo:  # REINFORCE weighted by the constant phi(w)
                phi = _vespo_phi(log_w, a.item(), *vespo_args)
                loss_t = -phi * a * lp[b, t]
                if not per_seq_adv and keep[b][t]:
                    phis.append(phi)
            row_rc.append(r)
            if off_policy_mask_threshold is not None:
                opsm = 1.0 if (a >= 0 or mean_kl <= off_policy_mask_threshold) else 0.0
                loss_t = loss_t * opsm
            if high_entropy is not None:
                loss_t = loss_t * float(high_entropy[b][t])
            if is_w is not None and not vespo:  # vespo's phi holds it
                loss_t = loss_t * is_w[b][t]
            kl_t = None
            if ref is not None:
                kl_t = _kl(lp[b, t], ref[b, t], kl_estimator)
                if use_bias_correction_kl:
                    kl_t = kl_t * w
                if beta != 0:
                    loss_t = loss_t + beta * kl_t
            if keep[b][t]:
                row.append(loss_t)
                row_kl.append(kl_t)
        rows.append(row)
        kls.append(row_kl)
        clip_ratios.append(row_rc)

    loss, policy = _normalise(
        loss_type, rows, B, GA, spg, max_completion_length, num_items_in_batch, num_processes
    )
    zero = torch.zeros((), dtype=torch.float64)
    if entropy_coef != 0:
        sel = [
            (b, t) for b in range(B) for t in toks[b] if high_entropy is None or high_entropy[b][t]
        ]
        bonus = sum((ent[b, t] for b, t in sel), zero) / max(len(sel), 1) / GA
        loss = loss - entropy_coef * bonus

    metrics = {"policy_loss": policy}
    n_tokens = sum(len(r) for r in rows)
    if ref is not None:
        metrics["kl"] = sum((k.detach() for r in kls for k in r), zero) / max(n_tokens, 1)
    if ent is not None:
        vals = [ent[b, t].item() for b in range(B) for t in toks[b]]
        metrics["entropy"] = sum(vals) / max(len(vals), 1)
    if loss_type in _CLIPPED + ("cispo",):
        per_seq = seq_level and per_seq_adv  # one clip decision per sequence
        metrics.update(_clip_metrics(loss_type, clip_ratios, A, toks, per_seq, eps_low, eps_high))
    if vespo:
        metrics["vespo/phi_seq_mean"] = sum(phis) / max(len(phis), 1)
    if correct:
        metrics.update(_sampling_metrics(old, samp, toks, is_w, sampling_correction))
    metrics = {k: torch.as_tensor(v, dtype=torch.float64).detach() for k, v in metrics.items()}
    return loss, metrics
