"""Hooks into other libraries: Hugging Face causal LMs without logits."""

from fastrl.integrations.hf import LMHead, causal_lm_hidden_states, lm_head

__all__ = ["LMHead", "causal_lm_hidden_states", "lm_head"]
