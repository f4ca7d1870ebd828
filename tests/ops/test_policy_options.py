"""`PolicyLossOptions.validate` / `check_inputs`: every field's check and every table entry,
each with the message it gives; the module imports without torch."""

import subprocess
import sys
from dataclasses import fields

import pytest

from fastrl.options.policy import (
    APPLIES_TO,
    DEFAULTS,
    INPUTS,
    NEEDS,
    ORDERED,
    PolicyLossOptions,
)

NO_INPUTS = dict(num_items_in_batch=False, ref_logps=False, entropy=False)
ALL_INPUTS = dict(num_items_in_batch=True, ref_logps=True, entropy=True)


def test_imports_without_torch():
    code = (
        "import sys, fastrl.options.policy as p; p.PolicyLossOptions().validate(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_defaults_pass_and_are_trls():
    DEFAULTS.validate()
    DEFAULTS.check_inputs(**{**NO_INPUTS, "num_items_in_batch": True})  # dapo's normaliser
    assert DEFAULTS.loss_type == "dapo" and DEFAULTS.epsilon == 0.2
    assert DEFAULTS.sapo_temperature_pos == 1.0 and DEFAULTS.sapo_temperature_neg == 1.05
    assert DEFAULTS.sampling_correction == "sequence_mask" and DEFAULTS.sampling_clip_max == 3.0
    vespo = (DEFAULTS.vespo_k_pos, DEFAULTS.vespo_lambda_pos)
    assert vespo + (DEFAULTS.vespo_k_neg, DEFAULTS.vespo_lambda_neg) == (2.0, 3.0, 3.0, 2.0)


# every field with a check: (a bad value, the message, the exception)
FIELD_CHECKS = {
    "loss_type": ("ppo", r"loss_type must be one of \('grpo', .*'luspo', 'vespo'\), got 'ppo'", ValueError),  # noqa: E501
    "epsilon": (-0.1, r"epsilon must be finite and >= 0.0, got -0.1", ValueError),
    "epsilon_high": (-1.0, r"epsilon_high must be finite and >= 0.0, got -1.0", ValueError),
    "delta": (0.0, r"delta must be finite and > 0.0, got 0.0", ValueError),
    "beta": (float("nan"), r"beta must be finite and >= 0.0, got nan", ValueError),
    "kl_estimator": ("k4", r"kl_estimator must be one of \('k1', 'k2', 'k3'\), got 'k4'", ValueError),  # noqa: E501
    "importance_sampling_level": ("seq", r"importance_sampling_level must be one of .*got 'seq'", ValueError),  # noqa: E501
    "max_completion_length": (0, r"max_completion_length must be finite and >= 1, got 0", ValueError),  # noqa: E501
    "gradient_accumulation_steps": (2.0, r"gradient_accumulation_steps must be an int, got 2.0", TypeError),  # noqa: E501
    "steps_per_generation": (0, r"steps_per_generation must be finite and >= 1, got 0", ValueError),  # noqa: E501
    "num_processes": (0, r"num_processes must be finite and >= 1, got 0", ValueError),
    "sapo_temperature_pos": (0.0, r"sapo_temperature_pos must be finite and > 0.0", ValueError),
    "sapo_temperature_neg": (-1.0, r"sapo_temperature_neg must be finite and > 0.0", ValueError),
    "vespo_k_pos": (-0.5, r"vespo_k_pos must be finite and >= 0.0, got -0.5", ValueError),
    "vespo_lambda_pos": ("3", r"vespo_lambda_pos must be a number, got '3'", TypeError),
    "vespo_k_neg": (float("nan"), r"vespo_k_neg must be finite and >= 0.0, got nan", ValueError),
    "vespo_lambda_neg": (-2.0, r"vespo_lambda_neg must be finite and >= 0.0, got -2.0", ValueError),  # noqa: E501
    "entropy_coef": (float("inf"), r"entropy_coef must be finite, got inf", ValueError),
    "top_entropy_quantile": (1.5, r"top_entropy_quantile must be finite and >= 0.0 and <= 1.0", ValueError),  # noqa: E501
    "sampling_correction": ("token", r"sampling_correction must be one of .*got 'token'", ValueError),  # noqa: E501
    "sampling_clip_min": ("0.8", r"sampling_clip_min must be a number, got '0.8'", TypeError),
    "sampling_clip_max": (float("nan"), r"sampling_clip_max must be finite, got nan", ValueError),
    "off_policy_mask_threshold": ([0.1], r"off_policy_mask_threshold must be a number", TypeError),  # noqa: E501
    "use_bias_correction_kl": ("no", r"use_bias_correction_kl must be a bool, got 'no'", TypeError),  # noqa: E501
}  # fmt: skip


def test_every_checked_field_has_a_case():
    checked = {f.name for f in fields(PolicyLossOptions) if f.metadata}
    assert checked == set(FIELD_CHECKS) == {f.name for f in fields(PolicyLossOptions)}


@pytest.mark.parametrize("name", FIELD_CHECKS)
def test_field_checks(name):
    bad, match, exc = FIELD_CHECKS[name]
    with pytest.raises(exc, match=match):
        PolicyLossOptions(**{name: bad}).validate()


@pytest.mark.parametrize(
    "name",
    [f.name for f in fields(PolicyLossOptions) if f.metadata.get("number", {}).get("optional")],
)
def test_optional_numbers_accept_none(name):
    kw = {name: None}
    if name == "max_completion_length":
        kw["loss_type"] = "grpo"  # dr_grpo alone needs it
    PolicyLossOptions(**kw).validate()


# --------------------------------------------------------------------------- the tables


def test_applies_to_delta():
    rule = APPLIES_TO[0]
    assert rule.option == "delta"
    for loss_type in rule.loss_types:
        PolicyLossOptions(loss_type=loss_type, delta=1.5, max_completion_length=12).validate()
    for loss_type in ("cispo", "sapo"):
        PolicyLossOptions(loss_type=loss_type).validate()  # delta None: fine
        with pytest.raises(
            ValueError,
            match=rf"delta=1.5 caps the unclipped ratio of the clipped surrogate, which "
            rf"loss_type='{loss_type}' does not have \(it applies to grpo, bnpo, dr_grpo, dapo, "
            r"luspo\)",
        ):
            PolicyLossOptions(loss_type=loss_type, delta=1.5).validate()


@pytest.mark.parametrize(
    "option,value,loss_type",
    [("sapo_temperature_pos", 2.0, "sapo"), ("sapo_temperature_neg", 0.5, "sapo"),
     ("vespo_k_pos", 5.0, "vespo"), ("vespo_lambda_pos", 1.0, "vespo"),
     ("vespo_k_neg", 1.0, "vespo"), ("vespo_lambda_neg", 4.0, "vespo")],
)  # fmt: skip
def test_applies_to_a_loss_type_own_options(option, value, loss_type):
    """A loss type's own option set away from its default, with another loss type, is
    refused (it would be ignored); at its default it passes with any loss type."""
    assert option in {r.option for r in APPLIES_TO}
    PolicyLossOptions(loss_type=loss_type, **{option: value}).validate()
    PolicyLossOptions(loss_type="bnpo").validate()
    with pytest.raises(ValueError, match=rf"{option}={value} .*which loss_type='bnpo' does not"):
        PolicyLossOptions(loss_type="bnpo", **{option: value}).validate()


# one case per NEEDS entry: (options that need something, what is missing, the message)
NEEDS_CASES = [
    (
        dict(loss_type="dr_grpo"),
        {},
        r"loss_type='dr_grpo' needs max_completion_length \(it normalises by B \* "
        r"max_completion_length\); got None",
    ),
    (
        dict(loss_type="cispo"),
        dict(num_items_in_batch=False),
        r"loss_type='cispo' needs num_items_in_batch \(it normalises by the active-token "
        r"count of the generation batch\); got None",
    ),
    (
        dict(sampling_correction="sequence_truncate", sampling_clip_max=None),
        {},
        r"sampling_correction='sequence_truncate' needs sampling_clip_min or sampling_clip_max"
        r" \(the bounds it truncates the ratio to\); got None for each",
    ),
    (
        dict(beta=0.04),
        dict(ref_logps=False),
        r"beta=0.04 needs ref_logps \(the KL penalty's reference\); got None",
    ),
    (
        dict(entropy_coef=-0.01),
        dict(entropy=False),
        r"entropy_coef=-0.01 needs entropy \(the per-token entropy the bonus is on\); got None",
    ),
    (
        dict(top_entropy_quantile=0.2),
        dict(entropy=False),
        r"top_entropy_quantile=0.2 needs entropy \(the per-token entropy it ranks\); got None",
    ),
]


def test_every_needs_entry_has_a_case():
    assert len(NEEDS_CASES) == len(NEEDS)
    for (kw, _, _), rule in zip(NEEDS_CASES, NEEDS, strict=True):
        assert rule.option in kw
        assert all(n in INPUTS for n in rule.needs) or all(n not in INPUTS for n in rule.needs)


@pytest.mark.parametrize("kw,missing,match", NEEDS_CASES)
def test_needs(kw, missing, match):
    opts = PolicyLossOptions(**kw)
    if missing:  # a tensor argument: checked next to the tensors, validate() lets it pass
        opts.validate()
        opts.check_inputs(**ALL_INPUTS)
        with pytest.raises(ValueError, match=match):
            opts.check_inputs(**{**ALL_INPUTS, **missing})
    else:
        opts.check_inputs(**{**NO_INPUTS, "num_items_in_batch": True})
        with pytest.raises(ValueError, match=match):
            opts.validate()


def test_needs_met():
    # dr_grpo with its length, truncation with either bound, mask modes without any
    PolicyLossOptions(loss_type="dr_grpo", max_completion_length=12).validate()
    for low, high in ((0.5, None), (None, 2.0)):
        PolicyLossOptions(
            sampling_correction="token_truncate", sampling_clip_min=low, sampling_clip_max=high
        ).validate()
    PolicyLossOptions(sampling_correction="token_mask", sampling_clip_max=None).validate()
    PolicyLossOptions(sampling_correction=None, sampling_clip_max=None).validate()
    # the options at their defaults (off) need no tensor
    PolicyLossOptions(loss_type="grpo").check_inputs(**NO_INPUTS)


def test_ordered_sampling_clip_bounds():
    assert ORDERED == (("sampling_clip_min", "sampling_clip_max"),)
    PolicyLossOptions(sampling_clip_min=0.5, sampling_clip_max=2.0).validate()
    for low, high in ((2.0, 1.0), (1.0, 1.0)):
        with pytest.raises(
            ValueError, match=rf"sampling_clip_min={low} must be less than sampling_clip_max={high}"
        ):
            PolicyLossOptions(sampling_clip_min=low, sampling_clip_max=high).validate()


def test_messages_in_another_spelling():
    # how GRPOConfig names options as flags: its own checks and "--name value"
    def number(name, value, **limits):
        raise ValueError(f"--{name} {limits}")

    def choice(name, value, choices):
        raise ValueError(f"--{name} of {choices}")

    flag = lambda name, value: f"--{name} {value!r}"
    with pytest.raises(ValueError, match=r"^--loss_type of \('grpo'"):
        PolicyLossOptions(loss_type="ppo").validate(choice=choice)
    with pytest.raises(ValueError, match=r"^--epsilon \{'low': 0.0\}"):
        PolicyLossOptions().validate(number=number)
    with pytest.raises(ValueError, match=r"^--delta 2.0 caps .*--loss_type 'sapo' does not"):
        PolicyLossOptions(loss_type="sapo", delta=2.0).validate(setting=flag)


# --------------------------------------------------------------------------- building


def test_from_mapping_picks_the_options():
    opts = PolicyLossOptions.from_mapping({"beta": 0.1, "logps": object(), "impl": "torch"})
    assert opts == PolicyLossOptions(beta=0.1)
    assert PolicyLossOptions.from_mapping({}) == DEFAULTS
    assert PolicyLossOptions.names()[0] == "loss_type" and "impl" not in PolicyLossOptions.names()


def test_derived_values_and_kernel_params():
    assert DEFAULTS.upper_epsilon == 0.2 and PolicyLossOptions(epsilon_high=5).upper_epsilon == 5.0
    assert PolicyLossOptions(gradient_accumulation_steps=4).generation_steps == 4
    assert (
        PolicyLossOptions(gradient_accumulation_steps=4, steps_per_generation=2).generation_steps
        == 2
    )  # noqa: E501
    params = PolicyLossOptions(epsilon=0, delta=2, use_bias_correction_kl=0).kernel_params()
    assert params == dict(
        loss_type="dapo", epsilon_low=0.0, epsilon_high=0.0, delta=2.0, kl_estimator="k3",
        kl_times_ratio=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
    )  # fmt: skip
    assert all(
        type(v) is float for k, v in params.items() if k.startswith(("eps", "delta", "sapo"))
    )


def test_kernel_params_are_the_launchers():
    from fastrl.kernels.policy_loss import TokenTermParams

    assert set(DEFAULTS.kernel_params()) == set(TokenTermParams._fields)


def test_frozen():
    with pytest.raises(AttributeError):
        DEFAULTS.beta = 0.1
