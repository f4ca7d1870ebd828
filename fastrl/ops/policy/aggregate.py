"""From per-token terms to the loss: the factors on the policy term (off-policy sequence
mask, high-entropy mask, sampler weights), TRL's normalisers, the entropy bonus.

The loss is linear in its per-token terms (loss term, KL, entropy) with coefficients that
do not depend on the log-probs once the factors are fixed: `token_coefficients` gives them,
for the fused head that forms the gradient in its forward (fastrl/ops/policy/fused.py). It
is the derivative of `aggregate` and `entropy_bonus`, written next to them: the two change
together (tests/ops/test_policy_loss.py pins them against autograd).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastrl.ops.policy.inputs import LossInputs
from fastrl.options.policy import (
    SEQUENCE_MEAN_LOSS_TYPES,
    TOKEN_COUNT_LOSS_TYPES,
    PolicyLossOptions,
)

NumItems = int | float | torch.Tensor  # policy_loss' num_items_in_batch


class TokenFactors(NamedTuple):
    """Constant factors on the per-token loss term (None where the option is off):
    ``off_policy`` 0/1 ``[B, 1]`` or ``[B, T]``, ``high_entropy`` bool ``[B, T]``,
    ``sampling`` the sampler's importance weights ``[B, T]`` or ``[B, 1]``."""

    off_policy: torch.Tensor | None
    high_entropy: torch.Tensor | None
    sampling: torch.Tensor | None


def sampling_ratio(
    opts: PolicyLossOptions, old: torch.Tensor, sampling: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """Importance weight pi_old / pi_sampler (TRL's vLLM correction) from constants old,
    sampling, m ``[B, T]`` (masked positions zeroed): ``[B, T]``, ``[B, 1]`` for the
    sequence modes."""
    mode = opts.sampling_correction
    clip_min, clip_max = opts.sampling_clip_min, opts.sampling_clip_max
    diff = torch.nan_to_num((old - sampling) * m, nan=0.0)  # unscored tokens: no correction
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = float("-inf") if clip_min is None else clip_min
    hi = float("inf") if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@torch.no_grad()
def token_factors(opts: PolicyLossOptions, x: LossInputs) -> TokenFactors:
    """The factors the options ask for (the off-policy mask reads the current log-probs,
    as a constant)."""
    off_policy = None
    if opts.off_policy_mask_threshold is not None:
        src = x.sampling if x.sampling is not None else x.old
        kl_div = torch.nan_to_num(src - x.lp, nan=0.0)
        seq_kl = (kl_div * x.m).sum(-1, keepdim=True) / x.m.sum(-1, keepdim=True).clamp(min=1.0)
        off_policy = ((x.adv >= 0) | (seq_kl <= opts.off_policy_mask_threshold)).to(x.m.dtype)
    high_entropy = None
    if opts.top_entropy_quantile < 1:
        local = x.ent[x.keep]
        if local.numel() == 0:
            high_entropy = torch.zeros_like(x.keep)
        else:
            threshold = torch.quantile(local, 1 - opts.top_entropy_quantile)
            high_entropy = (x.ent >= threshold) & x.keep
    sampling = None
    if x.sampling is not None and opts.sampling_correction is not None:
        sampling = sampling_ratio(opts, x.old, x.sampling, x.m)
    return TokenFactors(off_policy, high_entropy, sampling)


def apply_factors(per_token: torch.Tensor, factors: TokenFactors) -> torch.Tensor:
    if factors.off_policy is not None:
        per_token = per_token * factors.off_policy
    if factors.high_entropy is not None:
        per_token = per_token * factors.high_entropy.to(per_token.dtype)
    if factors.sampling is not None:
        per_token = per_token * factors.sampling
    return per_token


def _token_sum_divisor(
    opts: PolicyLossOptions, m: torch.Tensor, num_items_in_batch: NumItems | None
) -> torch.Tensor | int:
    """What ``bnpo``, ``dr_grpo``, ``dapo`` and ``cispo`` divide the token sum by."""
    if opts.loss_type == "bnpo":
        return m.sum().clamp(min=1.0)
    if opts.loss_type == "dr_grpo":
        return m.shape[0] * opts.max_completion_length
    # dapo, cispo: the token count of one accumulation window
    n = torch.as_tensor(num_items_in_batch, device=m.device).reshape(())
    normalizer = n.to(m.dtype).clamp(min=1.0) / opts.num_processes
    return normalizer * opts.gradient_accumulation_steps / opts.generation_steps


def aggregate(
    opts: PolicyLossOptions,
    per_token: torch.Tensor,
    m: torch.Tensor,
    num_items_in_batch: NumItems | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's normaliser of `opts.loss_type` over ``per_token * m`` (``[B, T]``, or ``[B, 1]``
    terms broadcast): ``(loss, the value TRL logs as policy_loss)``, the latter before the
    ``/ gradient_accumulation_steps`` of the loss types that divide by it."""
    if opts.loss_type in SEQUENCE_MEAN_LOSS_TYPES:
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif opts.loss_type == "luspo":
        loss = (per_token * m).sum(-1).mean()
    else:
        loss = (per_token * m).sum() / _token_sum_divisor(opts, m, num_items_in_batch)
    logged = loss.detach()
    if opts.loss_type not in TOKEN_COUNT_LOSS_TYPES:  # their normaliser has it already
        loss = loss / opts.gradient_accumulation_steps
    return loss, logged


def entropy_bonus(
    opts: PolicyLossOptions,
    ent: torch.Tensor,
    m: torch.Tensor,
    high_entropy: torch.Tensor | None,
) -> torch.Tensor:
    """The masked mean entropy (over the high-entropy tokens if masked), ``/ GA``."""
    eff = m if high_entropy is None else m * high_entropy.to(m.dtype)
    return (ent * eff).sum() / eff.sum().clamp(min=1.0) / opts.gradient_accumulation_steps


def token_coefficients(
    opts: PolicyLossOptions,
    m: torch.Tensor,
    sampling: torch.Tensor | None,
    num_items_in_batch: NumItems | None,
    *,
    has_kl: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dL/d(per-token loss term), dL/d(KL), dL/d(entropy), ``[B, T]`` in ``m``'s dtype each
    (None where the loss has no such term), for the loss without the off-policy and
    high-entropy masks (which depend on the log-probs): `aggregate` of
    ``loss * sampling + beta * kl`` minus ``entropy_coef *`` `entropy_bonus`."""
    B = m.shape[0]
    if opts.loss_type in SEQUENCE_MEAN_LOSS_TYPES:
        w = m / m.sum(-1, keepdim=True).clamp(min=1.0) / B
    elif opts.loss_type == "luspo":
        w = m / B
    else:
        w = m / _token_sum_divisor(opts, m, num_items_in_batch)
    if opts.loss_type not in TOKEN_COUNT_LOSS_TYPES:
        w = w / opts.gradient_accumulation_steps
    w_pt = w if sampling is None else w * sampling
    w_kl = opts.beta * w if has_kl and opts.beta != 0 else None
    w_ent = None
    if opts.entropy_coef != 0:
        GA = opts.gradient_accumulation_steps
        w_ent = -opts.entropy_coef * m / m.sum().clamp(min=1.0) / GA
    return w_pt, w_kl, w_ent
