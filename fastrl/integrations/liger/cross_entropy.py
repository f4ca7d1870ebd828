"""`LigerFusedLinearScaledCrossEntropyFunction`: Liger-Kernel 0.8.5's per-token NLL and
entropy from hidden states (``liger_kernel.ops.LigerFusedLinearScaledCrossEntropyFunction``,
the head verl's fused PPO forward uses), on fastrl's `linear_logprobs`.

``apply(_input, weight, target, temperature=1.0, ignore_index=-100, m_tiles_per_cluster=1,
return_entropy=False)`` returns ``nll [M]`` fp32, or ``(nll, entropy)`` with the entropy in
the input's dtype, as Liger's does; ignored rows give 0 for both, and both are
differentiable in ``_input`` and ``weight``. ``m_tiles_per_cluster`` schedules Liger's
Hopper kernel (validated as Liger does, no effect here). Liger's ``selected_token_ids``
(full-vocabulary log-probs of chosen ids) is refused: fastrl's head scores one target per
row.
"""

from __future__ import annotations

import math

import torch

from fastrl import linear_logprobs
from fastrl.checks import check_impl

__all__ = ["LigerFusedLinearScaledCrossEntropyFunction"]


def _check(_input, weight, target, temperature, m_tiles_per_cluster, return_entropy):
    """Liger's own checks, with its messages (TypeError/ValueError)."""
    if not isinstance(m_tiles_per_cluster, int) or isinstance(m_tiles_per_cluster, bool):
        raise TypeError("m_tiles_per_cluster must be an int")
    if m_tiles_per_cluster < 1:
        raise ValueError("m_tiles_per_cluster must be >= 1")
    if not isinstance(return_entropy, bool):
        raise TypeError("return_entropy must be a bool")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError("temperature must be a real number")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError("temperature must be finite and > 0")
    if _input.ndim != 2 or weight.ndim != 2 or target.ndim != 1:
        raise ValueError("expected input[M,H], weight[V,H], and target[M]")
    if _input.shape[0] != target.shape[0] or _input.shape[1] != weight.shape[1]:
        raise ValueError(
            f"input {tuple(_input.shape)}, weight {tuple(weight.shape)} and target "
            f"{tuple(target.shape)} shapes are incompatible"
        )
    if _input.dtype != weight.dtype or not torch.is_floating_point(_input):
        raise TypeError("input and weight must have the same floating-point dtype")
    if target.dtype != torch.int64:
        raise TypeError("target must be an int64 tensor")


class LigerFusedLinearScaledCrossEntropyFunction:
    """Per-token NLL and optional entropy of ``_input @ weight.T / temperature``."""

    @staticmethod
    def apply(
        _input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        temperature: float = 1.0,
        ignore_index: int = -100,
        m_tiles_per_cluster: int = 1,
        return_entropy: bool = False,
        selected_token_ids: torch.Tensor | None = None,
        *,
        impl: str = "auto",
    ):
        """``_input [M, H]``, ``weight [V, H]`` (same dtype), ``target [M]`` int64 ->
        ``nll [M]`` fp32, or ``(nll, entropy [M])`` with ``return_entropy``."""
        if selected_token_ids is not None:
            raise ValueError(
                "selected_token_ids is not supported by fastrl's drop-in (its head scores one "
                "target per row); score each id as a target with fastrl.linear_logprobs"
            )
        _check(_input, weight, target, temperature, m_tiles_per_cluster, return_entropy)
        check_impl(impl)
        out = linear_logprobs(
            _input, weight, target, temperature=float(temperature), ignore_index=ignore_index,
            return_entropy=return_entropy, impl=impl,
        )  # fmt: skip
        if not return_entropy:
            return -out
        logps, entropy = out
        return -logps, entropy.to(_input.dtype)
