"""Hooks into other libraries: Hugging Face causal LMs without logits, TRL's trainers."""

from fastrl.integrations.hf import LMHead, causal_lm_hidden_states, lm_head
from fastrl.integrations.trl import TRLPatch, patch_trl

__all__ = ["LMHead", "TRLPatch", "causal_lm_hidden_states", "lm_head", "patch_trl"]
