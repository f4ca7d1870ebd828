"""The PyTorch backend of `linear_logprobs`: the same forward/backward math as the Triton
kernels, on [CHUNK_TOKENS, CHUNK_VOCAB] blocks of logits so that no [N, V] tensor exists.

This is what CPU users get, and what the kernels are checked against on shapes too big for
the float64 oracle. Statistics are kept in float32 (float64 for float64 inputs).
"""

import torch

from fastrl.checks import compute_dtype

CHUNK_TOKENS = 512
CHUNK_VOCAB = 8192


def _logits(h, weight, bias, v0, v1, inv_temp, softcap):
    """z = softcap(h @ W[v0:v1].T + b) / T for one block, and dz/dx (None without softcap)."""
    x = h @ weight[v0:v1].to(h.dtype).T
    if bias is not None:
        x += bias[v0:v1].to(h.dtype)
    dzdx = None
    if softcap is not None:
        t = torch.tanh(x / softcap)
        x = softcap * t
        dzdx = 1 - t * t
    return x * inv_temp, dzdx


def chunked_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    return_entropy: bool,
    top1: torch.Tensor | None = None,
    log_sum_sq: torch.Tensor | None = None,
    row_max: torch.Tensor | None = None,
    target_logit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """hidden [N, d], weight [V, d], targets [N] int64 -> logp [N], entropy [N] | None, lse [N];
    fills `top1` ([N] bool, if given) with whether each target has the largest logit,
    `log_sum_sq` ([N], if given) with log sum_v p_v^2 (0 where ignored), and `row_max`,
    `target_logit` ([N], if given) with each row's largest logit and its target's (0 where
    the target is no column of `weight`: a vocab shard's part of the merge)."""
    N, V = hidden.shape[0], weight.shape[0]
    dt = compute_dtype(hidden)
    logp = torch.zeros(N, dtype=dt, device=hidden.device)
    lse = torch.zeros(N, dtype=dt, device=hidden.device)
    ent = torch.zeros(N, dtype=dt, device=hidden.device) if return_entropy else None
    valid = targets != ignore_index
    for n0 in range(0, N, CHUNK_TOKENS):
        rows = slice(n0, n0 + CHUNK_TOKENS)
        h, t = hidden[rows].to(dt), targets[rows]
        m = torch.full((h.shape[0],), float("-inf"), dtype=dt, device=h.device)
        s, a, q, zt = (torch.zeros_like(m) for _ in range(4))
        for v0 in range(0, V, CHUNK_VOCAB):
            v1 = min(v0 + CHUNK_VOCAB, V)
            z, _ = _logits(h, weight, bias, v0, v1, 1.0 / temperature, softcap)
            m_new = torch.maximum(m, z.amax(1))
            alpha = torch.exp(m - m_new)
            zm = z - m_new[:, None]
            e = zm.exp()
            if return_entropy:  # a = sum e^(z-m) (z-m), re-based when the max moves
                shift = torch.where(m.isinf(), 0.0, m - m_new)
                a = alpha * (a + s * shift) + (e * zm).sum(1)
            s = s * alpha + e.sum(1)
            if log_sum_sq is not None:  # q = sum e^(2(z-m)), re-based like s
                q = q * alpha * alpha + (e * e).sum(1)
            hit = (t >= v0) & (t < v1)
            zt += torch.where(hit, z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0)
            m = m_new
        lse[rows] = m + s.log()
        logp[rows] = torch.where(valid[rows], zt - lse[rows], 0.0)
        if return_entropy:
            ent[rows] = torch.where(valid[rows], s.log() - a / s, 0.0)
        if top1 is not None:  # zt is the very float the max was taken over: exact
            top1[rows] = valid[rows] & (zt >= m)
        if log_sum_sq is not None:
            log_sum_sq[rows] = torch.where(valid[rows], q.log() - 2 * s.log(), 0.0)
        if row_max is not None:
            row_max[rows] = m
        if target_logit is not None:
            target_logit[rows] = zt
    return logp, ent, lse


def chunked_logprobs_bwd(
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
    """Recompute each block, dz = g_logp (onehot - p) - g_ent p (log p + H), and contract."""
    N, V = hidden.shape[0], weight.shape[0]
    dt = compute_dtype(hidden)
    dh = torch.zeros(hidden.shape, dtype=dt, device=hidden.device) if need_hidden else None
    dw = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need_weight else None
    db = torch.zeros(V, dtype=dt, device=weight.device) if need_bias else None
    valid = (targets != ignore_index).to(dt)
    for n0 in range(0, N, CHUNK_TOKENS):
        rows = slice(n0, n0 + CHUNK_TOKENS)
        h, t, keep = hidden[rows].to(dt), targets[rows], valid[rows][:, None]
        for v0 in range(0, V, CHUNK_VOCAB):
            v1 = min(v0 + CHUNK_VOCAB, V)
            z, dzdx = _logits(h, weight, bias, v0, v1, 1.0 / temperature, softcap)
            logp = z - lse[rows, None]
            p = logp.exp()
            dz = torch.zeros_like(z)
            if grad_logp is not None:
                onehot = (t[:, None] - v0) == torch.arange(v1 - v0, device=z.device)
                dz += grad_logp[rows, None].to(dt) * (onehot.to(dt) - p)
            if grad_entropy is not None:
                dz -= grad_entropy[rows, None].to(dt) * p * (logp + entropy[rows, None])
            dx = dz * keep / temperature
            if dzdx is not None:
                dx *= dzdx
            if dh is not None:
                dh[rows] += dx @ weight[v0:v1].to(dt)
            if dw is not None:
                dw[v0:v1] += dx.T @ h
            if db is not None:
                db[v0:v1] += dx.sum(0)
    return (
        dh.to(hidden.dtype) if dh is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
