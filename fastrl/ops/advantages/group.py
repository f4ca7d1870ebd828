"""Group-relative advantages for GRPO-family RL: GRPO, Dr. GRPO, batch-scaled, RLOO, GDPO.

`group_advantages` turns the rewards of a generation batch into per-completion advantages
with the conventions of TRL 1.16 (`GRPOTrainer._generate_and_score_completions` and
`RLOOTrainer`), so a TRL user gets the same numbers:

- standard deviations are Bessel-corrected (unbiased, ``n - 1``), as TRL's ``nanstd``;
- ``eps`` (``1e-4`` in TRL) is added to the standard deviation, not to the variance;
- a NaN reward means "no reward" (a TRL reward function returning ``None``): it is left out
  of every mean and standard deviation; a completion whose rewards are all NaN gets 0;
- a group with a single completion, or whose rewards are all equal, gets 0 (exactly);
- the result never contains NaN.

The work is split so that a CUDA kernel can take over the whole computation
(`_group_advantages_torch` is the reference path; `_KERNEL`, the Triton launcher of
kernels/group_advantages.py, runs on CUDA tensors with ``impl="auto"`` for groups that fit
in one of its tiles).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from fastrl.checks import (
    check_choice,
    check_impl,
    check_number,
    check_tensor,
    check_values,
    compute_dtype,
)
from fastrl.options import advantages as defaults
from fastrl.options.advantages import AGGREGATIONS, BASELINES, SCALES

__all__ = ["group_advantages"]


def _group_advantages_triton(rewards, weights, group_size, baseline, scale, eps, normalize):
    # imported on first use: triton is only needed when the kernel runs
    from fastrl.kernels.group_advantages import group_advantages_fwd

    return group_advantages_fwd(rewards, weights, group_size, baseline, scale, eps, normalize)


# The Triton launcher, with the signature of `_group_advantages_torch` (None without triton).
_KERNEL = _group_advantages_triton if importlib.util.find_spec("triton") is not None else None


def _kernel_max_group_size() -> int:
    # a group lives in one tile of the kernel; read where the kernel is about to run
    from fastrl.kernels.group_advantages import MAX_GROUP_SIZE

    return MAX_GROUP_SIZE


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs; NaN where fewer than 2 values."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * count / (count - 1)  # count <= 1 gives inf or NaN
    std = torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))
    return std if keepdim else std.squeeze(dim)


def _constant(x: torch.Tensor, dim: int) -> torch.Tensor:
    """True where all non-NaN values along `dim` are equal (and at least one exists)."""
    nan = torch.isnan(x)
    hi = torch.where(nan, float("-inf"), x).amax(dim=dim, keepdim=True)
    lo = torch.where(nan, float("inf"), x).amin(dim=dim, keepdim=True)
    return hi == lo


def _group_advantages_torch(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    baseline: str,
    scale: str,
    eps: float,
    normalize: str,
) -> torch.Tensor:
    """rewards [B, K] float32/float64, weights [K] (same dtype) -> advantages [B]."""
    B, K = rewards.shape
    G, n = B // group_size, group_size
    unscorable = torch.isnan(rewards).all(dim=1)  # [B]

    if normalize == "normalize_then_sum":
        # GDPO: standardise every objective within its group, weight and sum, then
        # standardise the sum over the whole batch.
        g = rewards.view(G, n, K)
        if n > 1:
            z = (g - torch.nanmean(g, dim=1, keepdim=True)) / (nanstd(g, 1, keepdim=True) + eps)
        else:
            z = torch.zeros_like(g)
        z = torch.where(_constant(g, 1), 0.0, z)  # NaN entries of g stay NaN below
        z = torch.where(torch.isnan(g), float("nan"), z).view(B, K)
        s = torch.nansum(z * weights, dim=1)
        s = torch.where(unscorable, float("nan"), s)
        std = nanstd(s) if B > 1 else torch.zeros((), dtype=s.dtype, device=s.device)
        adv = (s - torch.nanmean(s)) / (std + eps)
        # A group with no variance in any objective carries no signal.
        flat = _constant(g, 1).all(dim=2)  # [G, 1]
        adv = torch.where(flat, 0.0, adv.view(G, n)).view(B)
        return torch.nan_to_num(adv, nan=0.0)

    # sum_then_normalize: weighted sum of the objectives, then one group baseline.
    s = torch.nansum(rewards * weights, dim=1)
    s = torch.where(unscorable, float("nan"), s)
    g = s.view(G, n)
    if baseline == "mean":
        adv = g - torch.nanmean(g, dim=1, keepdim=True)
    elif n > 1:  # rloo: the mean of the other scorable completions of the group
        count = (~torch.isnan(g)).sum(dim=1, keepdim=True)
        adv = g - (torch.nansum(g, dim=1, keepdim=True) - g) / (count - 1)
    else:
        adv = torch.zeros_like(g)

    if scale == "group":
        adv = adv / (nanstd(g, 1, keepdim=True) + eps)
    elif scale == "batch":
        if baseline == "mean":  # GRPOTrainer(scale_rewards="batch"): std of the rewards
            std = nanstd(s) if B > 1 else torch.zeros((), dtype=s.dtype, device=s.device)
            adv = adv / (std + eps)
        else:  # RLOOTrainer(normalize_advantages=True): standardise the advantages
            std = nanstd(adv) if B > 1 else torch.zeros((), dtype=s.dtype, device=s.device)
            adv = (adv - torch.nanmean(adv)) / (std + eps)
    adv = torch.where(_constant(g, 1), 0.0, adv)
    return torch.nan_to_num(adv.view(B), nan=0.0)


def _check_options(
    rewards: torch.Tensor,
    group_size: int,
    baseline: str,
    scale: str,
    eps: float,
    normalize: str,
    impl: str,
) -> None:
    """The arguments of `group_advantages` but `weights` (checked once cast)."""
    check_tensor("rewards", rewards, floating=False)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must have shape [B] or [B, K], got {tuple(rewards.shape)}")
    # a non-int is a ValueError here (not check_number's TypeError), as it has always been
    check_number("group_size", group_size, low=1, integer=True, type_error=ValueError)
    B = rewards.shape[0]
    if B % group_size != 0:
        raise ValueError(
            f"rewards has B={B} rows, not a multiple of group_size={group_size}: the batch "
            "must hold whole groups of completions, laid out prompt-major"
        )
    check_choice("baseline", baseline, BASELINES)
    check_choice("scale", scale, SCALES)
    check_choice("normalize", normalize, AGGREGATIONS)
    check_impl(impl, device=rewards.device)
    check_number("eps", eps, low=0.0)
    if normalize == "normalize_then_sum" and (baseline != "mean" or scale != "group"):
        raise ValueError(
            "normalize='normalize_then_sum' standardises each objective within its group and "
            "the weighted sum over the batch (TRL's recipe); it needs baseline='mean' and "
            f"scale='group', got baseline={baseline!r}, scale={scale!r}"
        )


def _use_kernel(impl: str, rewards: torch.Tensor, group_size: int) -> bool:
    """Whether the Triton kernel runs: always with impl="triton" (a ValueError where it
    cannot), with "auto" on CUDA tensors when triton is installed and a group fits in one
    of its tiles."""
    if impl == "torch" or (impl == "auto" and not (rewards.is_cuda and _KERNEL is not None)):
        return False
    if _KERNEL is None:
        raise ValueError("impl='triton': no Triton kernel for group_advantages is available")
    limit = _kernel_max_group_size()
    if impl == "triton" and group_size > limit:
        raise ValueError(
            f"impl='triton' supports group_size <= {limit} (a group is one tile of the "
            f"kernel), got group_size={group_size}; use impl='torch' or 'auto'"
        )
    return group_size <= limit


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    baseline: str = defaults.BASELINE,
    scale: str = defaults.SCALE,
    eps: float = defaults.EPS,
    weights: torch.Tensor | Sequence[float] | None = None,
    normalize: str = defaults.AGGREGATION,
    impl: str = "auto",
) -> torch.Tensor:
    """Group-relative advantages of a generation batch, with TRL's conventions.

    Args:
        rewards: ``[B]`` or ``[B, K]`` (K reward functions), any real dtype, laid out
            prompt-major: rows ``i * group_size ... (i + 1) * group_size - 1`` are the
            completions of prompt ``i``. NaN marks a missing reward (TRL's ``None``).
        group_size: completions per prompt (TRL's ``num_generations``); must divide ``B``.
        baseline: ``"mean"`` (GRPO: the group mean) or ``"rloo"`` (leave-one-out: the mean
            of the *other* completions of the group, as TRL's ``RLOOTrainer``).
        scale: what the centred rewards are divided by (plus ``eps``):

            - ``"group"``: the group's reward std (GRPO, TRL ``scale_rewards="group"``);
              with ``baseline="rloo"`` also the group's reward std;
            - ``"batch"``: the batch's std. With ``baseline="mean"`` the std of the rewards
              (TRL ``scale_rewards="batch"``); with ``baseline="rloo"`` the advantages are
              standardised over the batch, ``(A - mean(A)) / (std(A) + eps)``
              (TRL ``RLOOConfig(normalize_advantages=True)``);
            - ``"none"``: no scaling (Dr. GRPO; TRL ``scale_rewards="none"``, and
              ``RLOOTrainer``'s default).
        eps: added to the standard deviation. TRL uses ``1e-4``.
        weights: ``[K]`` weights of the reward functions (TRL's ``reward_weights``);
            default all ones.
        normalize: how ``K > 1`` objectives combine (TRL's ``multi_objective_aggregation``):

            - ``"sum_then_normalize"``: weighted sum per completion (NaNs skipped), then
              the baseline and scaling above;
            - ``"normalize_then_sum"`` (GDPO): every objective standardised within its
              group, weighted sum, then standardised over the batch. This mode is TRL's
              fixed recipe, so it needs ``baseline="mean"`` and ``scale="group"``.
        impl: ``"auto"`` (the Triton kernel for CUDA tensors, else PyTorch),
            ``"torch"``, or ``"triton"`` (CUDA tensors, or any under TRITON_INTERPRET=1).

    Returns:
        ``[B]`` advantages, float32 (float64 for float64 rewards). Never NaN: groups with
        a single scorable completion or no reward variance, and fully unscorable
        completions, get exactly 0. ``rewards`` is detached: advantages carry no
        gradient.

    Raises:
        ValueError: ``B`` not a multiple of ``group_size``, unknown ``baseline``,
            ``scale``, ``normalize`` or ``impl``, bad ``weights`` or ``eps``;
            ``impl="triton"`` on CPU tensors without TRITON_INTERPRET=1, or with a
            ``group_size`` above the kernel's (kernels/group_advantages.py
            ``MAX_GROUP_SIZE``).
        TypeError: ``rewards`` not a tensor, or complex.
    """
    _check_options(rewards, group_size, baseline, scale, eps, normalize, impl)
    dtype = compute_dtype(rewards)
    r = rewards.detach().to(dtype)
    r2 = r.unsqueeze(1) if r.dim() == 1 else r
    K = r2.shape[1]
    if weights is None:
        w = torch.ones(K, dtype=dtype, device=r.device)
    else:
        w = torch.as_tensor(weights, dtype=dtype, device=r.device)
        if w.shape != (K,):
            raise ValueError(
                f"weights must have shape [K]=[{K}] (one per reward column), got {tuple(w.shape)}"
            )
        msg = "weights must be finite"
        check_values(~torch.isfinite(w), msg, lambda: f"{msg}, got {w.tolist()}")
    if r2.shape[0] == 0:
        return r2.new_zeros(0)
    fn = _KERNEL if _use_kernel(impl, r2, group_size) else _group_advantages_torch
    return fn(r2.contiguous(), w, group_size, baseline, scale, float(eps), normalize)
