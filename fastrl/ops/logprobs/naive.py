"""Naive oracle for `linear_logprobs`: materialise the logits, in float64."""

import torch

from fastrl.checks import IGNORE_INDEX


def naive_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    return_is_top1: bool = False,
    return_log_sum_sq_probs: bool = False,
    compute_dtype: torch.dtype = torch.float64,
):
    """Per-token log-probs (and entropies) the obvious way, differentiable.

    Same contract as `fastrl.linear_logprobs`; returns tensors of `targets.shape` in
    `compute_dtype`. float64 is the ground truth; the input dtype gives "what plain
    PyTorch would get", the baseline error a kernel is allowed to match.
    """
    x = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        x = x + bias.to(compute_dtype)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    z = x / temperature

    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    logps = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logps = torch.where(valid, logps, 0.0)
    out = (logps,)
    if return_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        out += (torch.where(valid, entropy, 0.0),)
    if return_is_top1:
        target_z = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        out += (valid & (target_z >= z.amax(-1)),)
    if return_log_sum_sq_probs:
        out += (torch.where(valid, torch.logsumexp(2 * logp_all, -1), 0.0),)
    return out[0] if len(out) == 1 else out
