"""LD-DPO's split of each completion into the pair's shared part and its verbose tail."""

from __future__ import annotations

import torch

from fastrl.checks import check_zero_one

__all__ = ["ld_tail_logps"]


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
    check_zero_one(mask)
    pos = keep.long().cumsum(1)  # 1-based position among the completion tokens
    lens = keep.sum(1)
    shared = torch.minimum(*lens.chunk(2)).repeat(2)
    tail = keep & (pos > shared.unsqueeze(1))
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    tails = torch.where(tail, logps, zero).sum(1)
    return tails[: logps.shape[0] // 2], tails[logps.shape[0] // 2 :]


def ld_weighted(logps: torch.Tensor, tail: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """``shared + ld_alpha * tail`` of ``[B]`` sequence log-probs, the shared part formed
    as ``logps - tail``."""
    return (logps - tail) + ld_alpha * tail
