"""The policy loss's metrics, named as TRL logs them, on this batch only (see
`fastrl.policy_loss` for TRL's cross-process reduction)."""

from __future__ import annotations

import torch

from fastrl.ops.policy.aggregate import TokenFactors
from fastrl.ops.policy.inputs import LossInputs
from fastrl.ops.policy.terms import TokenTerms
from fastrl.options.policy import CLIPPED_LOSS_TYPES, PolicyLossOptions


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """TRL's metric mean: over unmasked tokens, or over sequences for [B, 1] values."""
    if x.shape[1] == 1:
        return x.sum() / x.shape[0]
    return (x * m).sum() / m.sum().clamp(min=1.0)


def _masked_seq_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * m).sum(-1) / m.sum(-1)  # NaN for empty rows, skipped by the nan-min/max


def _nanmin(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.min() if x.numel() else torch.tensor(float("nan"), dtype=x.dtype, device=x.device)


def _nanmax(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.max() if x.numel() else torch.tensor(float("nan"), dtype=x.dtype, device=x.device)


def _clip_metrics(opts: PolicyLossOptions, x: LossInputs, terms: TokenTerms) -> dict:
    cdt, m = x.m.dtype, x.m
    if opts.loss_type == "cispo":
        clipped = ((terms.ratio > opts.upper_epsilon) & (x.adv > 0)).to(cdt)
        return {"cispo_clip_ratio": _masked_mean(clipped, m)}
    if opts.loss_type == "vespo":
        return {"vespo/phi_seq_mean": _masked_mean(terms.phi, m)}
    if opts.loss_type not in CLIPPED_LOSS_TYPES:
        return {}
    low = ((terms.clip_ratio < 1 - float(opts.epsilon)) & (x.adv < 0)).to(cdt)
    high = ((terms.clip_ratio > 1 + opts.upper_epsilon) & (x.adv > 0)).to(cdt)
    region = torch.maximum(low, high)
    return {
        "clip_ratio/low_mean": _masked_mean(low, m),
        "clip_ratio/high_mean": _masked_mean(high, m),
        "clip_ratio/region_mean": _masked_mean(region, m),
        "clip_ratio/low_min": _nanmin(_masked_seq_mean(low, m)),
        "clip_ratio/high_max": _nanmax(_masked_seq_mean(high, m)),
    }


def _sampling_metrics(x: LossInputs, weights: torch.Tensor) -> dict:
    zero = torch.zeros((), dtype=x.m.dtype, device=x.m.device)
    diff = (x.old - x.sampling).abs()
    diff = diff[x.keep & ~torch.isnan(diff)]
    flat = weights.flatten() if weights.shape[1] == 1 else weights[x.keep]
    return {
        "sampling/sampling_logp_difference/mean": diff.mean() if diff.numel() else zero,
        "sampling/sampling_logp_difference/max": diff.max() if diff.numel() else zero,
        "sampling/importance_sampling_ratio/min": flat.min() if flat.numel() else zero,
        "sampling/importance_sampling_ratio/mean": flat.mean() if flat.numel() else zero,
        "sampling/importance_sampling_ratio/max": flat.max() if flat.numel() else zero,
    }


@torch.no_grad()
def policy_metrics(
    opts: PolicyLossOptions,
    x: LossInputs,
    terms: TokenTerms,
    factors: TokenFactors,
    policy_loss: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """0-d detached tensors in the compute dtype: ``policy_loss`` (given), ``kl``,
    ``entropy``, the clip ratios of the loss type, the sampler correction's statistics."""
    metrics = {"policy_loss": policy_loss}
    if terms.kl is not None:
        metrics["kl"] = _masked_mean(terms.kl.detach(), x.m)
    if x.ent is not None:
        metrics["entropy"] = _masked_mean(x.ent.detach(), x.m)
    metrics.update(_clip_metrics(opts, x, terms))
    if factors.sampling is not None:
        metrics.update(_sampling_metrics(x, factors.sampling))
    return {k: v.detach().to(x.m.dtype) for k, v in metrics.items()}
