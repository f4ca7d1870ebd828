"""What the Liger drop-ins share: option checks, sequence log-probs, Liger's logit metrics."""

from __future__ import annotations

import torch

from fastrl import linear_logprobs
from fastrl.checks import check_bool, check_number
from fastrl.integrations.logit_sums import vocab_sums


def check_perf_options(compiled: bool, chunk_size: int) -> None:
    """Liger's ``compiled`` and ``chunk_size`` choose how Liger schedules its work
    (``torch.compile`` of each chunk, rows per chunk), not what it computes; fastrl's head
    tiles the work itself, so they are validated and otherwise have no effect."""
    check_bool("compiled", compiled)
    check_number("chunk_size", chunk_size, low=1, integer=True)


def refuse_non_default(name: str, value, default, why: str) -> None:
    """A Liger option fastrl does not have is refused unless it is at its default."""
    if value != default:
        raise ValueError(f"{name}={value!r} is not supported by fastrl's drop-in: {why}")


def check_3d(name: str, x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> None:
    """`x` ``[B, T, d]`` matching ``targets [B, T]`` and ``weight [V, d]``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{name} must be a [B, T, d] tensor, got {getattr(x, 'shape', x)}")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(x.shape[:2]):
        got = getattr(targets, "shape", targets)
        raise ValueError(f"targets must have shape [B, T]={tuple(x.shape[:2])}, got {got}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[2]:
        got = getattr(weight, "shape", weight)
        raise ValueError(f"weight must have shape [V, d] with d={x.shape[2]}, got {got}")


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Liger's ``chunk_forward`` without logits: ``(per-token log-probs [R, T] fp32 (0 where
    ignored), summed sequence log-probs [R], token counts [R])`` of the targets that are
    not `ignore_index`."""
    tok = linear_logprobs(hidden, weight, target, bias=bias, ignore_index=ignore_index, impl=impl)
    return tok, tok.sum(-1), (target != ignore_index).sum(-1)


def averaged(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Liger's ``average_log_prob``: the mean token log-prob (a row with no scored token
    gives 0, where Liger divides 0 by 0)."""
    return seq / lengths.clamp(min=1)


@torch.no_grad()
def row_logits_sums(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``[R]`` fp32: per row, the sum over positions and vocabulary of ``hidden @ weight.T +
    bias``, without the logits (`fastrl.integrations.logit_sums.vocab_sums`: the sum over
    the vocabulary is linear). `hidden` ``[R, T, d]``; every position counts (Liger's logit
    metrics ignore no target). Accumulated in fp32 without an fp32 copy of `hidden` or of
    the ``[V, d]`` `weight`: call it once per forward and sum the rows each metric needs."""
    col_sum, bias_sum = vocab_sums(weight, bias)
    per_row = hidden.sum(1, dtype=torch.float32) @ col_sum  # [R]
    if bias_sum is not None:
        per_row = per_row + hidden.shape[1] * bias_sum
    return per_row
