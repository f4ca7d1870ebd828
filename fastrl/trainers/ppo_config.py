"""`PPOConfig`: `TrainingArguments` plus PPO's options, named as TRL's PPOConfig
(trl/experimental/ppo, TRL <= 0.2x's `trl.PPOConfig`) and OpenRLHF where they have them, and
fastrl's own (LoRA, `max_memory_gb`, the generation options `GRPOConfig` has).
"""

from __future__ import annotations

__all__ = ["KL_ESTIMATORS", "STOP_TOKENS", "PPOConfig"]

from dataclasses import dataclass, field

from transformers import TrainingArguments

from fastrl.trainers.model import ModelArguments
from fastrl.trainers.options import PPO_NUMBERS, check_choice, check_number, check_numbers

#: TRL PPOConfig's `kl_estimator`s: k1 = log pi - log pi_ref, k3 = (r - 1) - log r
KL_ESTIMATORS = ("k1", "k3")
#: `stop_token`s: a completion ends at its first EOS (TRL's "eos")
STOP_TOKENS = ("eos",)


@dataclass
class PPOConfig(ModelArguments, TrainingArguments):
    r"""`TrainingArguments` for `PPOTrainer`: PPO with a value head on the policy's backbone.

    Batch layout (TRL's PPO): one *rollout* per process holds
    `per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`
    completions (one per prompt). It is trained on for `num_ppo_epochs` epochs; each epoch
    shuffles it and cuts it into `num_mini_batches` mini-batches of
    `per_device_train_batch_size * gradient_accumulation_steps` completions, one optimizer
    step each (micro-batches of `per_device_train_batch_size`). So a rollout gives
    `num_ppo_epochs * num_mini_batches` optimizer steps, and `max_steps` counts those.
    Under DDP (torchrun, accelerate launch) every process samples and trains on its own
    rollout of that size (TRL's `local_batch_size`; the prompts are sharded), DDP averages
    the gradients, and the whitening (`whiten_advantages`, `whiten_rewards`) takes its
    statistics over every process's rollout together (OpenRLHF's; TRL whitens each
    process's batch alone). FSDP2 (`fsdp=True, fsdp_config={"version": 2}`) and DeepSpeed
    ZeRO-3 shard the model, the value head included, as for GRPOConfig (FSDP1 is refused);
    the saved value head is the whole one.

    Defaults that differ from `TrainingArguments` (as TRL): `learning_rate=3e-6`,
    `logging_steps=10`, activation checkpointing on, `remove_unused_columns=False`;
    `bf16` on a bf16-capable CUDA device.

    PPO (TRL's names and defaults): num_ppo_epochs (4), num_mini_batches (1), kl_coef
        (0.05; the KL to the reference, the base with adapters off, is folded into the
        per-token reward: `fastrl.kl_shaped_rewards`; 0 skips the reference pass),
        kl_estimator ("k1" | "k3"), cliprange (0.2, the policy ratio's clip), vf_coef (0.1,
        the value loss's weight), cliprange_value (0.2; None: no value clipping), gamma
        (1.0), lam (0.95), whiten_rewards (False: TRL whitens the per-token rewards, mean
        kept), missing_eos_penalty (None; >= 0, subtracted from the score of a completion that
        ends without EOS), stop_token ("eos" only: a completion ends at its first EOS),
        stop_token_id (an extra id that ends a completion). fastrl's: whiten_advantages
        (True, as TRL and OpenRLHF always do: `fastrl.masked_whiten` over the rollout,
        every process's together),
        reward_weights (one per reward function, as GRPOConfig), value_head_std (the
        value head's initial weight std; default 1 / (d + 1), as OpenRLHF's critic head).

    Generation (as GRPOConfig): max_completion_length (TRL's `response_length`, which is
        accepted as an alias), temperature (0.7, TRL's PPO default), top_p, top_k, min_p,
        repetition_penalty, generation_kwargs, max_prompt_length, use_chat_template,
        shuffle_dataset.

    Model (fastrl, as GRPOConfig): lora_r, lora_alpha, lora_dropout,
        lora_target_modules, load_in_4bit, attn_implementation, model_dtype, kernel_impl,
        max_memory_gb.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["generation_kwargs"]

    # ---- TrainingArguments defaults changed (as TRL)
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute block activations in the backward (default on)."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (default: on a bf16-capable GPU)."}
    )
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep every dataset column (reward functions get them)."}
    )

    # ---- PPO (TRL's PPOConfig)
    num_ppo_epochs: int = field(default=4, metadata={"help": "Epochs over each rollout."})
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches per epoch."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL-in-reward coefficient."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 | k3"})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    cliprange_value: float | None = field(
        default=0.2, metadata={"help": "Value clip around the rollout's values (None: off)."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten the advantages."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted (>= 0) from the score without EOS."}
    )
    stop_token: str = field(default="eos", metadata={"help": "eos (a completion ends at EOS)."})
    stop_token_id: int | None = field(
        default=None, metadata={"help": "Another token id that ends a completion."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (default 1)."}
    )
    value_head_std: float | None = field(
        default=None, metadata={"help": "Initial value-head weight std (default 1/(d+1))."}
    )

    # ---- data and generation (as GRPOConfig)
    use_chat_template: bool = field(
        default=True, metadata={"help": "Render string prompts with the chat template if any."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep the last N prompt tokens (None: all)."}
    )
    max_completion_length: int = field(default=53, metadata={"help": "Max new tokens."})
    response_length: int | None = field(
        default=None, metadata={"help": "TRL's name of --max_completion_length."}
    )
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty."})
    generation_kwargs: dict | str | None = field(
        default=None, metadata={"help": "More GenerationConfig fields."}
    )

    def __post_init__(self):
        self.set_engine_defaults()
        if self.response_length is not None:  # TRL's name, read once
            check_number("response_length", self.response_length, low=1, integer=True)
            self.max_completion_length, self.response_length = self.response_length, None
        self._check_options()
        super().__post_init__()
        self._check_after_parse()

    @property
    def mini_batch_size(self) -> int:
        """Completions per optimizer step on each process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def rollout_batch_size(self) -> int:
        """Completions per rollout on each process (TRL's `local_batch_size`)."""
        return self.mini_batch_size * self.num_mini_batches

    def _check_options(self) -> None:
        """Every PPO option, each message naming the flag, the value and what is allowed
        (the number options' ranges: `fastrl.trainers.options.PPO_NUMBERS`)."""
        check_numbers({name: getattr(self, name) for name in PPO_NUMBERS}, PPO_NUMBERS)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.stop_token is None:
            raise ValueError(
                "--stop_token None is not supported: a completion always ends at its first "
                "EOS token (TRL's stop_token 'eos'); use --stop_token eos"
            )
        check_choice("stop_token", self.stop_token, STOP_TOKENS)
        if self.reward_weights is not None:
            for w in self.reward_weights:
                check_number("reward_weights", w)
        self.check_model_arguments()
        if self.auto_find_batch_size:
            raise ValueError(
                "--auto_find_batch_size is not supported: a rollout is trained on in "
                "mini-batches of a fixed size; lower --per_device_train_batch_size instead"
            )

    def _check_after_parse(self) -> None:
        """What needs `TrainingArguments` parsed (`generation_kwargs`, `do_eval`)."""
        if self.eval_strategy != "no" or self.do_eval:
            raise ValueError(
                "--eval_strategy / --do_eval: PPOTrainer has no evaluation loop; leave "
                "--eval_strategy 'no' and evaluate with generation and your reward functions"
            )
        stop = (self.generation_kwargs or {}).get("stop_strings")
        if stop is not None:
            raise ValueError(
                f"--generation_kwargs stop_strings={stop!r} is not supported: a completion "
                "ends at its first EOS token (use --stop_token_id)"
            )
