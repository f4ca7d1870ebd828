"""fastrl: fused Triton kernels for RL fine-tuning of language models.

Everything here works from a model's last hidden states and its ``lm_head`` weight and
never materialises the ``[tokens, vocab]`` logits.
"""

from fastrl.advantages import group_advantages
from fastrl.fused_policy import fused_policy_loss
from fastrl.fused_preference import fused_preference_loss
from fastrl.logprobs import linear_logprobs, sequence_logprobs
from fastrl.policy import policy_loss
from fastrl.preference import kto_loss, ld_tail_logps, preference_loss

__version__ = "0.1.0"

__all__ = [
    "fused_policy_loss",
    "fused_preference_loss",
    "group_advantages",
    "kto_loss",
    "ld_tail_logps",
    "linear_logprobs",
    "policy_loss",
    "preference_loss",
    "sequence_logprobs",
]
