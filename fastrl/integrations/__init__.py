"""Hooks into other libraries: Hugging Face causal LMs without logits, TRL's trainers,
verl's fused-kernel forwards (`patch_verl`), Liger-Kernel's fused losses
(`fastrl.integrations.liger`), plain models (`patch_model`), the lm_head weight gathered from
FSDP2 / ZeRO-3 shards.

`patch_model` and its classes load on first use (PEP 562): they import transformers. verl is
not imported until `patch_verl()` is called.
"""

import importlib

from fastrl.integrations.gather import gathered_weight, is_sharded
from fastrl.integrations.hf import LMHead, causal_lm_hidden_states, lm_head
from fastrl.integrations.trl import TRLPatch, patch_trl
from fastrl.integrations.verl import VerlPatch, patch_verl

_LAZY = {
    "CausalLMLogProbsOutput": "fastrl.integrations.model",
    "ModelPatch": "fastrl.integrations.model",
    "patch_model": "fastrl.integrations.model",
}

__all__ = [
    "CausalLMLogProbsOutput",
    "LMHead",
    "ModelPatch",
    "TRLPatch",
    "VerlPatch",
    "causal_lm_hidden_states",
    "gathered_weight",
    "is_sharded",
    "lm_head",
    "patch_model",
    "patch_trl",
    "patch_verl",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastrl.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
