"""TRL 1.16 ``DPOTrainer``'s loss types on sequence log-ratios, one function each.

With ``s`` the log-ratios ``logp - ref_logp`` of a pair, or their f-divergence transform
``f'(pi / pi_ref)`` (``f_divergence_type``), and ``z = beta * (s_c - s_r)``:

- ``"sigmoid"``: DPO, ``-log sigmoid(z)``; with ``label_smoothing`` eps, cDPO
  ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` (TRL 1.16 ignores
  ``label_smoothing`` here); ``rdpo_alpha`` (R-DPO) turns ``z`` into ``z - rdpo_alpha *
  (n_c - n_r)``, ``dpop_lambda`` (DPOP) into ``beta * (s_c - s_r - dpop_lambda * max(0,
  ref_logp_c - logp_c))``;
- ``"hinge"``: SLiC, ``relu(1 - z)``;
- ``"ipo"``: ``(d - 1 / (2 beta))^2`` with ``d = s_c / n_c - s_r / n_r``, the scores
  divided by the completion lengths as TRL does; ``"sigmoid_norm"``: ``-log sigmoid(beta
  d)``;
- ``"exo_pair"``: EXO, ``KL(softmax(z) || [1 - eps, eps])``, eps = ``label_smoothing`` > 0;
- ``"robust"``: rDPO, ``(-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)) / (1 - 2 eps)``;
- per-completion forms on ``u = beta * (logp - ref_logp)`` (never f-transformed):
  ``"nca_pair"`` ``-log sigmoid(u_c) - log sigmoid(-u_c) / 2 - log sigmoid(-u_r) / 2``;
  ``"bco_pair"`` ``-log sigmoid(u_c) - log sigmoid(-u_r)`` (no running reward mean: TRL
  1.16 has none); ``"sppo_hard"`` ``(s_c - 1 / (2 beta))^2 + (s_r + 1 / (2 beta))^2``;
  ``"apo_zero"`` ``1 - sigmoid(u_c) + sigmoid(u_r)``; ``"apo_down"`` ``sigmoid(u_c) + 1 -
  sigmoid(u_c - u_r)``;
- ``"aot"``, ``"aot_unpaired"``: AOT, ``sigmoid`` (with label smoothing) on the sorted
  policy and reference margins (paired) or the sorted chosen and rejected log-ratios
  (unpaired);
- ``"discopop"``: DiscoPOP, ``(1 - m) (-log sigmoid(z)) + m exp(-z)``, ``m = sigmoid(z /
  discopop_tau)``;
- ``"sft"``: the mean negative log-likelihood per chosen token, TRL's ``sft`` term.

Each function maps the pairs' `DPOTerms` and the resolved options to the ``[B]`` loss of
each pair; `preference_loss` weights (WPO), averages and sums them (MPO).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastrl.options.preference import PreferenceLossOptions

__all__ = ["DPO_LOSSES", "DPOTerms", "dpo_terms", "smoothed_logsigmoid"]


@dataclass(frozen=True)
class DPOTerms:
    """What the DPO loss types read, ``[B]`` each in the compute dtype (ld-weighted
    log-probs with ``ld_alpha``). The reference and the ratios are None only for ``sft``
    without reference log-probs; the lengths and ``nll`` where no option needs them."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    nll: torch.Tensor | None
    chosen_logratios: torch.Tensor | None = None  # log pi / pi_ref
    rejected_logratios: torch.Tensor | None = None
    chosen_scores: torch.Tensor | None = None  # f'(pi / pi_ref)
    rejected_scores: torch.Tensor | None = None
    score_margin: torch.Tensor | None = None  # chosen_scores - rejected_scores


def dpo_terms(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    nll: torch.Tensor | None,
    o: PreferenceLossOptions,
) -> DPOTerms:
    """`DPOTerms` with the log-ratios and their f-divergence scores, once per call."""
    ratios = {}
    if ref_chosen is not None:
        chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
        chosen_scores = _f_scores(chosen_logratios, o)
        rejected_scores = _f_scores(rejected_logratios, o)
        ratios = dict(
            chosen_logratios=chosen_logratios,
            rejected_logratios=rejected_logratios,
            chosen_scores=chosen_scores,
            rejected_scores=rejected_scores,
            score_margin=chosen_scores - rejected_scores,
        )
    lengths = (chosen_lengths, rejected_lengths)
    return DPOTerms(chosen, rejected, ref_chosen, ref_rejected, *lengths, nll, **ratios)


def _f_scores(logratios: torch.Tensor, o: PreferenceLossOptions) -> torch.Tensor:
    """f'(pi / pi_ref) of the f-DPO paper, as a function of the log-ratio."""
    coef = o.f_alpha_divergence_coef
    if o.f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if o.f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    if o.f_divergence_type == "alpha_divergence" and abs(coef - 1.0) >= 1e-6:
        # f'(t) = (t^(a-1) - 1) / (a - 1); the exponent is capped at 80 as TRL caps it in
        # float32 (so exp stays finite; no gradient beyond the cap)
        t = torch.clamp((coef - 1.0) * logratios, max=80.0)
        return (torch.exp(t) - 1.0) * (1.0 / (coef - 1.0))
    return logratios  # reverse_kl (standard DPO), and the alpha -> 1 limit


def smoothed_logsigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``: the logistic loss of a label
    flipped with probability eps."""
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


# --------------------------------------------------------------------------- loss types


def _sigmoid(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    margin = t.score_margin
    if o.dpop_lambda != 0:  # DPOP: penalise the chosen log-ratio falling below 0
        margin = margin - o.dpop_lambda * torch.relu(-t.chosen_logratios)
    logits = o.beta * margin
    if o.rdpo_alpha != 0:  # R-DPO: penalise the chosen being longer than the rejected
        logits = logits - o.rdpo_alpha * (t.chosen_lengths - t.rejected_lengths)
    if o.label_smoothing == 0:
        return -F.logsigmoid(logits)
    return smoothed_logsigmoid(logits, o.label_smoothing)  # cDPO


def _hinge(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    return torch.relu(1 - o.beta * t.score_margin)


def _length_normalised_margin(t: DPOTerms) -> torch.Tensor:
    chosen = t.chosen_scores / t.chosen_lengths.clamp(min=1.0)
    return chosen - t.rejected_scores / t.rejected_lengths.clamp(min=1.0)


def _ipo(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    # beta is IPO's tau; TRL's per-token normalisation
    return (_length_normalised_margin(t) - 1 / (2 * o.beta)) ** 2


def _sigmoid_norm(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    return -F.logsigmoid(o.beta * _length_normalised_margin(t))


def _exo_pair(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    z, eps = o.beta * t.score_margin, o.label_smoothing  # KL(softmax(z) || [1 - eps, eps])
    chosen = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    return chosen + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def _nca_pair(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    zc, zr = o.beta * t.chosen_logratios, o.beta * t.rejected_logratios
    return -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)


def _robust(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    # unbiased under labels flipped with probability eps
    z, eps = o.beta * t.score_margin, o.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    return -F.logsigmoid(o.beta * t.chosen_logratios) - F.logsigmoid(-o.beta * t.rejected_logratios)


def _sppo_hard(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    return (t.chosen_logratios - 0.5 / o.beta) ** 2 + (t.rejected_logratios + 0.5 / o.beta) ** 2


def _sorted_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AOT's optimal-transport pairing: the k-th smallest of `a` with the k-th of `b`."""
    return torch.sort(a, dim=0)[0] - torch.sort(b, dim=0)[0]


def _aot(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    d = _sorted_gap(t.chosen - t.rejected, t.ref_chosen - t.ref_rejected)
    return smoothed_logsigmoid(o.beta * d, o.label_smoothing)


def _aot_unpaired(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    d = _sorted_gap(t.chosen_logratios, t.rejected_logratios)
    return smoothed_logsigmoid(o.beta * d, o.label_smoothing)


def _apo_zero(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    return (1 - torch.sigmoid(o.beta * t.chosen_logratios)) + torch.sigmoid(
        o.beta * t.rejected_logratios
    )


def _apo_down(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    margin = t.chosen_logratios - t.rejected_logratios
    return torch.sigmoid(o.beta * t.chosen_logratios) + (1 - torch.sigmoid(o.beta * margin))


def _discopop(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    # logistic / exponential blend, modulated by the margin
    z = o.beta * t.score_margin
    mix = torch.sigmoid(z / o.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _sft(t: DPOTerms, o: PreferenceLossOptions) -> torch.Tensor:
    return t.nll.expand(t.chosen.shape[0])  # NLL of the chosen completions, a token mean


#: loss type -> its ``[B]`` per-pair loss
DPO_LOSSES: dict[str, Callable[[DPOTerms, PreferenceLossOptions], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
}
