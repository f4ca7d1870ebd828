"""The tensor arguments of the policy loss: their checks, and the inputs the PyTorch path
computes on (compute dtype, masked positions zeroed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrl.checks import check_num_items, check_tensor, check_zero_one, compute_dtype


def check_tensors(
    shape: tuple[int, int],
    *,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None,
    entropy: torch.Tensor | None,
    sampling_logps: torch.Tensor | None,
    num_items_in_batch: int | float | torch.Tensor | None,
) -> None:
    """Every tensor argument of `policy_loss` but ``logps``, against ``logps``' ``[B, T]``
    `shape` (None: not given), and ``num_items_in_batch``.

    Raises:
        TypeError: not a tensor, not a floating-point one where log-probs are expected, a
            complex or bool ``advantages``, a complex ``mask``.
        ValueError: a shape other than ``[B, T]`` (``advantages``: ``[B]``, ``[B, 1]`` or
            ``[B, T]``), a mask value other than 0 and 1, a ``num_items_in_batch`` that is
            negative or a tensor of more than one element.
    """
    B, T = shape
    for name, x in (
        ("old_logps", old_logps),
        ("ref_logps", ref_logps),
        ("entropy", entropy),
        ("sampling_logps", sampling_logps),
    ):
        if x is not None:
            check_tensor(name, x, shape)
    check_tensor("advantages", advantages, floating=False)
    if advantages.dtype == torch.bool:  # (check_tensor refuses complex dtypes)
        raise TypeError(f"advantages must be a real tensor, got dtype {advantages.dtype}")
    if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
        raise ValueError(
            f"advantages must have shape [B]=({B},), [B, 1] or [B, T]={tuple(shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    check_tensor("mask", mask, shape, floating=False)
    check_zero_one(mask)
    check_num_items(num_items_in_batch)


def masked(x: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, 0 where `keep` is False: inf/NaN padding cannot leak into sums, and
    the gradient there is zero (as with TRL's masking)."""
    return torch.where(keep, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


@dataclass(frozen=True)
class LossInputs:
    """The PyTorch path's inputs: ``[B, T]`` in the compute dtype (float64 for float64
    log-probs, else float32), zero where the mask is 0."""

    keep: torch.Tensor  #: the mask, bool
    m: torch.Tensor  #: the mask as 0/1 numbers
    lp: torch.Tensor  #: the policy's log-probs, differentiable
    old: torch.Tensor  #: the sampling policy's log-probs (``lp.detach()`` on-policy)
    adv: torch.Tensor  #: the advantages, ``[B, 1]`` or ``[B, T]``
    ent: torch.Tensor | None  #: the policy's entropy, differentiable
    sampling: torch.Tensor | None  #: the sampler's log-probs; NaN where it could not score

    @classmethod
    def prepare(
        cls,
        logps: torch.Tensor,
        old_logps: torch.Tensor | None,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        entropy: torch.Tensor | None,
        sampling_logps: torch.Tensor | None,
    ) -> LossInputs:
        """From `policy_loss`' (checked) arguments; the old, sampler's log-probs and the
        advantages are constants."""
        cdt = compute_dtype(logps)
        keep = mask.bool() if mask.dtype != torch.bool else mask
        lp = masked(logps, keep, cdt)
        adv = advantages.detach().to(cdt)
        adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
        if adv.shape[1] == logps.shape[1] and logps.shape[1] != 1:
            adv = masked(adv, keep, cdt)
        return cls(
            keep=keep,
            m=keep.to(cdt),
            lp=lp,
            old=lp.detach() if old_logps is None else masked(old_logps.detach(), keep, cdt),
            adv=adv,
            ent=None if entropy is None else masked(entropy, keep, cdt),
            sampling=None if sampling_logps is None else masked(sampling_logps, keep, cdt),
        )

    def clean(self, x: torch.Tensor) -> torch.Tensor:
        """Another ``[B, T]`` tensor as these are: compute dtype, 0 where masked."""
        return masked(x, self.keep, self.m.dtype)
