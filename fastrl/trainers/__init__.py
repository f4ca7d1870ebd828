"""LoRA-first GRPO and DPO trainers built on transformers.Trainer and peft."""

from fastrl.trainers.dpo import DPOConfig, DPOTrainer, evaluate_preference_accuracy
from fastrl.trainers.grpo import GRPOConfig, GRPOTrainer

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "evaluate_preference_accuracy",
]

# built-in reward functions (TRL's convention) and the checked call the trainers use
from fastrl.trainers.rewards import (  # noqa: E402
    call_reward,
    exact_match_answer,
    format_reward,
    length_penalty,
)

__all__ += ["call_reward", "exact_match_answer", "format_reward", "length_penalty"]
