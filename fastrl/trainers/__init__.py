"""LoRA-first GRPO and DPO trainers built on transformers.Trainer and peft.

The names load on first use (PEP 562): `import fastrl.trainers.data` (the command line's
data checks) then costs no torch/transformers/peft import.
"""

import importlib

# name -> the submodule that defines it; the built-in reward functions follow TRL's
# convention, `call_reward` is the checked call the trainers use
_EXPORTS = {
    "DPOConfig": "dpo_config",
    "DPOTrainer": "dpo_trainer",
    "evaluate_preference_accuracy": "dpo_trainer",
    "KTOConfig": "kto_config",
    "KTOTrainer": "kto_trainer",
    "unpair_preference_dataset": "kto_trainer",
    "GRPOConfig": "grpo_config",
    "GRPOTrainer": "grpo_trainer",
    "PPOConfig": "ppo_config",
    "PPOTrainer": "ppo_trainer",
    "call_reward": "rewards",
    "exact_match_answer": "rewards",
    "format_reward": "rewards",
    "length_penalty": "rewards",
    "RewardConfig": "reward_config",
    "RewardTrainer": "reward_trainer",
    "RewardModel": "rewards",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastrl.trainers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fastrl.trainers.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
