"""`LigerFusedLinearKTOLoss`: Liger-Kernel 0.8's KTO module on fastrl's fused head.

Same constructor, ``forward(_input, lin_weight, target, bias, preference_labels, ref_input,
ref_weight, ref_bias, kl)``, defaults and return value as Liger 0.8.5's: ``(loss,
(chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
chosen_rewards_sum, rejected_rewards_sum))``. The loss is fastrl's `kto_loss`: with
``kl=None`` Liger's loss is KTO without a reference point, which is TRL's
``apo_zero_unpaired``; with a ``kl`` value it is ``kto`` at that reference point.

Refused with a ValueError: a per-row ``kl`` (fastrl, like TRL, has one reference point per
batch) and a negative one (TRL's reference point is clamped at 0).
"""

from __future__ import annotations

import torch

from fastrl import kto_loss
from fastrl.checks import check_bool, check_impl, check_number, check_values
from fastrl.integrations.liger._common import (
    averaged,
    check_3d,
    check_perf_options,
    row_logits_sums,
    token_logps,
)

__all__ = ["LigerFusedLinearKTOLoss"]


def _kl_point(kl: torch.Tensor | float) -> torch.Tensor:
    """Liger's ``kl`` as the one-element ``kl_logps`` of `kto_loss` (ref_kl_logps 0)."""
    kl = torch.as_tensor(kl)
    if not kl.is_floating_point() or kl.numel() != 1:
        raise ValueError(
            "kl must be one number (a 0-d or one-element float tensor, the batch's KL "
            f"reference point), got shape {tuple(kl.shape)} dtype {kl.dtype}"
        )
    kl = kl.detach().float().reshape(1)
    # fastrl clamps the reference point at 0 as TRL does: a negative one is refused, on the
    # device (no host read)
    message = "kl must be >= 0 (TRL's KL reference point is clamped at 0)"
    check_values(kl < 0, message, lambda: f"{message}, got {kl.item()}")
    return kl


class LigerFusedLinearKTOLoss(torch.nn.Module):
    """Fused linear layer with KTO loss (Liger-Kernel 0.8.5's module, fastrl's head).

    Args (Liger's): ignore_index, beta, compiled and chunk_size (no effect here),
    use_ref_model (else the reference log-probs are 0), average_log_prob; impl: fastrl's
    head (keyword only).
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compiled: bool = True,
        use_ref_model: bool = False,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        *,
        impl: str = "auto",
    ):
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        check_number("beta", beta, low=0.0, strict_low=True)
        check_perf_options(compiled, chunk_size)
        check_bool("use_ref_model", use_ref_model)
        check_bool("average_log_prob", average_log_prob)
        check_impl(impl)
        self.ignore_index, self.beta = ignore_index, beta
        self.compiled, self.chunk_size, self.impl = compiled, chunk_size, impl
        self.use_ref_model, self.average_log_prob = use_ref_model, average_log_prob

    def _sequence(self, hidden, weight, target, bias):
        tok, seq, lengths = token_logps(
            hidden, weight, target, bias, ignore_index=self.ignore_index, impl=self.impl
        )
        return averaged(seq, lengths) if self.average_log_prob else seq

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        preference_labels: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        kl: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``_input [B, T, d]``, ``lin_weight [V, d]``, ``target [B, T]``, ``bias [V]``,
        ``preference_labels [B]`` bool (True: desirable), the reference model's
        ``ref_input [B, T, d]`` / ``ref_weight`` (default: this head, with ``bias``) /
        ``ref_bias``, ``kl`` the KL reference point (one number, or None)."""
        check_3d("_input", _input, target, lin_weight)
        if preference_labels is None:
            raise ValueError("preference_labels must be provided for unpaired preference loss")
        seq = self._sequence(_input, lin_weight, target, bias)
        if self.use_ref_model:
            if ref_input is None:
                raise ValueError("use_ref_model=True needs ref_input (the reference hidden states)")
            if ref_weight is None:  # a shared (frozen) lm_head, as with LoRA
                ref_weight, ref_bias = lin_weight, bias
            check_3d("ref_input", ref_input, target, ref_weight)
            with torch.no_grad():
                ref = self._sequence(ref_input, ref_weight, target, ref_bias)
        else:
            if ref_input is not None:
                raise ValueError(
                    "ref_input was given with use_ref_model=False; set use_ref_model=True"
                )
            ref = torch.zeros_like(seq)
        kw = dict(loss_type="apo_zero_unpaired")
        if kl is not None:
            point = _kl_point(kl).to(seq.device)
            kw = dict(loss_type="kto", kl_logps=point, ref_kl_logps=torch.zeros_like(point))
        loss, _ = kto_loss(seq, ref, preference_labels, beta=self.beta, **kw)
        labels = preference_labels.bool()
        chosen, rejected = labels.float(), (~labels).float()
        seq_d = seq.detach()
        rewards = self.beta * (seq_d - ref)
        logits = row_logits_sums(_input, lin_weight, bias)  # [B]
        outputs = (
            (seq_d * chosen).sum(),
            (seq_d * rejected).sum(),
            (logits * chosen).sum(),
            (logits * rejected).sum(),
            (rewards * chosen).sum(),
            (rewards * rejected).sum(),
        )
        return loss.float(), tuple(x.float() for x in outputs)
