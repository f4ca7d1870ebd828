"""The plain-PyTorch oracles (float64, materialised logits) the kernels are tested
against, gathered in one namespace; each lives in its op's folder as `naive.py`."""

from fastrl.ops.advantages.naive import (
    naive_gae_advantages,
    naive_group_advantages,
    naive_reinforce_plus_plus_advantages,
    naive_remax_advantages,
)
from fastrl.ops.logprobs.naive import naive_linear_logprobs
from fastrl.ops.policy.naive import naive_policy_loss
from fastrl.ops.preference.naive import (
    naive_kto_loss,
    naive_ld_tail_logps,
    naive_preference_loss,
)
from fastrl.ops.value.naive import naive_value_loss

__all__ = [
    "naive_gae_advantages",
    "naive_group_advantages",
    "naive_kto_loss",
    "naive_ld_tail_logps",
    "naive_linear_logprobs",
    "naive_policy_loss",
    "naive_preference_loss",
    "naive_reinforce_plus_plus_advantages",
    "naive_remax_advantages",
    "naive_value_loss",
]
