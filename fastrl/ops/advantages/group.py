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
kernels/group_advantages.py, runs on CUDA tensors with ``impl="auto"``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from fastrl.checks import check_values
from fastrl.ops.logprobs.linear import _triton_usable

__all__ = ["group_advantages"]

_BASELINES = ("mean", "rloo")
_SCALES = ("group", "batch", "none")
_NORMALIZE = ("sum_then_normalize", "normalize_then_sum")
_IMPLS = ("auto", "torch", "triton")


def _group_advantages_triton(rewards, weights, group_size, baseline, scale, eps, normalize):
    # imported on first use: triton is only needed when the kernel runs
    from fastrl.kernels.group_advantages import group_advantages_fwd

    return group_advantages_fwd(rewards, weights, group_size, baseline, scale, eps, normalize)


# The Triton launcher, with the signature of `_group_advantages_torch` (None without triton).
_KERNEL = _group_advantages_triton if importlib.util.find_spec("triton") is not None else None
# A group lives in one tile of the kernel (kernels/group_advantages.py: MAX_GROUP_SIZE);
# larger groups take the PyTorch path with impl="auto".
_KERNEL_MAX_GROUP_SIZE = 4096


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
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
            z = (g - torch.nanmean(g, dim=1, keepdim=True)) / (_nanstd(g, 1, keepdim=True) + eps)
        else:
            z = torch.zeros_like(g)
        z = torch.where(_constant(g, 1), 0.0, z)  # NaN entries of g stay NaN below
        z = torch.where(torch.isnan(g), float("nan"), z).view(B, K)
        s = torch.nansum(z * weights, dim=1)
        s = torch.where(unscorable, float("nan"), s)
        std = _nanstd(s) if B > 1 else torch.zeros((), dtype=s.dtype, device=s.device)
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
        adv = adv / (_nanstd(g, 1, keepdim=True) + eps)
    elif scale == "batch":
        if baseline == "mean":  # GRPOTrainer(scale_rewards="batch"): std of the rewards
            std = _nanstd(s) if B > 1 else torch.zeros((), dtype=s.dtype, device=s.device)
            adv = adv / (std + eps)
        else:  # RLOOTrainer(normalize_advantages=True): standardise the advantages
            std = _nanstd(adv) if B > 1 else torch.zeros((), dtype=s.dtype, device=s.device)
            adv = (adv - torch.nanmean(adv)) / (std + eps)
    adv = torch.where(_constant(g, 1), 0.0, adv)
    return torch.nan_to_num(adv.view(B), nan=0.0)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    baseline: str = "mean",
    scale: str = "group",
    eps: float = 1e-4,
    weights: torch.Tensor | Sequence[float] | None = None,
    normalize: str = "sum_then_normalize",
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
            ``group_size`` above the kernel's limit (4096).
        TypeError: ``rewards`` not a tensor, or complex.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got dtype {rewards.dtype}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must have shape [B] or [B, K], got {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    B = rewards.shape[0]
    if B % group_size != 0:
        raise ValueError(
            f"rewards has B={B} rows, not a multiple of group_size={group_size}: the batch "
            "must hold whole groups of completions, laid out prompt-major"
        )
    if baseline not in _BASELINES:
        raise ValueError(f"baseline must be one of {_BASELINES}, got {baseline!r}")
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if normalize == "normalize_then_sum" and (baseline != "mean" or scale != "group"):
        raise ValueError(
            "normalize='normalize_then_sum' standardises each objective within its group and "
            "the weighted sum over the batch (TRL's recipe); it needs baseline='mean' and "
            f"scale='group', got baseline={baseline!r}, scale={scale!r}"
        )

    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
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
    if B == 0:
        return r2.new_zeros(0)

    if impl == "triton":
        if _KERNEL is None:
            raise ValueError("impl='triton': no Triton kernel for group_advantages is available")
        if not _triton_usable(r2.device):
            raise ValueError(
                f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {r2.device}"
            )
        if group_size > _KERNEL_MAX_GROUP_SIZE:
            raise ValueError(
                f"impl='triton' supports group_size <= {_KERNEL_MAX_GROUP_SIZE} (a group is one "
                f"tile of the kernel), got group_size={group_size}; use impl='torch' or 'auto'"
            )
    use_kernel = _KERNEL is not None and (
        impl == "triton" or (impl == "auto" and r2.is_cuda and group_size <= _KERNEL_MAX_GROUP_SIZE)
    )
    fn = _KERNEL if use_kernel else _group_advantages_torch
    return fn(r2.contiguous(), w, group_size, baseline, scale, float(eps), normalize)
