"""Frozen-head linear log-probs in two GEMMs: E_p[W] accumulated in the forward.

For a frozen lm_head (weight and bias without gradient) and no entropy gradient, the
gradient of a token's log-prob w.r.t. its hidden state is

    dH = g / T * ((1 - p_t) c_t W_t - sum_{v != t} p_v c_v W_v),   c_v = dz_v/dx_v (softcap)

and the sum is a GEMM of the probabilities with W, which the forward can accumulate while
it streams the logits, as flash attention accumulates P V (here V = W). Forward + backward
then cost two N x V x d GEMMs instead of three (no recompute), and the backward is a
gather of W[t] and an elementwise combine.

    for each chunk of R tokens, each chunk of C vocab columns:
        Z = H_c @ W_v.T                 cuBLAS, fp32 [R, C] (as the cublas design)
        frozen_logprobs_fwd_kernel      per row, sweep 1: the chunk's max, sum e^(z-m),
                                        target logit (and sum e^(2(z-m))), merged with the
                                        previous chunks'; sweep 2: P_v = e^(z_v - m) c_v in
                                        the input dtype (0 at the target and the vocab
                                        tail), sum_{v != t} e^(z_v - m), and alpha =
                                        e^(m_old - m), the rescale of what came before
        O_c = alpha * O_c + P @ W_v     cuBLAS, fp32 [R, d] accumulator
    O / s is saved ([N, d] in the input dtype: 128 MiB at N = 16k, d = 4096, bf16) with
    (1 - p_t) c_t = (sum_{v != t} e^(z_v - m)) / s c_t.

Numerics. The target column is excluded from P and 1 - p_t is summed from the other
columns, never formed as 1 - p_t: for a confident token (p_t -> 1) nothing cancels, and
O holds only the (1 - p_t)-sized remainder, so its rounding to bf16/fp16 is relative to
the result. P <= 1 (relative to the running max) cannot overflow fp16; its terms below
fp16's normal range (e^(z - m) < 6e-5) lose bits, each at most 3e-8 absolute.

Tiling: grid = (cdiv(rows, BLOCK_N),); a program owns BLOCK_N rows of the chunk and sweeps
their columns twice in BLOCK_V steps (running statistics per lane in sweep 1, merged once
after it). Memory beyond the saved O: the fp32 Z chunk, the P chunk and the [R, d] fp32
accumulator, 1024 x 8192 x (4 + 2) + 1024 x 4096 x 4 B = 64 MiB at d = 4096 by default
(the cublas design's backward chunks, FASTRL_CUBLAS_CHUNK_ROWS/_VOCAB).
"""

import torch
import triton
import triton.language as tl

from .config import CUBLAS_CHUNK_ROWS, FROZEN_BLOCK_N, FROZEN_BLOCK_V, FROZEN_NUM_WARPS
from .cublas_logprobs import chunk_sizes
from .linear_logprobs import addmm_fp32, load_logits_step, mm_fp32


@triton.jit(do_not_specialize=["N", "v_start", "n_cols", "ignore_index"])
def frozen_logprobs_fwd_kernel(
    Z, P, Bias, T, M, S, SX, ZT, Q, ALPHA,
    N, v_start, n_cols, stride_z, stride_p, inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SQ: tl.constexpr,
    IS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # Z: [N, n_cols] fp32 raw logits of columns [v_start, v_start + n_cols); M, S, SX, ZT,
    # Q: the rows' running max, sum e^(z-m), sum over non-target columns, target logit and
    # sum e^(2(z-m)) (read unless IS_FIRST, always written); P: [N, n_cols] out; ALPHA [N].
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(T + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)

    # sweep 1: per-lane running max and sums, merged after the loop
    lm = tl.full((BLOCK_N, BLOCK_V), float("-inf"), tl.float32)
    ls = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    lq = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    lzt = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        z, _, _, cols, col_mask = load_logits_step(
            Z, Bias, rows, row_mask, v0, v_start, n_cols, stride_z, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_V,
        )  # fmt: skip
        m_new = tl.maximum(lm, z)
        alpha = tl.where(lm > float("-inf"), tl.exp(lm - m_new), 0.0)
        e = tl.where(z > float("-inf"), tl.exp(z - m_new), 0.0)
        ls = ls * alpha + e
        if HAS_SQ:
            lq = lq * alpha * alpha + e * e
        lzt += tl.where((cols[None, :] == tgt[:, None]) & col_mask[None, :], z, 0.0)
        lm = m_new
    m = tl.max(lm, axis=1)
    sc = tl.where(lm > float("-inf"), tl.exp(lm - m[:, None]), 0.0)
    s = tl.sum(ls * sc, axis=1)
    q = tl.sum(lq * sc * sc, axis=1)
    zt = tl.sum(lzt, axis=1)
    m_old = m
    c_old = tl.zeros((BLOCK_N,), tl.float32)
    sx = tl.zeros((BLOCK_N,), tl.float32)
    if not IS_FIRST:  # merge with the previous chunks
        m_old = tl.load(M + rows, mask=row_mask, other=0.0)
        m = tl.maximum(m_old, m)
        c_old = tl.exp(m_old - m)
        c_new = tl.exp(tl.max(lm, axis=1) - m)
        s = tl.load(S + rows, mask=row_mask, other=0.0) * c_old + s * c_new
        q = tl.load(Q + rows, mask=row_mask, other=0.0) * c_old * c_old + q * c_new * c_new
        sx = tl.load(SX + rows, mask=row_mask, other=0.0) * c_old
        zt += tl.load(ZT + rows, mask=row_mask, other=0.0)

    # sweep 2: P = e^(z - m) dz/dx without the target column, and its unweighted sum
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        z, dzdx, local, cols, col_mask = load_logits_step(
            Z, Bias, rows, row_mask, v0, v_start, n_cols, stride_z, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_V,
        )  # fmt: skip
        keep = valid[:, None] & (z > float("-inf")) & (cols[None, :] != tgt[:, None])
        e = tl.where(keep, tl.exp(z - m[:, None]), 0.0)
        acc += e
        tl.store(
            P + rows[:, None] * stride_p + local[None, :],
            (e * dzdx).to(P.dtype.element_ty),
            mask=row_mask[:, None] & col_mask[None, :],
        )
    sx += tl.sum(acc, axis=1)

    tl.store(M + rows, m, mask=row_mask)
    tl.store(S + rows, s, mask=row_mask)
    tl.store(SX + rows, sx, mask=row_mask)
    tl.store(ZT + rows, zt, mask=row_mask)
    if HAS_SQ:
        tl.store(Q + rows, q, mask=row_mask)
    tl.store(ALPHA + rows, c_old, mask=row_mask)


def frozen_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    top1: torch.Tensor | None = None,
    log_sum_sq: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, d], weight [V, d] (one half/fp32 dtype), targets [N] int64.

    Returns logp [N] fp32, lse [N] fp32, and what the backward needs: o [N, d] in
    hidden's dtype (sum_{v != t} p_v c_v W_v) and ct [N] fp32 ((1 - p_t) c_t); fills
    `top1` and `log_sum_sq` as `linear_logprobs_fwd` does.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    o = torch.empty_like(hidden)
    if N == 0:
        return torch.empty(0, **f32), torch.empty(0, **f32), o, torch.empty(0, **f32)
    # the cublas design's backward chunks (also Z + a half chunk + an [R, d] accumulator)
    R, C = chunk_sizes(N, V, chunk_rows, chunk_vocab, backward=True)
    zbuf = torch.empty((R, C), **f32)
    pbuf = torch.empty((R, C), device=hidden.device, dtype=hidden.dtype)
    acc = torch.empty((R, D), **f32)
    m, s, sx, zt, q, alpha = torch.empty((6, N), **f32)
    w32 = None if hidden.device.type == "cuda" else weight.float()  # CPU: no fp32-out GEMM

    for n0 in range(0, N, R):
        n = min(R, N - n0)
        rows = slice(n0, n0 + n)
        h = hidden[rows]
        for v0 in range(0, V, C):
            nv = min(C, V - v0)
            z, p = zbuf[:n, :nv], pbuf[:n, :nv]
            mm_fp32(h, weight[v0 : v0 + nv].T, z, b32=None if w32 is None else w32[v0 : v0 + nv].T)
            frozen_logprobs_fwd_kernel[(triton.cdiv(n, FROZEN_BLOCK_N),)](
                z, p, bias if bias is not None else z, targets[rows], m[rows], s[rows],
                sx[rows], zt[rows], q[rows], alpha[rows],
                n, v0, nv, z.stride(0), p.stride(0), 1.0 / temperature, softcap or 1.0,
                ignore_index, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                HAS_SQ=log_sum_sq is not None, IS_FIRST=v0 == 0, BLOCK_N=FROZEN_BLOCK_N,
                BLOCK_V=FROZEN_BLOCK_V, num_warps=FROZEN_NUM_WARPS,
            )  # fmt: skip
            if v0 == 0:
                mm_fp32(p, weight[:nv], acc[:n], b32=None if w32 is None else w32[:nv])
            else:
                acc[:n].mul_(alpha[rows, None])
                addmm_fp32(acc[:n], p, weight[v0 : v0 + nv])
        o[rows] = acc[:n] / s[rows, None]

    valid = targets != ignore_index
    log_s = s.log()
    lse = m + log_s
    logp = torch.where(valid, zt - lse, 0.0)
    ct = sx / s  # 1 - p_t without cancellation
    if softcap is not None:  # c_t = 1 - tanh^2 at the target, from z_t = softcap tanh / T
        ct = ct * (1 - (zt * temperature / softcap) ** 2)
    if top1 is not None:
        top1.copy_(valid & (zt >= m))
    if log_sum_sq is not None:
        log_sum_sq.copy_(torch.where(valid, q.log() - 2 * log_s, 0.0))
    return logp, lse, o, torch.where(valid, ct, 0.0)


def frozen_logprobs_bwd(
    weight: torch.Tensor,
    targets: torch.Tensor,
    o: torch.Tensor,
    ct: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """d_hidden [N, d] in o's dtype: g / T * (ct W_t - o) (0 where ignored)."""
    dh = torch.empty_like(o)
    g = torch.where(targets != ignore_index, grad_logp.float() / temperature, 0.0)
    safe = targets.clamp(0, weight.shape[0] - 1)
    for n0 in range(0, o.shape[0], CUBLAS_CHUNK_ROWS):  # bounded fp32 temporaries
        r = slice(n0, n0 + CUBLAS_CHUNK_ROWS)
        w_t = weight.index_select(0, safe[r]).float()
        dh[r] = (w_t * ct[r, None] - o[r].float()) * g[r, None]
    return dh
