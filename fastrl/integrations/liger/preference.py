"""Liger-Kernel 0.8's paired preference modules on fastrl's fused head: DPO, CPO, SimPO,
ORPO.

Each has the constructor, ``forward(lin_weight, _input, target, ...)`` argument order,
defaults, reductions and return value of its ``liger_kernel.chunked_loss`` namesake
(0.8.5): ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
nll_loss, *aux))``. Rows are ``[chosen; rejected]``, positions whose target is
``ignore_index`` are not scored, and the loss is ``alpha * nll_loss`` plus the preference
term, computed by fastrl's `preference_loss` (TRL's formulas, which Liger's follow) on
sequence log-probs from `linear_logprobs`: no ``[2B, T, V]`` logits. The outputs after the
loss carry no gradient (Liger's do not either); the logit means are Liger's (over every
position and the whole vocabulary), computed from the head's column sums.

Refused with a ValueError where Liger ignores an option or fastrl lacks one:
``label_smoothing`` on DPO loss types that do not read it (Liger's ``sigmoid`` among them),
``discopop_tau`` off ``discopop``.
"""

from __future__ import annotations

import torch

from fastrl import linear_logprobs, preference_loss
from fastrl.checks import check_bool, check_impl, check_number
from fastrl.integrations.liger._common import (
    averaged,
    check_3d,
    check_perf_options,
    refuse_non_default,
    row_logits_sums,
    token_logps,
)

__all__ = [
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearSimPOLoss",
]

#: Liger 0.8.5's DPO loss types (all in fastrl, with TRL's formulas)
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
    "apo_down", "discopop",
)  # fmt: skip
_SMOOTHED = ("robust", "exo_pair")  # the Liger DPO types that read label_smoothing


class _PairedPreference(torch.nn.Module):
    """What the paired modules share: the log-prob pass, the NLL term, the reference, the
    logit metrics. Subclasses set `_average` and implement `_loss`."""

    def __init__(self, ignore_index, beta, compiled, chunk_size, impl):
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        check_number("beta", beta)
        check_perf_options(compiled, chunk_size)
        check_impl(impl)
        self.ignore_index, self.beta = ignore_index, beta
        self.compiled, self.chunk_size, self.impl = compiled, chunk_size, impl

    # ---- pieces

    def _nll(self, _input, weight, bias, tok, lengths, nll_target, B):
        """Liger's NLL term: the summed NLL of the chosen rows' targets (or `nll_target`'s
        first B rows) over their count."""
        if not self.compute_nll_loss:
            return torch.zeros((), device=_input.device)
        if nll_target is None:
            return -tok[:B].sum() / lengths[:B].sum().clamp(min=1)
        T = _input.shape[1]
        if not isinstance(nll_target, torch.Tensor) or nll_target.dim() != 2:
            raise ValueError(f"nll_target must be a [2B, T] tensor, got {nll_target!r}")
        if nll_target.shape[0] < B or nll_target.shape[1] != T:
            raise ValueError(
                f"nll_target must have shape [2B, T] (its first B={B} rows are the chosen "
                f"rows' NLL targets) with T={T}, got {tuple(nll_target.shape)}"
            )
        target = nll_target[:B]
        tok = linear_logprobs(
            _input[:B], weight, target, bias=bias, ignore_index=self.ignore_index, impl=self.impl
        )
        return -tok.sum() / (target != self.ignore_index).sum().clamp(min=1)

    def _reference(self, target, ref_input, ref_weight, ref_bias, weight, bias):
        """The reference model's sequence log-probs ``[2B]`` (summed or averaged like the
        policy's), without gradient."""
        if ref_input is None:
            raise ValueError("use_ref_model=True needs ref_input (the reference hidden states)")
        if ref_weight is None:  # a shared (frozen) lm_head, as with LoRA
            ref_weight, ref_bias = weight, bias
        check_3d("ref_input", ref_input, target, ref_weight)
        with torch.no_grad():
            _, seq, lengths = token_logps(
                ref_input, ref_weight, target, ref_bias, ignore_index=self.ignore_index,
                impl=self.impl,
            )  # fmt: skip
        return averaged(seq, lengths) if self._average else seq

    def _run(self, lin_weight, _input, target, bias, nll_target=None, ref=None):
        check_3d("_input", _input, target, lin_weight)
        if target.shape[0] % 2:
            raise ValueError(
                f"rows must be [chosen; rejected] pairs, got an odd row count {target.shape[0]}"
            )
        B, T = target.shape[0] // 2, target.shape[1]
        tok, seq, lengths = token_logps(
            _input, lin_weight, target, bias, ignore_index=self.ignore_index, impl=self.impl
        )
        nll = self._nll(_input, lin_weight, bias, tok, lengths, nll_target, B)
        ref_seq = None if ref is None else self._reference(target, *ref, lin_weight, bias)
        loss, shown, aux = self._loss(seq, lengths, nll, ref_seq, B)
        scale = B * T * lin_weight.shape[0]
        logits = row_logits_sums(_input, lin_weight, bias)  # [2B]
        chosen_mean, rejected_mean = logits[:B].sum() / scale, logits[B:].sum() / scale
        outputs = (shown[:B], shown[B:], chosen_mean, rejected_mean, nll, *aux)
        return loss.float(), tuple(x.detach().float() for x in outputs)

    def _loss(self, seq, lengths, nll, ref_seq, B):
        """``(loss, the sequence log-probs Liger returns [2B], aux outputs)``."""
        raise NotImplementedError


class LigerFusedLinearDPOLoss(_PairedPreference):
    """Fused linear layer with DPO loss (Liger-Kernel 0.8.5's module, fastrl's head).

    Args (Liger's): ignore_index, beta, alpha (weight of the NLL term), compute_nll_loss,
    compiled and chunk_size (Liger's scheduling, no effect here), use_ref_model (else the
    reference log-probs are 0), average_log_prob (mean instead of sum of the token
    log-probs), loss_type (Liger's: "sigmoid", "hinge", "exo_pair", "nca_pair", "robust",
    "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop"), label_smoothing
    ("robust", "exo_pair"), discopop_tau ("discopop"); impl: fastrl's head (keyword only).

    ``forward`` returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean,
    rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``, the rewards
    ``beta * (logp - ref_logp)`` ``[B]``.
    """

    _SUPPORTED_LOSS_TYPES = set(DPO_LOSS_TYPES)

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        impl: str = "auto",
    ):
        super().__init__(ignore_index, beta, compiled, chunk_size, impl)
        if loss_type not in self._SUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"Unsupported loss_type: {loss_type}. Supported types are: {DPO_LOSS_TYPES}"
            )
        if loss_type == "exo_pair" and label_smoothing <= 0.0:
            raise ValueError(
                "label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends "
                "1e-3."
            )
        if loss_type == "robust" and not (0.0 <= label_smoothing < 0.5):
            raise ValueError(
                f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got "
                f"{label_smoothing}."
            )
        if loss_type not in _SMOOTHED:
            refuse_non_default(
                "label_smoothing", label_smoothing, 0.0,
                f"Liger's loss_type={loss_type!r} ignores it (it applies to {_SMOOTHED})",
            )  # fmt: skip
        if loss_type != "discopop":
            refuse_non_default(
                "discopop_tau", discopop_tau, 0.05,
                f"it is for loss_type='discopop' only, got loss_type={loss_type!r}",
            )  # fmt: skip
        for name, flag in (
            ("compute_nll_loss", compute_nll_loss),
            ("use_ref_model", use_ref_model),
            ("average_log_prob", average_log_prob),
        ):
            check_bool(name, flag)
        check_number("alpha", alpha)
        self.alpha, self.compute_nll_loss = alpha, compute_nll_loss
        self.use_ref_model, self.average_log_prob = use_ref_model, average_log_prob
        self.loss_type, self.label_smoothing, self.discopop_tau = (
            loss_type,
            label_smoothing,
            discopop_tau,
        )

    @property
    def _average(self) -> bool:
        return self.average_log_prob

    def _loss(self, seq, lengths, nll, ref_seq, B):
        shown = averaged(seq, lengths) if self.average_log_prob else seq
        if ref_seq is None:  # Liger's reference log-probs without a reference model
            ref_seq = torch.zeros_like(shown)
        kw = {}
        if self.loss_type in _SMOOTHED:
            kw["label_smoothing"] = self.label_smoothing
        if self.loss_type == "discopop":
            kw["discopop_tau"] = self.discopop_tau
        loss, _ = preference_loss(
            shown[:B], shown[B:], ref_seq[:B], ref_seq[B:], loss_type=self.loss_type,
            beta=self.beta, **kw,
        )  # fmt: skip
        rewards = self.beta * (shown - ref_seq).detach()
        return loss + self.alpha * nll, shown, (rewards[:B], rewards[B:])

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``lin_weight [V, d]``, ``_input [2B, T, d]`` (``[chosen; rejected]``), ``target
        [2B, T]``, ``bias [V]``; the reference model's ``ref_input [2B, T, d]``,
        ``ref_weight [V, d]`` (default: this head, with ``bias``), ``ref_bias [V]``."""
        ref = (ref_input, ref_weight, ref_bias) if self.use_ref_model else None
        if ref is None and ref_input is not None:
            raise ValueError("ref_input was given with use_ref_model=False; set use_ref_model=True")
        return self._run(lin_weight, _input, target, bias, ref=ref)


class _ReferenceFree(_PairedPreference):
    """CPO, SimPO, ORPO: no reference model, an NLL term on the chosen rows."""

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``lin_weight [V, d]``, ``_input [2B, T, d]`` (``[chosen; rejected]``), ``target
        [2B, T]``, ``bias [V]``."""
        return self._run(lin_weight, _input, target, bias)


def _check_cpo_like(module, alpha, label_smoothing, compute_nll_loss):
    check_number("alpha", alpha)
    check_number("label_smoothing", label_smoothing, low=0.0)
    check_bool("compute_nll_loss", compute_nll_loss)
    module.alpha, module.label_smoothing = alpha, label_smoothing
    module.compute_nll_loss = compute_nll_loss


class LigerFusedLinearCPOLoss(_ReferenceFree):
    """Fused linear layer with CPO loss (Liger-Kernel 0.8.5's module, fastrl's head).

    Args (Liger's): ignore_index, beta, alpha (weight of the NLL term), label_smoothing,
    compute_nll_loss, compiled and chunk_size (no effect here), average_log_prob; impl.

    ``forward`` returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean,
    rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``, the rewards
    ``beta * logp`` ``[B]``.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        *,
        impl: str = "auto",
    ):
        super().__init__(ignore_index, beta, compiled, chunk_size, impl)
        _check_cpo_like(self, alpha, label_smoothing, compute_nll_loss)
        check_bool("average_log_prob", average_log_prob)
        self.average_log_prob = average_log_prob

    @property
    def _average(self) -> bool:
        return self.average_log_prob

    def _loss(self, seq, lengths, nll, ref_seq, B):
        shown = averaged(seq, lengths) if self.average_log_prob else seq
        # fastrl's "cpo" on the log-probs as Liger compares them; the NLL is Liger's, added
        loss, _ = preference_loss(
            shown[:B], shown[B:], loss_type="cpo", beta=self.beta,
            label_smoothing=self.label_smoothing, cpo_alpha=0.0,
        )  # fmt: skip
        rewards = self.beta * shown.detach()
        return loss + self.alpha * nll, shown, (rewards[:B], rewards[B:])


class LigerFusedLinearSimPOLoss(_ReferenceFree):
    """Fused linear layer with SimPO loss (Liger-Kernel 0.8.5's module, fastrl's head).

    Args (Liger's): ignore_index, beta, alpha (weight of the NLL term), label_smoothing,
    compute_nll_loss, compiled and chunk_size (no effect here), gamma (the target margin:
    ``beta * (avg_c - avg_r) - gamma``); impl. Log-probs are length-averaged.

    ``forward`` returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean,
    rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``.
    """

    _average = True

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
        *,
        impl: str = "auto",
    ):
        super().__init__(ignore_index, beta, compiled, chunk_size, impl)
        _check_cpo_like(self, alpha, label_smoothing, compute_nll_loss)
        check_number("gamma", gamma)
        self.gamma = gamma

    def _loss(self, seq, lengths, nll, ref_seq, B):
        # fastrl's simpo averages the summed log-probs itself; its margin is simpo_gamma /
        # beta on the log-prob difference, i.e. beta * (c - r) - simpo_gamma: Liger's gamma
        loss, _ = preference_loss(
            seq[:B], seq[B:], loss_type="simpo", beta=self.beta,
            label_smoothing=self.label_smoothing, simpo_gamma=self.gamma, cpo_alpha=0.0,
            chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        )  # fmt: skip
        shown = averaged(seq, lengths)
        rewards = self.beta * shown.detach()
        return loss + self.alpha * nll, shown, (rewards[:B], rewards[B:])


class LigerFusedLinearORPOLoss(_ReferenceFree):
    """Fused linear layer with ORPO loss (Liger-Kernel 0.8.5's module, fastrl's head).

    Args (Liger's): ignore_index, beta (ORPO's lambda), compute_nll_loss, compiled and
    chunk_size (no effect here); impl. Log-probs are length-averaged; the loss is ``nll -
    beta * mean(log sigmoid(log odds ratio))``.

    ``forward(lin_weight, _input, target, bias=None, nll_target=None)`` returns ``(loss,
    (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen))``; ``nll_target``
    ``[2B, T]`` (its first B rows) replaces the chosen targets in the NLL term (TRL scores
    the prompt too there).
    """

    _average = True

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
        *,
        impl: str = "auto",
    ):
        super().__init__(ignore_index, beta, compiled, chunk_size, impl)
        check_bool("compute_nll_loss", compute_nll_loss)
        self.compute_nll_loss = compute_nll_loss

    def _loss(self, seq, lengths, nll, ref_seq, B):
        loss, metrics = preference_loss(
            seq[:B], seq[B:], loss_type="orpo", beta=self.beta, nll=nll,
            chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        )  # fmt: skip
        shown = averaged(seq, lengths)
        rewards = self.beta * shown.detach()
        aux = (rewards[:B], rewards[B:], metrics["log_odds_ratio"], metrics["log_odds_chosen"])
        return loss, shown, aux

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        nll_target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return self._run(lin_weight, _input, target, bias, nll_target=nll_target)
