"""`PreferenceLossOptions` / `KTOLossOptions`: each rule of the table as `validate` reads it
(the values each option takes, where it applies, what None stands for there, what a loss
type requires), the list-valued options, and the import without torch."""

import math
import subprocess
import sys

import pytest

from fastrl.options.preference import (
    DPO_LOSS_TYPES,
    LOSS_TYPES,
    OPTION_NAMES,
    REFERENCE_FREE_LOSS_TYPES,
    RULES,
    KTOLossOptions,
    PreferenceLossOptions,
)

P = PreferenceLossOptions


def test_imports_and_validates_without_torch():
    code = (
        "import sys, fastrl.options.preference as p; p.PreferenceLossOptions().validate(); "
        "p.KTOLossOptions().validate(); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_defaults_are_trl_s_and_valid():
    o = P()
    o.validate()
    assert o.loss_type == ["sigmoid"] and o.beta == 0.1 and o.loss_weights is None
    assert o.label_smoothing == 0.0 and o.f_divergence_type == "reverse_kl"
    assert o.kwargs() == {}
    assert OPTION_NAMES[0] == "loss_type" and set(RULES) == set(OPTION_NAMES) - {
        "loss_type",
        "loss_weights",
    }


def test_the_table_names_known_loss_types():
    for name, rule in RULES.items():
        assert set(rule.loss_types or ()) <= set(LOSS_TYPES), name
        assert set(rule.by_loss_type) <= set(LOSS_TYPES), name
    assert LOSS_TYPES == DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES


def test_every_dpo_loss_type_has_a_function():
    from fastrl.ops.preference.dpo import DPO_LOSSES

    assert tuple(DPO_LOSSES) == DPO_LOSS_TYPES


# --------------------------------------------------------------------------- values

# Each option on its own (RULES' bounds, choices, flags): (options, error, message).
VALUES = {
    "beta": [
        (dict(beta=0.0), ValueError, r"beta must be finite and > 0.0, got 0.0"),
        (dict(beta=True), TypeError, r"beta must be a number"),
        (dict(beta=None), TypeError, r"beta must be a number, got None"),  # None: no default
        (dict(loss_type="orpo", beta=-0.1), ValueError, r"beta must be finite and >= 0.0"),
    ],
    "label_smoothing": [
        (dict(label_smoothing=0.5), ValueError, r"label_smoothing must be in \[0, 0.5\), got 0.5"),
        (dict(label_smoothing=-0.1), ValueError, r"must be in \[0, 0.5\), got -0.1"),
        (dict(label_smoothing="0.1"), TypeError, r"label_smoothing must be a number"),
    ],
    "f_divergence_type": [
        (dict(f_divergence_type="kl"), ValueError, r"f_divergence_type must be one of \("),
    ],
    "f_alpha_divergence_coef": [
        (dict(f_alpha_divergence_coef=math.nan), ValueError, r"f_alpha_divergence_coef must be finite"),  # noqa: E501
    ],
    "discopop_tau": [
        (dict(loss_type="discopop", discopop_tau=0.0), ValueError, r"discopop_tau must be finite and > 0.0"),  # noqa: E501
    ],
    "rdpo_alpha": [(dict(rdpo_alpha=math.inf), ValueError, r"rdpo_alpha must be finite")],
    "dpop_lambda": [(dict(dpop_lambda=-1.0), ValueError, r"dpop_lambda must be finite and >= 0.0")],  # noqa: E501
    "alpha": [(dict(loss_type="cpo", alpha="a"), TypeError, r"alpha must be a number")],
    "cpo_alpha": [(dict(loss_type="cpo", cpo_alpha=math.nan), ValueError, r"cpo_alpha must be finite")],  # noqa: E501
    "simpo_gamma": [(dict(loss_type="simpo", simpo_gamma=[1]), TypeError, r"simpo_gamma must be a number")],  # noqa: E501
    "use_weighting": [
        (dict(use_weighting=1), TypeError, r"use_weighting must be a bool, got 1"),
        (dict(use_weighting=None), TypeError, r"use_weighting must be a bool, got None"),
    ],
    "ld_alpha": [(dict(ld_alpha=1.5), ValueError, r"ld_alpha must be finite and >= 0.0 and <= 1.0, got 1.5")],  # noqa: E501
}  # fmt: skip
VALUE_CASES = [(name, *case) for name, cases in VALUES.items() for case in cases]


def test_every_rule_has_value_cases():
    assert set(VALUES) == set(RULES)


@pytest.mark.parametrize("name,kw,error,match", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_values_refused(name, kw, error, match):
    with pytest.raises(error, match=match):
        P(**kw).validate()


def test_value_edges_pass():
    P(loss_type="orpo", beta=0.0).validate()  # ORPO's lambda 0: the NLL alone
    P(label_smoothing=0.0).validate()
    P(loss_type="robust", label_smoothing=0.4999).validate()
    P(ld_alpha=0.0).validate()
    P(ld_alpha=1).validate()
    P(dpop_lambda=0).validate()


def test_the_value_checks_can_be_a_config_s():
    """`validate(number=, choice=)`: a config renders the single-value messages itself."""
    calls = []
    P(loss_type="ipo", loss_weights=[2.0], ld_alpha=0.3).validate(
        number=lambda name, x, **bounds: calls.append((name, x, bounds)),
        choice=lambda name, x, choices: calls.append((name, x, choices)),
    )
    assert ("loss_weights[0]", 2.0, {}) in calls
    assert ("beta", 0.1, dict(low=0.0, low_open=True)) in calls
    assert ("ld_alpha", 0.3, dict(low=0.0, high=1.0)) in calls
    assert ("label_smoothing", 0.0, dict(low=0.0, high=0.5, high_open=True)) in calls
    assert ("f_divergence_type", "reverse_kl", RULES["f_divergence_type"].choices) in calls
    assert not any(c[0] == "cpo_alpha" for c in calls)  # None: nothing to check


# --------------------------------------------------------------------------- where

# Where each option applies: {name: (value, options where it applies, options where it
# does not, the refusal there)}.
WHERE = {
    "label_smoothing": (0.1, dict(loss_type="robust"), dict(loss_type="hinge"), r"label_smoothing=0.1 has no effect on loss_type='hinge' \(it applies to \('sigmoid'"),  # noqa: E501
    "f_divergence_type": ("js_divergence", dict(loss_type=["sigmoid", "hinge"]), dict(loss_type=["sigmoid", "bco_pair"]), r"f_divergence_type='js_divergence' applies to loss types .* only, got loss_type 'bco_pair'"),  # noqa: E501
    "f_alpha_divergence_coef": (2.0, dict(f_divergence_type="alpha_divergence"), dict(f_divergence_type="js_divergence"), r"f_alpha_divergence_coef=2.0 is for f_divergence_type='alpha_divergence', got 'js_divergence'"),  # noqa: E501
    "discopop_tau": (0.1, dict(loss_type=["sigmoid", "discopop"]), dict(loss_type="sigmoid"), r"discopop_tau=0.1 is for loss_type='discopop', got loss_type='sigmoid'"),  # noqa: E501
    "rdpo_alpha": (0.1, dict(loss_type=["ipo", "sigmoid"]), dict(loss_type="ipo"), r"rdpo_alpha=0.1 is R-DPO's, for loss_type='sigmoid', got loss_type='ipo'"),  # noqa: E501
    "dpop_lambda": (1.0, dict(loss_type="sigmoid"), dict(loss_type=["ipo", "hinge"]), r"dpop_lambda=1.0 is DPOP's, for loss_type='sigmoid', got loss_type=\['ipo', 'hinge'\]"),  # noqa: E501
    "alpha": (0.5, dict(loss_type="simpo"), dict(loss_type="sigmoid"), r"alpha=0.5 is AlphaPO's, for the CPO loss types \('cpo'"),  # noqa: E501
    "cpo_alpha": (0.5, dict(loss_type="cpo_hinge"), dict(loss_type="orpo"), r"cpo_alpha=0.5 is for the CPO loss types"),  # noqa: E501
    "simpo_gamma": (1.0, dict(loss_type="alphapo"), dict(loss_type="cpo"), r"simpo_gamma=1.0 is SimPO's target margin, for \('simpo', 'alphapo'\), got loss_type='cpo'"),  # noqa: E501
    "use_weighting": (True, dict(loss_type=["sigmoid", "ipo"]), dict(loss_type=["sigmoid", "aot_unpaired"]), r"use_weighting=True \(WPO\) cannot weight 'aot_unpaired'"),  # noqa: E501
    "ld_alpha": (0.5, dict(loss_type="sft"), dict(loss_type="orpo"), r"ld_alpha=0.5 \(LD-DPO\) is for DPO loss types, got loss_type='orpo'"),  # noqa: E501
}  # fmt: skip


def test_every_rule_but_beta_says_where_it_applies():
    assert set(WHERE) == set(RULES) - {"beta"}
    assert RULES["beta"].loss_types is None  # beta: every loss type


@pytest.mark.parametrize("name", WHERE)
def test_where_each_option_applies(name):
    value, inside, outside, match = WHERE[name]
    P(**inside, **{name: value}).validate()
    assert P(**inside).applies(name) and not P(**outside).applies(name)
    with pytest.raises(ValueError, match=match):
        P(**outside, **{name: value}).validate()
    P(**outside).validate()  # the default passes anywhere


def test_wpo_refuses_the_reference_free_types_too():
    with pytest.raises(ValueError, match=r"use_weighting=True \(WPO\) cannot weight 'cpo'"):
        P(loss_type="cpo", use_weighting=True).validate()


def test_required():
    with pytest.raises(ValueError, match=r"loss_type='exo_pair' needs label_smoothing > 0"):
        P(loss_type="exo_pair").validate()
    with pytest.raises(ValueError, match=r"loss_type='exo_pair' needs label_smoothing > 0"):
        P(loss_type=["sigmoid", "exo_pair"]).validate()
    P(loss_type="exo_pair", label_smoothing=1e-3).validate()


# --------------------------------------------------------------------------- None


@pytest.mark.parametrize(
    "name,kw,want",
    [
        ("f_alpha_divergence_coef", dict(f_divergence_type="alpha_divergence"), 0.5),
        ("f_alpha_divergence_coef", {}, None),
        ("discopop_tau", dict(loss_type="discopop"), 0.05),
        ("discopop_tau", {}, None),
        ("cpo_alpha", dict(loss_type="cpo"), 1.0),
        ("cpo_alpha", dict(loss_type="alphapo"), 0.0),  # TRL's alphapo: simpo without NLL
        ("cpo_alpha", dict(loss_type="cpo", cpo_alpha=0.3), 0.3),
        ("cpo_alpha", {}, None),
        ("simpo_gamma", dict(loss_type="simpo"), 0.5),
        ("simpo_gamma", dict(loss_type="cpo"), None),
        ("ld_alpha", {}, None),
    ],
)
def test_what_none_stands_for(name, kw, want):
    o = P(**kw)
    assert o.value(name) == want
    assert getattr(o.resolved(), name) == want


def test_resolved():
    o = P(loss_type=("sigmoid", "sft"), beta=1, ld_alpha=1).resolved()
    assert o.loss_type == ["sigmoid", "sft"] and o.loss_weights == [1.0, 1.0]
    assert isinstance(o.beta, float) and isinstance(o.ld_alpha, float)
    assert P(loss_weights=(2, 3), loss_type=["ipo", "hinge"]).resolved().loss_weights == [2.0, 3.0]


@pytest.mark.parametrize(
    "kw,has_nll",
    [
        ({}, False),
        (dict(loss_type=["sigmoid", "sft"]), True),
        (dict(loss_type="orpo"), True),
        (dict(loss_type="cpo"), True),
        (dict(loss_type="alphapo"), False),
        (dict(loss_type="simpo", cpo_alpha=0.0), False),
    ],
)
def test_has_nll(kw, has_nll):
    assert P(**kw).has_nll == has_nll


# --------------------------------------------------------------------------- lists


LOSS_TYPE_BAD = [
    (dict(loss_type="dpo"), ValueError, r"loss_type must be one of \('sigmoid', .* \(or a list of them\), got 'dpo'"),  # noqa: E501
    (dict(loss_type=["sigmoid", "nope"]), ValueError, r"got 'nope'"),
    (dict(loss_type=[]), ValueError, r"loss_type needs at least one loss type, got \[\]"),
    (dict(loss_type=3), TypeError, r"loss_type must be a str or a sequence of str, got 3"),
    (dict(loss_type=["sigmoid", 3]), TypeError, r"loss_type must be a str or a sequence of str"),
    (dict(loss_type=["sigmoid", "sigmoid"]), ValueError, r"must not repeat a loss type"),
    (dict(loss_type=["sigmoid", "orpo"]), ValueError, r"'orpo' is a reference-free loss and cannot be combined"),  # noqa: E501
    (dict(loss_weights=1.0), TypeError, r"loss_weights must be a sequence of numbers, got 1.0"),
    (dict(loss_weights="1"), TypeError, r"loss_weights must be a sequence of numbers"),
    (dict(loss_weights=[1.0, 2.0]), ValueError, r"loss_weights must have one weight per loss type \(1\), got \[1.0, 2.0\]"),  # noqa: E501
    (dict(loss_weights=["a"]), TypeError, r"loss_weights\[0\] must be a number"),
]  # fmt: skip


@pytest.mark.parametrize("kw,error,match", LOSS_TYPE_BAD)
def test_loss_type_and_weights_refused(kw, error, match):
    with pytest.raises(error, match=match):
        P(**kw).validate()


def test_lists_as_trl_keeps_them():
    given = ["sigmoid", "sft"]
    o = P(loss_type=given, loss_weights=(0.5, 1.0))
    assert o.loss_type == given and o.loss_type is not given  # a copy
    assert o.loss_weights == [0.5, 1.0]
    assert P(loss_type="ipo").loss_type == ["ipo"]
    o.validate()


# --------------------------------------------------------------------------- building


def test_from_mapping_and_kwargs_round_trip():
    values = dict(loss_type="simpo", beta=2.0, simpo_gamma=0.3, output_dir="x", lr=1.0)
    o = P.from_mapping(values)
    assert o == P(loss_type=["simpo"], beta=2.0, simpo_gamma=0.3)
    assert o.kwargs() == dict(loss_type="simpo", beta=2.0, simpo_gamma=0.3)
    mpo = P(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert mpo.kwargs()["loss_type"] == ["sigmoid", "sft"]
    assert P.from_mapping(mpo.kwargs()) == mpo


def test_options_are_frozen():
    with pytest.raises(AttributeError):
        P().beta = 0.2


def test_kto_options():
    KTOLossOptions().validate()
    for kw, match in [
        (dict(loss_type="sigmoid"), r"loss_type must be one of \('kto', 'apo_zero_unpaired'\)"),
        (dict(beta=0.0), r"beta must be finite and > 0.0"),
        (dict(desirable_weight=-1.0), r"desirable_weight must be finite and >= 0.0"),
        (dict(undesirable_weight=math.nan), r"undesirable_weight must be finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            KTOLossOptions(**kw).validate()
