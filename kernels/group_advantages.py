"""Group-relative advantages: rewards `[B, K]` (prompt-major groups of n) -> advantages `[B]`.

Computes exactly what `fastrl.ops.advantages.group._group_advantages_torch` computes, in the same
order of operations, for every mode: baseline mean / rloo, scale group / batch / none,
weighted multi-reward sums (sum_then_normalize) and GDPO's normalize_then_sum, NaN
rewards left out of every statistic, zero-variance groups giving exactly 0, no NaN out.

Tiling. grid = (cdiv(G, BLOCK_G),) for the G = B / n groups. Program i owns groups
[i*BLOCK_G, (i+1)*BLOCK_G) as one [BLOCK_G, BLOCK_N] register tile, a group per tile row
(BLOCK_N = next_pow2(n); padded slots load NaN, i.e. "no reward", and drop out of every
statistic like a missing reward does). It loops over the K reward columns (K is a handful;
each column is a strided [BLOCK_G, BLOCK_N] load) and folds them into the per-completion
value s: the weighted sum of the rewards, or for GDPO the weighted sum of every column
standardised within its group. The group statistics are row reductions of the tile:
count of scored completions, sum, mean, Bessel-corrected std (two passes over registers,
mean first, then squared deviations, as `nanstd`), and min == max for "no variance".
A whole group lives in one tile, so group_size is capped at MAX_GROUP_SIZE (GRPO groups
are 2-64 completions); `group_advantages` falls back to PyTorch beyond it.

Batch modes need one batch-wide mean/std after every group is done: scale="batch" (of the
rewards s with baseline="mean", of the advantages with "rloo") and GDPO (of s). There the
group kernel writes the numerator to `Out` (NaN where the group has no variance: NaN
becomes exactly 0 at the end, as it does in the PyTorch path) and the value whose batch
statistics are needed to `Stat`; `group_advantages_batch_kernel`, a single program, then
makes two passes over `Stat` (count + sum, then squared deviations) and one over `Out`.
B is a few thousand at most, so one program streaming it costs a few microseconds.

Precision: rewards arrive as float32 or float64 (the caller casts) and everything is
computed in that dtype. `eps` is passed as an fp32 (hi, lo) pair: a Python float kernel
argument is an fp32, and hi + lo restores it to ~48 bits for float64 rewards.
There is no backward: advantages are constants of the loss.
"""

import torch
import triton
import triton.language as tl

from .config import GROUP_ADVANTAGES_BATCH_BLOCK, GROUP_ADVANTAGES_TILE, on_tensor_device

# One group per tile row: a [BLOCK_G, BLOCK_N] tile holds BLOCK_N >= group_size slots.
MAX_GROUP_SIZE = 4096

_FP32_MAX = tl.constexpr(3.4028234663852886e38)
_FP64_MAX = tl.constexpr(1.7976931348623157e308)


@triton.jit
def _nan_to_num(x, FP64: tl.constexpr):
    # torch.nan_to_num(x, nan=0.0): NaN -> 0, +-inf -> +-the largest finite value
    x = tl.where(x != x, 0.0, x)
    if FP64:
        x = tl.minimum(tl.maximum(x, -_FP64_MAX), _FP64_MAX)
    else:
        x = tl.minimum(tl.maximum(x, -_FP32_MAX), _FP32_MAX)
    return x


@triton.jit
def _group_stats(x, valid):
    """Per tile row: count, sum, mean, Bessel std (NaN under 2 values), all-equal flag."""
    cnt = tl.sum(valid.to(tl.int32), axis=1)
    tot = tl.sum(tl.where(valid, x, 0.0), axis=1)
    # the denominators are clamped only where the result is replaced by NaN anyway
    # (no 0/0 in the interpreter's numpy); otherwise as `nanstd`: ssd / c * c / (c - 1)
    c = tl.maximum(cnt, 1).to(x.dtype)
    mean = tl.where(cnt > 0, tot / c, float("nan"))
    dev = tl.where(valid, x - mean[:, None], 0.0)
    c = tl.maximum(cnt, 2).to(x.dtype)
    var = tl.sum(dev * dev, axis=1) / c * c / (c - 1.0)
    std = tl.where(cnt > 1, tl.sqrt(var), float("nan"))
    hi = tl.max(tl.where(valid, x, float("-inf")), axis=1)
    lo = tl.min(tl.where(valid, x, float("inf")), axis=1)
    return cnt, tot, mean, std, hi == lo  # hi == lo is False when nothing is scored


@triton.jit(do_not_specialize=["G", "n", "K"])
def group_advantages_fwd_kernel(
    R,
    W,
    Out,
    Stat,
    G,
    n,
    K,
    eps_hi,
    eps_lo,
    RLOO: tl.constexpr,
    SCALE: tl.constexpr,  # 0: none, 1: group, 2: batch
    GDPO: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    DT = Out.dtype.element_ty  # float32 or float64 (FP64 picks the nan_to_num bound)
    eps = (tl.zeros((1,), DT) + eps_hi) + eps_lo  # [1]: hi + lo in DT (see the header)
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    slots = tl.arange(0, BLOCK_N)
    inb = (groups[:, None] < G) & (slots[None, :] < n)
    rows = groups[:, None].to(tl.int64) * n + slots[None, :]  # completion index

    s = tl.zeros((BLOCK_G, BLOCK_N), DT)
    scored = tl.zeros((BLOCK_G, BLOCK_N), tl.int32)  # completions with any reward
    flat_all = tl.full((BLOCK_G,), 1, tl.int1)  # GDPO: no variance in any objective
    for k in range(K):
        r = tl.load(R + rows * K + k, mask=inb, other=float("nan"))
        w = tl.load(W + k)
        has = r == r
        if GDPO:
            _, _, mean, std, flat = _group_stats(r, has)
            z = tl.where(n > 1, (r - mean[:, None]) / (std[:, None] + eps), 0.0)
            z = tl.where(flat[:, None], 0.0, z)
            z = tl.where(has, z, float("nan"))
            flat_all = flat_all & flat
            zw = z * w
        else:
            zw = r * w
        s += tl.where(zw == zw, zw, 0.0)  # nansum over the objectives
        scored = tl.maximum(scored, has.to(tl.int32))
    s = tl.where(scored > 0, s, float("nan"))  # a completion without any reward

    if GDPO:
        # standardised over the batch in the second pass; flat groups give 0
        num = tl.where(flat_all[:, None], float("nan"), s)
        stat = s
    else:
        cnt, tot, mean, std, flat = _group_stats(s, s == s)
        if RLOO:  # minus the mean of the other scored completions of the group
            # NaN with fewer than two scored completions (0/0 in the PyTorch path)
            others = tl.maximum(cnt - 1, 1).to(DT)[:, None]
            adv = tl.where(cnt[:, None] > 1, s - (tot[:, None] - s) / others, float("nan"))
            adv = tl.where(n > 1, adv, 0.0)
        else:
            adv = s - mean[:, None]
        if SCALE == 1:
            adv = adv / (std[:, None] + eps)
        if SCALE == 2:
            num = tl.where(flat[:, None], float("nan"), adv)
            stat = adv if RLOO else s
        else:
            num = _nan_to_num(tl.where(flat[:, None], 0.0, adv), FP64)
    tl.store(Out + rows, num, mask=inb)
    if GDPO or SCALE == 2:
        tl.store(Stat + rows, stat, mask=inb)


@triton.jit(do_not_specialize=["B"])
def group_advantages_batch_kernel(
    Out,
    Stat,
    B,
    eps_hi,
    eps_lo,
    CENTER: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Out = nan_to_num((Out - CENTER * nanmean(Stat)) / (nanstd(Stat) + eps)), one program.
    DT = Out.dtype.element_ty  # float32 or float64 (FP64 picks the nan_to_num bound)
    eps = (tl.zeros((1,), DT) + eps_hi) + eps_lo  # [1]: hi + lo in DT (see the header)
    offs = tl.arange(0, BLOCK)
    cnt = tl.zeros((BLOCK,), tl.int32)
    tot = tl.zeros((BLOCK,), DT)
    for b0 in range(0, B, BLOCK):
        x = tl.load(Stat + b0 + offs, mask=b0 + offs < B, other=float("nan"))
        cnt += (x == x).to(tl.int32)
        tot += tl.where(x == x, x, 0.0)
    c_int = tl.sum(cnt, axis=0)
    c = tl.maximum(c_int, 1).to(DT)
    mean = tl.where(c_int > 0, tl.sum(tot, axis=0) / c, float("nan"))
    ssd = tl.zeros((BLOCK,), DT)
    for b0 in range(0, B, BLOCK):
        x = tl.load(Stat + b0 + offs, mask=b0 + offs < B, other=float("nan"))
        d = tl.where(x == x, x - mean, 0.0)
        ssd += d * d
    c = tl.maximum(c_int, 2).to(DT)
    var = tl.sum(ssd, axis=0) / c * c / (c - 1.0)
    std = tl.where(c_int > 1, tl.sqrt(var), float("nan"))
    std = tl.where(B > 1, std, 0.0)  # as the PyTorch path: a batch of one has std 0
    for b0 in range(0, B, BLOCK):
        m = b0 + offs < B
        x = tl.load(Out + b0 + offs, mask=m, other=0.0)
        if CENTER:
            x = x - mean
        tl.store(Out + b0 + offs, _nan_to_num(x / (std + eps), FP64), mask=m)


def _split(x: float) -> tuple[float, float]:
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, x - hi


@on_tensor_device
def group_advantages_fwd(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    baseline: str,
    scale: str,
    eps: float,
    normalize: str,
) -> torch.Tensor:
    """Launch. rewards [B, K] float32/float64 contiguous, weights [K] (same dtype), B a
    non-zero multiple of group_size <= MAX_GROUP_SIZE. Returns advantages [B], same dtype."""
    B, K = rewards.shape
    if group_size > MAX_GROUP_SIZE:
        raise ValueError(
            f"group_size={group_size} is above the Triton kernel's MAX_GROUP_SIZE="
            f"{MAX_GROUP_SIZE} (a group lives in one tile); use impl='torch'"
        )
    if rewards.dtype not in (torch.float32, torch.float64) or weights.dtype != rewards.dtype:
        raise TypeError(
            f"rewards and weights must both be float32 or float64, got {rewards.dtype} "
            f"and {weights.dtype}"
        )
    rewards, weights = rewards.contiguous(), weights.contiguous()
    G = B // group_size
    fp64 = rewards.dtype == torch.float64
    gdpo = normalize == "normalize_then_sum"
    batch = gdpo or scale == "batch"
    out = torch.empty(B, dtype=rewards.dtype, device=rewards.device)
    stat = torch.empty_like(out) if batch else out

    block_n = max(2, triton.next_power_of_2(group_size))
    block_g = max(1, min(GROUP_ADVANTAGES_TILE // block_n, triton.next_power_of_2(G)))
    eps_hi, eps_lo = _split(float(eps))
    group_advantages_fwd_kernel[(triton.cdiv(G, block_g),)](
        rewards,
        weights,
        out,
        stat,
        G,
        group_size,
        K,
        eps_hi,
        eps_lo,
        RLOO=baseline == "rloo",
        SCALE={"none": 0, "group": 1, "batch": 2}[scale],
        GDPO=gdpo,
        FP64=fp64,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        num_warps=4 if block_g * block_n >= 512 else 1,
    )
    if batch:
        group_advantages_batch_kernel[(1,)](
            out,
            stat,
            B,
            eps_hi,
            eps_lo,
            CENTER=gdpo or baseline == "rloo",
            FP64=fp64,
            BLOCK=min(GROUP_ADVANTAGES_BATCH_BLOCK, max(16, triton.next_power_of_2(B))),
            num_warps=4,
        )
    return out
