"""The options of the preference losses (`fastrl.preference_loss`, `fastrl.kto_loss`).

`PreferenceLossOptions` holds every hyper-parameter of `preference_loss` with its default,
declared here once; `RULES` says, for each option, which values it takes, which loss types
it has an effect on and what ``None`` stands for where it applies; `validate` reads that
table. The loss functions, `DPOConfig` and the command line build the options from their
own arguments (`PreferenceLossOptions.from_mapping`) and validate them here, so an option is
refused with the same message wherever it is set. No torch: the command line checks its
flags before it loads torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields

from fastrl.checks import check_choice, check_number

__all__ = [
    "AVERAGED_LOSS_TYPES",
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "LABEL_SMOOTHED_LOSS_TYPES",
    "LENGTH_NORMALISED_LOSS_TYPES",
    "LOSS_TYPES",
    "OPTION_NAMES",
    "REFERENCE_FREE_LOSS_TYPES",
    "REQUIRED",
    "RULES",
    "KTOLossOptions",
    "PreferenceLossOptions",
    "Rule",
    "check_bounds",
]

# --------------------------------------------------------------------------- taxonomies

#: TRL's DPOTrainer loss types: on log-ratios to a reference model (``sft`` only optionally)
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
#: CPOTrainer's sigmoid/hinge/ipo/simpo, and alphapo (its simpo with cpo_alpha=0)
CPO_LOSS_TYPES = ("cpo", "cpo_hinge", "cpo_ipo", "simpo", "alphapo")
#: the loss types without a reference model: the CPO family and ORPOTrainer's odds ratio
REFERENCE_FREE_LOSS_TYPES = CPO_LOSS_TYPES + ("orpo",)
LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: TRL takes a non-default f-divergence only with these: the others do not depend on the
#: chosen-rejected score difference alone
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust")
F_DIVERGENCE_LOSS_TYPES += ("discopop", "sft")
#: the loss types that read label_smoothing (sigmoid: cDPO, which TRL 1.16 no longer has)
LABEL_SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "cpo")
LABEL_SMOOTHED_LOSS_TYPES += ("simpo", "alphapo")
#: DPO types that divide each score by its completion's length
LENGTH_NORMALISED_LOSS_TYPES = ("ipo", "sigmoid_norm")
#: reference-free types on length-averaged log-probs
AVERAGED_LOSS_TYPES = ("cpo_ipo", "simpo", "alphapo", "orpo")
#: the DPO types WPO can weight: not the two that sort the pairs (TRL refuses them too)
_WPO_LOSS_TYPES = tuple(t for t in DPO_LOSS_TYPES if t not in ("aot", "aot_unpaired"))


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Rule:
    """How `PreferenceLossOptions.validate` checks one option.

    Attributes:
        bounds: the option is a finite number within these (``low``, ``high``,
            ``low_open``, ``high_open``); None: it is not a number.
        choices: the values of a string option.
        flag: the option is a bool.
        loss_types: the loss types the option has an effect on (None: every one).
        every: every loss type asked for must be among `loss_types` (else one is enough).
        when: ``(option, value)``: the option has an effect only while that other option
            has that value (instead of `loss_types`).
        default: what ``None`` stands for where the option has an effect.
        by_loss_type: other `bounds` / `default` for one loss type (the first asked).
        why: the refusal of a value other than the default where the option has no
            effect, after ``"{name}={value!r} "``; it may name ``{loss_type}`` (as asked),
            ``{types}`` (`loss_types`), ``{bad}`` (the first asked type outside them) and
            any option.
    """

    bounds: Mapping[str, float | bool] | None = None
    choices: tuple[str, ...] | None = None
    flag: bool = False
    loss_types: tuple[str, ...] | None = None
    every: bool = False
    when: tuple[str, object] | None = None
    default: float | None = None
    by_loss_type: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    why: str = ""


_ANY_NUMBER: Mapping[str, float | bool] = {}
_POSITIVE = dict(low=0.0, low_open=True)
_NON_NEGATIVE = dict(low=0.0)

#: Every option but `loss_type` and `loss_weights` (checked on their own first), in the
#: order `validate` checks them.
RULES: dict[str, Rule] = {
    # ORPO's lambda may be 0 (the NLL alone); every other beta divides or scales a margin
    "beta": Rule(_POSITIVE, by_loss_type={"orpo": dict(bounds=_NON_NEGATIVE)}),
    "label_smoothing": Rule(
        dict(low=0.0, high=0.5, high_open=True),
        loss_types=LABEL_SMOOTHED_LOSS_TYPES,
        why="has no effect on loss_type={loss_type} (it applies to {types})",
    ),
    "f_divergence_type": Rule(
        choices=F_DIVERGENCES,
        loss_types=F_DIVERGENCE_LOSS_TYPES,
        every=True,
        why="applies to loss types {types} only, got loss_type {bad!r}",
    ),
    "f_alpha_divergence_coef": Rule(
        _ANY_NUMBER,
        when=("f_divergence_type", "alpha_divergence"),
        default=0.5,
        why="is for f_divergence_type='alpha_divergence', got {f_divergence_type!r}",
    ),
    "discopop_tau": Rule(
        _POSITIVE,
        loss_types=("discopop",),
        default=0.05,
        why="is for loss_type='discopop', got loss_type={loss_type}",
    ),
    "rdpo_alpha": Rule(
        _ANY_NUMBER,
        loss_types=("sigmoid",),
        why="is R-DPO's, for loss_type='sigmoid', got loss_type={loss_type}",
    ),
    "dpop_lambda": Rule(
        _NON_NEGATIVE,
        loss_types=("sigmoid",),
        why="is DPOP's, for loss_type='sigmoid', got loss_type={loss_type}",
    ),
    "alpha": Rule(
        _ANY_NUMBER, loss_types=CPO_LOSS_TYPES, why="is AlphaPO's, for the CPO loss types {types}"
    ),
    "cpo_alpha": Rule(
        _ANY_NUMBER,
        loss_types=CPO_LOSS_TYPES,
        default=1.0,  # TRL's CPOConfig
        by_loss_type={"alphapo": dict(default=0.0)},  # TRL's alphapo: simpo without NLL
        why="is for the CPO loss types {types}",
    ),
    "simpo_gamma": Rule(
        _ANY_NUMBER,
        loss_types=("simpo", "alphapo"),
        default=0.5,
        why="is SimPO's target margin, for {types}, got loss_type={loss_type}",
    ),
    "use_weighting": Rule(
        flag=True,
        loss_types=_WPO_LOSS_TYPES,
        every=True,
        why="(WPO) cannot weight {bad!r}: it weights DPO loss types, but not 'aot' / "
        "'aot_unpaired', which sort the pairs (TRL refuses them too)",
    ),
    "ld_alpha": Rule(
        dict(low=0.0, high=1.0),
        loss_types=DPO_LOSS_TYPES,
        every=True,
        why="(LD-DPO) is for DPO loss types, got loss_type={loss_type}",
    ),
}

#: loss types that need an option away from its default: ``{loss_type: (option, why)}``
REQUIRED = {
    "exo_pair": (
        "label_smoothing",
        "needs label_smoothing > 0 (its target distribution [1 - eps, eps]; the EXO paper "
        "uses 1e-3), got {value!r}",
    ),
}

NumberCheck = Callable[..., None]
ChoiceCheck = Callable[[str, object, Sequence], None]


def check_bounds(name: str, x, *, low=None, high=None, low_open=False, high_open=False) -> None:
    """`fastrl.checks.check_number` within `RULES`' bounds; an open upper bound (which
    `check_number` does not take) comes with a lower one, as an interval: ``[0, 0.5)``."""
    if not high_open:
        check_number(name, x, low=low, high=high, strict_low=low_open)
        return
    check_number(name, x)
    if not (low < x if low_open else low <= x) or not x < high:
        raise ValueError(
            f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}), got {x!r}"
        )


# --------------------------------------------------------------------------- the options


@dataclass(frozen=True)
class PreferenceLossOptions:
    """Every hyper-parameter of `fastrl.preference_loss` (TRL's names and defaults).

    Attributes:
        loss_type: the loss types, one or (DPO types only) several, combined with
            `loss_weights` (MPO); a single string is taken as a list of one. The formulas
            are in `fastrl.ops.preference.dpo` (TRL's DPOTrainer types), `.cpo` (``cpo``,
            ``cpo_hinge``, ``cpo_ipo``, ``simpo``, ``alphapo``) and `.orpo`.
        beta: DPO's beta (IPO's tau; ORPO's lambda). > 0 (>= 0 for ``orpo``).
        loss_weights: one weight per loss type (default all 1).
        label_smoothing: eps in [0, 0.5) for `LABEL_SMOOTHED_LOSS_TYPES`: cDPO on
            ``sigmoid`` (TRL 1.16 ignores it there), the label-flip rate of ``robust``, EXO's
            target ``[1 - eps, eps]`` (``exo_pair``: required > 0).
        f_divergence_type: one of `F_DIVERGENCES`, applied to each log-ratio ``s``:
            ``"reverse_kl"`` (DPO), ``"forward_kl"`` (``1 - exp(-s)``), ``"js_divergence"``
            (``log 2 + log sigmoid(s)``) or ``"alpha_divergence"`` (``(exp((a - 1) s) - 1) /
            (a - 1)``, the exponent capped at 80 as TRL caps it); a non-default one only
            with `F_DIVERGENCE_LOSS_TYPES` (TRL's rule).
        f_alpha_divergence_coef: ``a`` of the alpha divergence (None: 0.5).
        discopop_tau: DiscoPOP's temperature (None: 0.05).
        ld_alpha: LD-DPO's weight in [0, 1] on the verbose tail of the longer completion
            of each pair (DPO types; None: off).
        use_weighting: WPO: each pair's loss weighted by its completions' aligned
            probabilities (DPO types but ``aot`` / ``aot_unpaired``, as TRL).
        rdpo_alpha: R-DPO's length penalty (``sigmoid`` only, not in TRL).
        dpop_lambda: DPOP's penalty on the chosen log-ratio falling below 0 (``sigmoid``
            only, not in TRL); >= 0.
        cpo_alpha: weight of the NLL term of the CPO family (None: 1.0 as TRL's CPOConfig;
            0.0 for ``alphapo``).
        simpo_gamma: SimPO's target margin (``simpo``, ``alphapo``; None: 0.5).
        alpha: AlphaPO's reward shape for the CPO family (0: log-prob rewards).

    Construction only normalises `loss_type` / `loss_weights` to lists; `validate` checks.
    """

    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    beta: float = 0.1
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float | None = None
    discopop_tau: float | None = None
    ld_alpha: float | None = None
    use_weighting: bool = False
    rdpo_alpha: float = 0.0
    dpop_lambda: float = 0.0
    cpo_alpha: float | None = None
    simpo_gamma: float | None = None
    alpha: float = 0.0

    def __post_init__(self) -> None:
        # a copy as a list, as TRL's DPOConfig keeps it; anything else is validate's to refuse
        types = self.loss_type
        if isinstance(types, str):
            object.__setattr__(self, "loss_type", [types])
        elif _is_sequence(types) and all(isinstance(t, str) for t in types):
            object.__setattr__(self, "loss_type", list(types))
        if _is_sequence(self.loss_weights):
            object.__setattr__(self, "loss_weights", list(self.loss_weights))

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> PreferenceLossOptions:
        """The options among `values` (a config's fields, command-line values, a
        function's arguments, by name); other keys are ignored."""
        return cls(**{name: values[name] for name in OPTION_NAMES if name in values})

    # ---------------------------------------------------------------- validation

    def validate(self, number: NumberCheck = check_bounds, choice: ChoiceCheck = check_choice):
        """Raise ValueError (TypeError for a wrong type) naming the first bad option.

        `check_values`, then `check_combinations`. `number(name, value, **bounds)` and
        `choice(name, value, choices)` render the messages of the checks of a single
        value: a config passes its own to name the options as flags.
        """
        self.check_values(number, choice)
        self.check_combinations()

    def check_values(self, number: NumberCheck = check_bounds, choice: ChoiceCheck = check_choice):
        """Each option on its own: `loss_type`, `loss_weights`, then `RULES`' types and
        bounds (``None`` passes where it is the default: it stands for a value there)."""
        types = self._check_loss_type()
        weights = self.loss_weights
        if weights is not None:
            if not isinstance(weights, list):
                raise TypeError(f"loss_weights must be a sequence of numbers, got {weights!r}")
            if len(weights) != len(types):
                raise ValueError(
                    f"loss_weights must have one weight per loss type ({len(types)}), got "
                    f"{weights!r}"
                )
            for i, w in enumerate(weights):
                number(f"loss_weights[{i}]", w)
        for name in RULES:
            value, rule = getattr(self, name), self._rule(name)
            if value is None and _DEFAULTS[name] is None:
                continue
            if rule.flag and not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
            if rule.choices is not None:
                choice(name, value, rule.choices)
            if rule.bounds is not None:
                number(name, value, **rule.bounds)

    def check_combinations(self) -> None:
        """Which option applies to which loss types (after `check_values`): a value other
        than the default where the option has no effect is refused, not ignored."""
        context = self._context()
        for name, rule in RULES.items():
            value = getattr(self, name)
            if value is None or value == _DEFAULTS[name] or self.applies(name):
                continue
            asked = self.loss_type
            bad = next((t for t in asked if t not in (rule.loss_types or ())), asked[0])
            why = rule.why.format(types=rule.loss_types, bad=bad, **context)
            raise ValueError(f"{name}={value!r} {why}")
        for loss_type, (name, why) in REQUIRED.items():
            value = getattr(self, name)
            if loss_type in self.loss_type and value == _DEFAULTS[name]:
                raise ValueError(f"loss_type={loss_type!r} {why.format(value=value)}")

    def _check_loss_type(self) -> list[str]:
        types = self.loss_type
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise TypeError(f"loss_type must be a str or a sequence of str, got {types!r}")
        if not types:
            raise ValueError(f"loss_type needs at least one loss type, got {types!r}")
        for t in types:
            if t not in LOSS_TYPES:
                raise ValueError(
                    f"loss_type must be one of {LOSS_TYPES} (or a list of them), got {t!r}"
                )
        if len(types) > 1:
            free = [t for t in types if t in REFERENCE_FREE_LOSS_TYPES]
            if free:
                raise ValueError(
                    f"loss_type lists (MPO) combine DPO loss types {DPO_LOSS_TYPES}; "
                    f"{free[0]!r} is a reference-free loss and cannot be combined, got "
                    f"{types!r}"
                )
            if len(set(types)) != len(types):
                raise ValueError(f"loss_type lists must not repeat a loss type, got {types!r}")
        return types

    # ---------------------------------------------------------------- reading

    def applies(self, name: str) -> bool:
        """Whether option `name` has an effect on the loss types asked for."""
        rule = RULES.get(name)
        if rule is None:
            return True
        if rule.when is not None:
            other, value = rule.when
            return getattr(self, other) == value
        if rule.loss_types is None:
            return True
        inside = [t in rule.loss_types for t in self.loss_type]
        return all(inside) if rule.every else any(inside)

    @staticmethod
    def applied_default(name: str, loss_type: str | None = None) -> float | None:
        """What ``None`` stands for in option `name` where it applies (for `loss_type`)."""
        rule = RULES[name]
        return rule.by_loss_type.get(loss_type, {}).get("default", rule.default)

    def value(self, name: str):
        """Option `name` as the losses read it: ``None`` replaced by what it stands for
        where the option applies."""
        value = getattr(self, name)
        if value is None and self.applies(name):
            return self.applied_default(name, self.loss_type[0])
        return value

    def resolved(self) -> PreferenceLossOptions:
        """These options as the losses read them (unchecked): every `value`, numbers as
        floats, `loss_weights` a list."""
        values = {"loss_weights": [1.0] * len(self.loss_type)}
        if self.loss_weights is not None:
            values["loss_weights"] = [float(w) for w in self.loss_weights]
        for name, rule in RULES.items():
            value = self.value(name)
            values[name] = float(value) if value is not None and rule.bounds is not None else value
        return dataclasses.replace(self, **values)

    def kwargs(self) -> dict[str, object]:
        """The options that differ from their defaults, as `preference_loss` keyword
        arguments (a single loss type as a string)."""
        kw = {n: getattr(self, n) for n in OPTION_NAMES if getattr(self, n) != _DEFAULTS[n]}
        if len(self.loss_type) == 1 and "loss_type" in kw:
            kw["loss_type"] = self.loss_type[0]
        return kw

    @property
    def reference_free(self) -> bool:
        """The loss uses no reference model (the CPO family, ORPO)."""
        return self.loss_type[0] in REFERENCE_FREE_LOSS_TYPES

    @property
    def averaged(self) -> bool:
        """The loss compares length-averaged log-probs."""
        return self.loss_type[0] in AVERAGED_LOSS_TYPES

    @property
    def has_nll(self) -> bool:
        """The loss has a supervised NLL term: ``sft``, ``orpo``, the CPO family with a
        nonzero `cpo_alpha`."""
        first = self.loss_type[0]
        cpo_nll = first in CPO_LOSS_TYPES and self.value("cpo_alpha") != 0
        return "sft" in self.loss_type or first == "orpo" or cpo_nll

    @property
    def loss_type_repr(self) -> str:
        """`loss_type` as the messages show it: a single type as a string."""
        return repr(self.loss_type[0] if len(self.loss_type) == 1 else self.loss_type)

    def _rule(self, name: str) -> Rule:
        """`RULES[name]` with its entry for the first loss type asked for applied."""
        rule = RULES[name]
        override = rule.by_loss_type.get(self.loss_type[0])
        return dataclasses.replace(rule, **override) if override else rule

    def _context(self) -> dict[str, object]:
        """The options by name for the messages."""
        return {**{n: getattr(self, n) for n in OPTION_NAMES}, "loss_type": self.loss_type_repr}


#: the options' names, in declaration order
OPTION_NAMES = tuple(f.name for f in fields(PreferenceLossOptions))
_DEFAULTS = {
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in fields(PreferenceLossOptions)
}


def _is_sequence(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes))


@dataclass(frozen=True)
class KTOLossOptions:
    """The hyper-parameters of `fastrl.kto_loss` (TRL's KTOConfig names and defaults).

    Attributes:
        loss_type: one of `KTO_LOSS_TYPES`.
        beta: > 0.
        desirable_weight, undesirable_weight: >= 0, the weights of the two kinds of rows.
    """

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def validate(self) -> None:
        check_choice("loss_type", self.loss_type, KTO_LOSS_TYPES)
        check_number("beta", self.beta, low=0.0, strict_low=True)
        check_number("desirable_weight", self.desirable_weight, low=0.0)
        check_number("undesirable_weight", self.undesirable_weight, low=0.0)
