"""Config fields the offline trainers' configs (`DPOConfig`, `KTOConfig`, `RewardConfig`)
declare alike, declared once here: dataclass bases that go before `ModelArguments` and
`TrainingArguments` (``class DPOConfig(PreferenceDataArguments, ModelArguments,
TrainingArguments)``), so every field keeps the place it would have had in the config
itself. `fastrl.cli` reads these classes through the configs' bases (``_declared_fields``).
"""

from __future__ import annotations

__all__ = ["OfflineTrainingArguments", "PreferenceDataArguments"]

from dataclasses import dataclass, field


@dataclass
class OfflineTrainingArguments:
    """The `TrainingArguments` defaults TRL's offline trainers change, and dropout off."""

    # ---- TrainingArguments defaults changed as TRL changes them
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; default: on when a bf16-capable GPU is used."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the dataset's columns (the collator picks)."}
    )

    # ---- model (besides ModelArguments)
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set every dropout probability of the model to 0."}
    )


@dataclass
class PreferenceDataArguments(OfflineTrainingArguments):
    """The data options of prompt + completion datasets (`DPOConfig`, `KTOConfig`)."""

    # ---- data
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Max prompt + completion tokens (keeps the start); None: no limit."},
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Max prompt tokens (keeps the end); None: no limit."}
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Max tokens per completion (keeps the start); None: no limit."},
    )
    use_chat_template: bool = field(
        default=True,
        metadata={
            "help": "Render string prompts as a user turn through the tokenizer's chat template "
            "(when it has one). Chat-message prompts always go through it."
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for tokenizing the dataset."}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad prompt and completion widths to a multiple."}
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs once over the datasets before training "
            "(adapters off) and store them as columns, instead of a reference forward per batch."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the precomputation; default: the per-device batch size."},
    )

    def tokenize_kwargs(self) -> dict:
        """The keyword arguments of `tokenize_preference_dataset` and
        `tokenize_unpaired_dataset` these options set."""
        return dict(
            use_chat_template=self.use_chat_template,
            max_prompt_length=self.max_prompt_length,
            max_completion_length=self.max_completion_length,
            max_length=self.max_length,
            num_proc=self.dataset_num_proc,
        )
