"""Offline preference losses on sequence log-probs, with TRL 1.16's semantics.

`preference_loss` computes, from the summed log-probs of a batch of (chosen, rejected)
completion pairs, the loss that TRL 1.16 computes for the same numbers:

- ``DPOTrainer._compute_loss``: every ``loss_type`` (``sigmoid``, ``hinge``, ``ipo``,
  ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``, ``aot``,
  ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``, ``sft``, ``sigmoid_norm``), a
  weighted list of them (MPO), the f-divergence regularisers (f-DPO), LD-DPO's ``ld_alpha``
  and WPO weighting (``use_weighting``);
- ``trl.experimental.cpo.CPOTrainer``: CPO with its NLL term, SimPO, AlphaPO, and CPO's
  hinge and IPO variants (reference-free);
- ``trl.experimental.orpo.ORPOTrainer``: ORPO (reference-free);

plus what TRL lacks: conservative DPO (``label_smoothing`` on ``sigmoid``), R-DPO's length
penalty (``rdpo_alpha``) and DPOP's positive penalty (``dpop_lambda``). `kto_loss` is KTO
(``trl.KTOTrainer``) on unpaired data. Loss, gradients and metrics agree with TRL's own
trainers to float rounding (tests/test_trl_parity_dpo.py runs them).

Everything here is elementwise over ``[B]`` sequence log-probs, so it is plain PyTorch: the
expensive part, the log-probs themselves, comes from `linear_logprobs` /
`sequence_logprobs` or from `fused_preference_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastrl.checks import check_choice, check_number, check_values, check_zero_one

__all__ = ["kto_loss", "ld_tail_logps", "preference_loss"]

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# Reference-free: CPOTrainer's sigmoid/hinge/ipo/simpo (alphapo: its simpo with cpo_alpha=0),
# ORPOTrainer's odds-ratio loss.
CPO_LOSS_TYPES = ("cpo", "cpo_hinge", "cpo_ipo", "simpo", "alphapo")
REFERENCE_FREE_LOSS_TYPES = CPO_LOSS_TYPES + ("orpo",)
LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# DPOTrainer accepts a non-default f-divergence only with these (the others do not depend on
# the chosen-rejected score difference alone).
_F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust")
_F_DIVERGENCE_LOSS_TYPES += ("discopop", "sft")
# Loss types that read label_smoothing (sigmoid: cDPO, which TRL 1.16 no longer has).
_LABEL_SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "cpo", "simpo")
_LABEL_SMOOTHED += ("alphapo",)
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")  # DPO types that divide scores by the length
_AVERAGED = ("cpo_ipo", "simpo", "alphapo", "orpo")  # length-averaged log-probs


# --------------------------------------------------------------------------- validation


def _check_vector(name, x, B=None, *, floating=True, like="chosen_logps"):
    """A 1-D tensor ([B] when B is given); floating, or real (integer allowed)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not floating and (x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be a real (integer or float) tensor, got dtype {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(x.shape)}")
    if B is not None and x.shape[0] != B:
        raise ValueError(f"{name} must have shape [B]=({B},) like {like}, got {tuple(x.shape)}")


def _check_lengths(name, x, B):
    _check_vector(name, x, B, floating=False)
    bad = x < 0
    msg = f"{name} must be token counts >= 0"
    check_values(bad, msg, lambda: f"{msg}, got value {x[bad][0].item()!r}")


def _loss_type_list(loss_type):
    if isinstance(loss_type, str):
        types = [loss_type]
    elif isinstance(loss_type, Sequence) and all(isinstance(t, str) for t in loss_type):
        types = list(loss_type)
    else:
        raise TypeError(f"loss_type must be a str or a sequence of str, got {loss_type!r}")
    if not types:
        raise ValueError(f"loss_type must name at least one loss type, got {loss_type!r}")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {LOSS_TYPES} (or a list of them), got {t!r}"
            )
    if len(types) > 1:
        free = [t for t in types if t in REFERENCE_FREE_LOSS_TYPES]
        if free:
            raise ValueError(
                f"loss_type lists (MPO) combine DPO loss types {DPO_LOSS_TYPES}; "
                f"{free[0]!r} is a reference-free loss and cannot be combined, got {loss_type!r}"
            )
        if len(set(types)) != len(types):
            raise ValueError(f"loss_type lists must not repeat a loss type, got {loss_type!r}")
    return types


def _unused(name, value, default, why):
    """An option that has no effect for the loss types asked for: refuse it."""
    if value is not None and value != default:
        raise ValueError(f"{name}={value!r} {why}")


# --------------------------------------------------------------------------- helpers


def ld_tail_logps(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's verbose part: the log-prob of each completion beyond the pair's shared length.

    For a pair whose completions have ``n_c`` and ``n_r`` tokens, the first
    ``min(n_c, n_r)`` completion tokens of each are the shared ("public") part and the rest
    the verbose tail, as TRL's ``DPOTrainer`` splits them; only the longer completion of a
    pair has a tail. Feed the result to `preference_loss` as ``chosen_tail_logps`` /
    ``rejected_tail_logps`` (from the policy's log-probs) and ``ref_chosen_tail_logps`` /
    ``ref_rejected_tail_logps`` (from the reference's) together with ``ld_alpha``.

    Args:
        logps: ``[2B, T]`` float per-token log-probs, rows ``[chosen; rejected]`` (the
            layout of TRL's batches and of `fused_preference_loss`).
        mask: ``[2B, T]`` bool or 0/1 tensor, 1 on the completion tokens (they need not be
            contiguous nor left-aligned: the shared part is the first ``min(n_c, n_r)``
            masked tokens of each row).

    Returns:
        ``(chosen_tail, rejected_tail)``, ``[B]`` each, in ``logps.dtype``; differentiable
        in ``logps``.
    """
    if not isinstance(logps, torch.Tensor) or not logps.is_floating_point():
        raise TypeError(f"logps must be a floating-point tensor, got {type(logps).__name__}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if logps.dim() != 2 or tuple(mask.shape) != tuple(logps.shape):
        raise ValueError(
            f"logps and mask must both be [2B, T], got {tuple(logps.shape)} and {tuple(mask.shape)}"
        )
    if logps.shape[0] % 2:
        raise ValueError(
            f"logps must have an even number of rows [chosen; rejected], got {logps.shape[0]}"
        )
    keep = mask.bool() if mask.dtype != torch.bool else mask
    check_zero_one(mask, "mask must contain only 0 and 1")
    pos = keep.long().cumsum(1)  # 1-based position among the completion tokens
    lens = keep.sum(1)
    shared = torch.minimum(*lens.chunk(2)).repeat(2)
    tail = keep & (pos > shared.unsqueeze(1))
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    tails = torch.where(tail, logps, zero).sum(1)
    return tails[: logps.shape[0] // 2], tails[logps.shape[0] // 2 :]


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, stable on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _f_scores(logratios, f_divergence_type, coef):
    """f'(pi / pi_ref) of the f-DPO paper, as a function of the log-ratio."""
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence" and abs(coef - 1.0) >= 1e-6:
        # f'(t) = (t^(a-1) - 1) / (a - 1); the exponent is capped at 80 as TRL caps it in
        # float32 (so exp stays finite; no gradient beyond the cap)
        t = torch.clamp((coef - 1.0) * logratios, max=80.0)
        return (torch.exp(t) - 1.0) * (1.0 / (coef - 1.0))
    return logratios  # reverse_kl (standard DPO), and the alpha -> 1 limit


def _reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    metrics = {}
    if chosen_rewards is not None:
        metrics["rewards/chosen"] = chosen_rewards.mean()
        metrics["rewards/rejected"] = rejected_rewards.mean()
        metrics["rewards/accuracies"] = (
            (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean()
        )
        metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    metrics["logps/chosen"] = chosen_logps.detach().mean()
    metrics["logps/rejected"] = rejected_logps.detach().mean()
    return metrics


# --------------------------------------------------------------------------- loss families


def _dpo(
    types,
    weights,
    c,
    r,
    rc,
    rr,
    *,
    beta,
    label_smoothing,
    f_divergence_type,
    f_alpha_divergence_coef,
    discopop_tau,
    len_c,
    len_r,
    nll,
    wpo_weights,
    rdpo_alpha,
    dpop_lambda,
):
    """DPOTrainer's loss on (ld-weighted) sequence log-probs; rc/rr None only for sft."""
    loss = torch.zeros((), dtype=c.dtype, device=c.device)
    have_ref = rc is not None
    if have_ref:
        chosen_logratios = c - rc
        rejected_logratios = r - rr
        chosen_scores = _f_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
        rejected_scores = _f_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
        delta_score = chosen_scores - rejected_scores
    eps = label_smoothing
    for loss_type, weight in zip(types, weights, strict=True):
        if loss_type == "sigmoid":
            margin = delta_score
            if dpop_lambda != 0:  # DPOP: penalise the chosen log-ratio falling below 0
                margin = margin - dpop_lambda * torch.relu(-chosen_logratios)
            logits = beta * margin
            if rdpo_alpha != 0:  # R-DPO: penalise the chosen being longer than the rejected
                logits = logits - rdpo_alpha * (len_c - len_r)
            per_seq = -F.logsigmoid(logits)
            if eps != 0:  # cDPO: the label is flipped with probability eps
                per_seq = per_seq * (1 - eps) - F.logsigmoid(-logits) * eps
        elif loss_type == "hinge":
            per_seq = torch.relu(1 - beta * delta_score)
        elif loss_type in ("ipo", "sigmoid_norm"):
            avg = chosen_scores / len_c.clamp(min=1.0) - rejected_scores / len_r.clamp(min=1.0)
            if loss_type == "ipo":  # beta is IPO's tau; TRL's per-token normalisation
                per_seq = (avg - 1 / (2 * beta)) ** 2
            else:
                per_seq = -F.logsigmoid(beta * avg)
        elif loss_type == "exo_pair":  # KL(softmax(beta * scores) || [1 - eps, eps])
            z = beta * delta_score
            per_seq = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(
                -z
            ) * (F.logsigmoid(-z) - math.log(eps))
        elif loss_type == "nca_pair":
            zc, zr = beta * chosen_logratios, beta * rejected_logratios
            per_seq = -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)
        elif loss_type == "robust":  # unbiased under labels flipped with probability eps
            z = beta * delta_score
            per_seq = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif loss_type == "bco_pair":
            per_seq = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(
                -beta * rejected_logratios
            )
        elif loss_type == "sppo_hard":
            per_seq = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type in ("aot", "aot_unpaired"):  # sorted (optimal-transport) pairing
            if loss_type == "aot":
                d = torch.sort(c - r, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
            else:
                d = (
                    torch.sort(chosen_logratios, dim=0)[0]
                    - torch.sort(rejected_logratios, dim=0)[0]
                )
            per_seq = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
        elif loss_type == "apo_zero":
            per_seq = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(
                beta * rejected_logratios
            )
        elif loss_type == "apo_down":
            per_seq = torch.sigmoid(beta * chosen_logratios) + (
                1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
            )
        elif loss_type == "discopop":  # logistic / exponential blend, modulated by the margin
            z = beta * delta_score
            mix = torch.sigmoid(z / discopop_tau)
            per_seq = -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
        else:  # sft: NLL of the chosen completions, a token mean over the batch
            per_seq = nll.expand(c.shape[0])
        if wpo_weights is not None:
            per_seq = per_seq * wpo_weights
        loss = loss + per_seq.mean() * weight

    if have_ref:
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
    else:
        chosen_rewards = rejected_rewards = None
    return loss, _reward_metrics(chosen_rewards, rejected_rewards, c, r)


def _cpo(loss_type, c, r, *, beta, label_smoothing, alpha, simpo_gamma, cpo_alpha, nll):
    """CPOTrainer.cpo_loss + cpo_alpha * NLL on (averaged where TRL averages) log-probs."""
    if alpha != 0:  # AlphaPO's reward (1 - p^-alpha) / alpha
        cr = (1 - torch.exp(-alpha * c)) / alpha
        rr = (1 - torch.exp(-alpha * r)) / alpha
    else:
        cr, rr = c, r
    logits = cr - rr
    eps = label_smoothing
    if loss_type in ("cpo", "simpo", "alphapo"):
        if loss_type != "cpo":
            logits = logits - simpo_gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "cpo_hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # cpo_ipo
        losses = (logits - 1 / (2 * beta)) ** 2
    if cpo_alpha == 0:
        nll = torch.zeros((), dtype=c.dtype, device=c.device)
    loss = losses.mean() + cpo_alpha * nll
    metrics = _reward_metrics(beta * cr.detach(), beta * rr.detach(), c, r)
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def _orpo(c, r, *, beta, nll):
    """ORPOTrainer: NLL - beta * mean(log sigmoid(log odds ratio)), averaged log-probs."""
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    loss = nll - (beta * ratio).mean()
    metrics = _reward_metrics(beta * c.detach(), beta * r.detach(), c, r)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics


# --------------------------------------------------------------------------- public API


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float | None = None,
    discopop_tau: float | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    nll: torch.Tensor | None = None,
    ld_alpha: float | None = None,
    chosen_tail_logps: torch.Tensor | None = None,
    rejected_tail_logps: torch.Tensor | None = None,
    ref_chosen_tail_logps: torch.Tensor | None = None,
    ref_rejected_tail_logps: torch.Tensor | None = None,
    use_weighting: bool = False,
    chosen_aligned_logps: torch.Tensor | None = None,
    rejected_aligned_logps: torch.Tensor | None = None,
    rdpo_alpha: float = 0.0,
    dpop_lambda: float = 0.0,
    cpo_alpha: float | None = None,
    simpo_gamma: float | None = None,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Paired preference loss on sequence log-probs, as TRL 1.16's DPO, CPO and ORPO trainers.

    Shapes: ``B`` pairs. Every per-sequence input is ``[B]``, row ``i`` of the chosen and
    rejected inputs being the two completions of prompt ``i``. Log-probs are *sums* over the
    completion tokens (TRL's ``per_token_logps.sum(1)``; `sequence_logprobs` computes them);
    the loss types that work on length-averaged log-probs divide by ``chosen_lengths`` /
    ``rejected_lengths`` themselves. The math runs in float32 (float64 for float64
    ``chosen_logps``); loss and metrics come back in that dtype, gradients in the inputs'.
    Differentiable in ``chosen_logps``, ``rejected_logps``, the tail log-probs and ``nll``;
    reference log-probs, lengths and WPO's aligned log-probs are constants.

    Args:
        chosen_logps: ``[B]`` float, log-prob of each chosen completion under the policy.
        rejected_logps: ``[B]`` float, the same for the rejected completions.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` float, the same under the reference
            model. Required by every DPO loss type but ``sft`` (where they only feed the
            reward metrics); refused by the reference-free ones.
        loss_type: one of, or for DPO types a list of (MPO, combined with
            ``loss_weights``; ``z = beta * (s_c - s_r)`` with ``s`` the log-ratios
            ``logp - ref_logp``, or their f-divergence transform, below):

            - ``"sigmoid"``: DPO, ``-log sigmoid(z)``; with ``label_smoothing`` eps, cDPO
              ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` (TRL 1.16 ignores
              ``label_smoothing`` here);
            - ``"hinge"``: SLiC, ``relu(1 - z)``;
            - ``"ipo"``: ``(d - 1 / (2 beta))^2`` with ``d = s_c / n_c - s_r / n_r``, the
              scores divided by the completion lengths as TRL does (needs the lengths);
            - ``"sigmoid_norm"``: ``-log sigmoid(beta * d)``, ``d`` as for ipo;
            - ``"exo_pair"``: EXO, ``KL(softmax(z) || [1 - eps, eps])``, eps =
              ``label_smoothing`` (> 0);
            - per-completion forms on ``u = beta * (logp - ref_logp)`` (never
              f-transformed): ``"nca_pair"`` ``-log sigmoid(u_c) - log sigmoid(-u_c) / 2 -
              log sigmoid(-u_r) / 2``; ``"bco_pair"`` ``-log sigmoid(u_c) - log
              sigmoid(-u_r)`` (no running reward mean: TRL 1.16 has none);
              ``"sppo_hard"`` ``(s_c - 1 / (2 beta))^2 + (s_r + 1 / (2 beta))^2``;
              ``"apo_zero"`` ``1 - sigmoid(u_c) + sigmoid(u_r)``; ``"apo_down"``
              ``sigmoid(u_c) + 1 - sigmoid(u_c - u_r)``;
            - ``"robust"``: rDPO, ``(-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)) /
              (1 - 2 eps)``;
            - ``"aot"``, ``"aot_unpaired"``: AOT, ``sigmoid`` (with label smoothing) on the
              sorted policy and reference margins (paired) or sorted chosen and rejected
              log-ratios (unpaired);
            - ``"discopop"``: DiscoPOP, ``(1 - m) (-log sigmoid(z)) + m exp(-z)`` with
              ``m = sigmoid(z / discopop_tau)``;
            - ``"sft"``: the mean negative log-likelihood per chosen token
              (``-sum(chosen_logps) / sum(chosen_lengths)``, or ``nll``), as TRL's
              ``sft`` term;
            - reference-free, as ``CPOTrainer`` (``cpo_alpha`` times the chosen NLL added):
              ``"cpo"`` (its ``sigmoid``), ``"cpo_hinge"``, ``"cpo_ipo"`` (on
              length-averaged log-probs), ``"simpo"`` (length-averaged, margin
              ``simpo_gamma``), ``"alphapo"`` (TRL's sugar: ``simpo`` with ``cpo_alpha``
              0 by default); ``alpha != 0`` turns the rewards into AlphaPO's
              ``(1 - p^-alpha) / alpha`` for any of them;
            - ``"orpo"``: as ``ORPOTrainer``, ``nll - beta * mean(log sigmoid(log odds
              ratio))`` on length-averaged log-probs; ``beta`` is ORPO's lambda.
        beta: DPO's beta (IPO's tau; ORPO's lambda). > 0 (>= 0 for ``orpo``).
        loss_weights: one weight per entry of a ``loss_type`` list (default all 1).
        label_smoothing: eps in [0, 0.5) for the loss types that read it: ``sigmoid``
            (cDPO), ``robust``, ``exo_pair`` (required > 0 there), ``aot``,
            ``aot_unpaired``, ``cpo``, ``simpo``, ``alphapo``.
        f_divergence_type: ``"reverse_kl"`` (DPO), ``"forward_kl"`` (``1 - exp(-s)``),
            ``"js_divergence"`` (``log 2 + log sigmoid(s)``) or ``"alpha_divergence"``
            (``(exp((a - 1) s) - 1) / (a - 1)``, exponent capped at 80 as TRL does) applied
            to each log-ratio ``s``; non-default values only with ``sigmoid``,
            ``sigmoid_norm``, ``hinge``, ``ipo``, ``exo_pair``, ``robust``, ``discopop``,
            ``sft`` (TRL's rule).
        f_alpha_divergence_coef: ``a`` of the alpha divergence (default 0.5).
        discopop_tau: DiscoPOP's temperature (default 0.05).
        chosen_lengths, rejected_lengths: ``[B]`` integer or float completion-token counts.
            Required by ``ipo``, ``sigmoid_norm``, ``sft`` (chosen only, unless ``nll``),
            ``use_weighting``, ``rdpo_alpha``, the averaged reference-free types
            (``cpo_ipo``, ``simpo``, ``alphapo``, ``orpo``) and the CPO NLL term (chosen
            only, unless ``nll``). Counts of 0 are treated as 1 (the log-prob is then 0).
        nll: 0-d float tensor, the supervised NLL term to use instead of the one computed
            from ``chosen_logps`` and ``chosen_lengths`` (the mean over chosen completion
            tokens, which is TRL's for ``sft`` and CPO). TRL's ORPO takes its NLL over the
            prompt *and* completion tokens: pass that here to match it.
        ld_alpha: LD-DPO's weight in [0, 1] on the verbose tail of the longer completion:
            the policy and reference log-probs become ``shared + ld_alpha * tail``
            (needs the four ``*_tail_logps``; DPO types). The shared part is formed as
            ``logp - tail``; in float32 that differs from a directly summed shared part
            (TRL's) by the rounding of the sums. ``sft`` and WPO use the whole log-probs,
            as TRL does.
        chosen_tail_logps, rejected_tail_logps: ``[B]`` float, the policy's log-prob of the
            tokens beyond the pair's shared length (`ld_tail_logps`); differentiable.
        ref_chosen_tail_logps, ref_rejected_tail_logps: the same under the reference.
        use_weighting: WPO: multiply each pair's loss by ``w_c * w_r``, ``w = exp(aligned
            / n)``, without gradient. Needs ``chosen_aligned_logps``,
            ``rejected_aligned_logps`` and the lengths. DPO types but ``aot`` /
            ``aot_unpaired`` (as TRL).
        chosen_aligned_logps, rejected_aligned_logps: ``[B]`` float, WPO's aligned
            log-probs: the sum over each completion's tokens of ``log p(y_t) - log
            sum_v p_v(t)^2`` under the policy (``linear_logprobs(...,
            return_log_sum_sq_probs=True)`` gives the second term; `fused_preference_loss`
            computes these sums itself). Constants.
        rdpo_alpha: R-DPO (``sigmoid`` only, not in TRL): the logit becomes
            ``z - rdpo_alpha * (n_c - n_r)``; needs the lengths.
        dpop_lambda: DPOP (``sigmoid`` only, not in TRL): the logit becomes ``beta * (s_c
            - s_r - dpop_lambda * max(0, ref_logp_c - logp_c))``.
        cpo_alpha: weight of the NLL term of the CPO-family types (default 1.0 as TRL's
            ``CPOConfig``; 0.0 for ``alphapo``).
        simpo_gamma: SimPO's target margin (``simpo``/``alphapo``; default 0.5).
        alpha: AlphaPO's reward shape for the CPO-family types (0: log-prob rewards).

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d tensor; ``metrics`` a dict of detached 0-d
        tensors named as TRL logs them (batch means):

        - ``rewards/chosen``, ``rewards/rejected``: ``beta * (logp - ref_logp)`` (DPO,
          with the ld-weighted log-probs), ``beta * logp`` (ORPO, CPO; averaged where the
          loss averages) or ``beta * (1 - p^-alpha) / alpha`` (AlphaPO); absent for ``sft``
          without reference log-probs;
        - ``rewards/accuracies`` (fraction of pairs with ``rewards/chosen >
          rewards/rejected``), ``rewards/margins``;
        - ``logps/chosen``, ``logps/rejected``: the log-probs the loss used (ld-weighted;
          averaged for the averaged types);
        - CPO family and ORPO: ``nll_loss``; ORPO: ``log_odds_ratio`` (mean of
          ``log sigmoid(log odds)``) and ``log_odds_chosen`` (mean log odds).

        TRL also logs model-side values (``entropy``, ``logits/*``,
        ``mean_token_accuracy``, ``num_tokens``) that sequence log-probs do not determine.

    Raises:
        ValueError: unknown ``loss_type`` or ``f_divergence_type``; chosen and rejected
            inputs of different lengths (pairs); reference log-probs missing for a loss
            that needs them or given to a reference-free one; an option that the loss
            types asked for do not use (``label_smoothing``, ``f_alpha_divergence_coef``,
            ``discopop_tau``, ``rdpo_alpha``, ``dpop_lambda``, ``cpo_alpha``,
            ``simpo_gamma``, ``alpha``, ``nll``, ``ld_alpha``, ``use_weighting`` or their
            tensors); a required length or tail missing; ``label_smoothing`` outside [0,
            0.5); out-of-range numbers.
        TypeError: a tensor argument that is not a (floating-point, for log-probs) tensor;
            a non-numeric hyper-parameter.
    """
    # ---- validation: every message names the argument and the value it got.
    types = _loss_type_list(loss_type)
    free = types[0] in REFERENCE_FREE_LOSS_TYPES
    _check_vector("chosen_logps", chosen_logps)
    _check_vector("rejected_logps", rejected_logps)
    B = chosen_logps.shape[0]
    if rejected_logps.shape[0] != B:
        raise ValueError(
            "chosen_logps and rejected_logps hold the two completions of each pair and must "
            f"have the same shape [B], got {tuple(chosen_logps.shape)} and "
            f"{tuple(rejected_logps.shape)}"
        )
    if B == 0:
        raise ValueError("chosen_logps must hold at least one pair, got shape (0,)")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        given = "ref_chosen_logps" if ref_rejected_logps is None else "ref_rejected_logps"
        raise ValueError(f"{given} was given without its pair: pass both reference log-probs")
    have_ref = ref_chosen_logps is not None
    if have_ref:
        if free:
            raise ValueError(
                f"loss_type={types[0]!r} is reference-free and does not use "
                "ref_chosen_logps/ref_rejected_logps: pass None"
            )
        _check_vector("ref_chosen_logps", ref_chosen_logps, B)
        _check_vector("ref_rejected_logps", ref_rejected_logps, B)
    elif not free and types != ["sft"]:
        raise ValueError(
            f"loss_type={loss_type!r} needs the reference log-probs: ref_chosen_logps and "
            "ref_rejected_logps are None"
        )

    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
            raise TypeError(f"loss_weights must be a sequence of numbers, got {loss_weights!r}")
        if len(loss_weights) != len(types):
            raise ValueError(
                f"loss_weights must have one weight per loss type ({len(types)}), got "
                f"{list(loss_weights)!r}"
            )
        for i, w in enumerate(loss_weights):
            check_number(f"loss_weights[{i}]", w)
        weights = [float(w) for w in loss_weights]

    check_number("beta", beta, low=0.0, strict_low=types != ["orpo"])
    beta = float(beta)
    check_number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    label_smoothing = float(label_smoothing)
    if label_smoothing != 0 and not set(types) & set(_LABEL_SMOOTHED):
        raise ValueError(
            f"label_smoothing={label_smoothing!r} has no effect on loss_type={loss_type!r} "
            f"(it applies to {_LABEL_SMOOTHED})"
        )
    if "exo_pair" in types and label_smoothing == 0:
        raise ValueError(
            "loss_type='exo_pair' needs label_smoothing > 0 (its target distribution "
            "[1 - eps, eps]; the EXO paper uses 1e-3), got 0.0"
        )

    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    if f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in _F_DIVERGENCE_LOSS_TYPES]
        if bad:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} applies to loss types "
                f"{_F_DIVERGENCE_LOSS_TYPES} only, got loss_type {bad[0]!r}"
            )
    if f_divergence_type == "alpha_divergence":
        coef = 0.5 if f_alpha_divergence_coef is None else f_alpha_divergence_coef
        check_number("f_alpha_divergence_coef", coef)
        coef = float(coef)
    else:
        _unused(
            "f_alpha_divergence_coef",
            f_alpha_divergence_coef,
            None,
            f"is for f_divergence_type='alpha_divergence', got {f_divergence_type!r}",
        )
        coef = 0.5
    if "discopop" in types:
        tau = 0.05 if discopop_tau is None else discopop_tau
        check_number("discopop_tau", tau, low=0.0, strict_low=True)
        tau = float(tau)
    else:
        _unused(
            "discopop_tau", discopop_tau, None, f"is for loss_type='discopop', got {loss_type!r}"
        )
        tau = None

    check_number("rdpo_alpha", rdpo_alpha)
    check_number("dpop_lambda", dpop_lambda, low=0.0)
    if "sigmoid" not in types:
        _unused(
            "rdpo_alpha", rdpo_alpha, 0.0, f"is R-DPO's, for loss_type='sigmoid', got {loss_type!r}"
        )
        _unused(
            "dpop_lambda",
            dpop_lambda,
            0.0,
            f"is DPOP's, for loss_type='sigmoid', got {loss_type!r}",
        )

    cpo_family = types[0] in CPO_LOSS_TYPES
    check_number("alpha", alpha)
    if cpo_family:
        default_cpo_alpha = 0.0 if types[0] == "alphapo" else 1.0
        cpo_alpha = default_cpo_alpha if cpo_alpha is None else cpo_alpha
        check_number("cpo_alpha", cpo_alpha)
        cpo_alpha = float(cpo_alpha)
    else:
        _unused("alpha", alpha, 0.0, f"is AlphaPO's, for the CPO loss types {CPO_LOSS_TYPES}")
        _unused("cpo_alpha", cpo_alpha, None, f"is for the CPO loss types {CPO_LOSS_TYPES}")
    if types[0] in ("simpo", "alphapo"):
        simpo_gamma = 0.5 if simpo_gamma is None else simpo_gamma
        check_number("simpo_gamma", simpo_gamma)
        simpo_gamma = float(simpo_gamma)
    else:
        _unused("simpo_gamma", simpo_gamma, None, f"is SimPO's, got loss_type={loss_type!r}")

    if not isinstance(use_weighting, bool):
        raise TypeError(f"use_weighting must be a bool, got {use_weighting!r}")
    if use_weighting:
        if free:
            raise ValueError(f"use_weighting=True (WPO) is for DPO loss types, got {loss_type!r}")
        if set(types) & {"aot", "aot_unpaired"}:
            raise ValueError(
                "use_weighting=True (WPO) cannot weight 'aot'/'aot_unpaired', which sort the "
                f"pairs (TRL refuses it too), got loss_type={loss_type!r}"
            )
        for name, x in (
            ("chosen_aligned_logps", chosen_aligned_logps),
            ("rejected_aligned_logps", rejected_aligned_logps),
        ):
            if x is None:
                raise ValueError(f"use_weighting=True (WPO) needs {name} (got None)")
            _check_vector(name, x, B)
    else:
        for name, x in (
            ("chosen_aligned_logps", chosen_aligned_logps),
            ("rejected_aligned_logps", rejected_aligned_logps),
        ):
            if x is not None:
                raise ValueError(f"{name} is for WPO weighting: it needs use_weighting=True")

    tails = {
        "chosen_tail_logps": chosen_tail_logps,
        "rejected_tail_logps": rejected_tail_logps,
        "ref_chosen_tail_logps": ref_chosen_tail_logps,
        "ref_rejected_tail_logps": ref_rejected_tail_logps,
    }
    if ld_alpha is not None:
        if free:
            raise ValueError(
                f"ld_alpha={ld_alpha!r} (LD-DPO) is for DPO loss types, got {loss_type!r}"
            )
        check_number("ld_alpha", ld_alpha, low=0.0, high=1.0)
        ld_alpha = float(ld_alpha)
        for name, x in tails.items():
            if name.startswith("ref") and not have_ref:
                if x is not None:
                    raise ValueError(f"{name} was given without ref_chosen/rejected_logps")
                continue
            if x is None:
                raise ValueError(f"ld_alpha={ld_alpha!r} needs {name} (see ld_tail_logps)")
            _check_vector(name, x, B)
    else:
        for name, x in tails.items():
            if x is not None:
                raise ValueError(f"{name} is for LD-DPO: it needs ld_alpha (got None)")

    # what needs the lengths
    need_chosen_len, need_both_len = [], []
    for t in types:
        if t in _LENGTH_NORMALISED or t in _AVERAGED:
            need_both_len.append(f"loss_type={t!r}")
    if use_weighting:
        need_both_len.append("use_weighting=True")
    if rdpo_alpha != 0:
        need_both_len.append(f"rdpo_alpha={rdpo_alpha!r}")
    has_nll = "sft" in types or types == ["orpo"] or (cpo_family and cpo_alpha != 0)
    if has_nll and nll is None:
        need_chosen_len.append(f"the NLL term of loss_type={loss_type!r} (or pass nll)")
    if nll is not None:
        if not has_nll:
            raise ValueError(
                f"nll is for loss types with an NLL term (sft, orpo, the CPO family with "
                f"cpo_alpha != 0), got loss_type={loss_type!r}"
                + (f" with cpo_alpha={cpo_alpha!r}" if cpo_family else "")
            )
        if not isinstance(nll, torch.Tensor) or not nll.is_floating_point():
            raise TypeError(f"nll must be a floating-point tensor, got {nll!r:.80}")
        if nll.numel() != 1:
            raise ValueError(
                f"nll must be a 0-d (one-element) tensor, got shape {tuple(nll.shape)}"
            )
    for name, x, needs in (
        ("chosen_lengths", chosen_lengths, need_both_len + need_chosen_len),
        ("rejected_lengths", rejected_lengths, need_both_len),
    ):
        if x is not None:
            _check_lengths(name, x, B)
        elif needs:
            raise ValueError(f"{needs[0]} needs {name} (the completion-token counts), got None")

    # ---- inputs in the compute dtype
    cdt = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    c, r = chosen_logps.to(cdt), rejected_logps.to(cdt)
    rc = rr = None
    if have_ref:
        rc, rr = ref_chosen_logps.detach().to(cdt), ref_rejected_logps.detach().to(cdt)
    len_c = None if chosen_lengths is None else chosen_lengths.detach().to(cdt)
    len_r = None if rejected_lengths is None else rejected_lengths.detach().to(cdt)
    if nll is not None:
        nll = nll.to(cdt).reshape(())
    elif has_nll:  # mean NLL over the chosen completion tokens
        nll = -c.sum() / len_c.sum().clamp(min=1.0)

    if free:
        if types[0] in _AVERAGED:
            c = c / len_c.clamp(min=1.0)
            r = r / len_r.clamp(min=1.0)
        if types[0] == "orpo":
            loss, metrics = _orpo(c, r, beta=beta, nll=nll)
        else:
            loss, metrics = _cpo(
                types[0],
                c,
                r,
                beta=beta,
                label_smoothing=label_smoothing,
                alpha=float(alpha),
                simpo_gamma=simpo_gamma,
                cpo_alpha=cpo_alpha,
                nll=nll,
            )
    else:
        wpo = None
        if use_weighting:
            with torch.no_grad():
                w_c = torch.exp(chosen_aligned_logps.to(cdt) / len_c.clamp(min=1.0))
                w_r = torch.exp(rejected_aligned_logps.to(cdt) / len_r.clamp(min=1.0))
                wpo = w_c * w_r
        if ld_alpha is not None:  # shared + ld_alpha * tail
            tc, tr = chosen_tail_logps.to(cdt), rejected_tail_logps.to(cdt)
            c = (c - tc) + ld_alpha * tc
            r = (r - tr) + ld_alpha * tr
            if have_ref:
                trc = ref_chosen_tail_logps.detach().to(cdt)
                trr = ref_rejected_tail_logps.detach().to(cdt)
                rc = (rc - trc) + ld_alpha * trc
                rr = (rr - trr) + ld_alpha * trr
        loss, metrics = _dpo(
            types,
            weights,
            c,
            r,
            rc,
            rr,
            beta=beta,
            label_smoothing=label_smoothing,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=coef,
            discopop_tau=tau,
            len_c=len_c,
            len_r=len_r,
            nll=nll,
            wpo_weights=wpo,
            rdpo_alpha=float(rdpo_alpha),
            dpop_lambda=float(dpop_lambda),
        )
    metrics = {k: v.detach().to(cdt) for k, v in metrics.items()}
    return loss, metrics


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO on unpaired completions, as TRL 1.16's ``KTOTrainer``.

    Each row is one completion with a binary label (desirable or not); nothing is paired.
    With ``r = logp - ref_logp`` and ``z0`` the KL reference point:

    - ``"kto"``: desirable ``1 - sigmoid(beta (r - z0))``, undesirable ``1 - sigmoid(beta
      (z0 - r))``; ``z0 = max(0, mean(kl_logps - ref_kl_logps))`` without gradient, the
      KL estimate from mismatched (prompt, completion) pairs: TRL pairs each prompt of the
      batch with the previous example's completion (``(x_i, y_{i-1})``, cyclically);
    - ``"apo_zero_unpaired"``: desirable ``1 - sigmoid(beta r)``, undesirable
      ``sigmoid(beta r)``; no KL term.

    The loss is the mean over rows of ``desirable_weight`` / ``undesirable_weight`` times
    the row's loss (NaN rows skipped, as TRL's ``nanmean``).

    Args:
        logps: ``[B]`` float, summed completion log-probs under the policy; differentiable.
        ref_logps: ``[B]`` float, the same under the reference model (constant).
        labels: ``[B]`` bool or 0/1 tensor, True for desirable completions.
        kl_logps: ``[M]`` float, summed log-probs of the mismatched pairs' completions under
            the policy (TRL computes them without gradient; treated as constant).
            Required by ``"kto"``, refused by ``"apo_zero_unpaired"``.
        ref_kl_logps: ``[M]`` float, the same under the reference model.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
        beta: > 0.
        desirable_weight, undesirable_weight: >= 0, the weights of the two kinds of rows.

    Returns:
        ``(loss, metrics)``; metrics as TRL logs them: ``kl`` (``z0``; 0 for
        ``apo_zero_unpaired``), and, when the batch has rows of that kind,
        ``rewards/chosen`` / ``logps/chosen`` (means over desirable rows of ``beta * r`` and
        ``logp``), ``rewards/rejected`` / ``logps/rejected``, and ``rewards/margins``
        (their difference, when both kinds are present).

    Raises:
        ValueError: unknown ``loss_type``; mismatched shapes; ``labels`` not 0/1;
            ``kl_logps``/``ref_kl_logps`` missing for ``"kto"`` or given to
            ``"apo_zero_unpaired"``; out-of-range numbers.
        TypeError: non-tensor or non-floating log-probs; non-numeric hyper-parameters.
    """
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    _check_vector("logps", logps, like="logps")
    B = logps.shape[0]
    if B == 0:
        raise ValueError("logps must hold at least one completion, got shape (0,)")
    _check_vector("ref_logps", ref_logps, B, like="logps")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"labels must have shape [B]=({B},) like logps, got {tuple(labels.shape)}")
    if labels.is_complex():
        raise TypeError(f"labels must be a bool or 0/1 tensor, got dtype {labels.dtype}")
    check_zero_one(labels, "labels must contain only 0 and 1")
    if loss_type == "kto":
        for name, x in (("kl_logps", kl_logps), ("ref_kl_logps", ref_kl_logps)):
            if x is None:
                raise ValueError(
                    f"loss_type='kto' estimates its KL reference point from mismatched pairs: "
                    f"pass {name} (got None)"
                )
        _check_vector("kl_logps", kl_logps)
        if kl_logps.shape[0] == 0:
            raise ValueError("kl_logps must hold at least one mismatched pair, got shape (0,)")
        _check_vector("ref_kl_logps", ref_kl_logps, kl_logps.shape[0], like="kl_logps")
    else:
        for name, x in (("kl_logps", kl_logps), ("ref_kl_logps", ref_kl_logps)):
            if x is not None:
                raise ValueError(f"loss_type={loss_type!r} has no KL term: {name} must be None")
    check_number("beta", beta, low=0.0, strict_low=True)
    check_number("desirable_weight", desirable_weight, low=0.0)
    check_number("undesirable_weight", undesirable_weight, low=0.0)

    cdt = torch.float64 if logps.dtype == torch.float64 else torch.float32
    lp = logps.to(cdt)
    logratios = lp - ref_logps.detach().to(cdt)
    desirable = labels.bool()
    if loss_type == "kto":
        with torch.no_grad():
            kl = (kl_logps.to(cdt) - ref_kl_logps.to(cdt)).mean().clamp(min=0)
        loss_d = 1 - torch.sigmoid(beta * (logratios - kl))
        loss_u = 1 - torch.sigmoid(beta * (kl - logratios))
    else:
        kl = torch.zeros((), dtype=cdt, device=lp.device)
        loss_d = 1 - torch.sigmoid(beta * logratios)
        loss_u = torch.sigmoid(beta * logratios)
    weighted = torch.where(
        desirable, float(desirable_weight) * loss_d, float(undesirable_weight) * loss_u
    )
    loss = weighted.nanmean()

    metrics = {"kl": kl}
    rewards = beta * logratios.detach()
    n_d = int(desirable.sum())
    n_u = B - n_d
    if n_d:
        metrics["rewards/chosen"] = rewards[desirable].nansum() / n_d
        metrics["logps/chosen"] = lp.detach()[desirable].nansum() / n_d
    if n_u:
        metrics["rewards/rejected"] = rewards[~desirable].nansum() / n_u
        metrics["logps/rejected"] = lp.detach()[~desirable].nansum() / n_u
    if n_d and n_u:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics = {k: v.detach().to(cdt) for k, v in metrics.items()}
    return loss, metrics
