"""Generalized Advantage Estimation (PPO's advantages from a value model), per token.

`gae_advantages` turns per-token rewards and the value model's per-token values into
advantages and returns with the semantics of verl's ``compute_gae_advantage_return``
(verl/trainer/ppo/core_algos.py) and OpenRLHF's
``RemoteExperienceMaker.get_advantages_and_returns``, which agree wherever each row's
mask is one run of tokens (left or right padding):

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    returns_t = A_t + V_t,   V and A past the row's last unmasked token = 0.

A masked token inside a row (a tool observation) is skipped as verl skips it: ``t + 1`` is
the next *unmasked* token, so the hole neither ends nor discounts the chain (OpenRLHF
would treat it as a step with reward and value 0). Unlike verl, the advantages come back
unwhitened, as OpenRLHF's do before its batch normalisation: `masked_whiten` does that
step (``normalize_std`` as OpenRLHF's ``no_std_norm``), so the returns stay ``A + V``.

`_gae_torch` is the PyTorch path (a loop over the T tokens, vectorised over rows);
kernels/gae.py is the Triton path, one reverse scan per row in a single pass over memory.
"""

from __future__ import annotations

import torch

from fastrl.checks import check_impl
from fastrl.ops.advantages.tokens import check_discount, check_token_batch, keep_and_dtype, masked
from fastrl.options import advantages as defaults

__all__ = ["gae_advantages"]


def _gae_torch(
    r: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r, v ``[B, T]`` compute dtype, 0 where masked; keep bool ``[B, T]``."""
    B, T = r.shape
    adv = torch.zeros_like(r)
    y = r.new_zeros(B)  # the value of the next unmasked token (0 past the last one)
    a = r.new_zeros(B)  # its advantage
    for t in range(T - 1, -1, -1):
        m = keep[:, t]
        a_t = r[:, t] - v[:, t] + gamma * y + gamma * lam * a
        a = torch.where(m, a_t, a)  # a masked token passes the state on unchanged
        y = torch.where(m, v[:, t], y)
        adv[:, t] = torch.where(m, a_t, 0.0)
    return adv, torch.where(keep, adv + v, 0.0)


def use_gae_kernel(impl: str, rewards: torch.Tensor, dtype: torch.dtype) -> bool:
    check_impl(impl, device=rewards.device)
    if impl == "torch":
        return False
    if impl == "auto":
        return rewards.is_cuda and dtype != torch.float64
    if dtype == torch.float64:
        raise ValueError(
            "impl='triton' does not cover float64 rewards/values (the kernel computes in "
            "float32); use impl='auto' or 'torch'"
        )
    return True


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = defaults.GAMMA,
    lam: float = defaults.LAM,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns per token (verl's ``compute_gae_advantage_return``
    without its whitening; see the module docstring for the recurrence).

    Args:
        rewards: ``[B, T]`` float, the per-token rewards (e.g. `kl_shaped_rewards`: the
            sequence reward at the last token, ``-kl_coef * KL`` at every token).
        values: ``[B, T]`` float, the value model's estimate at each token (TRL / verl /
            OpenRLHF's ``values``), treated as a constant.
        mask: ``[B, T]`` bool or 0/1, the tokens that are actions (``response_mask``);
            left or right padding, holes allowed (skipped), empty rows allowed.
        gamma: discount in [0, 1]. lam: GAE's lambda in [0, 1] (0: one-step TD,
            1: Monte-Carlo returns minus the value).
        impl: ``"auto"`` (the Triton kernel for CUDA tensors that are not float64, else
            PyTorch), ``"triton"`` or ``"torch"``.

    Returns:
        ``(advantages, returns)``: ``[B, T]`` float32 (float64 when either input is),
        detached, 0 at masked positions; ``returns = advantages + values``, the value
        loss's target.

    Raises:
        ValueError: shapes that differ or are not ``[B, T]``, a mask with values other
            than 0 and 1, ``gamma`` or ``lam`` outside [0, 1], unknown ``impl``,
            ``impl="triton"`` for float64 or where Triton cannot run.
        TypeError: a non-float ``rewards`` / ``values``, a non-number ``gamma``/``lam``.
    """
    check_token_batch(mask, rewards=rewards, values=values)
    check_discount(gamma, lam)
    keep, dtype = keep_and_dtype(mask, rewards, values)
    if use_gae_kernel(impl, rewards, dtype):
        from fastrl.kernels.gae import gae_fwd

        adv, ret = gae_fwd(rewards.detach(), values.detach(), mask, float(gamma), float(lam))
        return adv.to(dtype), ret.to(dtype)
    r, v = masked(rewards, keep, dtype), masked(values, keep, dtype)
    return _gae_torch(r, v, keep, float(gamma), float(lam))
