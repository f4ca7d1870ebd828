"""Fused policy head: a GRPO-family loss's gradient w.r.t. hidden states in one sweep.

For a token-level loss the derivative w.r.t. a token's log-prob depends only on that
token (the normalisers, masks and sampler weights are constants the caller folds into
per-token coefficients w_pt, w_kl, w_ent), so the gradient can be formed as soon as the
token's logsumexp is known, and forward+backward needs two N x V x d GEMMs, not three:

    for each chunk of `rows` tokens (a multiple of 128, the GEMM tile, from chunk_bytes):
        Z  = H_c @ W.T                 cuBLAS, [rows, V] fp32 (the only GEMM output kept)
        fused_policy_loss_fwd_kernel   per row: pass 1 over Z -> max, sum e^z, sum z e^z,
                                       target logit -> logp, entropy; the token's loss
                                       derivative g = w_pt dpt + w_kl dkl (token_terms);
                                       pass 2 over Z -> dz = g (onehot - p) - w_ent p (log p
                                       + H), through softcap/temperature, times `scale`,
                                       written in the input dtype over Z's own bytes
        dH_c = dZ @ W                  cuBLAS, fp32 accumulation over the whole vocab
        dW  += dZ^T @ H_c              only for a trainable head, fp32

Tiling of the row kernel: grid = (cdiv(rows, BLOCK_N),), a [BLOCK_N, BLOCK_V] tile of Z
per step, two sweeps over the vocab. It is bandwidth-bound: it reads Z twice and writes
it once, ~3 x rows x V x 2 bytes per chunk against 2 x 2 x rows x V x d flops of GEMMs.

Z is kept in fp32, as in `linear_logprobs`' tiles: log-probs that are compared with each
other (current here, old and reference from `linear_logprobs`) see the same fp32 logits,
so identical weights give a ratio of 1 and a KL of 0 to fp32 rounding. Rounding Z to bf16
instead would move each logit by up to half a bf16 step (0.06 at |z| ~ 20).

dz goes over Z in place: for a 2-byte input dtype, row r's dz occupies the first half of
the bytes of row r's fp32 logits (a [rows, V] view with row stride 2V). A store of block
[v0, v0 + BLOCK_V) overwrites fp32 columns below v0 + BLOCK_V, all read by then; a
barrier between the loads and the stores of a block orders the warps of the program.

fp16 and loss scaling: the gradient is formed before the upstream gradient (a loss
scaler's 2^16) is known, and dz ~ p / N_tokens underflows in fp16. The caller passes a
power-of-two `scale` (a device scalar) that brings the largest coefficient to ~1; dz, dH
and dW hold scale x the gradient, and the backward multiplies by g_out / scale.
"""

import os

import torch
import triton
import triton.language as tl

from .config import FUSED_POLICY_BLOCK_N, FUSED_POLICY_BLOCK_V, FUSED_POLICY_NUM_WARPS
from .linear_logprobs import addmm_fp32, load_logits_step, logits_epilogue, mm_fp32
from .policy_loss import TokenTermParams, token_terms

# fp32 Z chunks hold at most this many bytes by default: 128 rows of a 128k vocab (62.6
# MiB at V=128256). FASTRL_FUSED_CHUNK_MB (or chunk_bytes=) trades memory for GEMMs of
# more rows (the dH GEMM of 128 rows x d=4096 has only 32-64 output tiles for 132 SMs).
CHUNK_BYTES = 64 * 2**20
ROW_KERNELS = ("lanes", "reduced")


def chunk_bytes_default() -> int:
    mb = os.environ.get("FASTRL_FUSED_CHUNK_MB")
    return CHUNK_BYTES if mb is None else int(float(mb) * 2**20)


def lane_stats() -> bool:
    """FASTRL_FUSED_ROW_KERNEL: "lanes" (the default: statistics per lane, one reduction
    after the loop) or "reduced" (reduced every step); not yet measured on a GPU."""
    name = os.environ.get("FASTRL_FUSED_ROW_KERNEL", "lanes")
    if name not in ROW_KERNELS:
        raise ValueError(f"FASTRL_FUSED_ROW_KERNEL must be one of {ROW_KERNELS}, got {name!r}")
    return name == "lanes"


# chunk rows are a multiple of this (a full cuBLAS tile) when at least this many fit
GEMM_TILE_ROWS = 128


def chunk_rows(n_tokens: int, vocab: int, chunk_bytes: int) -> int:
    """Rows of a fp32 [rows, vocab] chunk within chunk_bytes: a multiple of 128 (16 when
    fewer fit), at least 16, at most n_tokens."""
    rows = chunk_bytes // (4 * vocab)
    step = GEMM_TILE_ROWS if rows >= GEMM_TILE_ROWS else 16
    return max(1, min(n_tokens, max(16, rows // step * step)))


@triton.jit
def _row_stats_reduced(Z, Bias, rows, row_mask, tgt, V, stride_z, inv_temp, softcap,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    # per-row statistics, reduced across the block every step (one exp per element,
    # four cross-warp reductions and their barriers per step)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z, _, _, cols, _ = load_logits_step(Z, Bias, rows, row_mask, v0, 0, V, stride_z, inv_temp, softcap,
                               HAS_BIAS, HAS_SOFTCAP, BLOCK_V)  # fmt: skip
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zm = tl.where(z > float("-inf"), z - m_new[:, None], 0.0)
        e = tl.where(z > float("-inf"), tl.exp(zm), 0.0)
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        a = alpha * (a + s * shift) + tl.sum(e * zm, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    return m, s, a, zt


@triton.jit
def _row_stats_lanes(Z, Bias, rows, row_mask, tgt, V, stride_z, inv_temp, softcap,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    # running statistics per lane ([BLOCK_N, BLOCK_V] each), merged once after the loop:
    # no reduction or barrier inside it, so warps stream Z independently (more loads in
    # flight), at two exps per element instead of one
    m = tl.full((BLOCK_N, BLOCK_V), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    a = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    zt = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z, _, _, cols, _ = load_logits_step(Z, Bias, rows, row_mask, v0, 0, V, stride_z, inv_temp, softcap,
                               HAS_BIAS, HAS_SOFTCAP, BLOCK_V)  # fmt: skip
        m_new = tl.maximum(m, z)
        seen = m_new > float("-inf")  # a lane that has seen no column keeps zeros
        alpha = tl.where(m > float("-inf"), tl.exp(m - m_new), 0.0)
        zm = tl.where(z > float("-inf"), z - m_new, 0.0)
        e = tl.where(z > float("-inf"), tl.exp(zm), 0.0)
        shift = tl.where(m > float("-inf"), m - m_new, 0.0)
        a = tl.where(seen, alpha * (a + s * shift) + e * zm, 0.0)
        s = tl.where(seen, s * alpha + e, 0.0)
        zt += tl.where(cols[None, :] == tgt[:, None], z, 0.0)
        m = m_new
    # merge the lanes of each row, relative to the row max
    row_m = tl.max(m, axis=1)
    live = m > float("-inf")
    dm = tl.where(live, m - row_m[:, None], 0.0)
    scale = tl.where(live, tl.exp(dm), 0.0)
    row_s = tl.sum(s * scale, axis=1)
    row_a = tl.sum(scale * (a + s * dm), axis=1)
    return row_m, row_s, row_a, tl.sum(zt, axis=1)


@triton.jit(do_not_specialize=["N", "ignore_index"])
def fused_policy_loss_fwd_kernel(
    Z, DZ, SCALE, Bias, T, OLD, ADV, REF, WPT, WKL, WENT, LOGP, ENT,
    N, V, stride_z, stride_dz, inv_temp, softcap, ignore_index,
    clip_low, clip_high, delta, cispo_cap, tau_pos, tau_neg,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_OLD: tl.constexpr,
    FAMILY: tl.constexpr, HAS_DELTA: tl.constexpr, KL_EST: tl.constexpr,
    KL_TIMES_RATIO: tl.constexpr, HAS_WKL: tl.constexpr, HAS_WENT: tl.constexpr,
    HALF_DZ: tl.constexpr, LANE_STATS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(T + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)

    # pass 1: online (max, sum e^(z-m), sum e^(z-m)(z-m)) and the target logit
    if LANE_STATS:
        m, s, a, zt = _row_stats_lanes(
            Z, Bias, rows, row_mask, tgt, V, stride_z, inv_temp, softcap, HAS_BIAS,
            HAS_SOFTCAP, BLOCK_N, BLOCK_V,
        )  # fmt: skip
    else:
        m, s, a, zt = _row_stats_reduced(
            Z, Bias, rows, row_mask, tgt, V, stride_z, inv_temp, softcap, HAS_BIAS,
            HAS_SOFTCAP, BLOCK_N, BLOCK_V,
        )  # fmt: skip
    s = tl.where(row_mask, s, 1.0)
    lse = m + tl.log(s)
    logp = tl.where(valid, zt - lse, 0.0)
    ent = tl.where(valid, tl.log(s) - a / s, 0.0)
    tl.store(LOGP + rows, logp, mask=row_mask)
    tl.store(ENT + rows, ent, mask=row_mask)

    # the token's loss derivative w.r.t. its log-prob (and entropy)
    if HAS_OLD:
        old = tl.load(OLD + rows, mask=valid, other=0.0)
    else:
        old = logp
    adv = tl.load(ADV + rows, mask=valid, other=0.0)
    ref = logp
    if KL_EST != 0:
        ref = tl.load(REF + rows, mask=valid, other=0.0)
    _, _, dpt, _, dkl = token_terms(
        logp, old, adv, ref, clip_low, clip_high, delta, cispo_cap, tau_pos, tau_neg,
        FAMILY, HAS_DELTA, KL_EST, KL_TIMES_RATIO, True,
    )  # fmt: skip
    g = tl.load(WPT + rows, mask=valid, other=0.0) * dpt
    if HAS_WKL:
        g += tl.load(WKL + rows, mask=valid, other=0.0) * dkl
    g = tl.where(valid, g, 0.0)
    g_ent = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_WENT:
        g_ent = tl.load(WENT + rows, mask=valid, other=0.0)
    scale = tl.load(SCALE)

    # pass 2: dz over Z, in place
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        keep = valid[:, None] & col_mask[None, :]
        ptrs = Z + rows[:, None] * stride_z + cols[None, :]
        x = tl.load(ptrs, mask=keep, other=0.0).to(tl.float32)
        z, dzdx = logits_epilogue(x, Bias, cols, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
        logp_v = tl.where(keep, z - lse[:, None], 0.0)
        p = tl.where(keep, tl.exp(logp_v), 0.0)
        onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
        dz = g[:, None] * (onehot - p)
        if HAS_WENT:
            dz -= g_ent[:, None] * p * (logp_v + ent[:, None])
        dx = tl.where(keep, dz * dzdx * (inv_temp * scale), 0.0)
        if HALF_DZ:  # the half-width stores land on fp32 columns other warps may still read
            tl.debug_barrier()
        tl.store(
            DZ + rows[:, None] * stride_dz + cols[None, :],
            dx.to(DZ.dtype.element_ty),
            mask=row_mask[:, None] & col_mask[None, :],
        )


def fused_policy_loss_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    ref_logps: torch.Tensor | None,
    w_pt: torch.Tensor,
    w_kl: torch.Tensor | None,
    w_ent: torch.Tensor | None,
    params: TokenTermParams,
    *,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    grad_scale: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
):
    """hidden [N, d], weight [V, d] (same dtype), targets [N] int64 (ignore_index where
    not scored); per-token fp32 [N]: old_logps (None: on-policy), advantages, ref_logps
    (None: no KL), and the loss's coefficients w_pt, w_kl, w_ent (dL/d per-token loss
    term, KL and entropy); params: the loss options. grad_scale: a 0-d fp32 device
    tensor the gradients are multiplied by (default 1); chunk_bytes: the fp32 logits
    chunk (default FASTRL_FUSED_CHUNK_MB, else CHUNK_BYTES).

    Returns logp [N] fp32, entropy [N] fp32, and grad_scale x the gradients (d_hidden in
    hidden's dtype, d_weight and d_bias fp32) or None where not needed.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    zdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp, ent = torch.empty(N, **f32), torch.empty(N, **f32)
    dh = torch.empty_like(hidden) if need_hidden else None
    dw = torch.zeros((V, D), device=hidden.device, dtype=zdt) if need_weight else None
    db = torch.zeros(V, device=hidden.device, dtype=zdt) if need_bias else None
    if grad_scale is None:
        grad_scale = torch.ones((), **f32)
    rows_per_chunk = chunk_rows(N, V, chunk_bytes or chunk_bytes_default())
    zbuf = torch.empty((rows_per_chunk, V), device=hidden.device, dtype=zdt)
    # dz in the input dtype over Z's bytes: [rows, 2V] half view, its first V columns
    half = hidden.element_size() == 2
    dzbuf = zbuf.view(hidden.dtype) if half else zbuf
    unused = logp
    loss_args = params.runtime_args()
    loss_constexprs = params.constexprs(has_ref=ref_logps is not None)
    w32 = None if hidden.device.type == "cuda" else weight.to(zdt)  # CPU: no fp32-out GEMM

    for n0 in range(0, N, rows_per_chunk):
        rows = slice(n0, n0 + rows_per_chunk)
        h = hidden[rows]
        n = h.shape[0]
        z, dz = zbuf[:n], dzbuf[:n, :V]
        mm_fp32(h, weight.T, z, b32=None if w32 is None else w32.T)
        fused_policy_loss_fwd_kernel[(triton.cdiv(n, FUSED_POLICY_BLOCK_N),)](
            z, dz, grad_scale, bias if bias is not None else unused, targets[rows],
            old_logps[rows] if old_logps is not None else unused,
            advantages[rows], ref_logps[rows] if ref_logps is not None else unused,
            w_pt[rows], w_kl[rows] if w_kl is not None else unused,
            w_ent[rows] if w_ent is not None else unused, logp[rows], ent[rows],
            n, V, z.stride(0), dz.stride(0), 1.0 / temperature, softcap or 1.0, ignore_index,
            *loss_args, **loss_constexprs,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_OLD=old_logps is not None, HAS_WKL=w_kl is not None,
            HAS_WENT=w_ent is not None, HALF_DZ=half, LANE_STATS=lane_stats(),
            BLOCK_N=FUSED_POLICY_BLOCK_N,
            BLOCK_V=FUSED_POLICY_BLOCK_V, num_warps=FUSED_POLICY_NUM_WARPS,
        )  # fmt: skip
        if dh is not None:
            torch.mm(dz, weight, out=dh[rows])
        if dw is not None:
            addmm_fp32(dw, dz.T, h)
        if db is not None:
            db += dz.sum(0, dtype=torch.float32)

    return logp, ent, dh, dw, db
