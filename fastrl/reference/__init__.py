"""Plain-PyTorch oracles (float64, materialised logits) that the kernels are tested against."""

from fastrl.reference.advantages import naive_group_advantages
from fastrl.reference.logprobs import naive_linear_logprobs
from fastrl.reference.policy import naive_policy_loss

__all__ = ["naive_group_advantages", "naive_linear_logprobs", "naive_policy_loss"]
