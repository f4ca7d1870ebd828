"""Offline preference losses on sequence log-probs, with TRL 1.16's semantics.

`preference_loss` computes, from the summed log-probs of a batch of (chosen, rejected)
completion pairs, the loss that TRL 1.16 computes for the same numbers:

- ``DPOTrainer._compute_loss``: every ``loss_type`` (`dpo`), a weighted list of them (MPO),
  the f-divergence regularisers (f-DPO), LD-DPO's ``ld_alpha`` and WPO weighting
  (``use_weighting``);
- ``trl.experimental.cpo.CPOTrainer``: CPO with its NLL term, SimPO, AlphaPO, and CPO's
  hinge and IPO variants (`cpo`, reference-free);
- ``trl.experimental.orpo.ORPOTrainer``: ORPO (`orpo`, reference-free);

plus what TRL lacks: conservative DPO (``label_smoothing`` on ``sigmoid``), R-DPO's length
penalty (``rdpo_alpha``) and DPOP's positive penalty (``dpop_lambda``). `kto_loss` (`kto`)
is KTO on unpaired data. Loss, gradients and metrics agree with TRL's own trainers to float
rounding (tests/parity/test_trl_parity_dpo.py runs them).

The options are `fastrl.options.preference.PreferenceLossOptions`, validated there once;
this module checks the tensors against them, forms what the families share (compute
dtype, NLL, length averaging, LD-DPO, WPO), calls the family and gathers the metrics.
Everything is elementwise over ``[B]`` sequence log-probs, so it is plain PyTorch: the
expensive part, the log-probs themselves, comes from `linear_logprobs` /
`sequence_logprobs` or from `fused_preference_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastrl.checks import compute_dtype
from fastrl.ops.preference.cpo import cpo_loss
from fastrl.ops.preference.dpo import DPO_LOSSES, dpo_terms
from fastrl.ops.preference.inputs import PreferenceInputs
from fastrl.ops.preference.kto import kto_loss
from fastrl.ops.preference.ld import ld_tail_logps, ld_weighted
from fastrl.ops.preference.orpo import orpo_loss
from fastrl.options.preference import (
    PreferenceLossOptions,
)

__all__ = ["compute_preference_loss", "kto_loss", "ld_tail_logps", "preference_loss"]

_D = PreferenceLossOptions()  # the defaults, declared there


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = _D.loss_type[0],
    beta: float = _D.beta,
    loss_weights: Sequence[float] | None = _D.loss_weights,
    label_smoothing: float = _D.label_smoothing,
    f_divergence_type: str = _D.f_divergence_type,
    f_alpha_divergence_coef: float | None = _D.f_alpha_divergence_coef,
    discopop_tau: float | None = _D.discopop_tau,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    nll: torch.Tensor | None = None,
    ld_alpha: float | None = _D.ld_alpha,
    chosen_tail_logps: torch.Tensor | None = None,
    rejected_tail_logps: torch.Tensor | None = None,
    ref_chosen_tail_logps: torch.Tensor | None = None,
    ref_rejected_tail_logps: torch.Tensor | None = None,
    use_weighting: bool = _D.use_weighting,
    chosen_aligned_logps: torch.Tensor | None = None,
    rejected_aligned_logps: torch.Tensor | None = None,
    rdpo_alpha: float = _D.rdpo_alpha,
    dpop_lambda: float = _D.dpop_lambda,
    cpo_alpha: float | None = _D.cpo_alpha,
    simpo_gamma: float | None = _D.simpo_gamma,
    alpha: float = _D.alpha,
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
        loss_type, beta, loss_weights, label_smoothing, f_divergence_type,
            f_alpha_divergence_coef, discopop_tau, ld_alpha, use_weighting, rdpo_alpha,
            dpop_lambda, cpo_alpha, simpo_gamma, alpha: the options, documented in
            `PreferenceLossOptions`. ``loss_type`` is one of TRL's DPO loss types
            (formulas in `fastrl.ops.preference.dpo`), a list of them (MPO, weighted by
            ``loss_weights``), or a reference-free one: the CPO family (``cpo``,
            ``cpo_hinge``, ``cpo_ipo``, ``simpo``, ``alphapo``; `.cpo`) or ``orpo``
            (`.orpo`). An option set where it has no effect is refused.
        chosen_lengths, rejected_lengths: ``[B]`` integer or float completion-token counts.
            Required by ``ipo``, ``sigmoid_norm``, ``sft`` (chosen only, unless ``nll``),
            ``use_weighting``, ``rdpo_alpha``, the averaged reference-free types
            (``cpo_ipo``, ``simpo``, ``alphapo``, ``orpo``) and the CPO NLL term (chosen
            only, unless ``nll``). Counts of 0 are treated as 1 (the log-prob is then 0).
        nll: 0-d float tensor, the supervised NLL term to use instead of the one computed
            from ``chosen_logps`` and ``chosen_lengths`` (the mean over chosen completion
            tokens, which is TRL's for ``sft`` and CPO). TRL's ORPO takes its NLL over the
            prompt *and* completion tokens: pass that here to match it.
        chosen_tail_logps, rejected_tail_logps: ``[B]`` float, with ``ld_alpha``: the
            policy's log-prob of the tokens beyond the pair's shared length
            (`ld_tail_logps`); the log-probs become ``(logp - tail) + ld_alpha * tail``
            (in float32 that differs from TRL's directly summed shared part by the rounding
            of the sums; ``sft`` and WPO use the whole log-probs, as TRL does).
        ref_chosen_tail_logps, ref_rejected_tail_logps: the same under the reference.
        chosen_aligned_logps, rejected_aligned_logps: ``[B]`` float, with
            ``use_weighting`` (WPO, each pair's loss times ``w_c * w_r``, ``w = exp(aligned
            / n)``, no gradient): the sum over each completion's tokens of ``log p(y_t) -
            log sum_v p_v(t)^2`` under the policy (``linear_logprobs(...,
            return_log_sum_sq_probs=True)`` gives the second term; `fused_preference_loss`
            computes these sums itself). Constants.

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
        ValueError: a bad option or combination of options
            (`PreferenceLossOptions.validate`); chosen and rejected inputs of different
            lengths (pairs); reference log-probs missing for a loss that needs them or
            given to a reference-free one; a length, tail, aligned log-prob or ``nll``
            missing where an option needs it or given where none does.
        TypeError: a tensor argument that is not a (floating-point, for log-probs) tensor;
            a non-numeric hyper-parameter.
    """
    arguments = locals()  # by name; nothing else is local yet
    options = PreferenceLossOptions.from_mapping(arguments)
    options.validate()
    return compute_preference_loss(PreferenceInputs.from_mapping(arguments), options)


def compute_preference_loss(
    x: PreferenceInputs, options: PreferenceLossOptions
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`preference_loss` on its inputs and validated options (which `fused_preference_loss`
    validates before its log-prob pass)."""
    o = options.resolved()
    x.check(o)
    cdt = compute_dtype(x.chosen_logps)
    c, r = x.chosen_logps.to(cdt), x.rejected_logps.to(cdt)
    len_c, len_r = (
        None if n is None else n.detach().to(cdt) for n in (x.chosen_lengths, x.rejected_lengths)
    )
    if x.nll is not None:
        nll = x.nll.to(cdt).reshape(())
    elif o.has_nll:  # the mean NLL over the chosen completion tokens
        nll = -c.sum() / len_c.sum().clamp(min=1.0)
    else:
        nll = None
    if o.reference_free:
        if o.averaged:
            c, r = c / len_c.clamp(min=1.0), r / len_r.clamp(min=1.0)
        family = orpo_loss if o.loss_type == ["orpo"] else cpo_loss
        loss, rewards, extra = family(c, r, nll, o)
    else:
        loss, rewards, c, r = _dpo_loss(x, o, c, r, len_c, len_r, nll)
        extra = {}
    metrics = {**_reward_metrics(rewards, c, r), **extra}
    return loss, {k: v.detach().to(cdt) for k, v in metrics.items()}


def _dpo_loss(x: PreferenceInputs, o: PreferenceLossOptions, c, r, len_c, len_r, nll):
    """The DPO loss types: LD-DPO's log-probs, WPO's weights, the weighted sum of the types
    (MPO). Returns ``(loss, rewards or None, chosen, rejected)``, the log-probs ld-weighted."""
    cdt = c.dtype
    rc = rr = wpo = None
    if x.has_reference:
        rc, rr = x.ref_chosen_logps.detach().to(cdt), x.ref_rejected_logps.detach().to(cdt)
    if o.use_weighting:  # from the whole log-probs, without gradient
        with torch.no_grad():
            w_c = torch.exp(x.chosen_aligned_logps.to(cdt) / len_c.clamp(min=1.0))
            w_r = torch.exp(x.rejected_aligned_logps.to(cdt) / len_r.clamp(min=1.0))
            wpo = w_c * w_r
    if o.ld_alpha is not None:
        c = ld_weighted(c, x.chosen_tail_logps.to(cdt), o.ld_alpha)
        r = ld_weighted(r, x.rejected_tail_logps.to(cdt), o.ld_alpha)
        if rc is not None:
            rc = ld_weighted(rc, x.ref_chosen_tail_logps.detach().to(cdt), o.ld_alpha)
            rr = ld_weighted(rr, x.ref_rejected_tail_logps.detach().to(cdt), o.ld_alpha)
    terms = dpo_terms(c, r, rc, rr, len_c, len_r, nll, o)
    loss = torch.zeros((), dtype=cdt, device=c.device)
    for loss_type, weight in zip(o.loss_type, o.loss_weights, strict=True):
        per_pair = DPO_LOSSES[loss_type](terms, o)
        if wpo is not None:
            per_pair = per_pair * wpo
        loss = loss + per_pair.mean() * weight
    rewards = None
    if rc is not None:
        rewards = (
            o.beta * terms.chosen_logratios.detach(),
            o.beta * terms.rejected_logratios.detach(),
        )
    return loss, rewards, c, r


def _reward_metrics(rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    metrics = {}
    if rewards is not None:
        chosen, rejected = rewards
        metrics["rewards/chosen"] = chosen.mean()
        metrics["rewards/rejected"] = rejected.mean()
        metrics["rewards/accuracies"] = (chosen > rejected).to(chosen.dtype).mean()
        metrics["rewards/margins"] = (chosen - rejected).mean()
    metrics["logps/chosen"] = chosen_logps.detach().mean()
    metrics["logps/rejected"] = rejected_logps.detach().mean()
    return metrics
