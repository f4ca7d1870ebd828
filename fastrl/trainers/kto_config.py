"""`KTOConfig`: `TrainingArguments` plus TRL 1.16's KTO options (same names and defaults
where TRL has them) and fastrl's own (LoRA, `max_memory_gb`, ...).
"""

from __future__ import annotations

__all__ = ["KTOConfig"]

from dataclasses import dataclass, field

from transformers import TrainingArguments

from fastrl.options.preference import KTO_LOSS_TYPES, KTOLossOptions
from fastrl.trainers.config_fields import PreferenceDataArguments
from fastrl.trainers.model import ModelArguments
from fastrl.trainers.options import check_number

_LOSS = KTOLossOptions()  # the loss options' defaults, declared there


@dataclass
class KTOConfig(PreferenceDataArguments, ModelArguments, TrainingArguments):
    r"""Configuration of `KTOTrainer`: `transformers.TrainingArguments` plus KTO's options.

    Names and defaults follow TRL 1.16's ``KTOConfig`` (``loss_type`` ``"kto"`` or
    ``"apo_zero_unpaired"``, ``beta``, ``desirable_weight``, ``undesirable_weight``,
    ``max_length``, ``precompute_ref_log_probs``, ``precompute_ref_batch_size``,
    ``disable_dropout``, ``dataset_num_proc``, ``pad_to_multiple_of``;
    ``logging_steps=10``, ``train_sampling_strategy="sequential"``, activation
    checkpointing on, bf16 where the GPU supports it). Differences from TRL:

    - ``learning_rate`` keeps the `TrainingArguments` default 5e-5: TRL's 1e-6 is for full
      fine-tuning and barely moves LoRA adapters;
    - the KL pairs are built by the collator, each batch's completions rotated by one
      (TRL rotates them in the dataset, in blocks of ``per_device_train_batch_size``, so
      it needs sequential sampling): the same pairs as TRL's with sequential sampling,
      and any ``train_sampling_strategy`` works (``precompute_ref_log_probs`` excepted: the
      stored reference KL log-probs belong to fixed batches);
    - ``max_prompt_length`` (keeps the end of the prompt) and ``max_completion_length``
      (keeps the start of the completion) besides ``max_length`` (prompt + completion,
      keeps the start; rows whose prompt alone fills it are dropped, as TRL drops them),
      as `DPOConfig`;
    - LoRA options (``lora_r``, ``lora_alpha``, ``lora_dropout``,
      ``lora_target_modules``), ``load_in_4bit``, ``attn_implementation``,
      ``model_dtype``, ``use_chat_template``, ``kernel_impl`` and ``max_memory_gb``, as
      `DPOConfig`; the reference is the model with its adapters off. TRL's
      ``sync_ref_model`` (TR-DPO; TRL refuses it with peft too), ``activation_offloading``,
      ``model_init_kwargs`` and ``router_aux_loss_coef`` are not options here.
    """

    # ---- TrainingArguments defaults changed as TRL changes them (the shared ones, the model
    # and data options: PreferenceDataArguments)
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={
            "help": "Sampler of the training data (TRL's KTO default: sequential).",
            "choices": ["random", "sequential", "group_by_length"],
        },
    )

    # ---- data (PreferenceDataArguments' but for the help, which names the KL pairs)
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs (and the KL pairs') once over the datasets "
            "before training (adapters off), instead of a reference forward per batch."
        },
    )

    # ---- loss (fastrl.kto_loss options: KTOLossOptions)
    loss_type: str = field(
        default=_LOSS.loss_type,
        metadata={"help": "KTO loss type.", "choices": list(KTO_LOSS_TYPES)},
    )
    beta: float = field(
        default=_LOSS.beta, metadata={"help": "Deviation from the reference model (> 0)."}
    )
    desirable_weight: float = field(
        default=_LOSS.desirable_weight,
        metadata={"help": "Weight of the desirable completions' losses (>= 0)."},
    )
    undesirable_weight: float = field(
        default=_LOSS.undesirable_weight,
        metadata={"help": "Weight of the undesirable completions' losses (>= 0)."},
    )

    def __post_init__(self):
        self.set_engine_defaults()
        # the options alone first: no device set-up, and a typo fails in milliseconds
        self._check_options()
        super().__post_init__()

    def _check_options(self) -> None:
        """Every KTO option, each message naming the flag, the value and what is allowed."""
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            check_number(name, getattr(self, name), low=1, integer=True, optional=True)
        for name in ("precompute_ref_batch_size", "dataset_num_proc", "pad_to_multiple_of"):
            check_number(name, getattr(self, name), low=1, integer=True, optional=True)
        self.check_loss_options()
        if self.uses_kl and self.per_device_train_batch_size <= 1:
            raise ValueError(  # as TRL: the KL pair of a lone completion is itself
                f"--loss_type {self.loss_type} estimates its KL reference point from mismatched "
                "pairs within a batch: --per_device_train_batch_size must be > 1, got "
                f"{self.per_device_train_batch_size}"
            )
        if self.uses_kl and self.precompute_ref_log_probs:
            if self.train_sampling_strategy != "sequential":
                raise ValueError(
                    "--precompute_ref_log_probs with --loss_type kto stores each KL pair's "
                    "reference log-prob for fixed sequential batches: --train_sampling_strategy "
                    f"must be sequential, got {self.train_sampling_strategy}"
                )
            if self.precompute_ref_batch_size is not None:
                raise ValueError(
                    "--precompute_ref_log_probs with --loss_type kto forms the KL pairs of the "
                    "training (and evaluation) batches: leave --precompute_ref_batch_size unset "
                    f"(got {self.precompute_ref_batch_size}); each split is precomputed in "
                    "batches of its per-device batch size"
                )
        self.check_model_arguments()

    @property
    def uses_kl(self) -> bool:
        """Whether the loss needs the KL reference point (``loss_type="kto"``)."""
        return self.loss_type == "kto"

    def check_loss_options(self) -> None:
        """The loss options (`KTOLossOptions.validate`); `KTOTrainer` checks again: its
        config may have changed since construction."""
        self.kto_loss_options().validate()

    def kto_loss_options(self) -> KTOLossOptions:
        """The options `KTOTrainer` passes to `fastrl.kto_loss`."""
        return KTOLossOptions(
            self.loss_type, self.beta, self.desirable_weight, self.undesirable_weight
        )

    def kto_loss_kwargs(self) -> dict:
        """`kto_loss_options` as keyword arguments."""
        o = self.kto_loss_options()
        return dict(
            loss_type=o.loss_type,
            beta=o.beta,
            desirable_weight=o.desirable_weight,
            undesirable_weight=o.undesirable_weight,
        )
