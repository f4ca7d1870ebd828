"""Fused linear log-probs and entropies: `hidden [N, d] @ weight[V, d].T` -> per-token stats.

Logits `z = softcap(hidden @ weight.T + bias) / temperature` exist only tile by tile.

Forward tiling. grid = (num_splits, cdiv(N, BLOCK_N)). Program (s, i) owns rows
[i*BLOCK_N, (i+1)*BLOCK_N) and the vocab columns of split s. For every BLOCK_V block of
its split it forms the [BLOCK_N, BLOCK_V] logits tile with an fp32 accumulator (a loop
over d in BLOCK_D steps), masks padded columns to -inf, and folds the tile into running
per-row statistics: max m, s = sum e^(z-m), a = sum e^(z-m) (z-m), optionally
q = sum e^(2(z-m)) (WPO's log sum_v p_v^2 = log q - 2 log s), and the target logit when
the target falls in the block. Splits vary fastest in the grid, so the programs in
flight cover a few row blocks times all splits and share both hidden and weight blocks
through L2 (see `_num_splits`). Each split writes its statistics to [num_splits, N]
scratch, and `linear_logprobs_combine_kernel` merges them into logp = z_t - lse and
entropy = log s - a/s (both relative to the same max).

Backward tiling. The backward walks [BWD_CHUNK_ROWS, BWD_CHUNK_VOCAB] blocks of the
logits gradient. In each, one program per [BLOCK_N, BLOCK_V] tile (GROUP_N row blocks
per vocab block, so both operands are reused through L2) recomputes its logits tile with
an fp32 accumulator, forms dz = g_logp*(onehot - p) - g_ent*p*(log p + H) (the entropy
term is -g_ent*p*(z - mu) with mu = sum p z), chains it through temperature and softcap,
and stores it in the input dtype to the block's scratch. The reductions that follow,
dH += dz @ W_v over vocab and (only for a trainable head) dW_v += dz^T @ H over rows,
are GEMMs with a long K that cuBLAS runs into fp32 accumulators. Doing them inside the
tile kernel instead would push a [BLOCK_N, d] partial per vocab block through global
atomics: N*d*V/BLOCK_V words, hundreds of GB at N=16k, d=4096, V=128k.
"""

import torch
import triton
import triton.language as tl

from .config import (
    _INTERPRET_BWD_CFG,
    _INTERPRET_CFG,
    LINEAR_LOGPROBS_BWD,
    LINEAR_LOGPROBS_BWD_FP32,
    LINEAR_LOGPROBS_FWD,
    LINEAR_LOGPROBS_FWD_FP32,
    SPLIT_ALIGN,
    autotune,
)

# The backward works on [BWD_CHUNK_ROWS, BWD_CHUNK_VOCAB] blocks of the logits gradient:
# 32 MiB in bf16, plus a [BWD_CHUNK_ROWS, d] fp32 dH accumulator (16 MiB at d=4096).
# 1024 rows keep the GEMMs compute-bound: a row chunk streams W once for ~1024 flop per
# byte of W, well above the H100/H200 ridge of ~300 flop/byte.
BWD_CHUNK_ROWS = 1024
BWD_CHUNK_VOCAB = 16384


def _half_on_cuda(a: torch.Tensor) -> bool:
    # torch.mm/addmm(..., out_dtype=torch.float32): half inputs, fp32 output, CUDA only
    # (torch >= 2.8, the floor in pyproject.toml); elsewhere through fp32 copies
    return a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16)


# Whether torch.addmm takes an fp32 accumulator with half operands (out_dtype=fp32): some
# releases require self to have the operands' dtype. Found out on the first call.
_ADDMM_FP32_ACC: bool | None = None


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b into an fp32 acc without rounding the products to a's dtype."""
    global _ADDMM_FP32_ACC
    if not _half_on_cuda(a):
        acc.addmm_(a.float(), b.float())
        return
    if _ADDMM_FP32_ACC is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_FP32_ACC = True
            return
        except RuntimeError:  # a dtype check at launch, before any work
            if _ADDMM_FP32_ACC:
                raise
            _ADDMM_FP32_ACC = False
    acc.add_(torch.mm(a, b, out_dtype=torch.float32))  # an fp32 temporary of acc's size


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, b32=None) -> None:
    """out = a @ b into an fp32 `out` (on CPU through fp32 copies; pass b32 = b.float()
    to reuse one across calls)."""
    if _half_on_cuda(a):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        torch.mm(a.float(), b.float() if b32 is None else b32, out=out)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def logits_epilogue(
    x, Bias, cols, col_mask, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr
):
    # z = softcap(x + bias) / T from raw fp32 logits x [.., BLOCK_V], and dz/dx without
    # the 1/T (1 without softcap)
    if HAS_BIAS:
        x += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        x = softcap * t
        dzdx = 1.0 - t * t
    else:
        dzdx = 1.0
    return x * inv_temp, dzdx


@triton.jit
def logits_grad(
    z, dzdx, keep, cols, tgt, lse, rows, row_mask, GLogp, GEnt, Ent, inv_temp,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr,
):  # fmt: skip
    # d loss / d raw logit of a tile: dz = g_logp (onehot - p) - g_ent p (log p + H),
    # through softcap (dzdx) and 1/T; 0 outside `keep` (scored rows x real columns)
    logp = tl.where(keep, z - lse[:, None], 0.0)
    p = tl.where(keep, tl.exp(logp), 0.0)
    dz = tl.zeros_like(z)  # z is fp32
    if HAS_G_LOGP:
        g = tl.load(GLogp + rows, mask=row_mask, other=0.0)
        onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
        dz += g[:, None] * (onehot - p)
    if HAS_G_ENT:
        ge = tl.load(GEnt + rows, mask=row_mask, other=0.0)
        ent = tl.load(Ent + rows, mask=row_mask, other=0.0)
        dz -= ge[:, None] * p * (logp + ent[:, None])
    return tl.where(keep, dz * dzdx * inv_temp, 0.0)


@triton.jit
def load_logits_step(
    Z, Bias, rows, row_mask, v0, v_start, n_cols, stride_z, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # one [rows, BLOCK_V] step, local columns [v0, v0 + BLOCK_V), of a raw fp32 logits
    # chunk Z that holds vocab columns [v_start, v_start + n_cols) (the cuBLAS designs):
    # z = softcap(x + bias) / T (-inf past the chunk), dz/dx, local and vocab column ids
    # and the column mask
    local = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = local < n_cols
    cols = v_start + local
    x = tl.load(
        Z + rows[:, None] * stride_z + local[None, :],
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    z, dzdx = logits_epilogue(x, Bias, cols, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
    return tl.where(col_mask[None, :], z, float("-inf")), dzdx, local, cols, col_mask


@triton.jit
def _logits_tile(
    H,
    W,
    Bias,
    rows,
    row_mask,
    cols,
    col_mask,
    D,
    stride_h,
    stride_w,
    inv_temp,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # z = softcap(H[rows] @ W[cols].T + bias) / T as a [BLOCK_N, BLOCK_V] fp32 tile
    # (accumulated over d in BLOCK_D steps), and dz/dx without the 1/T (1 without softcap)
    x = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        h = tl.load(
            H + rows[:, None] * stride_h + dcols[None, :],
            mask=row_mask[:, None] & dmask[None, :],
            other=0.0,
        )
        w = tl.load(
            W + cols[:, None] * stride_w + dcols[None, :],
            mask=col_mask[:, None] & dmask[None, :],
            other=0.0,
        )
        x = tl.dot(h, tl.trans(w), x, input_precision=DOT_PRECISION)
    return logits_epilogue(x, Bias, cols, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit(do_not_specialize=["N", "ignore_index"])
def linear_logprobs_fwd_kernel(
    H,
    W,
    Bias,
    T,
    Mp,
    Sp,
    Ap,
    Zp,
    Qp,
    N,
    V,
    D,
    stride_h,
    stride_w,
    split_cols,
    inv_temp,
    softcap,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_SQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(T + rows, mask=row_mask, other=ignore_index)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    q = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = pid_s.to(tl.int64) * split_cols
    v_end = tl.minimum(v_begin + split_cols, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, _ = _logits_tile(
            H,
            W,
            Bias,
            rows,
            row_mask,
            cols,
            col_mask,
            D,
            stride_h,
            stride_w,
            inv_temp,
            softcap,
            HAS_BIAS,
            HAS_SOFTCAP,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
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
        if HAS_SQ:
            q = q * alpha * alpha + tl.sum(e * e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new

    out = pid_s.to(tl.int64) * N + rows
    tl.store(Mp + out, m, mask=row_mask)
    tl.store(Sp + out, s, mask=row_mask)
    tl.store(Zp + out, zt, mask=row_mask)
    if HAS_ENTROPY:
        tl.store(Ap + out, a, mask=row_mask)
    if HAS_SQ:
        tl.store(Qp + out, q, mask=row_mask)


@triton.jit(do_not_specialize=["N", "num_splits", "ignore_index"])
def linear_logprobs_combine_kernel(
    Mp,
    Sp,
    Ap,
    Zp,
    Qp,
    T,
    Logp,
    Ent,
    Lse,
    Top1,
    LogSq,
    RowMax,
    TgtLogit,
    N,
    num_splits,
    ignore_index,
    HAS_ENTROPY: tl.constexpr,
    HAS_TOP1: tl.constexpr,
    HAS_SQ: tl.constexpr,
    HAS_RAW: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Merge the per-split (m, s, a, z_t) of BLOCK_N rows into logp, entropy and lse; the
    # target is a top-1 token when its logit is the row max (z_t is the same float as the
    # tile entry the max came from, so the test is exact). HAS_RAW also stores the row max
    # and the target logit (0 where the target is not a column): what a vocab shard
    # contributes to the merge across shards (fastrl/ops/logprobs/vocab_parallel.py).
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    mx = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for k in range(num_splits):
        mx = tl.maximum(mx, tl.load(Mp + k * N + rows, mask=row_mask, other=0.0))
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    q = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    for k in range(num_splits):
        mk = tl.load(Mp + k * N + rows, mask=row_mask, other=0.0)
        sk = tl.load(Sp + k * N + rows, mask=row_mask, other=1.0)
        scale = tl.exp(mk - mx)
        s += sk * scale
        if HAS_ENTROPY:
            ak = tl.load(Ap + k * N + rows, mask=row_mask, other=0.0)
            a += scale * (ak + sk * (mk - mx))
        if HAS_SQ:
            q += tl.load(Qp + k * N + rows, mask=row_mask, other=0.0) * scale * scale
        zt += tl.load(Zp + k * N + rows, mask=row_mask, other=0.0)

    valid = row_mask & (tl.load(T + rows, mask=row_mask, other=ignore_index) != ignore_index)
    log_s = tl.log(s)
    tl.store(Lse + rows, mx + log_s, mask=row_mask)
    tl.store(Logp + rows, tl.where(valid, zt - mx - log_s, 0.0), mask=row_mask)
    if HAS_ENTROPY:
        tl.store(Ent + rows, tl.where(valid, log_s - a / s, 0.0), mask=row_mask)
    if HAS_TOP1:
        tl.store(Top1 + rows, (valid & (zt >= mx)).to(tl.uint8), mask=row_mask)
    if HAS_SQ:
        tl.store(LogSq + rows, tl.where(valid, tl.log(q) - 2.0 * log_s, 0.0), mask=row_mask)
    if HAS_RAW:
        tl.store(RowMax + rows, mx, mask=row_mask)
        tl.store(TgtLogit + rows, zt, mask=row_mask)


@triton.jit(do_not_specialize=["N", "ignore_index"])
def linear_logprobs_bwd_kernel(
    H,
    W,
    Bias,
    T,
    Lse,
    Ent,
    GLogp,
    GEnt,
    dZ,
    N,
    V,
    D,
    v_start,
    n_cols,
    stride_h,
    stride_w,
    stride_dz,
    inv_temp,
    softcap,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    v_blocks = tl.cdiv(n_cols, BLOCK_V)
    per_group = GROUP_N * v_blocks
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols = v_start + local
    row_mask = rows < N
    col_mask = local < n_cols
    tgt = tl.load(T + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    lse = tl.load(Lse + rows, mask=row_mask, other=0.0)

    z, dzdx = _logits_tile(
        H,
        W,
        Bias,
        rows,
        row_mask,
        cols,
        col_mask,
        D,
        stride_h,
        stride_w,
        inv_temp,
        softcap,
        HAS_BIAS,
        HAS_SOFTCAP,
        DOT_PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    keep = valid[:, None] & col_mask[None, :]
    dx = logits_grad(
        z, dzdx, keep, cols, tgt, lse, rows, row_mask, GLogp, GEnt, Ent, inv_temp,
        HAS_G_LOGP, HAS_G_ENT,
    )  # fmt: skip
    tl.store(
        dZ + rows[:, None] * stride_dz + local[None, :],
        dx.to(dZ.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


# The tile kernels with their default config for half-precision (2-byte) and wider inputs
# (see kernels/config.py); index with `_width(tensor)`.
_FWD = {
    2: autotune(LINEAR_LOGPROBS_FWD, _INTERPRET_CFG, key=["D", "V"])(linear_logprobs_fwd_kernel),
    4: autotune(LINEAR_LOGPROBS_FWD_FP32, _INTERPRET_CFG, key=["D", "V"])(
        linear_logprobs_fwd_kernel
    ),
}
_BWD = {
    2: autotune(LINEAR_LOGPROBS_BWD, _INTERPRET_BWD_CFG, key=["D", "V"])(
        linear_logprobs_bwd_kernel
    ),
    4: autotune(LINEAR_LOGPROBS_BWD_FP32, _INTERPRET_BWD_CFG, key=["D", "V"])(
        linear_logprobs_bwd_kernel
    ),
}


def _width(t: torch.Tensor) -> int:
    return 2 if t.element_size() <= 2 else 4


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 heads get true fp32 products (as torch.matmul by default), not TF32
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_splits(vocab: int, device: torch.device) -> int:
    # Splits vary fastest in the grid, so the ~#SM programs in flight cover about
    # #SM/S row blocks x S splits: each hidden block is read from HBM once for S programs
    # and each weight block once for #SM/S. Traffic per step, #SM/S + S blocks, is least
    # near S = sqrt(#SM), i.e. 8-16 on current GPUs.
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(round(sms**0.5), triton.cdiv(vocab, SPLIT_ALIGN)))


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
    top1: torch.Tensor | None = None,
    log_sum_sq: torch.Tensor | None = None,
    row_max: torch.Tensor | None = None,
    target_logit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward. hidden [N, d], weight [V, d] (unit stride on d), targets [N] int64.

    Returns logp [N] fp32, entropy [N] fp32 (or None), and lse [N] fp32 for the backward;
    fills `top1` ([N] bool, if given) with whether each target has the largest logit and
    `log_sum_sq` ([N] fp32, if given) with log sum_v p_v^2 (0 where ignored). With
    `row_max` and `target_logit` ([N] fp32, both or neither) it also stores each row's
    largest logit and its target's logit (0 where the target is no column of `weight`).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    if num_splits is None:
        num_splits = _num_splits(V, hidden.device)
    split_cols = triton.cdiv(triton.cdiv(V, num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    num_splits = triton.cdiv(V, split_cols)

    f32 = dict(device=hidden.device, dtype=torch.float32)
    m, s, zt = (torch.empty((num_splits, N), **f32) for _ in range(3))
    a = torch.empty((num_splits, N), **f32) if return_entropy else m
    q = torch.empty((num_splits, N), **f32) if log_sum_sq is not None else m
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if return_entropy else None
    if N == 0:
        return logp, ent, lse

    grid = lambda meta: (num_splits, triton.cdiv(N, meta["BLOCK_N"]))
    _FWD[_width(hidden)][grid](
        hidden,
        weight,
        bias if bias is not None else m,
        targets,
        m,
        s,
        a,
        zt,
        q,
        N,
        V,
        D,
        hidden.stride(0),
        weight.stride(0),
        split_cols,
        1.0 / temperature,
        softcap or 1.0,
        ignore_index,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_ENTROPY=return_entropy,
        HAS_SQ=log_sum_sq is not None,
        DOT_PRECISION=_dot_precision(hidden.dtype),
    )
    combine_block = 16 if N <= 16 else 128
    linear_logprobs_combine_kernel[(triton.cdiv(N, combine_block),)](
        m,
        s,
        a,
        zt,
        q,
        targets,
        logp,
        ent if ent is not None else logp,
        lse,
        top1.view(torch.uint8) if top1 is not None else lse,
        log_sum_sq if log_sum_sq is not None else lse,
        row_max if row_max is not None else lse,
        target_logit if target_logit is not None else lse,
        N,
        num_splits,
        ignore_index,
        HAS_ENTROPY=return_entropy,
        HAS_TOP1=top1 is not None,
        HAS_SQ=log_sum_sq is not None,
        HAS_RAW=row_max is not None,
        BLOCK_N=combine_block,
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
    its input's dtype, or None where not needed; a frozen weight costs no [V, d] buffer
    and no dW GEMM. A trainable one accumulates dW over row chunks in fp32."""
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    unused = torch.empty(1, **f32)
    grad_logp, grad_entropy = (  # the kernel reads them as fp32 with unit stride
        g.float().contiguous() if g is not None else None for g in (grad_logp, grad_entropy)
    )
    dh = torch.empty_like(hidden) if need_hidden else None
    dw = torch.zeros((V, D), **f32) if need_weight else None
    db = torch.zeros(V, **f32) if need_bias else None
    n_chunk, v_chunk = max(1, min(N, BWD_CHUNK_ROWS)), min(V, BWD_CHUNK_VOCAB)
    dz_buf = torch.empty((n_chunk, v_chunk), device=hidden.device, dtype=hidden.dtype)
    dh_acc = torch.empty((n_chunk, D), **f32) if need_hidden else None

    for n0 in range(0, N, n_chunk):
        rows = slice(n0, n0 + n_chunk)
        h = hidden[rows]
        n = h.shape[0]
        if dh_acc is not None:
            dh_acc[:n].zero_()
        for v0 in range(0, V, v_chunk):
            nv = min(v_chunk, V - v0)
            dz = dz_buf[:n, :nv]
            grid = lambda meta, n=n, nv=nv: (
                triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(nv, meta["BLOCK_V"]),
            )
            _BWD[_width(hidden)][grid](
                h,
                weight,
                bias if bias is not None else unused,
                targets[rows],
                lse[rows],
                entropy[rows] if entropy is not None else unused,
                grad_logp[rows] if grad_logp is not None else unused,
                grad_entropy[rows] if grad_entropy is not None else unused,
                dz,
                n,
                V,
                D,
                v0,
                nv,
                h.stride(0),
                weight.stride(0),
                dz.stride(0),
                1.0 / temperature,
                softcap or 1.0,
                ignore_index,
                HAS_BIAS=bias is not None,
                HAS_SOFTCAP=softcap is not None,
                HAS_G_LOGP=grad_logp is not None,
                HAS_G_ENT=grad_entropy is not None,
                DOT_PRECISION=_dot_precision(hidden.dtype),
            )
            if dh_acc is not None:
                addmm_fp32(dh_acc[:n], dz, weight[v0 : v0 + nv])
            if dw is not None:
                addmm_fp32(dw[v0 : v0 + nv], dz.T, h)
            if db is not None:
                db[v0 : v0 + nv] += dz.sum(0, dtype=torch.float32)
        if dh is not None:
            dh[rows].copy_(dh_acc[:n])

    return (
        dh,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
