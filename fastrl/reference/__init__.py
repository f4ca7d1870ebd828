"""Plain-PyTorch oracles (float64, materialised logits) that the kernels are tested against."""

from fastrl.reference.advantages import naive_group_advantages
from fastrl.reference.logprobs import naive_linear_logprobs
from fastrl.reference.policy import naive_policy_loss
from fastrl.reference.preference import (
    naive_kto_loss,
    naive_ld_tail_logps,
    naive_preference_loss,
)

__all__ = [
    "naive_group_advantages",
    "naive_kto_loss",
    "naive_ld_tail_logps",
    "naive_linear_logprobs",
    "naive_policy_loss",
    "naive_preference_loss",
]
