"""fastrl: fused Triton kernels for RL fine-tuning of language models.

Everything here works from a model's last hidden states and its ``lm_head`` weight and
never materialises the ``[tokens, vocab]`` logits.
"""

from fastrl.logprobs import linear_logprobs, sequence_logprobs

__version__ = "0.1.0"

__all__ = [
    "linear_logprobs",
    "sequence_logprobs",
]
