"""Critic-free per-token advantages: REINFORCE++, REINFORCE++-baseline and ReMax.

With OpenRLHF's semantics (openrlhf/trainer/ppo_utils/experience_maker.py,
``RemoteExperienceMaker.compute_advantages_and_returns`` with ``estimator="reinforce"`` /
``"reinforce_baseline"``, and openrlhf/models/utils.py ``compute_reward``) and verl's
(verl/trainer/ppo/core_algos.py ``compute_reinforce_plus_plus_outcome_advantage``,
``compute_reinforce_plus_plus_baseline_outcome_advantage``,
``compute_remax_outcome_advantage``):

- `kl_shaped_rewards`: the KL folded into a per-token reward, ``r_t = -kl_coef * kl_t``,
  plus the sequence's reward at its last unmasked token (``compute_reward``);
- `discounted_returns`: returns-to-go ``G_t = r_t + gamma * G_{t+1}``
  (``get_cumulative_returns``; masked tokens carry reward 0 and still discount, as
  OpenRLHF's; rows that are one run of tokens, as verl assumes, are unaffected);
- `reinforce_plus_plus_advantages`: those returns whitened over the whole batch
  (`masked_whiten`), after a group-mean baseline on the rewards for the ``-baseline``
  variant (gamma 1 there, as OpenRLHF forces it);
- `remax_advantages`: ReMax's returns minus the reward of a greedy completion of the same
  prompt (``compute_remax_outcome_advantage``).

Every output is ``[B, T]``, detached, 0 at masked positions (OpenRLHF and verl leave
values there that their losses mask out).
"""

from __future__ import annotations

import torch

from fastrl.checks import check_choice, check_number
from fastrl.ops.advantages.gae import use_gae_kernel
from fastrl.ops.advantages.tokens import (
    check_discount,
    check_sequence_values,
    check_token_batch,
    keep_and_dtype,
    masked,
    masked_whiten,
)
from fastrl.options import advantages as defaults
from fastrl.options.advantages import REINFORCE_BASELINES

__all__ = [
    "discounted_returns",
    "kl_shaped_rewards",
    "reinforce_plus_plus_advantages",
    "remax_advantages",
]


def _last_token(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index of each row's last unmasked token [B, 1], whether it has one [B])``."""
    T = keep.shape[1]
    last = T - 1 - keep.to(torch.int8).flip(1).argmax(dim=1, keepdim=True)
    return last, keep.any(dim=1)


def kl_shaped_rewards(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token rewards ``[B, T]``: ``-kl_coef * kl`` at every unmasked token, plus
    ``rewards[b]`` at row b's last unmasked token (OpenRLHF ``compute_reward``; an empty
    row gets none).

    Args:
        rewards: ``[B]`` float, one reward per sequence.
        mask: ``[B, T]`` bool or 0/1, the completion tokens.
        kl: ``[B, T]`` per-token KL estimate to the reference (e.g. ``logps - ref_logps``,
            OpenRLHF's ``compute_approx_kl``); needed when ``kl_coef != 0``.
        kl_coef: >= 0 (OpenRLHF's ``init_kl_coef``, its KL controller's current value).

    Raises:
        ValueError: shapes, a mask not 0/1, a negative ``kl_coef``, ``kl_coef != 0``
            without ``kl``. TypeError: non-float tensors.
    """
    B, _ = check_token_batch(mask, kl=kl)
    check_sequence_values("rewards", rewards, B)
    check_number("kl_coef", kl_coef, low=0.0)
    if kl_coef != 0 and kl is None:
        raise ValueError(f"kl_coef={kl_coef!r} needs kl (the per-token KL it weighs); got None")
    keep, dtype = keep_and_dtype(mask, rewards, *(() if kl is None else (kl,)))
    out = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    if kl is not None and kl_coef != 0:
        out = out - kl_coef * masked(kl, keep, dtype)
    if keep.shape[1] == 0:  # no tokens: nowhere to put a reward
        return out
    last, has = _last_token(keep)
    r = torch.where(has, rewards.detach().to(dtype), 0.0)
    return out.scatter_add(1, last, r[:, None])


def discounted_returns(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = defaults.GAMMA,
    impl: str = "auto",
) -> torch.Tensor:
    """Returns-to-go ``G_t = r_t + gamma * G_{t+1}`` ``[B, T]`` of per-token rewards
    (OpenRLHF ``get_cumulative_returns``: masked tokens carry reward 0 and still
    discount); 0 at masked positions.

    ``impl``: "auto" (for ``gamma < 1``, the GAE scan kernel on CUDA, else PyTorch),
    "triton" or "torch" (a loop over tokens for ``gamma < 1``).

    Raises:
        ValueError: shapes, a mask not 0/1, ``gamma`` outside [0, 1], as `gae_advantages`
            for ``impl``.
    """
    check_token_batch(mask, token_rewards=token_rewards)
    check_discount(gamma)
    keep, dtype = keep_and_dtype(mask, token_rewards)
    r = masked(token_rewards, keep, dtype)
    kernel = use_gae_kernel(impl, r, dtype)  # checks impl whatever gamma is
    if gamma == 1:  # a reversed cumulative sum (verl's ReMax returns)
        g = r.flip(1).cumsum(1).flip(1)
    elif kernel:
        from fastrl.kernels.gae import gae_fwd

        # GAE's recurrence with values 0 and lambda 1 is this one; every token kept, so
        # that masked tokens (reward 0 here) still discount, as OpenRLHF's
        g = gae_fwd(r, torch.zeros_like(r), torch.ones_like(keep), float(gamma), 1.0)[0]
        g = g.to(dtype)
    else:
        g = torch.zeros_like(r)
        running = r.new_zeros(r.shape[0])
        for t in range(r.shape[1] - 1, -1, -1):
            running = r[:, t] + gamma * running
            g[:, t] = running
    return torch.where(keep, g, 0.0)


def reinforce_plus_plus_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = defaults.GAMMA,
    baseline: str = "none",
    group_size: int | None = None,
    normalize_std: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (``baseline="none"``) and REINFORCE++-baseline (``"mean"``) advantages
    of a generation batch, as OpenRLHF's ``estimator="reinforce"`` /
    ``"reinforce_baseline"``:

    1. ``"mean"``: each reward minus the mean reward of its group of ``group_size``
       completions (prompt-major groups, as `group_advantages`);
    2. per-token rewards, `kl_shaped_rewards` (the KL folded in);
    3. returns, `discounted_returns` with ``gamma``;
    4. advantages: the returns whitened over every unmasked token of the batch,
       `masked_whiten` (``normalize_std=False``: centred only, OpenRLHF's
       ``no_std_norm``).

    With ``kl_coef=0`` and ``gamma=1`` these are verl's
    ``compute_reinforce_plus_plus_(baseline_)outcome_advantage`` up to its whitening's
    roundings (Bessel, eps); verl leaves a single-completion group's reward uncentred,
    OpenRLHF (and fastrl) centre it to 0.

    Args:
        rewards: ``[B]`` float sequence rewards; mask: ``[B, T]`` bool or 0/1.
        kl, kl_coef: as `kl_shaped_rewards`.
        gamma: discount in [0, 1]; must be 1 with ``baseline="mean"`` (OpenRLHF resets
            it to 1 for the baseline estimators).
        baseline: ``"none"`` or ``"mean"``; group_size: completions per prompt, needed by
            ``"mean"`` (and must divide B).

    Returns:
        ``(advantages, returns)``: ``[B, T]`` float32 (float64 for float64 inputs),
        detached, 0 at masked positions.

    Raises:
        ValueError: bad shapes, mask, ``gamma``, ``kl_coef``; unknown ``baseline``;
            ``"mean"`` without a ``group_size`` dividing B, or with ``gamma != 1``;
            ``group_size`` with ``baseline="none"``.
        TypeError: non-float tensors, a non-bool ``normalize_std``.
    """
    B, _ = check_token_batch(mask, kl=kl)
    check_sequence_values("rewards", rewards, B)
    check_choice("baseline", baseline, REINFORCE_BASELINES)
    check_discount(gamma)
    if not isinstance(normalize_std, bool):
        raise TypeError(f"normalize_std must be a bool, got {normalize_std!r}")
    r = rewards.detach()
    if baseline == "mean":
        if group_size is None:
            raise ValueError("baseline='mean' needs group_size (completions per prompt); got None")
        check_number("group_size", group_size, low=1, integer=True)
        if B % group_size:
            raise ValueError(f"rewards has B={B} rows, not a multiple of group_size={group_size}")
        if gamma != 1:
            raise ValueError(
                f"baseline='mean' needs gamma=1 (OpenRLHF's REINFORCE++-baseline is "
                f"undiscounted: a group-mean baseline on the return), got gamma={gamma!r}"
            )
        g = r.to(keep_and_dtype(mask, rewards)[1]).view(-1, group_size)
        r = (g - g.mean(dim=1, keepdim=True)).view(B)
    elif group_size is not None:
        raise ValueError(
            f"group_size={group_size!r} is only read by baseline='mean'; got baseline='none'"
        )
    token_rewards = kl_shaped_rewards(r, mask, kl=kl, kl_coef=kl_coef)
    returns = discounted_returns(token_rewards, mask, gamma=gamma)
    return masked_whiten(returns, mask, normalize_std=normalize_std), returns


def remax_advantages(
    rewards: torch.Tensor, baseline_rewards: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax (arXiv 2310.10505) advantages, as verl's ``compute_remax_outcome_advantage``:
    the undiscounted return of each token (the sequence reward, placed at its last
    unmasked token) minus ``baseline_rewards``, the reward of a greedy completion of the
    same prompt.

    Args:
        rewards: ``[B]`` float rewards of the sampled completions.
        baseline_rewards: ``[B]`` float rewards of the greedy completion of each row's
            prompt (repeat it for the rows of a group).
        mask: ``[B, T]`` bool or 0/1.

    Returns:
        ``(advantages, returns)``: ``[B, T]``, 0 at masked positions; ``returns[b, t] =
        rewards[b]`` at every unmasked token.

    Raises:
        ValueError: shapes, a mask not 0/1. TypeError: non-float tensors.
    """
    B, _ = check_token_batch(mask)
    check_sequence_values("rewards", rewards, B)
    check_sequence_values("baseline_rewards", baseline_rewards, B)
    keep, dtype = keep_and_dtype(mask, rewards, baseline_rewards)
    returns = discounted_returns(kl_shaped_rewards(rewards, mask), mask, gamma=1.0)
    base = baseline_rewards.detach().to(dtype)[:, None]
    return torch.where(keep, returns - base, 0.0), returns
