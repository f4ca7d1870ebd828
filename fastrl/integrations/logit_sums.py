"""Sums of the logits over the vocabulary without the logits: the sum over the vocabulary
is linear, ``sum_v (h . w_v + b_v) = h . sum_v w_v + sum_v b_v``, so one ``[d]`` column
sum of the weight (and one of the bias) serves every hidden state. TRL's ``mean_logits``
(`fastrl.integrations.trl`) and Liger's logit metrics (`fastrl.integrations.liger`) read it.
"""

from __future__ import annotations

import torch

__all__ = ["vocab_sums"]


@torch.no_grad()
def vocab_sums(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sum_v weight[v] [d], sum_v bias[v] 0-d or None)``, float32, accumulated in
    float32 without a float32 copy of the ``[V, d]`` weight (`weight` ``[V, d]``, `bias`
    ``[V]``, any floating dtype)."""
    col_sum = weight.sum(0, dtype=torch.float32)
    return col_sum, None if bias is None else bias.sum(dtype=torch.float32)
