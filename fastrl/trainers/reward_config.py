"""`RewardConfig`: `TrainingArguments` plus TRL 1.16's reward-model options (same names and
defaults where TRL has them) and fastrl's model options (LoRA, `max_memory_gb`, ...).
"""

from __future__ import annotations

__all__ = ["RewardConfig"]

from dataclasses import dataclass, field

from transformers import TrainingArguments

from fastrl.trainers.config_fields import OfflineTrainingArguments
from fastrl.trainers.model import ModelArguments
from fastrl.trainers.options import REWARD_NUMBERS, check_numbers


@dataclass
class RewardConfig(OfflineTrainingArguments, ModelArguments, TrainingArguments):
    r"""Configuration of `RewardTrainer`: `transformers.TrainingArguments` plus its options.

    Names and defaults follow TRL 1.16's ``RewardConfig`` (``max_length=1024``, pairs with
    a longer chosen or rejected sequence are dropped, as TRL drops them;
    ``center_rewards_coefficient``; ``disable_dropout``; ``dataset_num_proc``;
    ``pad_to_multiple_of``; ``learning_rate=1e-4``, ``logging_steps=10``, activation
    checkpointing on, bf16 where the GPU supports it). Differences from TRL:

    - the model is trained with LoRA (``lora_r``, ``lora_alpha``, ``lora_dropout``,
      ``lora_target_modules``: peft's ``SEQ_CLS`` task, the ``score`` head trained in
      full), ``load_in_4bit``, ``attn_implementation``, ``model_dtype`` (for a model path;
      TRL loads float32) and ``max_memory_gb``, as the other fastrl trainers;
    - the reward is read at each sequence's last attended token (see
      `fastrl.trainers.reward_model`);
    - ``kernel_impl`` is refused unless ``auto``: a reward model has no lm_head, so no
      fused head runs.
    """

    # ---- TrainingArguments defaults changed as TRL changes them
    learning_rate: float = field(default=1e-4, metadata={"help": "The initial learning rate."})
    # (the other defaults: OfflineTrainingArguments)

    # ---- data
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Pairs whose chosen or rejected sequence has more tokens are dropped; "
            "None: no limit."
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for tokenizing the dataset."}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad the sequence width to a multiple."}
    )

    # ---- loss
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "Weight of mean((r_chosen + r_rejected)^2), which pulls rewards to mean "
            "zero (Eisenstein et al. 2023); 0.01 is the usual value. None: off."
        },
    )

    def __post_init__(self):
        self.set_engine_defaults()
        self._check_options()  # before the device set-up: a typo fails in milliseconds
        super().__post_init__()

    def _check_options(self) -> None:
        """Every reward option, each message naming the flag, the value and what is
        allowed (the number options' ranges: `fastrl.trainers.options.REWARD_NUMBERS`)."""
        check_numbers({name: getattr(self, name) for name in REWARD_NUMBERS}, REWARD_NUMBERS)
        if self.kernel_impl != "auto":
            raise ValueError(
                f"--kernel_impl {self.kernel_impl!r} has no effect on a reward model (it has "
                "no lm_head, so no fused head runs): leave it at 'auto'"
            )
        self.check_model_arguments()
