"""fastrl: fused Triton kernels for RL fine-tuning of language models.

Everything here works from a model's last hidden states and its ``lm_head`` weight and
never materialises the ``[tokens, vocab]`` logits.

The names load on first use (PEP 562): `import fastrl` costs no torch import, so the
`fastrl` command rejects a mistyped option in a fraction of a second.
"""

import importlib

__version__ = "0.1.0"

# public name -> the op package that defines it
_EXPORTS = {
    "discounted_returns": "fastrl.ops.advantages",
    "fused_policy_loss": "fastrl.ops.policy",
    "fused_preference_loss": "fastrl.ops.preference",
    "gae_advantages": "fastrl.ops.advantages",
    "group_advantages": "fastrl.ops.advantages",
    "kl_shaped_rewards": "fastrl.ops.advantages",
    "kto_loss": "fastrl.ops.preference",
    "ld_tail_logps": "fastrl.ops.preference",
    "linear_logprobs": "fastrl.ops.logprobs",
    "masked_whiten": "fastrl.ops.advantages",
    "policy_loss": "fastrl.ops.policy",
    "preference_loss": "fastrl.ops.preference",
    "reinforce_plus_plus_advantages": "fastrl.ops.advantages",
    "remax_advantages": "fastrl.ops.advantages",
    "sequence_logprobs": "fastrl.ops.logprobs",
    "value_loss": "fastrl.ops.value",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastrl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
