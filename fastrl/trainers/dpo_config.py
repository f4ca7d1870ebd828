"""`DPOConfig`: `TrainingArguments` plus TRL 1.16's DPO options (same names and
defaults where TRL has them) and fastrl's own (LoRA, `max_memory_gb`, ...).
"""

from __future__ import annotations

__all__ = ["DPOConfig"]

from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from fastrl.options.preference import (
    F_DIVERGENCES,
    PreferenceLossOptions,
)
from fastrl.trainers.config_fields import PreferenceDataArguments
from fastrl.trainers.model import (
    ModelArguments,
)
from fastrl.trainers.options import (
    check_number,
    check_preference_loss_options,
    preference_loss_options,
)

_LOSS = PreferenceLossOptions()  # the loss options' defaults, declared there


# ------------------------------------------------------------------------------ config


@dataclass
class DPOConfig(PreferenceDataArguments, ModelArguments, TrainingArguments):
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
      1.16 ignores it there). The loss options are
      `fastrl.options.preference.PreferenceLossOptions` (which defines each, with its
      default and where it applies), passed to `fastrl.preference_loss`; a loss option set
      where it has no effect is refused at construction, but ``f_alpha_divergence_coef``
      and ``discopop_tau``, which TRL sets for every loss type and reads where they apply;
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

    # ---- loss (fastrl.preference_loss options: PreferenceLossOptions documents each)
    loss_type: list[str] = field(
        default_factory=lambda: list(_LOSS.loss_type),
        metadata={"help": "Loss type, or a list of DPO loss types combined with loss_weights."},
    )
    loss_weights: list[float] | None = field(
        default=_LOSS.loss_weights,
        metadata={"help": "Weights of a loss_type list (default all 1)."},
    )
    beta: float = field(
        default=_LOSS.beta, metadata={"help": "DPO's beta (IPO's tau, ORPO's lambda)."}
    )
    label_smoothing: float = field(
        default=_LOSS.label_smoothing,
        metadata={"help": "Label smoothing / flip probability in [0, 0.5)."},
    )
    f_divergence_type: str = field(
        default=_LOSS.f_divergence_type,
        metadata={"help": "f-DPO divergence.", "choices": list(F_DIVERGENCES)},
    )
    f_alpha_divergence_coef: float = field(
        default=PreferenceLossOptions.applied_default("f_alpha_divergence_coef"),
        metadata={"help": "alpha of f_divergence_type='alpha_divergence'."},
    )
    discopop_tau: float = field(
        default=PreferenceLossOptions.applied_default("discopop_tau"),
        metadata={"help": "DiscoPOP's temperature."},
    )
    ld_alpha: float | None = field(
        default=_LOSS.ld_alpha,
        metadata={"help": "LD-DPO's weight of the verbose tail, in [0, 1]."},
    )
    use_weighting: bool = field(
        default=_LOSS.use_weighting,
        metadata={"help": "WPO weighting of each pair's loss (DPO loss types)."},
    )
    rdpo_alpha: float = field(
        default=_LOSS.rdpo_alpha, metadata={"help": "R-DPO length penalty (sigmoid)."}
    )
    dpop_lambda: float = field(
        default=_LOSS.dpop_lambda, metadata={"help": "DPOP positive penalty (sigmoid)."}
    )
    cpo_alpha: float | None = field(
        default=_LOSS.cpo_alpha,
        metadata={"help": "NLL weight of the CPO family (default 1; alphapo 0)."},
    )
    simpo_gamma: float | None = field(
        default=_LOSS.simpo_gamma,
        metadata={"help": "SimPO / AlphaPO target margin (default 0.5)."},
    )
    alpha: float = field(default=_LOSS.alpha, metadata={"help": "AlphaPO's alpha (CPO family)."})

    def __post_init__(self):
        self.set_engine_defaults()
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        else:
            self.loss_type = list(self.loss_type)
        # the options alone first: no device set-up, and a typo fails in milliseconds
        self._check_options()
        super().__post_init__()

    def _check_options(self) -> None:
        """Every DPO option (and `kernel_impl` / `load_in_4bit` against the device), each
        message naming the flag, the value and what is allowed; the loss options by
        `PreferenceLossOptions` (`check_loss_options`)."""
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            check_number(name, getattr(self, name), low=1, integer=True, optional=True)
        for name in ("precompute_ref_batch_size", "dataset_num_proc", "pad_to_multiple_of"):
            check_number(name, getattr(self, name), low=1, integer=True, optional=True)
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(  # as the two flags are typed
                f"--loss_weights {' '.join(map(str, self.loss_weights))} must hold one "
                f"weight per --loss_type ({' '.join(self.loss_type)}): "
                f"{len(self.loss_type)}, got {len(self.loss_weights)}"
            )
        self.check_loss_options()
        if self.precompute_ref_log_probs and self.reference_free:
            raise ValueError(
                f"--precompute_ref_log_probs is set, but --loss_type {' '.join(self.loss_type)} "
                "uses no reference model"
            )
        self.check_model_arguments()

    @property
    def reference_free(self) -> bool:
        """Whether the loss uses no reference model (CPO, SimPO, AlphaPO, ORPO)."""
        return self.preference_loss_options().reference_free

    def check_loss_options(self) -> None:
        """The loss options named as flags (`check_preference_loss_options`). `DPOTrainer`
        checks again: its config may have changed since construction."""
        optional = {f.name for f in fields(self) if f.default is None}
        check_preference_loss_options(vars(self), optional)

    def preference_loss_options(self) -> PreferenceLossOptions:
        """The options `DPOTrainer` passes to `fastrl.preference_loss` (`preference_loss_options`
        in `fastrl.trainers.options`)."""
        return preference_loss_options(vars(self))

    def preference_loss_kwargs(self) -> dict:
        """`preference_loss_options` as keyword arguments (those at their defaults left out)."""
        return self.preference_loss_options().kwargs()
