"""VESPO's sequence weight: the detached Gamma function of the sequence importance ratio.

TRL 1.16, ``GRPOTrainer.get_gamma_weights`` (loss_type="vespo", the VESPO paper,
arXiv 2602.10693): with the *sum* over a sequence's tokens of the log-ratios
``log pi / pi_old`` (each clamped to [-20, 20]), plus, when the sampler correction runs,
the sum over the row of ``log(pi_old / pi_sampler)`` (each clamped to [log 1e-8, 20]),
``log w`` is clamped to [log 1e-8, 20] and

    phi(w) = exp(lambda + k log w - lambda w) = e^lambda w^k e^(-lambda w),  phi(1) = 1,

with ``(k, lambda)`` = ``(vespo_k_pos, vespo_lambda_pos)`` where the advantage is >= 0,
else the ``_neg`` pair, ``lambda`` clamped to >= 1e-4, and NaN/inf mapped to 0. ``phi`` is a
constant: the loss ``-phi * A * logps`` has the gradient ``-phi * A * grad logps``.
"""

from __future__ import annotations

import math

import torch

from fastrl.options.policy import PolicyLossOptions

#: TRL's clamps: each token log-ratio, and log w and each log sampler ratio from below
LOG_RATIO_CLAMP = 20.0
LOG_W_MIN = math.log(1e-8)
LAMBDA_MIN = 1e-4


@torch.no_grad()
def gamma_weights(
    opts: PolicyLossOptions,
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    m: torch.Tensor,
    sampling: torch.Tensor | None,
) -> torch.Tensor:
    """``phi``: ``[B, 1]`` for per-sequence advantages (``[B, 1]``), ``[B, T]`` for
    per-token ones (the sign picks ``k``, ``lambda`` per token, as TRL's broadcast does).

    log_ratio, m: ``[B, T]`` compute dtype (``logps - old_logps``, masked positions 0);
    adv: ``[B, 1]`` or ``[B, T]``; sampling: the sampler correction's token ratios
    ``[B, T]`` (`fastrl.ops.policy.aggregate.sampling_ratio`) or None.
    """
    lr = log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_w = (lr * m).sum(-1, keepdim=True)
    if sampling is not None:
        # TRL sums over the whole row; masked positions hold ratio 1 (log 0) there too
        log_w = log_w + sampling.log().clamp(LOG_W_MIN, LOG_RATIO_CLAMP).sum(-1, keepdim=True)
    log_w = log_w.clamp(LOG_W_MIN, LOG_RATIO_CLAMP)
    nonneg = adv >= 0
    k = torch.where(nonneg, opts.vespo_k_pos, opts.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, opts.vespo_lambda_pos, opts.vespo_lambda_neg).to(log_w.dtype)
    lam = lam.clamp(min=LAMBDA_MIN)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
