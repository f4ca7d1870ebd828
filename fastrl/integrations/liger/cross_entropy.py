"""`LigerFusedLinearScaledCrossEntropyFunction`: Liger-Kernel 0.8.5's per-token NLL and
entropy from hidden states (``liger_kernel.ops.LigerFusedLinearScaledCrossEntropyFunction``,
the head verl's fused PPO forward uses), on fastrl's `linear_logprobs`.

``apply(_input, weight, target, temperature=1.0, ignore_index=-100, m_tiles_per_cluster=1,
return_entropy=False)`` returns ``nll [M]`` fp32, or ``(nll, entropy)`` with the entropy in
the input's dtype, as Liger's does; ignored rows give 0 for both, and both are
differentiable in ``_input`` and ``weight``. ``m_tiles_per_cluster`` schedules Liger's
Hopper kernel (validated as Liger does, no effect here). ``selected_token_ids [K]`` appends
``[M, K]`` fp32 full-vocabulary log-probs of those ids (0 on ignored rows), as Liger's
does: ``z_k - logsumexp(z)`` with the row's logsumexp recovered from the target's log-prob
(``z_target - logp_target``, one ``[M, K]`` GEMM more, no ``[M, V]`` logits), so they are
differentiable through fastrl's head.
"""

from __future__ import annotations

import math

import torch

from fastrl import linear_logprobs
from fastrl.checks import check_impl, check_values

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


def _check_selected(selected_token_ids, weight) -> None:
    """Liger's checks of ``selected_token_ids``; the range is checked on the device without
    a host read (`fastrl.checks.check_values`: eager on a CPU, a device-side assert on an
    accelerator)."""
    if selected_token_ids is None:
        return
    if not isinstance(selected_token_ids, torch.Tensor):
        raise TypeError("selected_token_ids must be an int64 tensor")
    if selected_token_ids.ndim != 1:
        raise ValueError("selected_token_ids must have shape [K]")
    if selected_token_ids.dtype != torch.int64:
        raise TypeError("selected_token_ids must be an int64 tensor")
    if selected_token_ids.device != weight.device:
        raise ValueError("selected_token_ids and weight must be on the same device")
    V = weight.shape[0]
    bad = (selected_token_ids < 0) | (selected_token_ids >= V)
    message = f"selected_token_ids must be in [0, {V})"
    check_values(bad, message, lambda: f"{message}, got {selected_token_ids[bad][0].item()}")


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
        ``nll [M]`` fp32, ``(nll, entropy [M])`` with ``return_entropy``, and
        ``selected [M, K]`` fp32 appended with ``selected_token_ids [K]``."""
        _check(_input, weight, target, temperature, m_tiles_per_cluster, return_entropy)
        _check_selected(selected_token_ids, weight)
        check_impl(impl)
        out = linear_logprobs(
            _input, weight, target, temperature=float(temperature), ignore_index=ignore_index,
            return_entropy=return_entropy, impl=impl,
        )  # fmt: skip
        logps, entropy = out if return_entropy else (out, None)
        outputs = (-logps,) if entropy is None else (-logps, entropy.to(_input.dtype))
        if selected_token_ids is not None:
            valid = target != ignore_index
            safe = torch.where(valid, target, 0)
            # the row's logsumexp: z_target - logp_target, differentiable like both terms.
            # Both logits in fp32 (the [M, d] / [K, d] gathers and the [M, K] product are
            # small next to [M, V]), as the head accumulates the logits behind logps: bf16
            # products would be off by ~|z| 2^-9
            h = _input.float()
            z_target = (h * weight[safe].float()).sum(-1) / temperature
            lse = z_target - logps
            z_sel = (h @ weight[selected_token_ids].float().T) / temperature
            selected = (z_sel - lse[:, None]).masked_fill(~valid[:, None], 0.0)
            outputs += (selected,)
        return outputs[0] if len(outputs) == 1 else outputs
