"""ORPO (TRL 1.16's ``ORPOTrainer``), reference-free, on length-averaged log-probs.

``loss = nll - beta * mean(log sigmoid(log odds ratio))`` with ``odds(y) = p / (1 - p)``,
``p = exp(mean token log-prob)``; ``beta`` is ORPO's lambda (>= 0: 0 leaves the NLL alone).
The rewards are ``beta * mean log-prob``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastrl.options.preference import PreferenceLossOptions

__all__ = ["orpo_loss"]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, nll: torch.Tensor, o: PreferenceLossOptions
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """ORPO on ``[B]`` mean token log-probs and the 0-d NLL term, with resolved options.

    Returns ``(loss, (chosen_rewards, rejected_rewards), metrics)``: ``nll_loss``,
    ``log_odds_ratio`` (mean log sigmoid of the log odds ratio), ``log_odds_chosen``.
    """
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    loss = nll - (o.beta * ratio).mean()
    metrics = {
        "nll_loss": nll.detach(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
    }
    return loss, (o.beta * chosen.detach(), o.beta * rejected.detach()), metrics
