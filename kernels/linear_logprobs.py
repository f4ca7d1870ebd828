"""Fused linear log-probs and entropies: `hidden [N, d] @ weight[V, d].T` -> per-token stats.

Logits `z = softcap(hidden @ weight.T + bias) / temperature` exist only tile by tile.

Forward tiling. grid = (cdiv(N, BLOCK_N), num_splits). Program (i, s) owns rows
[i*BLOCK_N, (i+1)*BLOCK_N) and the vocab columns of split s. For every BLOCK_V block of
its split it forms the [BLOCK_N, BLOCK_V] logits tile with an fp32 accumulator (a loop
over d in BLOCK_D steps), masks padded columns to -inf, and folds the tile into running
per-row statistics: max m, s = sum e^(z-m), a = sum e^(z-m) (z-m), and the target logit
when the target falls in the block. Row blocks vary fastest in the grid, so programs in
flight stream the same weight blocks and share them through L2. Each split writes its
statistics to [num_splits, N] scratch, and `linear_logprobs_combine_kernel` merges them
into logp = z_t - lse and entropy = log s - a/s (both relative to the same max).

Backward tiling. grid = one program per [BLOCK_N, BLOCK_V] tile, ordered in groups of
GROUP_N row blocks per vocab block (L2 reuse of both operands). Each program recomputes
its logits tile, forms dz = g_logp*(onehot - p) - g_ent*p*(log p + entropy) (the entropy
term is -g_ent*p*(z - mu) with mu = sum p z), chains it through temperature and softcap,
and then, BLOCK_D columns at a time, atomically adds dz @ W_v into an fp32 dH and, only
when the weight is trainable, dz^T @ H_i into an fp32 dW.
"""

import torch
import triton
import triton.language as tl

from .config import (
    _INTERPRET_BWD_CFG,
    _INTERPRET_CFG,
    LINEAR_LOGPROBS_BWD,
    LINEAR_LOGPROBS_FWD,
    SPLIT_ALIGN,
    autotune,
    configs,
)

# fp32 scratch for dH is allocated per row chunk of the backward, at most this many bytes,
# so a bf16 run never holds an fp32 copy of the whole [N, d] gradient.
BWD_SCRATCH_BYTES = 32 * 2**20


@triton.jit
def _logits_tile(H, W, rows, row_mask, cols, col_mask, D, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    # x[BLOCK_N, BLOCK_V] = H[rows] @ W[cols].T, fp32 accumulation over d
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        h = tl.load(H + rows[:, None] * stride_h + dcols[None, :],
                    mask=row_mask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + dcols[None, :],
                    mask=col_mask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _transform(x, Bias, cols, col_mask, inv_temp, softcap,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # z = softcap(x + bias) / T; also returns dz/dx (without the 1/T), 1 when no softcap
    if HAS_BIAS:
        x += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        x = softcap * t
        dxdx = 1.0 - t * t
    else:
        dxdx = 1.0
    return x * inv_temp, dxdx


@triton.jit(do_not_specialize=["N", "ignore_index"])
def linear_logprobs_fwd_kernel(
    H, W, Bias, T, Mp, Sp, Ap, Zp,
    N, V, D, stride_h, stride_w, split_cols, inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(T + rows, mask=row_mask, other=ignore_index)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = pid_s.to(tl.int64) * split_cols
    v_end = tl.minimum(v_begin + split_cols, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        x = _logits_tile(H, W, rows, row_mask, cols, col_mask, D, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        z, _ = _transform(x, Bias, cols, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(col_mask[None, :], z, float("-inf"))

        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zm = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_mask[None, :], tl.exp(zm), 0.0)
        if HAS_ENTROPY:
            # a is kept relative to the running max: re-base the old sum before rescaling
            shift = tl.where(m == float("-inf"), 0.0, m - m_new)
            a = alpha * (a + s * shift) + tl.sum(e * zm, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new

    out = pid_s.to(tl.int64) * N + rows
    tl.store(Mp + out, m, mask=row_mask)
    tl.store(Sp + out, s, mask=row_mask)
    tl.store(Zp + out, zt, mask=row_mask)
    if HAS_ENTROPY:
        tl.store(Ap + out, a, mask=row_mask)


@triton.jit(do_not_specialize=["N", "num_splits", "ignore_index"])
def linear_logprobs_combine_kernel(
    Mp, Sp, Ap, Zp, T, Logp, Ent, Lse, N, num_splits, ignore_index,
    HAS_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Merge the per-split (m, s, a, z_t) of BLOCK_N rows into logp, entropy and lse.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    mx = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for k in range(num_splits):
        mx = tl.maximum(mx, tl.load(Mp + k * N + rows, mask=row_mask, other=0.0))
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    for k in range(num_splits):
        mk = tl.load(Mp + k * N + rows, mask=row_mask, other=0.0)
        sk = tl.load(Sp + k * N + rows, mask=row_mask, other=1.0)
        scale = tl.exp(mk - mx)
        s += sk * scale
        if HAS_ENTROPY:
            ak = tl.load(Ap + k * N + rows, mask=row_mask, other=0.0)
            a += scale * (ak + sk * (mk - mx))
        zt += tl.load(Zp + k * N + rows, mask=row_mask, other=0.0)

    valid = row_mask & (tl.load(T + rows, mask=row_mask, other=ignore_index) != ignore_index)
    log_s = tl.log(s)
    tl.store(Lse + rows, mx + log_s, mask=row_mask)
    tl.store(Logp + rows, tl.where(valid, zt - mx - log_s, 0.0), mask=row_mask)
    if HAS_ENTROPY:
        tl.store(Ent + rows, tl.where(valid, log_s - a / s, 0.0), mask=row_mask)


@autotune(LINEAR_LOGPROBS_BWD, _INTERPRET_BWD_CFG, key=["D", "V"], reset_to_zero=["dH", "dW", "dB"])
@triton.jit(do_not_specialize=["N", "ignore_index"])
def linear_logprobs_bwd_kernel(
    H, W, Bias, T, Lse, Ent, GLogp, GEnt, dH, dW, dB,
    N, V, D, stride_h, stride_w, stride_dh, stride_dw, inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    v_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * v_blocks
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    tgt = tl.load(T + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    lse = tl.load(Lse + rows, mask=row_mask, other=0.0)

    x = _logits_tile(H, W, rows, row_mask, cols, col_mask, D, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    z, dzdx = _transform(x, Bias, cols, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
    keep = valid[:, None] & col_mask[None, :]
    logp = tl.where(keep, z - lse[:, None], 0.0)
    p = tl.where(keep, tl.exp(logp), 0.0)
    dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_G_LOGP:
        g = tl.load(GLogp + rows, mask=row_mask, other=0.0)
        onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
        dz += g[:, None] * (onehot - p)
    if HAS_G_ENT:
        ge = tl.load(GEnt + rows, mask=row_mask, other=0.0)
        ent = tl.load(Ent + rows, mask=row_mask, other=0.0)
        dz -= ge[:, None] * p * (logp + ent[:, None])
    dx = tl.where(keep, dz * dzdx * inv_temp, 0.0)
    if COMPUTE_DB:
        tl.atomic_add(dB + cols, tl.sum(dx, axis=0), mask=col_mask)
    dx = dx.to(H.dtype.element_ty)

    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        if COMPUTE_DH:
            w = tl.load(W + cols[:, None] * stride_w + dcols[None, :],
                        mask=col_mask[:, None] & dmask[None, :], other=0.0)
            dh = tl.dot(dx, w, input_precision=DOT_PRECISION)
            tl.atomic_add(dH + rows[:, None] * stride_dh + dcols[None, :], dh,
                          mask=row_mask[:, None] & dmask[None, :])
        if COMPUTE_DW:
            h = tl.load(H + rows[:, None] * stride_h + dcols[None, :],
                        mask=row_mask[:, None] & dmask[None, :], other=0.0)
            dw = tl.dot(tl.trans(dx), h, input_precision=DOT_PRECISION)
            tl.atomic_add(dW + cols[:, None] * stride_dw + dcols[None, :], dw,
                          mask=col_mask[:, None] & dmask[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 heads get true fp32 products (as torch.matmul by default), not TF32
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_splits(n_rows: int, vocab: int, device: torch.device) -> int:
    # Enough (row block x vocab split) programs for ~2 waves; rows first, splits fill in.
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n_rows, LINEAR_LOGPROBS_FWD[0].kwargs["BLOCK_N"])
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(vocab, SPLIT_ALIGN)))


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    return_entropy: bool,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward. hidden [N, d], weight [V, d] (unit stride on d), targets [N] int64.

    Returns logp [N] fp32, entropy [N] fp32 (or None), and lse [N] fp32 for the backward.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    if num_splits is None:
        num_splits = _num_splits(N, V, hidden.device)
    split_cols = triton.cdiv(triton.cdiv(V, num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    num_splits = triton.cdiv(V, split_cols)

    f32 = dict(device=hidden.device, dtype=torch.float32)
    m, s, zt = (torch.empty((num_splits, N), **f32) for _ in range(3))
    a = torch.empty((num_splits, N), **f32) if return_entropy else m
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if return_entropy else None

    cfg = configs(LINEAR_LOGPROBS_FWD, _INTERPRET_CFG)[0]
    block_n = cfg.kwargs["BLOCK_N"]
    linear_logprobs_fwd_kernel[(triton.cdiv(N, block_n), num_splits)](
        hidden, weight, bias if bias is not None else m, targets, m, s, a, zt,
        N, V, D, hidden.stride(0), weight.stride(0), split_cols, 1.0 / temperature,
        softcap or 1.0, ignore_index,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=return_entropy,
        DOT_PRECISION=_dot_precision(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs,
    )
    combine_block = 16 if N <= 16 else 128
    linear_logprobs_combine_kernel[(triton.cdiv(N, combine_block),)](
        m, s, a, zt, targets, logp, ent if ent is not None else logp, lse, N, num_splits,
        ignore_index, HAS_ENTROPY=return_entropy, BLOCK_N=combine_block,
    )
    return logp, ent, lse


def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward. Returns (d_hidden [N, d], d_weight [V, d], d_bias [V]), each in
    its input's dtype, or None where not needed; a frozen weight costs no [V, d] buffer."""
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    unused = torch.empty(1, **f32)  # stands in for pointers a constexpr flag switches off
    dw = torch.zeros((V, D), **f32) if need_weight else None
    db = torch.zeros(V, **f32) if need_bias else None
    dh = torch.empty_like(hidden) if need_hidden else None
    # fp32 dH accumulates straight into the result; other dtypes into fp32 scratch, one row
    # chunk at a time, then round once.
    direct = dh is None or hidden.dtype == torch.float32
    chunk = N if direct else max(1, BWD_SCRATCH_BYTES // (4 * D))
    if dh is not None and direct:
        dh.zero_()
    scratch = None if direct else torch.empty((min(chunk, N), D), **f32)

    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        rows = slice(start, start + n)
        if dh is None:
            acc = unused
        elif direct:
            acc = dh
        else:
            acc = scratch[:n].zero_()
        grid = lambda meta, n=n: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)
        linear_logprobs_bwd_kernel[grid](
            hidden[rows], weight, bias if bias is not None else unused, targets[rows], lse[rows],
            entropy[rows] if entropy is not None else unused,
            grad_logp[rows] if grad_logp is not None else unused,
            grad_entropy[rows] if grad_entropy is not None else unused,
            acc, dw if dw is not None else unused, db if db is not None else unused,
            n, V, D, hidden.stride(0), weight.stride(0), acc.stride(0), D,
            1.0 / temperature, softcap or 1.0, ignore_index,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_G_LOGP=grad_logp is not None, HAS_G_ENT=grad_entropy is not None,
            COMPUTE_DH=dh is not None, COMPUTE_DW=need_weight, COMPUTE_DB=need_bias,
            DOT_PRECISION=_dot_precision(hidden.dtype),
        )
        if not direct:
            dh[rows].copy_(acc)

    return (
        dh,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
