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

Chunked (``chunk_t`` > 0), for few long rows: one program per row block covers only
cdiv(B, BLOCK_B) SMs, so each row's tokens are cut into chunks of ``chunk_t`` (counted
from the right), grid = (cdiv(B, BLOCK_B), n_chunks). Pass 1 (`gae_chunk_fwd_kernel`)
composes each chunk's maps into one (5 floats per row and chunk); pass 2
(`gae_fwd_kernel` with CHUNKS > 1) starts each chunk from the state the chunks to its
right leave (the episode end, (0, 0), through their maps: one [BLOCK_B, CHUNKS] tile of
them composed by one scan, not a chain of dependent loads) and scans as above. The inputs are read twice (the second read mostly from L2 at the
sizes this is for).

Inputs of any float dtype (fp16/bf16/fp32) are computed in fp32; float64 is left to the
PyTorch path (gamma and lam are fp32 kernel arguments). B, T, gamma and lam are runtime
arguments. There is no backward: advantages and returns are constants of the losses
(the value loss regresses onto detached returns).
"""

import torch
import triton
import triton.language as tl

from .config import GAE_BLOCK_B, GAE_BLOCK_T, GAE_CHUNK_T, GAE_NUM_WARPS, on_tensor_device


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


@triton.jit
def _block_maps(R, V, M, rows64, row_ok, t, s_rb, s_rt, s_vb, s_vt, s_mb, s_mt, gamma, gl):
    """Load one [BLOCK_B, BLOCK_T] tile (reversed time `t`) and scan its tokens' maps:
    column j holds the composition of the tile's columns 0..j."""
    inb = row_ok[:, None] & (t >= 0)
    t64 = t.to(tl.int64)
    r = tl.load(R + rows64 * s_rb + t64 * s_rt, mask=inb, other=0.0).to(tl.float32)
    v = tl.load(V + rows64 * s_vb + t64 * s_vt, mask=inb, other=0.0).to(tl.float32)
    m = tl.load(M + rows64 * s_mb + t64 * s_mt, mask=inb, other=0).to(tl.float32) != 0
    r = tl.where(m, r, 0.0)  # padding may hold anything (inf, NaN): never read
    v = tl.where(m, v, 0.0)
    zero = tl.zeros(r.shape, tl.float32)
    one = zero + 1.0
    a = tl.where(m, zero, one)
    b = tl.where(m, v, zero)
    c = tl.where(m, zero + gamma, zero)
    d = tl.where(m, zero + gl, one)
    e = tl.where(m, r - v, zero)
    a, b, c, d, e = tl.associative_scan((a, b, c, d, e), 1, _compose)
    return inb, t64, m, v, a, b, c, d, e


@triton.jit
def _last(x, cols, BLOCK_T: tl.constexpr):
    return tl.sum(tl.where(cols == BLOCK_T - 1, x, 0.0), axis=1)


@triton.jit(do_not_specialize=["B", "T", "chunk_blocks", "gamma", "lam"])
def gae_chunk_fwd_kernel(
    R, V, M, Maps, B, T, chunk_blocks, s_rb, s_rt, s_vb, s_vt, s_mb, s_mt, gamma, lam,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    # pass 1 of the chunked scan: the composed map of chunk c of each row -> Maps[:, row, c]
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_T)[None, :]
    chunk, n_chunks = tl.program_id(1), tl.num_programs(1)
    # the identity map, then each block's composed on top (blocks further left apply later)
    a = tl.full((BLOCK_B,), 1.0, tl.float32)
    b = tl.zeros((BLOCK_B,), tl.float32)
    c = tl.zeros((BLOCK_B,), tl.float32)
    d = tl.full((BLOCK_B,), 1.0, tl.float32)
    e = tl.zeros((BLOCK_B,), tl.float32)
    first = chunk * chunk_blocks
    for k in range(first, tl.minimum(first + chunk_blocks, tl.cdiv(T, BLOCK_T))):
        t = T - 1 - (k * BLOCK_T + cols)
        _, _, _, _, ba, bb, bc, bd, be = _block_maps(
            R, V, M, rows64, row_ok, t, s_rb, s_rt, s_vb, s_vt, s_mb, s_mt, gamma, gamma * lam
        )
        a, b, c, d, e = _compose(
            a, b, c, d, e, _last(ba, cols, BLOCK_T), _last(bb, cols, BLOCK_T),
            _last(bc, cols, BLOCK_T), _last(bd, cols, BLOCK_T), _last(be, cols, BLOCK_T),
        )  # fmt: skip
    off = rows.to(tl.int64) * n_chunks + chunk  # Maps is [5, B, n_chunks], contiguous
    plane = B.to(tl.int64) * n_chunks
    tl.store(Maps + off, a, mask=row_ok)
    tl.store(Maps + plane + off, b, mask=row_ok)
    tl.store(Maps + 2 * plane + off, c, mask=row_ok)
    tl.store(Maps + 3 * plane + off, d, mask=row_ok)
    tl.store(Maps + 4 * plane + off, e, mask=row_ok)


@triton.jit
def _carry_in(Maps, rows, row_ok, chunk, B, CHUNKS: tl.constexpr):
    """The state entering `chunk`: the episode's end (0, 0) through the composed maps of
    the chunks to its right (pass 1). One [BLOCK_B, CHUNKS] tile of them (contiguous along
    the chunks; identity maps from `chunk` on) composed by one scan, whose last column
    maps (0, 0) to (b, e)."""
    n_chunks = tl.num_programs(1)
    plane = B.to(tl.int64) * n_chunks
    j = tl.arange(0, CHUNKS)[None, :]
    ok = row_ok[:, None] & (j < chunk)
    off = rows.to(tl.int64)[:, None] * n_chunks + j
    a = tl.load(Maps + off, mask=ok, other=1.0)
    b = tl.load(Maps + plane + off, mask=ok, other=0.0)
    c = tl.load(Maps + 2 * plane + off, mask=ok, other=0.0)
    d = tl.load(Maps + 3 * plane + off, mask=ok, other=1.0)
    e = tl.load(Maps + 4 * plane + off, mask=ok, other=0.0)
    a, b, c, d, e = tl.associative_scan((a, b, c, d, e), 1, _compose)
    return _last(b, j, CHUNKS), _last(e, j, CHUNKS)


@triton.jit(do_not_specialize=["B", "T", "chunk_blocks", "gamma", "lam"])
def gae_fwd_kernel(
    R, V, M, Adv, Ret, Maps, B, T, chunk_blocks, s_rb, s_rt, s_vb, s_vt, s_mb, s_mt, gamma, lam,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, CHUNKS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_T)[None, :]
    gl = gamma * lam
    y = tl.zeros((BLOCK_B,), tl.float32)  # the carry: next value, next advantage
    adv = tl.zeros((BLOCK_B,), tl.float32)
    chunk = tl.program_id(1)
    if CHUNKS > 1:
        y, adv = _carry_in(Maps, rows, row_ok, chunk, B, CHUNKS)
    first = chunk * chunk_blocks
    for k in range(first, tl.minimum(first + chunk_blocks, tl.cdiv(T, BLOCK_T))):
        t = T - 1 - (k * BLOCK_T + cols)  # reversed time: column 0 is the rightmost
        inb, t64, m, v, a, b, c, d, e = _block_maps(
            R, V, M, rows64, row_ok, t, s_rb, s_rt, s_vb, s_vt, s_mb, s_mt, gamma, gl
        )
        y_t = a * y[:, None] + b
        adv_t = c * y[:, None] + d * adv[:, None] + e
        # masked tokens: 0 (their state is the next unmasked token's)
        out_adv = tl.where(m, adv_t, 0.0)
        out_ret = tl.where(m, adv_t + v, 0.0)
        off = rows64 * T + t64  # outputs are contiguous [B, T]
        tl.store(Adv + off, out_adv.to(Adv.dtype.element_ty), mask=inb)
        tl.store(Ret + off, out_ret.to(Ret.dtype.element_ty), mask=inb)
        # the state after the block (its last column) is the carry into the next one
        y = _last(y_t, cols, BLOCK_T)
        adv = _last(adv_t, cols, BLOCK_T)


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
    chunk_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the scan. rewards, values ``[B, T]`` fp16/bf16/fp32 (any strides), mask
    ``[B, T]`` bool or 0/1 numbers; gamma, lam Python floats in [0, 1] (the caller checks).
    ``block_b`` rows per program and ``block_t`` tokens per step (powers of 2): tile shapes
    for a GPU sweep. ``chunk_t`` (a multiple of ``block_t``; 0: off; None: kernels/config.py's
    GAE_CHUNK_T rounded up to a multiple of ``block_t``) splits each row's tokens into chunks
    of that many, one program each, in two passes (module docstring).

    Returns ``(advantages, returns)``: contiguous fp32 ``[B, T]``, 0 where masked.
    """
    B, T = rewards.shape
    f32 = dict(device=rewards.device, dtype=torch.float32)
    adv, ret = torch.empty((B, T), **f32), torch.empty((B, T), **f32)
    if B == 0 or T == 0:
        return adv, ret
    if chunk_t is None:
        chunk_t = triton.cdiv(GAE_CHUNK_T, block_t) * block_t
    if not isinstance(chunk_t, int) or chunk_t < 0 or chunk_t % block_t:
        raise ValueError(
            f"chunk_t={chunk_t!r} must be 0 (one pass) or a positive multiple of block_t={block_t}"
        )
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    n_blocks = triton.cdiv(T, block_t)
    chunk_blocks = min(chunk_t // block_t, n_blocks) if chunk_t else n_blocks
    n_chunks = triton.cdiv(n_blocks, chunk_blocks)
    grid = (triton.cdiv(B, block_b), n_chunks)
    strides = (*rewards.stride(), *values.stride(), *mask.stride())
    tiles = dict(BLOCK_B=block_b, BLOCK_T=block_t, num_warps=GAE_NUM_WARPS)
    maps = adv  # unused by the one-pass kernel
    if n_chunks > 1:
        maps = torch.empty((5, B, n_chunks), **f32)
        gae_chunk_fwd_kernel[grid](
            rewards, values, mask, maps, B, T, chunk_blocks, *strides, float(gamma),
            float(lam), **tiles,
        )  # fmt: skip
    gae_fwd_kernel[grid](
        rewards, values, mask, adv, ret, maps, B, T, chunk_blocks, *strides, float(gamma),
        float(lam), CHUNKS=triton.next_power_of_2(n_chunks), **tiles,
    )  # fmt: skip
    return adv, ret
