"""Checks and helpers shared by the per-token estimators (GAE, REINFORCE++, ReMax): the
``[B, T]`` tensors, ``gamma``/``lam``, and the batch whitening of OpenRLHF."""

from __future__ import annotations

import torch

from fastrl.checks import check_number, check_tensor, check_zero_one, compute_dtype
from fastrl.options.advantages import WHITEN_EPS


def check_token_batch(mask: torch.Tensor, **tensors: torch.Tensor | None) -> tuple[int, int]:
    """`mask` a ``[B, T]`` 0/1 (or bool) tensor and each of `tensors` (None skipped) a
    floating-point ``[B, T]`` tensor on its device; returns ``(B, T)``."""
    check_tensor("mask", mask, floating=False)
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T], got {tuple(mask.shape)}")
    check_zero_one(mask)
    for name, x in tensors.items():
        if x is not None:
            check_tensor(name, x, tuple(mask.shape), like="mask")
            if x.device != mask.device:
                raise ValueError(f"{name} is on {x.device}, mask on {mask.device}")
    return tuple(mask.shape)


def check_sequence_values(name: str, x: torch.Tensor, B: int) -> None:
    """`x` a floating-point ``[B]`` tensor (one value per sequence)."""
    check_tensor(name, x)
    if tuple(x.shape) != (B,):
        raise ValueError(
            f"{name} must have shape [B]=({B},) (one per sequence), got {tuple(x.shape)}"
        )


def check_discount(gamma: float, lam: float | None = None) -> None:
    check_number("gamma", gamma, low=0.0, high=1.0)
    if lam is not None:
        check_number("lam", lam, low=0.0, high=1.0)


def masked(x: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` detached in `dtype`, 0 where `keep` is False (padding garbage never leaks)."""
    return torch.where(keep, x.detach().to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def keep_and_dtype(mask: torch.Tensor, *like: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """The mask as bool, and the compute dtype: float64 if any input is, else float32."""
    keep = mask if mask.dtype == torch.bool else mask != 0
    dtype = torch.float64 if any(compute_dtype(x) == torch.float64 for x in like) else torch.float32
    return keep, dtype


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, normalize_std: bool = True
) -> torch.Tensor:
    """Whiten `x` ``[B, T]`` over the unmasked tokens of the whole batch, as OpenRLHF's
    ``RemoteExperienceMaker.compute_advantages_and_returns`` normalises the advantages of
    ``gae``, ``reinforce`` and ``reinforce_baseline``: ``(x - mean) * rsqrt(max(var,
    1e-8))`` with the mean and the *biased* variance over the unmasked tokens
    (``normalize_std=False``, OpenRLHF's ``no_std_norm``: centred only). Masked positions
    give 0 (verl multiplies by the mask too; OpenRLHF leaves ``-mean * rstd`` there).

    (verl's ``masked_whiten`` differs in two roundings: Bessel-corrected variance and
    ``rsqrt(var + 1e-8)``.) Pass the whole generation batch: the statistics are the
    batch's. Computed and returned in float32 for half-precision ``x`` (float64 stays).
    """
    keep = mask if mask.dtype == torch.bool else mask != 0
    x = x.to(compute_dtype(x))  # half-precision sums of a batch's tokens would round
    m = keep.to(x.dtype)
    n = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / n
    centred = torch.where(keep, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    if not normalize_std:
        return centred
    var = (centred * centred).sum() / n
    return centred * var.clamp(min=WHITEN_EPS).rsqrt()
