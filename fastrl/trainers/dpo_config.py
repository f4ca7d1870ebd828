"""`DPOConfig`: `TrainingArguments` plus TRL 1.16's DPO options (same names and
defaults where TRL has them) and fastrl's own (LoRA, `max_memory_gb`, ...).
"""

from __future__ import annotations

__all__ = ["DPOConfig"]

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from fastrl import preference_loss
from fastrl.trainers.model import (
    ModelArguments,
)
from fastrl.trainers.options import check_choice, check_model_options, check_number, flag_names

# The loss types of `fastrl.preference_loss` that use no reference model, and those that
# compare length-averaged log-probs (tests pin these against fastrl.ops.preference.loss).
REFERENCE_FREE_LOSS_TYPES = ("cpo", "cpo_hinge", "cpo_ipo", "simpo", "alphapo", "orpo")
AVERAGED_LOSS_TYPES = ("cpo_ipo", "simpo", "alphapo", "orpo")
_COLUMNS = ("prompt", "chosen", "rejected")
_TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the preference_loss arguments that are DPOConfig options of the same name
_LOSS_OPTIONS = (
    "loss_type", "beta", "loss_weights", "label_smoothing", "f_divergence_type",
    "f_alpha_divergence_coef", "discopop_tau", "ld_alpha", "use_weighting", "rdpo_alpha",
    "dpop_lambda", "cpo_alpha", "simpo_gamma", "alpha",
)  # fmt: skip


# ------------------------------------------------------------------------------ config


@dataclass
class DPOConfig(ModelArguments, TrainingArguments):
    r"""Configuration of `DPOTrainer`: `transformers.TrainingArguments` plus DPO's options.

    Names and defaults follow TRL 1.16's ``DPOConfig`` where TRL has the option
    (``beta``, ``loss_type``, ``loss_weights``, ``label_smoothing``, ``f_divergence_type``,
    ``f_alpha_divergence_coef``, ``discopop_tau``, ``ld_alpha``, ``max_length``,
    ``precompute_ref_log_probs``, ``precompute_ref_batch_size``, ``disable_dropout``,
    ``dataset_num_proc``, ``pad_to_multiple_of``; ``logging_steps=10``, activation
    checkpointing on, bf16 where the GPU supports it). Differences from TRL:

    - ``learning_rate`` keeps the `TrainingArguments` default 5e-5: TRL's 1e-6 is for full
      fine-tuning and barely moves LoRA adapters;
    - ``loss_type`` also takes the reference-free losses of TRL's CPO and ORPO trainers
      (``cpo``, ``cpo_hinge``, ``cpo_ipo``, ``simpo``, ``alphapo``, ``orpo``) with their
      options (``cpo_alpha``, ``simpo_gamma``, ``alpha``), and fastrl's ``rdpo_alpha``
      (R-DPO) and ``dpop_lambda`` (DPOP); ``label_smoothing`` on ``sigmoid`` is cDPO (TRL
      1.16 ignores it there). Everything is passed to `fastrl.preference_loss`, whose
      docstring defines each option;
    - ``max_prompt_length`` (keeps the end of the prompt) and ``max_completion_length``
      (keeps the start of each completion) besides ``max_length`` (prompt + completion,
      keeps the start; rows whose prompt alone fills it are dropped, as TRL drops them);
    - ``use_weighting`` (WPO): each pair's loss weighted by its completions' aligned
      probabilities; the kernel's ``log sum_v p_v^2`` comes from the policy's own pass;
    - LoRA options (``lora_r``, ``lora_alpha``, ``lora_dropout``,
      ``lora_target_modules``), ``load_in_4bit``, ``attn_implementation``,
      ``model_dtype`` (used when the model is given as a path), ``use_chat_template``,
      ``kernel_impl`` and ``max_memory_gb`` (caps this process's CUDA memory, so a run on
      a larger card proves it fits a smaller one).
    """

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

    # ---- loss (fastrl.preference_loss options)
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "Loss type, or a list of DPO loss types combined with loss_weights."},
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of a loss_type list (default all 1)."}
    )
    beta: float = field(default=0.1, metadata={"help": "DPO's beta (IPO's tau, ORPO's lambda)."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label smoothing / flip probability in [0, 0.5)."}
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={
            "help": "f-DPO divergence.",
            "choices": ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"],
        },
    )
    f_alpha_divergence_coef: float = field(
        default=0.5, metadata={"help": "alpha of f_divergence_type='alpha_divergence'."}
    )
    discopop_tau: float = field(default=0.05, metadata={"help": "DiscoPOP's temperature."})
    ld_alpha: float | None = field(
        default=None, metadata={"help": "LD-DPO's weight of the verbose tail, in [0, 1]."}
    )
    use_weighting: bool = field(
        default=False, metadata={"help": "WPO weighting of each pair's loss (DPO loss types)."}
    )
    rdpo_alpha: float = field(default=0.0, metadata={"help": "R-DPO length penalty (sigmoid)."})
    dpop_lambda: float = field(default=0.0, metadata={"help": "DPOP positive penalty (sigmoid)."})
    cpo_alpha: float | None = field(
        default=None, metadata={"help": "NLL weight of the CPO family (default 1; alphapo 0)."}
    )
    simpo_gamma: float | None = field(
        default=None, metadata={"help": "SimPO / AlphaPO target margin (default 0.5)."}
    )
    alpha: float = field(default=0.0, metadata={"help": "AlphaPO's alpha (CPO family)."})

    def __post_init__(self):
        self.set_engine_defaults()
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        else:
            self.loss_type = list(self.loss_type)
        # the options alone first: no device set-up, and a typo fails in milliseconds
        self._check_options()
        super().__post_init__()
        _check_loss_options(self)

    def _check_options(self) -> None:
        """Every DPO option on its own (and `kernel_impl` / `load_in_4bit` against the
        device), each message naming the flag, the value and what is allowed; the
        combinations are `preference_loss`'s to check (`_check_loss_options`)."""
        if not self.loss_type:
            raise ValueError("--loss_type needs at least one loss type, got none")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            check_number(name, getattr(self, name), low=1, integer=True, optional=True)
        for name in ("precompute_ref_batch_size", "dataset_num_proc", "pad_to_multiple_of"):
            check_number(name, getattr(self, name), low=1, integer=True, optional=True)
        # ORPO's lambda may be 0 (the NLL alone); every other beta divides or scales a margin
        orpo_only = self.loss_type == ["orpo"]
        check_number("beta", self.beta, low=0, low_open=not orpo_only)
        check_number("label_smoothing", self.label_smoothing, low=0, high=0.5, high_open=True)
        check_choice("f_divergence_type", self.f_divergence_type, _F_DIVERGENCES)
        check_number("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        check_number("discopop_tau", self.discopop_tau, low=0, low_open=True)
        check_number("ld_alpha", self.ld_alpha, low=0, high=1, optional=True)
        check_number("rdpo_alpha", self.rdpo_alpha)
        check_number("dpop_lambda", self.dpop_lambda, low=0)
        for name in ("cpo_alpha", "simpo_gamma"):
            check_number(name, getattr(self, name), optional=True)
        check_number("alpha", self.alpha)
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(self.loss_type):
                raise ValueError(
                    f"--loss_weights {' '.join(map(str, self.loss_weights))} must hold one "
                    f"weight per --loss_type ({' '.join(self.loss_type)}): "
                    f"{len(self.loss_type)}, got {len(self.loss_weights)}"
                )
            for w in self.loss_weights:
                check_number("loss_weights", w)
        if self.precompute_ref_log_probs and self.reference_free:
            raise ValueError(
                f"--precompute_ref_log_probs is set, but --loss_type {' '.join(self.loss_type)} "
                "uses no reference model"
            )
        check_model_options(self)
        self.check_model_arguments()

    @property
    def reference_free(self) -> bool:
        """Whether the loss uses no reference model (CPO, SimPO, AlphaPO, ORPO)."""
        return any(t in REFERENCE_FREE_LOSS_TYPES for t in self.loss_type)

    def preference_loss_kwargs(self) -> dict:
        """The `fastrl.preference_loss` options this configuration selects."""
        types = self.loss_type
        kw = dict(
            loss_type=types[0] if len(types) == 1 else list(types),
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type,
            ld_alpha=self.ld_alpha,
            rdpo_alpha=self.rdpo_alpha,
            dpop_lambda=self.dpop_lambda,
            cpo_alpha=self.cpo_alpha,
            simpo_gamma=self.simpo_gamma,
            alpha=self.alpha,
            use_weighting=self.use_weighting,
        )
        if self.loss_weights is not None:
            kw["loss_weights"] = list(self.loss_weights)
        # options with a TRL default that preference_loss refuses where they have no effect
        if self.f_divergence_type == "alpha_divergence":
            kw["f_alpha_divergence_coef"] = self.f_alpha_divergence_coef
        if "discopop" in types:
            kw["discopop_tau"] = self.discopop_tau
        return kw


def _check_loss_options(args: DPOConfig) -> None:
    """Surface a bad loss configuration at construction instead of at the first step:
    `preference_loss` itself on one dummy pair (so nothing the trainer's loss refuses
    passes), its argument names, the options of the same name, written as flags."""
    one, zero = torch.ones(1), torch.zeros(1)
    kw = args.preference_loss_kwargs()
    extra = dict(chosen_lengths=one, rejected_lengths=one)
    ref = () if args.reference_free else (zero, zero)
    if args.use_weighting:
        extra.update(chosen_aligned_logps=zero, rejected_aligned_logps=zero)
    if args.ld_alpha is not None:
        extra.update(chosen_tail_logps=zero, rejected_tail_logps=zero)
        if ref:
            extra.update(ref_chosen_tail_logps=zero, ref_rejected_tail_logps=zero)
    try:
        preference_loss(-one, -one, *ref, **extra, **kw)
    except (TypeError, ValueError) as e:
        raise ValueError(flag_names(str(e), _LOSS_OPTIONS)) from e


# ---------------------------------------------------------------------------- the data
