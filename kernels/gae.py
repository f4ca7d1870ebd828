"""Generalized Advantage Estimation: per-token advantages and returns, `[B, T]`.

Computes exactly what `fastrl.ops.advantages.gae._gae_torch` computes (up to the order of
the fp32 additions): for each row, a reverse scan over its tokens

    delta_t = r_t + gamma * V_next(t) - V_t,    A_t = delta_t + gamma * lam * A_next(t),

with V_next(t) and A_next(t) the value and advantage of the next *unmasked* token after t
(0 past the row's last one: the episode ends there). Masked tokens are skipped, not
treated as zero-reward steps (verl's compute_gae_advantage_return: a tool observation
inside a completion neither breaks nor discounts the chain); returns are A_t + V_t.
Masked positions get 0 in both outputs.

The scan as a composition of maps. Read from the right, each token maps the state
(y, A) = (next value, next advantage) it receives to the state it passes on:

    unmasked: y' = V_t,  A' = (r_t - V_t) + gamma y + gamma lam A;    masked: identity.

Both are affine maps y' = a y + b, A' = c y + d A + e, and composing two of them gives
one of the same form (5 numbers), so a block of tokens is one `tl.associative_scan` of
such maps, and the state after the block is the carry into the next one.

Tiling. grid = (cdiv(B, BLOCK_B),): program i owns rows [i*BLOCK_B, (i+1)*BLOCK_B) and
walks their tokens from the right in blocks of BLOCK_T (the time loop is inside the
program; a row's scan is sequential across blocks, one carry per row in registers).
Each block is one [BLOCK_B, BLOCK_T] tile loaded in *reversed* time order (column j is
token T - 1 - (k BLOCK_T + j); still contiguous, coalesced addresses), so a forward scan
along the columns is the reverse scan in time. Positions past the row start load
mask 0: identity maps. Rewards, values and mask are read once and the two outputs
written once: 3 reads + 2 writes per token, the memory traffic of the op.

Inputs of any float dtype (fp16/bf16/fp32) are computed in fp32; float64 is left to the
PyTorch path (gamma and lam are fp32 kernel arguments). B, T, gamma and lam are runtime
arguments. There is no backward: advantages and returns are constants of the losses
(the value loss regresses onto detached returns).
"""

import torch
import triton
import triton.language as tl

from .config import GAE_BLOCK_B, GAE_BLOCK_T, GAE_NUM_WARPS, on_tensor_device


@triton.jit
def _compose(a1, b1, c1, d1, e1, a2, b2, c2, d2, e2):
    # map 1 (the tokens to the right, applied first), then map 2
    return (
        a2 * a1,
        a2 * b1 + b2,
        c2 * a1 + d2 * c1,
        d2 * d1,
        c2 * b1 + d2 * e1 + e2,
    )


@triton.jit(do_not_specialize=["B", "T", "gamma", "lam"])
def gae_fwd_kernel(
    R,
    V,
    M,
    Adv,
    Ret,
    B,
    T,
    s_rb,
    s_rt,
    s_vb,
    s_vt,
    s_mb,
    s_mt,
    gamma,
    lam,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_T)[None, :]
    gl = gamma * lam
    y = tl.zeros((BLOCK_B,), tl.float32)  # the carry: next value, next advantage
    adv = tl.zeros((BLOCK_B,), tl.float32)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for k in range(0, n_blocks):
        t = T - 1 - (k * BLOCK_T + cols)  # reversed time: column 0 is the rightmost
        inb = row_ok[:, None] & (t >= 0)
        t64 = t.to(tl.int64)
        r = tl.load(R + rows64 * s_rb + t64 * s_rt, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(V + rows64 * s_vb + t64 * s_vt, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(M + rows64 * s_mb + t64 * s_mt, mask=inb, other=0).to(tl.float32) != 0
        r = tl.where(m, r, 0.0)  # padding may hold anything (inf, NaN): never read
        v = tl.where(m, v, 0.0)
        zero = tl.zeros((BLOCK_B, BLOCK_T), tl.float32)
        one = zero + 1.0
        a = tl.where(m, zero, one)
        b = tl.where(m, v, zero)
        c = tl.where(m, zero + gamma, zero)
        d = tl.where(m, zero + gl, one)
        e = tl.where(m, r - v, zero)
        a, b, c, d, e = tl.associative_scan((a, b, c, d, e), 1, _compose)
        y_t = a * y[:, None] + b
        adv_t = c * y[:, None] + d * adv[:, None] + e
        # masked tokens: 0 (their state is the next unmasked token's)
        out_adv = tl.where(m, adv_t, 0.0)
        out_ret = tl.where(m, adv_t + v, 0.0)
        off = rows64 * T + t64  # outputs are contiguous [B, T]
        tl.store(Adv + off, out_adv.to(Adv.dtype.element_ty), mask=inb)
        tl.store(Ret + off, out_ret.to(Ret.dtype.element_ty), mask=inb)
        # the state after the block (its last column) is the carry into the next one
        last = cols == BLOCK_T - 1
        y = tl.sum(tl.where(last, y_t, 0.0), axis=1)
        adv = tl.sum(tl.where(last, adv_t, 0.0), axis=1)


@on_tensor_device
def gae_fwd(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    *,
    block_b: int = GAE_BLOCK_B,
    block_t: int = GAE_BLOCK_T,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the scan. rewards, values ``[B, T]`` fp16/bf16/fp32 (any strides), mask
    ``[B, T]`` bool or 0/1 numbers; gamma, lam Python floats in [0, 1] (the caller checks).
    ``block_b`` rows per program and ``block_t`` tokens per step (powers of 2): tile shapes
    for a GPU sweep.

    Returns ``(advantages, returns)``: contiguous fp32 ``[B, T]``, 0 where masked.
    """
    B, T = rewards.shape
    f32 = dict(device=rewards.device, dtype=torch.float32)
    adv, ret = torch.empty((B, T), **f32), torch.empty((B, T), **f32)
    if B == 0 or T == 0:
        return adv, ret
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    grid = (triton.cdiv(B, block_b),)
    gae_fwd_kernel[grid](
        rewards,
        values,
        mask,
        adv,
        ret,
        B,
        T,
        rewards.stride(0),
        rewards.stride(1),
        values.stride(0),
        values.stride(1),
        mask.stride(0),
        mask.stride(1),
        float(gamma),
        float(lam),
        BLOCK_B=block_b,
        BLOCK_T=block_t,
        num_warps=GAE_NUM_WARPS,
    )
    return adv, ret
