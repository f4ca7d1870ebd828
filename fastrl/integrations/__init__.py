"""Hooks into other libraries: Hugging Face causal LMs without logits, TRL's trainers,
verl's fused-kernel forwards (none of them imported until a patch is applied)."""

from fastrl.integrations.hf import LMHead, causal_lm_hidden_states, lm_head
from fastrl.integrations.trl import TRLPatch, patch_trl
from fastrl.integrations.verl import VerlPatch, patch_verl

__all__ = [
    "LMHead",
    "TRLPatch",
    "VerlPatch",
    "causal_lm_hidden_states",
    "lm_head",
    "patch_trl",
    "patch_verl",
]
