"""`PolicyLossOptions`: the hyper-parameters of the GRPO-family policy loss, declared once.

`fastrl.policy_loss` and `fastrl.fused_policy_loss` build one from their keyword arguments;
the float64 oracle and `GRPOConfig` take their defaults from it. `validate` is the one place
that decides what a setting may be and which settings go together: each field carries its
own check (a choice or a number range), and three tables say which option applies to or is
required by which loss type or setting (`APPLIES_TO`, `NEEDS`, `ORDERED`). The rules of
`NEEDS` about tensor arguments (``beta`` needs ``ref_logps``, ...) are checked next to the
tensors, by `check_inputs`.

Importable without torch: the command line validates options before it loads torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from fastrl.checks import check_bool, check_choice, check_number

__all__ = [
    "APPLIES_TO",
    "CLIPPED_LOSS_TYPES",
    "DEFAULTS",
    "INPUTS",
    "KL_ESTIMATORS",
    "LEVELS",
    "LOSS_TYPES",
    "NEEDS",
    "ORDERED",
    "PER_STEP",
    "SAMPLING_CORRECTIONS",
    "SEQUENCE_MEAN_LOSS_TYPES",
    "TOKEN_COUNT_LOSS_TYPES",
    "VESPO_SAMPLING_CORRECTIONS",
    "AppliesTo",
    "Needs",
    "PolicyLossOptions",
]

# --------------------------------------------------------------------------- taxonomies

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
#: the loss types with PPO's clipped surrogate (cispo weighs REINFORCE, sapo gates softly)
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: the loss types normalised by the active-token count of the generation batch
TOKEN_COUNT_LOSS_TYPES = ("dapo", "cispo", "vespo")
#: loss types whose loss is the mean over sequences of each sequence's token mean
SEQUENCE_MEAN_LOSS_TYPES = ("grpo", "sapo")
LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
#: TRL's ``vllm_importance_sampling_mode``s
SAMPLING_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
#: the corrections ``vespo`` can fold into its sequence weight (TRL: token ratios only)
VESPO_SAMPLING_CORRECTIONS = ("token_truncate", "token_mask")
#: the options a training loop sets on every call (training or evaluation), not a setting
PER_STEP = ("gradient_accumulation_steps", "steps_per_generation", "num_processes")
#: the arguments of `policy_loss` that are not options but that `NEEDS` can require
INPUTS = ("num_items_in_batch", "ref_logps", "entropy")


def _choice(default: Any, choices: tuple, *, optional: bool = False) -> Any:
    return field(default=default, metadata={"choices": choices, "optional": optional})


def _flag(default: bool) -> Any:
    return field(default=default, metadata={"flag": True})


def _number(default: Any, **limits: Any) -> Any:
    """`limits`: ``low``, ``high``, ``low_open`` (``low`` excluded), ``integer``, ``optional``
    (None allowed), as `PolicyLossOptions.validate`'s ``check_number`` takes them."""
    return field(default=default, metadata={"number": limits})


def _check_number(name: str, value: Any, *, low_open: bool = False, optional: bool = False, **kw):
    """`fastrl.checks.check_number` with `validate`'s arguments: None passes if optional."""
    if not (value is None and optional):
        check_number(name, value, strict_low=low_open, **kw)


def _python_setting(name: str, value: Any) -> str:
    return f"{name}={value!r}"


# --------------------------------------------------------------------------- rules


class AppliesTo(NamedTuple):
    """`option`, when set (not at its default), is for `loss_types` only; `what` it does (a
    message reads "delta=1.5 {what}, which loss_type='cispo' does not have")."""

    option: str
    loss_types: tuple[str, ...]
    what: str


class Needs(NamedTuple):
    """`option` at one of the values `when` (None: at any value but its default) needs one
    of `needs` (options, or arguments of `INPUTS`) not to be None, because `why`."""

    option: str
    when: tuple | None
    needs: tuple[str, ...]
    why: str

    def message(self, show: Callable[[str], str]) -> str:
        got = "None" if len(self.needs) == 1 else "None for each"
        return f"{show(self.option)} needs {' or '.join(self.needs)} ({self.why}); got {got}"


APPLIES_TO = (
    AppliesTo("delta", CLIPPED_LOSS_TYPES, "caps the unclipped ratio of the clipped surrogate"),
    *(AppliesTo(f"sapo_temperature_{s}", ("sapo",), "sets the soft gate's temperature")
      for s in ("pos", "neg")),
    *(AppliesTo(f"vespo_{p}_{s}", ("vespo",), "shapes the Gamma weight of the sequence ratio")
      for p in ("k", "lambda") for s in ("pos", "neg")),
)  # fmt: skip
NEEDS = (
    Needs(
        "loss_type",
        ("dr_grpo",),
        ("max_completion_length",),
        "it normalises by B * max_completion_length",
    ),
    Needs(
        "loss_type",
        TOKEN_COUNT_LOSS_TYPES,
        ("num_items_in_batch",),
        "it normalises by the active-token count of the generation batch",
    ),
    Needs(
        "sampling_correction",
        ("token_truncate", "sequence_truncate"),
        ("sampling_clip_min", "sampling_clip_max"),
        "the bounds it truncates the ratio to",
    ),
    Needs("beta", None, ("ref_logps",), "the KL penalty's reference"),
    Needs("entropy_coef", None, ("entropy",), "the per-token entropy the bonus is on"),
    Needs("top_entropy_quantile", None, ("entropy",), "the per-token entropy it ranks"),
)
#: pairs of options that, both set, must be in increasing order
ORDERED = (("sampling_clip_min", "sampling_clip_max"),)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PolicyLossOptions:
    """Every hyper-parameter of `fastrl.policy_loss`, with TRL 1.16's names and defaults.

    ``GA`` below is ``gradient_accumulation_steps``; ``r`` the importance ratio, ``A`` the
    advantage.

    Attributes:
        loss_type: how per-token losses are aggregated (TRL's normalisers):

            - ``"grpo"``, ``"sapo"``: mean over sequences of the per-sequence token mean,
              ``/ GA``;
            - ``"bnpo"``: sum over tokens ``/ mask.sum()``, ``/ GA``;
            - ``"dr_grpo"``: sum ``/ (B * max_completion_length)``, ``/ GA``;
            - ``"dapo"``, ``"cispo"``, ``"vespo"``: sum ``/ (num_items_in_batch /
              num_processes * GA / steps_per_generation)``, i.e. by the active-token
              count of the accumulation window;
            - ``"luspo"``: mean over sequences of the per-sequence token sum, ``/ GA``.

            ``grpo``/``bnpo``/``dr_grpo``/``dapo``/``luspo`` use the PPO clipped surrogate
            ``-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)``; ``cispo`` uses
            ``-min(r, epsilon_high).detach() * A * logps``; ``sapo`` the soft gate
            ``-sigmoid(tau (r - 1)) * 4 / tau * A``; ``vespo`` (VESPO) the REINFORCE term
            ``-phi(w) * A * logps`` weighted by a detached Gamma function of the
            *sequence* ratio ``w = exp(sum_t log r_t)`` (see ``vespo_k_pos``).
        epsilon: lower clip, ``1 - epsilon``.
        epsilon_high: upper clip ``1 + epsilon_high`` (None: ``epsilon``); for ``cispo``
            the cap on the ratio itself (TRL's default is then ``epsilon``, 0.2; MiniMax
            and ScaleRL use about 5).
        delta: two-sided clipping (INTELLECT-2): the unclipped ratio is capped at
            ``delta``. Clipped-surrogate loss types only.
        beta: weight of the per-token KL penalty ``beta * KL`` added to the loss; >= 0
            (a negative one would reward divergence).
        kl_estimator: ``"k3"`` (TRL: ``exp(ref - logp) - (ref - logp) - 1``), ``"k2"``
            (``(logp - ref)^2 / 2``) or ``"k1"`` (``logp - ref``).
        use_bias_correction_kl: multiply the KL by the (differentiable) importance ratio,
            as TRL does by default (DeepSeek-V3.2's unbiased KL gradient).
        importance_sampling_level: ``"token"`` (a ratio per token) or ``"sequence"``
            (GSPO: ``exp`` of the masked mean of the token log-ratios, per sequence).
        max_completion_length: the constant of ``dr_grpo`` (required by it).
        gradient_accumulation_steps: micro-batches per optimizer step. TRL divides every
            loss by it in training (``dapo``/``cispo`` through their normaliser). 1
            reproduces TRL's evaluation loss.
        steps_per_generation: micro-batches a generation batch is split into (TRL's
            ``steps_per_generation``; None: ``gradient_accumulation_steps``). 1 for TRL's
            evaluation loss.
        num_processes: data-parallel processes ``num_items_in_batch`` was summed over.
        sapo_temperature_pos, sapo_temperature_neg: ``sapo`` temperatures for tokens with
            positive and non-positive advantages.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: ``vespo``'s Gamma
            weight ``phi(w) = e^lambda * w^k * e^(-lambda w)`` (``phi(1) = 1``), with
            ``(k, lambda)`` the ``_pos`` pair for sequences with ``A >= 0`` and the ``_neg``
            pair otherwise (TRL 1.16 ``GRPOTrainer.get_gamma_weights``; defaults 2, 3, 3,
            2). ``k`` sets how fast ``phi`` falls for ``w < 1``, ``lambda`` for ``w > 1``;
            TRL clamps ``lambda`` to at least ``1e-4``.
        entropy_coef: entropy bonus: ``loss -= entropy_coef * mean_masked(entropy) / GA``.
            TRL's adaptive controller is stateful: pass its current coefficient.
        top_entropy_quantile: keep only tokens whose entropy is at or above this upper
            quantile of the batch's masked entropies (``torch.quantile``; "Beyond the
            80/20 rule"); 1.0 keeps all tokens.
        sampling_correction: importance-sampling correction ``pi_old / pi_sampler`` applied
            to the policy term when the sampler's log-probs are given: ``"token_truncate"``,
            ``"token_mask"``, ``"sequence_truncate"``, ``"sequence_mask"`` (TRL's
            ``vllm_importance_sampling_mode``), or None for none.
        sampling_clip_min, sampling_clip_max: bounds of the correction: truncate modes
            clamp to them, mask modes zero the ratios outside them.
        off_policy_mask_threshold: DeepSeek-V3.2's off-policy sequence mask: drop
            sequences with a negative advantage whose mean ``log pi_sampler - log pi``
            exceeds it (the sampler's log-probs if given, else the old policy's).
    """

    loss_type: str = _choice("dapo", LOSS_TYPES)
    epsilon: float = _number(0.2, low=0.0)
    epsilon_high: float | None = _number(None, low=0.0, optional=True)
    delta: float | None = _number(None, low=0.0, low_open=True, optional=True)
    beta: float = _number(0.0, low=0.0)
    kl_estimator: str = _choice("k3", KL_ESTIMATORS)
    use_bias_correction_kl: bool = _flag(True)
    importance_sampling_level: str = _choice("token", LEVELS)
    max_completion_length: int | None = _number(None, low=1, integer=True, optional=True)
    gradient_accumulation_steps: int = _number(1, low=1, integer=True)
    steps_per_generation: int | None = _number(None, low=1, integer=True, optional=True)
    num_processes: int = _number(1, low=1, integer=True)
    sapo_temperature_pos: float = _number(1.0, low=0.0, low_open=True)
    sapo_temperature_neg: float = _number(1.05, low=0.0, low_open=True)
    vespo_k_pos: float = _number(2.0, low=0.0)
    vespo_lambda_pos: float = _number(3.0, low=0.0)
    vespo_k_neg: float = _number(3.0, low=0.0)
    vespo_lambda_neg: float = _number(2.0, low=0.0)
    entropy_coef: float = _number(0.0)
    top_entropy_quantile: float = _number(1.0, low=0.0, high=1.0)
    sampling_correction: str | None = _choice("sequence_mask", SAMPLING_CORRECTIONS, optional=True)
    sampling_clip_min: float | None = _number(None, optional=True)
    sampling_clip_max: float | None = _number(3.0, optional=True)
    off_policy_mask_threshold: float | None = _number(None, optional=True)

    # ---- building

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PolicyLossOptions:
        """The options among `values` (e.g. parsed command-line values, or a function's
        ``locals()``); every other key is ignored, every missing option is its default."""
        return cls(**{name: values[name] for name in cls.names() if name in values})

    # ---- derived values

    @property
    def upper_epsilon(self) -> float:
        """``epsilon_high``, or ``epsilon`` when it is None."""
        return float(self.epsilon if self.epsilon_high is None else self.epsilon_high)

    @property
    def generation_steps(self) -> int:
        """``steps_per_generation``, or ``gradient_accumulation_steps`` when it is None."""
        spg = self.steps_per_generation
        return self.gradient_accumulation_steps if spg is None else spg

    def kernel_params(self) -> dict[str, Any]:
        """The per-token formula's options as plain values, keyed as the fields of
        `fastrl.kernels.policy_loss.TokenTermParams` (the kernels import nothing from here)."""
        return dict(
            loss_type=self.loss_type,
            epsilon_low=float(self.epsilon),
            epsilon_high=self.upper_epsilon,
            delta=None if self.delta is None else float(self.delta),
            kl_estimator=self.kl_estimator,
            kl_times_ratio=bool(self.use_bias_correction_kl),
            sapo_temperature_pos=float(self.sapo_temperature_pos),
            sapo_temperature_neg=float(self.sapo_temperature_neg),
        )

    # ---- validation

    def validate(
        self,
        *,
        number: Callable[..., None] = _check_number,
        choice: Callable[[str, Any, tuple], None] = check_choice,
        setting: Callable[[str, Any], str] = _python_setting,
    ) -> None:
        """Raise on a bad option or combination, naming the options and values involved:
        each field's own check, then the tables `NEEDS` (between options), `APPLIES_TO` and
        `ORDERED`.

        The messages name options as the Python API does (``beta=0.1``). A caller that names
        them otherwise (command-line flags) passes its own ``number(name, value, *, low,
        high, low_open, integer, optional)``, ``choice(name, value, choices)``
        and ``setting(name, value) -> str`` (how a message shows an option with its value).

        Raises:
            ValueError: a value out of range or not among the choices; a combination the
                tables refuse.
            TypeError: (with the default checks) a number option that is not a real
                number, or not an int where integral.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            if "choices" in f.metadata:
                if not (value is None and f.metadata["optional"]):
                    choice(f.name, value, f.metadata["choices"])
            elif "number" in f.metadata:
                number(f.name, value, **f.metadata["number"])
            elif f.metadata.get("flag"):
                check_bool(f.name, value)
        show = lambda name: setting(name, getattr(self, name))
        for rule in self._active_needs():
            if rule.needs[0] not in INPUTS and all(getattr(self, n) is None for n in rule.needs):
                raise ValueError(rule.message(show))
        defaults = {f.name: f.default for f in fields(self)}
        for rule in APPLIES_TO:
            value = getattr(self, rule.option)
            if value != defaults[rule.option] and self.loss_type not in rule.loss_types:
                raise ValueError(
                    f"{show(rule.option)} {rule.what}, which {show('loss_type')} does not have "
                    f"(it applies to {', '.join(rule.loss_types)})"
                )
        for low, high in ORDERED:
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and a >= b:
                raise ValueError(f"{show(low)} must be less than {show(high)}")

    def check_inputs(
        self,
        *,
        num_items_in_batch: bool,
        ref_logps: bool,
        entropy: bool,
        sampling_logps: bool = False,
    ) -> None:
        """The rules of `NEEDS` on the arguments that are not options (`INPUTS`), each given
        as whether it was passed (not None): checked next to the tensors, after `validate`.
        With ``sampling_logps``, also `check_sampling_correction`.

        Raises:
            ValueError: e.g. ``beta != 0`` without ``ref_logps``.
        """
        given = dict(num_items_in_batch=num_items_in_batch, ref_logps=ref_logps, entropy=entropy)
        show = lambda name: _python_setting(name, getattr(self, name))
        for rule in self._active_needs():
            if rule.needs[0] in INPUTS and not any(given[n] for n in rule.needs):
                raise ValueError(rule.message(show))
        if sampling_logps:
            self.check_sampling_correction()

    def check_sampling_correction(
        self, setting: Callable[[str, Any], str] = _python_setting
    ) -> None:
        """The sampler correction that runs (the sampler's log-probs are given) suits the
        loss type: ``vespo`` folds token ratios into its sequence weight and has no use for
        a sequence-level one (TRL 1.16 refuses it at ``GRPOTrainer.__init__``).

        Raises:
            ValueError: ``loss_type='vespo'`` with a ``sequence_*`` correction.
        """
        mode = self.sampling_correction
        if self.loss_type == "vespo" and mode not in (None, *VESPO_SAMPLING_CORRECTIONS):
            raise ValueError(
                f"{setting('loss_type', self.loss_type)} folds the sampler's per-token "
                "importance ratios into its sequence weight: it needs "
                f"{setting('sampling_correction', 'token_truncate')} or 'token_mask' (or None), "
                f"got {setting('sampling_correction', mode)}"
            )

    def _active_needs(self) -> Iterator[Needs]:
        """The rules of `NEEDS` whose option is at a value that needs something."""
        for rule in NEEDS:
            value = getattr(self, rule.option)
            default = getattr(type(self), rule.option)  # the field's default
            if (value in rule.when) if rule.when is not None else (value != default):
                yield rule


#: the defaults, for the signatures that repeat the options as keyword arguments
DEFAULTS = PolicyLossOptions()
