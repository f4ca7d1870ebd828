"""Fused policy head: a GRPO-family loss's gradient w.r.t. hidden states in one sweep.

For a token-level loss the derivative w.r.t. a token's log-prob depends only on that
token (the normalisers, masks and sampler weights are constants the caller folds into
per-token coefficients w_pt, w_kl, w_ent), so the gradient can be formed as soon as the
token's logsumexp is known, and forward+backward needs two N x V x d GEMMs, not three:

    for each chunk of CHUNK_ROWS tokens:
        Z  = H_c @ W.T                 cuBLAS, [rows, V] in the input dtype (the only GEMM
                                       output kept; <= CHUNK_BYTES)
        fused_policy_loss_fwd_kernel   per row: pass 1 over Z -> max, sum e^z, sum z e^z,
                                       target logit -> logp, entropy; the token's loss
                                       derivative g = w_pt dpt + w_kl dkl (token_terms);
                                       pass 2 over Z -> dz = g (onehot - p) - w_ent p (log p
                                       + H), through softcap/temperature, written over Z
        dH_c = dZ @ W                  cuBLAS, fp32 accumulation over the whole vocab
        dW  += dZ^T @ H_c              only for a trainable head, fp32

Tiling of the row kernel: grid = (cdiv(rows, BLOCK_N),), a [BLOCK_N, BLOCK_V] tile of Z
per step, two sweeps over the vocab. It is bandwidth-bound: it reads Z twice and writes
it once, ~3 x rows x V x 2 bytes per chunk against 2 x 2 x rows x V x d flops of GEMMs.

The logits are rounded to the input dtype once (as in eager PyTorch and TRL) before the
fp32 statistics; `linear_logprobs` keeps them in fp32 tiles but needs the third GEMM.
"""

import torch
import triton
import triton.language as tl

from .config import FUSED_POLICY_BLOCK_N, FUSED_POLICY_BLOCK_V, FUSED_POLICY_NUM_WARPS
from .linear_logprobs import addmm_fp32, logits_epilogue
from .policy_loss import CLIPPED, FAMILY, KL_ESTIMATORS, token_terms

# Z chunks hold at most this many bytes (>= 16 rows): 256 rows of a 128k bf16 vocab.
CHUNK_BYTES = 64 * 2**20


@triton.jit(do_not_specialize=["N", "ignore_index"])
def fused_policy_loss_fwd_kernel(
    Z, Bias, T, OLD, ADV, REF, WPT, WKL, WENT, LOGP, ENT,
    N, V, stride_z, inv_temp, softcap, ignore_index,
    clip_low, clip_high, delta, cispo_cap, tau_pos, tau_neg,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_OLD: tl.constexpr,
    FAMILY: tl.constexpr, HAS_DELTA: tl.constexpr, KL_EST: tl.constexpr,
    KL_TIMES_RATIO: tl.constexpr, HAS_WKL: tl.constexpr, HAS_WENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(T + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)

    # pass 1: online (max, sum e^(z-m), sum e^(z-m)(z-m)) and the target logit
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        ptrs = Z + rows[:, None] * stride_z + cols[None, :]
        x = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        z, _ = logits_epilogue(x, Bias, cols, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zm = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_mask[None, :], tl.exp(zm), 0.0)
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        a = alpha * (a + s * shift) + tl.sum(e * zm, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
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
        dx = tl.where(keep, dz * dzdx * inv_temp, 0.0)
        tl.store(ptrs, dx.to(Z.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


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
    *,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    kl_estimator: str,
    kl_times_ratio: bool,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
):
    """hidden [N, d], weight [V, d] (same dtype), targets [N] int64 (ignore_index where
    not scored); per-token fp32 [N]: old_logps (None: on-policy), advantages, ref_logps
    (None: no KL), and the loss's coefficients w_pt, w_kl, w_ent (dL/d per-token loss
    term, KL and entropy).

    Returns logp [N] fp32, entropy [N] fp32, and the gradients (d_hidden in hidden's
    dtype, d_weight, d_bias) or None where not needed.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, ent = torch.empty(N, **f32), torch.empty(N, **f32)
    dh = torch.empty_like(hidden) if need_hidden else None
    dw = torch.zeros((V, D), **f32) if need_weight else None
    db = torch.zeros(V, **f32) if need_bias else None
    chunk = max(1, min(N, max(16, CHUNK_BYTES // (V * hidden.element_size()))))
    zbuf = torch.empty((chunk, V), device=hidden.device, dtype=hidden.dtype)
    unused = logp
    family = FAMILY[loss_type]

    for n0 in range(0, N, chunk):
        rows = slice(n0, n0 + chunk)
        h = hidden[rows]
        n = h.shape[0]
        z = zbuf[:n]
        torch.mm(h, weight.T, out=z)
        fused_policy_loss_fwd_kernel[(triton.cdiv(n, FUSED_POLICY_BLOCK_N),)](
            z, bias if bias is not None else unused, targets[rows],
            old_logps[rows] if old_logps is not None else unused,
            advantages[rows], ref_logps[rows] if ref_logps is not None else unused,
            w_pt[rows], w_kl[rows] if w_kl is not None else unused,
            w_ent[rows] if w_ent is not None else unused, logp[rows], ent[rows],
            n, V, z.stride(0), 1.0 / temperature, softcap or 1.0, ignore_index,
            1.0 - epsilon_low, 1.0 + epsilon_high, delta if delta is not None else 0.0,
            epsilon_high, sapo_temperature_pos, sapo_temperature_neg,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_OLD=old_logps is not None, FAMILY=family,
            HAS_DELTA=delta is not None and family == CLIPPED,
            KL_EST=KL_ESTIMATORS[kl_estimator] if ref_logps is not None else 0,
            KL_TIMES_RATIO=kl_times_ratio, HAS_WKL=w_kl is not None,
            HAS_WENT=w_ent is not None, BLOCK_N=FUSED_POLICY_BLOCK_N,
            BLOCK_V=FUSED_POLICY_BLOCK_V, num_warps=FUSED_POLICY_NUM_WARPS,
        )  # fmt: skip
        if dh is not None:
            torch.mm(z, weight, out=dh[rows])
        if dw is not None:
            addmm_fp32(dw, z.T, h)
        if db is not None:
            db += z.sum(0, dtype=torch.float32)

    return (
        logp,
        ent,
        dh,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
