"""Hooks into other libraries: Hugging Face causal LMs without logits, TRL's trainers, the
lm_head weight gathered from FSDP2 / ZeRO-3 shards."""

from fastrl.integrations.gather import gathered_weight, is_sharded
from fastrl.integrations.hf import LMHead, causal_lm_hidden_states, lm_head
from fastrl.integrations.trl import TRLPatch, patch_trl

__all__ = [
    "LMHead",
    "TRLPatch",
    "causal_lm_hidden_states",
    "gathered_weight",
    "is_sharded",
    "lm_head",
    "patch_trl",
]
