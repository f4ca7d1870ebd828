"""The tensors of `preference_loss` and their checks against the options asked for."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from fastrl.checks import check_tensor, check_values
from fastrl.options.preference import (
    AVERAGED_LOSS_TYPES,
    CPO_LOSS_TYPES,
    LENGTH_NORMALISED_LOSS_TYPES,
    PreferenceLossOptions,
)

__all__ = ["PreferenceInputs", "check_vector"]


def check_vector(name: str, x, B: int | None = None, *, floating=True, like="chosen_logps"):
    """A 1-D tensor (``[B]``, the shape of `like`, when `B` is given); floating, or real
    (integer allowed)."""
    check_tensor(name, x, floating=floating)
    if not floating and x.dtype == torch.bool:  # (check_tensor refuses complex dtypes)
        raise TypeError(f"{name} must be a real (integer or float) tensor, got dtype {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(x.shape)}")
    if B is not None and x.shape[0] != B:
        raise ValueError(f"{name} must have shape [B]=({B},) like {like}, got {tuple(x.shape)}")


_WPO = ("chosen_aligned_logps", "rejected_aligned_logps")
_TAILS = ("chosen_tail_logps", "rejected_tail_logps")
_REF_TAILS = ("ref_chosen_tail_logps", "ref_rejected_tail_logps")


@dataclass(frozen=True)
class PreferenceInputs:
    """The per-pair tensors of `preference_loss` (its docstring defines each), ``[B]``
    each but ``nll`` (0-d)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    chosen_tail_logps: torch.Tensor | None = None
    rejected_tail_logps: torch.Tensor | None = None
    ref_chosen_tail_logps: torch.Tensor | None = None
    ref_rejected_tail_logps: torch.Tensor | None = None
    chosen_aligned_logps: torch.Tensor | None = None
    rejected_aligned_logps: torch.Tensor | None = None

    @classmethod
    def from_mapping(cls, values) -> PreferenceInputs:
        """The inputs among `values` (a function's arguments, by name)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logps is not None

    def check(self, o: PreferenceLossOptions) -> None:
        """Every tensor against the (validated, resolved) options: shapes, and what each
        option needs or refuses; messages name the argument and the value it got."""
        self._check_pairs(o)
        B = self.chosen_logps.shape[0]
        self._check_needed(
            _WPO,
            o.use_weighting,
            B,
            missing="use_weighting=True (WPO) needs {} (got None)",
            refused="for WPO weighting: it needs use_weighting=True",
        )
        ld = o.ld_alpha is not None
        # no reference log-probs: no reference tails either (the loss runs without them)
        tails = _TAILS + (_REF_TAILS if self.has_reference or not ld else ())
        self._check_needed(
            tails,
            ld,
            B,
            missing=f"ld_alpha={o.ld_alpha!r} needs {{}} (see ld_tail_logps)",
            refused="for LD-DPO: it needs ld_alpha (got None)",
        )
        if ld and not self.has_reference:
            for name in _REF_TAILS:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} was given without ref_chosen/rejected_logps")
        self._check_nll(o)
        self._check_lengths(o, B)

    def _check_pairs(self, o: PreferenceLossOptions) -> None:
        check_vector("chosen_logps", self.chosen_logps)
        check_vector("rejected_logps", self.rejected_logps)
        B = self.chosen_logps.shape[0]
        if self.rejected_logps.shape[0] != B:
            raise ValueError(
                "chosen_logps and rejected_logps hold the two completions of each pair and "
                f"must have the same shape [B], got {tuple(self.chosen_logps.shape)} and "
                f"{tuple(self.rejected_logps.shape)}"
            )
        if B == 0:
            raise ValueError("chosen_logps must hold at least one pair, got shape (0,)")
        if (self.ref_chosen_logps is None) != (self.ref_rejected_logps is None):
            given = "ref_chosen_logps" if self.ref_rejected_logps is None else "ref_rejected_logps"
            raise ValueError(f"{given} was given without its pair: pass both reference log-probs")
        if self.has_reference:
            if o.reference_free:
                raise ValueError(
                    f"loss_type={o.loss_type[0]!r} is reference-free and does not use "
                    "ref_chosen_logps/ref_rejected_logps: pass None"
                )
            check_vector("ref_chosen_logps", self.ref_chosen_logps, B)
            check_vector("ref_rejected_logps", self.ref_rejected_logps, B)
        elif not o.reference_free and o.loss_type != ["sft"]:
            raise ValueError(
                f"loss_type={o.loss_type_repr} needs the reference log-probs: ref_chosen_logps and "
                "ref_rejected_logps are None"
            )

    def _check_needed(self, names, needed: bool, B: int, *, missing: str, refused: str):
        """Tensors that an option needs (`missing` names the first absent one) and that
        are refused without it (``"{name} is " + refused``)."""
        for name in names:
            x = getattr(self, name)
            if not needed:
                if x is not None:
                    raise ValueError(f"{name} is {refused}")
            elif x is None:
                raise ValueError(missing.format(name))
            else:
                check_vector(name, x, B)

    def _check_nll(self, o: PreferenceLossOptions) -> None:
        nll = self.nll
        if nll is None:
            return
        if not o.has_nll:
            cpo = o.loss_type[0] in CPO_LOSS_TYPES
            raise ValueError(
                f"nll is for loss types with an NLL term (sft, orpo, the CPO family with "
                f"cpo_alpha != 0), got loss_type={o.loss_type_repr}"
                + (f" with cpo_alpha={o.cpo_alpha!r}" if cpo else "")
            )
        if not isinstance(nll, torch.Tensor) or not nll.is_floating_point():
            raise TypeError(f"nll must be a floating-point tensor, got {nll!r:.80}")
        if nll.numel() != 1:
            raise ValueError(
                f"nll must be a 0-d (one-element) tensor, got shape {tuple(nll.shape)}"
            )

    def _check_lengths(self, o: PreferenceLossOptions, B: int) -> None:
        """The completion-token counts where an option needs them."""
        both = [
            f"loss_type={t!r}"
            for t in o.loss_type
            if t in LENGTH_NORMALISED_LOSS_TYPES or t in AVERAGED_LOSS_TYPES
        ]
        if o.use_weighting:
            both.append("use_weighting=True")
        if o.rdpo_alpha != 0:
            both.append(f"rdpo_alpha={o.rdpo_alpha!r}")
        chosen = []
        if o.has_nll and self.nll is None:
            chosen.append(f"the NLL term of loss_type={o.loss_type_repr} (or pass nll)")
        for name, needs in (("chosen_lengths", both + chosen), ("rejected_lengths", both)):
            x = getattr(self, name)
            if x is None:
                if needs:
                    raise ValueError(
                        f"{needs[0]} needs {name} (the completion-token counts), got None"
                    )
                continue
            _check_counts(name, x, B)


def _check_counts(name: str, x: torch.Tensor, B: int) -> None:
    check_vector(name, x, B, floating=False)
    bad = x < 0
    msg = f"{name} must be token counts >= 0"
    check_values(bad, msg, lambda: f"{msg}, got value {x[bad][0].item()!r}")
