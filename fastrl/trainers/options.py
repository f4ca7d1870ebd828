"""Checks of `GRPOConfig` / `DPOConfig` options at construction, with messages that name
each option as it is typed on the command line (`--beta`), the value given and what is
allowed, so that a wrong setting fails before any model or data is loaded and the CLI
can print the message as it is (one line, `ValueError`)."""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import replace
from typing import Any

from fastrl.checks import IMPLS, triton_usable
from fastrl.options.policy import PER_STEP, PolicyLossOptions
from fastrl.options.preference import OPTION_NAMES, RULES, PreferenceLossOptions

__all__ = [
    "check_choice",
    "check_model_options",
    "check_number",
    "check_numbers",
    "check_policy_loss_options",
    "check_preference_loss_options",
    "check_training_options",
    "flag_names",
    "preference_loss_options",
]


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_choice(name: str, value, choices: Iterable, hint: str = "") -> None:
    choices = tuple(choices)
    if value not in choices:
        listed = ", ".join(_show(c) for c in choices)
        raise ValueError(f"--{name} must be one of {listed}; got {_show(value)}{hint}")


def check_number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """`value` a finite number (an int with `integer`) in the range given; None passes
    when `optional`. ValueError rather than TypeError for a wrong type: from Python the
    same option can arrive as a string, and the CLI reports ValueErrors as user errors."""
    if value is None and optional:
        return
    lo = None if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = None if high is None else f"{'<' if high_open else '<='} {high:g}"
    if lo and hi:  # an interval as people write it: (0, 1]
        what = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        what = lo or hi or "a finite number"
    what += " (an integer)" if integer else ""
    what += " or None" if optional else ""
    ok_type = numbers.Integral if integer else numbers.Real
    ok = not isinstance(value, bool) and isinstance(value, ok_type)
    if ok:
        x = float(value)
        ok = math.isfinite(x)
        if ok and low is not None:
            ok = x > low if low_open else x >= low
        if ok and high is not None:
            ok = x < high if high_open else x <= high
    if not ok:
        raise ValueError(f"--{name} must be {what}, got {_show(value)}")


def flag_names(message: str, names: Iterable[str]) -> str:
    """`message` with every option name among `names` written as its flag (`beta` ->
    `--beta`): the loss functions name their arguments, which are the configs' options."""
    names = sorted(set(names), key=len, reverse=True)
    pattern = r"(?<![\w\-.])(" + "|".join(map(re.escape, names)) + r")\b"
    return re.sub(pattern, r"--\1", message)


def check_model_options(args) -> None:
    """The `ModelArguments` options, against the device at hand (`args.use_cpu` included):
    `kernel_impl='triton'` cannot run on CPU tensors unless Triton's interpreter is on,
    and `load_in_4bit` needs bitsandbytes' CUDA kernels; both would otherwise fail only
    after the model is loaded."""
    import torch

    from fastrl.trainers.model import DTYPES

    check_choice("kernel_impl", args.kernel_impl, IMPLS)
    cuda = torch.cuda.is_available() and not args.use_cpu
    where = "--use_cpu is set" if args.use_cpu else "no CUDA device is available"
    if args.kernel_impl == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError(
                "--kernel_impl 'triton' needs the triton package, which is not installed; "
                "use --kernel_impl auto or torch"
            )
        if not triton_usable(torch.device("cuda" if cuda else "cpu")):
            raise ValueError(
                f"--kernel_impl 'triton' needs a CUDA device ({where}); use --kernel_impl auto "
                "or torch, or set TRITON_INTERPRET=1 to run the kernels on CPU (slow)"
            )
    if args.load_in_4bit and not cuda:
        raise ValueError(f"--load_in_4bit needs a CUDA device ({where})")
    if args.model_dtype is not None:
        check_choice("model_dtype", args.model_dtype, DTYPES)
    check_numbers({name: getattr(args, name) for name in MODEL_NUMBERS}, MODEL_NUMBERS)
    check_training_options({name: getattr(args, name) for name in TRAINING_OPTIONS})


# ------------------------------------------------------------ number options, by config
# The ranges of the number options the configs check with `check_numbers`, in one place:
# each config checks its fields against its table, and the command line the values it is
# given, before the slow imports (`fastrl.cli`). Torch-free.

#: `ModelArguments` (every config)
MODEL_NUMBERS: dict[str, dict] = {
    "max_memory_gb": dict(low=0, low_open=True, optional=True),
    "lora_r": dict(low=1, integer=True),
    "lora_alpha": dict(low=0, low_open=True),
    "lora_dropout": dict(low=0, high=1, high_open=True),
}
#: `PPOConfig`
PPO_NUMBERS: dict[str, dict] = {
    "num_ppo_epochs": dict(low=1, integer=True),
    "num_mini_batches": dict(low=1, integer=True),
    "kl_coef": dict(low=0),
    "cliprange": dict(low=0, low_open=True),
    "vf_coef": dict(low=0),
    "cliprange_value": dict(low=0, low_open=True, optional=True),
    "gamma": dict(low=0, high=1),
    "lam": dict(low=0, high=1),
    # subtracted from the score (TRL: "must be a positive value"): a negative one would
    # reward the completions that run out of tokens
    "missing_eos_penalty": dict(low=0, optional=True),
    "stop_token_id": dict(low=0, integer=True, optional=True),
    "value_head_std": dict(low=0, low_open=True, optional=True),
    "max_completion_length": dict(low=1, integer=True),
    "max_prompt_length": dict(low=1, integer=True, optional=True),
    "temperature": dict(low=0, low_open=True),
    "top_p": dict(low=0, high=1, low_open=True),
    "top_k": dict(low=0, integer=True),
    "min_p": dict(low=0, high=1, optional=True),
    "repetition_penalty": dict(low=0, low_open=True),
}
#: `RewardConfig`
REWARD_NUMBERS: dict[str, dict] = {
    "max_length": dict(low=1, integer=True, optional=True),
    "dataset_num_proc": dict(low=1, integer=True, optional=True),
    "pad_to_multiple_of": dict(low=1, integer=True, optional=True),
    "center_rewards_coefficient": dict(low=0, optional=True),
}
#: the tables of the commands whose configs check their options this way
CONFIG_NUMBERS = {"ppo": PPO_NUMBERS, "rm": REWARD_NUMBERS}


def check_numbers(values: Mapping[str, Any], rules: Mapping[str, dict]) -> None:
    """`check_number` on each of `values` (a config's fields, or the command line's
    values, by name) that `rules` has, with its bounds, in the rules' order."""
    for name, bounds in rules.items():
        if name in values:
            check_number(name, values[name], **bounds)


#: the inherited `TrainingArguments` options `check_training_options` checks
TRAINING_OPTIONS = ("learning_rate", "label_smoothing_factor")


def check_training_options(values: Mapping[str, Any]) -> None:
    """The inherited `TrainingArguments` options every fastrl trainer reads the same way,
    among `values` (a config's fields, or what the command line parsed, by name):
    `learning_rate` >= 0 (torch's optimizers refuse a negative one only when the trainer
    builds them; 0 is a run that moves no weight, e.g. to measure throughput), and
    `label_smoothing_factor` refused unless 0: it smooths `Trainer`'s own cross-entropy,
    which no fastrl loss is, so it would be silently ignored. Torch-free, for the command
    line's early checks."""
    if "learning_rate" in values:
        check_number("learning_rate", values["learning_rate"], low=0)
    smoothing = values.get("label_smoothing_factor", 0)
    if smoothing != 0:
        raise ValueError(
            f"--label_smoothing_factor {_show(smoothing)} is not supported: it smooths "
            "transformers.Trainer's own cross-entropy loss, which no fastrl trainer uses "
            "(DPO's label smoothing, cDPO, is --label_smoothing); leave it at 0"
        )


# ------------------------------------------------------------- the loss options as flags
# Torch-free, like the options dataclasses: the command line runs these on its values
# before it imports anything heavy, the configs on their fields.

_POLICY_SETTINGS = tuple(n for n in PolicyLossOptions.names() if n not in PER_STEP)
#: TRL's DPOConfig gives these a value for every loss type and reads it only where the
#: option applies: the config carries what the loss's None stands for there, and passes
#: it there only
SET_FOR_EVERY_LOSS_TYPE = ("f_alpha_divergence_coef", "discopop_tau")


def _flag_setting(name: str, value: Any) -> str:
    return f"--{name} {value!r}"


def check_policy_loss_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The policy-loss settings among `values` (a `GRPOConfig`'s fields, or the command
    line's values, by name), checked by `PolicyLossOptions.validate` with every message
    naming flags (``--beta``); returned as `fused_policy_loss` keyword arguments (the
    per-step ones, `PER_STEP`, are the trainer's to add)."""
    kwargs = {name: values[name] for name in _POLICY_SETTINGS if name in values}
    try:
        PolicyLossOptions(**kwargs).validate(
            number=check_number, choice=check_choice, setting=_flag_setting
        )
    except (TypeError, ValueError) as e:  # a wrong type is a user's mistake here too
        raise ValueError(flag_names(str(e), _POLICY_SETTINGS)) from e
    return kwargs


def preference_loss_options(values: Mapping[str, Any]) -> PreferenceLossOptions:
    """The options `DPOTrainer` passes to `fastrl.preference_loss` from `values` (a
    `DPOConfig`'s fields, or the command line's): ``f_alpha_divergence_coef`` /
    ``discopop_tau`` only where they apply (as TRL reads them)."""
    options = PreferenceLossOptions.from_mapping(values)
    unused = {n: None for n in SET_FOR_EVERY_LOSS_TYPE if not options.applies(n)}
    return replace(options, **unused)


def check_preference_loss_options(values: Mapping[str, Any], optional: Container[str]) -> None:
    """The preference-loss options among `values`, by `PreferenceLossOptions`, named as
    flags: each value as set (None allowed for the names in `optional`, whose config
    default is None), then what applies to which loss type as the trainer passes them."""

    def number(name: str, value, **bounds) -> None:
        check_number(name, value, optional=name in optional, **bounds)

    for name in OPTION_NAMES:  # the options take None for "what it stands for"; a config
        rule = RULES.get(name)  # whose default is a number does not
        if name in values and values[name] is None and name not in optional and rule:
            check_number(name, None, **(rule.bounds or {}))
    try:
        PreferenceLossOptions.from_mapping(values).check_values(number=number, choice=check_choice)
        preference_loss_options(values).check_combinations()
    except (TypeError, ValueError) as e:
        raise ValueError(flag_names(str(e), OPTION_NAMES)) from e
