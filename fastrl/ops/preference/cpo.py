"""The CPO family (TRL 1.16's ``CPOTrainer``), reference-free.

With rewards ``u = logp`` (``alpha != 0``: AlphaPO's ``(1 - p^-alpha) / alpha``) and
``h = u_c - u_r``, each pair's loss is

- ``"cpo"``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, eps =
  ``label_smoothing``;
- ``"simpo"``, ``"alphapo"``: the same with ``h - simpo_gamma / beta`` on length-averaged
  log-probs (``alphapo`` is TRL's SimPO with ``cpo_alpha`` 0);
- ``"cpo_hinge"``: ``relu(1 - beta h)``;
- ``"cpo_ipo"``: ``(h - 1 / (2 beta))^2`` on length-averaged log-probs;

and the loss is their mean plus ``cpo_alpha`` times the NLL of the chosen completions.
"""

from __future__ import annotations

import torch

from fastrl.ops.preference.dpo import smoothed_logsigmoid
from fastrl.options.preference import PreferenceLossOptions

__all__ = ["cpo_loss"]


def cpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, nll: torch.Tensor | None, o: PreferenceLossOptions
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """``CPOTrainer.cpo_loss + cpo_alpha * NLL`` on ``[B]`` log-probs (averaged for the
    averaged types), with resolved options; ``nll`` None only when ``cpo_alpha`` is 0.

    Returns ``(loss, (chosen_rewards, rejected_rewards), {"nll_loss": ...})``.
    """
    loss_type, beta = o.loss_type[0], o.beta
    if o.alpha != 0:  # AlphaPO's reward (1 - p^-alpha) / alpha
        chosen_rewards = (1 - torch.exp(-o.alpha * chosen)) / o.alpha
        rejected_rewards = (1 - torch.exp(-o.alpha * rejected)) / o.alpha
    else:
        chosen_rewards, rejected_rewards = chosen, rejected
    logits = chosen_rewards - rejected_rewards
    if loss_type in ("cpo", "simpo", "alphapo"):
        if loss_type != "cpo":
            logits = logits - o.simpo_gamma / beta
        losses = smoothed_logsigmoid(beta * logits, o.label_smoothing)
    elif loss_type == "cpo_hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # cpo_ipo
        losses = (logits - 1 / (2 * beta)) ** 2
    if o.cpo_alpha == 0:
        nll = torch.zeros((), dtype=chosen.dtype, device=chosen.device)
    loss = losses.mean() + o.cpo_alpha * nll
    rewards = (beta * chosen_rewards.detach(), beta * rejected_rewards.detach())
    return loss, rewards, {"nll_loss": nll.detach()}
