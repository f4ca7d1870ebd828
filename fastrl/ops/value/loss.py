"""`value_loss`: PPO's clipped value loss, as OpenRLHF's ``ValueLoss``
(openrlhf/models/loss.py) and verl's ``compute_value_loss``
(verl/trainer/ppo/core_algos.py):

    values_clipped = old_values + clamp(values - old_values, -value_clip, value_clip)
    loss_t = max((values_clipped - returns)^2, (values - returns)^2)   (no clip: the second)
    loss = 0.5 * aggregate(loss_t)

with OpenRLHF's ``aggregate_loss``: the masked mean over tokens (``token_level_loss``;
the masked sum over ``num_items_in_batch`` when given, its ``batch_num_tokens``), or the
mean over sequences with a token of each sequence's token mean.
"""

from __future__ import annotations

import torch

from fastrl.checks import (
    check_bool,
    check_num_items,
    check_number,
    check_tensor,
    check_zero_one,
    compute_dtype,
)
from fastrl.options import value as defaults

__all__ = ["value_loss"]


def _check(values, old_values, returns, mask, value_clip, token_level_loss, num_items_in_batch):
    check_tensor("values", values)
    if values.dim() != 2:
        raise ValueError(f"values must have shape [B, T], got {tuple(values.shape)}")
    shape = tuple(values.shape)
    check_tensor("returns", returns, shape, like="values")
    if old_values is not None:
        check_tensor("old_values", old_values, shape, like="values")
    check_tensor("mask", mask, shape, floating=False, like="values")
    check_zero_one(mask)
    check_number("value_clip", value_clip, low=0.0, strict_low=True, optional=True)
    check_bool("token_level_loss", token_level_loss)
    if value_clip is not None and old_values is None:
        raise ValueError(
            f"value_clip={value_clip!r} clips around old_values (the values at rollout); "
            "got old_values=None"
        )
    if num_items_in_batch is not None:
        if not token_level_loss:
            raise ValueError(
                "num_items_in_batch is the token count of token_level_loss=True; got "
                "token_level_loss=False"
            )
        check_num_items(num_items_in_batch)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor | None,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    value_clip: float | None = defaults.VALUE_CLIP,
    token_level_loss: bool = defaults.TOKEN_LEVEL_LOSS,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's (clipped) value loss (see the module docstring for the formula).

    Args:
        values: ``[B, T]`` float, the value head's current predictions; differentiable.
        old_values: ``[B, T]`` the values at rollout (OpenRLHF's ``old_values``, verl's
            ``values``), a constant; needed with ``value_clip``, else unused (may be None).
        returns: ``[B, T]`` the regression targets (e.g. `gae_advantages`' returns), a
            constant.
        mask: ``[B, T]`` bool or 0/1 (``action_mask``).
        value_clip: > 0, how far the clipped prediction may move from ``old_values``
            (OpenRLHF's ``value_clip``, verl's ``cliprange_value``), or None: no clipping.
        token_level_loss: True: masked mean over the tokens; False: the mean over the
            sequences that have a token of their token means (OpenRLHF).
        num_items_in_batch: with ``token_level_loss``, divide the masked sum by this
            global token count instead (OpenRLHF's ``batch_num_tokens``).

    Returns:
        ``(loss, metrics)``: a 0-d loss (float32, float64 for float64 ``values``);
        metrics, detached 0-d: ``value_loss`` (the loss), ``values`` (masked mean of the
        predictions), ``vf_clipfrac`` (verl's name: the fraction of masked tokens where
        the clipped term is the larger, 0 without ``value_clip``). A batch without
        tokens gives a loss of 0 (OpenRLHF's mean would be NaN).

    Raises:
        ValueError: shapes, a mask not 0/1, ``value_clip <= 0``, ``value_clip`` without
            ``old_values``, ``num_items_in_batch`` with ``token_level_loss=False`` or
            not a number. TypeError: non-float tensors, a non-bool ``token_level_loss``.
    """
    _check(values, old_values, returns, mask, value_clip, token_level_loss, num_items_in_batch)
    dtype = compute_dtype(values)
    keep = mask if mask.dtype == torch.bool else mask != 0
    m = keep.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v = torch.where(keep, values.to(dtype), zero)
    ret = torch.where(keep, returns.detach().to(dtype), zero)
    unclipped = (v - ret) ** 2
    if value_clip is not None:
        old = torch.where(keep, old_values.detach().to(dtype), zero)
        v_clipped = old + (v - old).clamp(-value_clip, value_clip)
        clipped = (v_clipped - ret) ** 2
        per_token = torch.maximum(clipped, unclipped)
        clipfrac = ((clipped > unclipped).to(dtype) * m).sum() / m.sum().clamp(min=1.0)
    else:
        per_token = unclipped
        clipfrac = zero
    if not token_level_loss:
        counts = m.sum(-1)
        seq = (per_token * m).sum(-1) / counts.clamp(min=1.0)
        has = (counts > 0).to(dtype)
        loss = (seq * has).sum() / has.sum().clamp(min=1.0)
    elif num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, device=values.device).reshape(()).to(dtype)
        loss = (per_token * m).sum() / n.clamp(min=1.0)
    else:
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    loss = 0.5 * loss
    metrics = {
        "value_loss": loss.detach(),
        "values": ((v * m).sum() / m.sum().clamp(min=1.0)).detach(),
        "vf_clipfrac": clipfrac.detach(),
    }
    return loss, metrics
