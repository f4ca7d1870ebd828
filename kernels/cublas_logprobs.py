"""cuBLAS-chunk linear log-probs: cuBLAS GEMMs into a bounded fp32 buffer + Triton epilogues.

The same contract as `kernels/linear_logprobs.py` (launchers with the same arguments and
returns), with the GEMMs given to cuBLAS instead of Triton tiles:

    forward, for each chunk of CHUNK_ROWS tokens and each chunk of CHUNK_VOCAB columns:
        Z = H_c @ W_v.T                  cuBLAS, fp32 output (torch.mm(out_dtype=fp32):
                                         bf16/fp16 products, fp32 accumulation, fp32 store)
        cublas_logprobs_fwd_kernel       reads Z once: bias/softcap/temperature, then folds
                                         it into running per-row statistics (max m,
                                         s = sum e^(z-m), a = sum e^(z-m)(z-m), q =
                                         sum e^(2(z-m)), target logit z_t) carried across
                                         vocab chunks in [CHUNK_ROWS] fp32 buffers; the
                                         last vocab chunk writes logp, entropy, lse, top1,
                                         log sum p^2
    backward, the same walk:
        Z = H_c @ W_v.T                  recomputed, fp32
        cublas_logprobs_bwd_kernel       dz = g_logp (onehot - p) - g_ent p (log p + H),
                                         through softcap and 1/T, stored in the input dtype
                                         (fp32 inputs: in place over Z)
        dH_c += dZ @ W_v                 cuBLAS, fp32 accumulator [CHUNK_ROWS, d]
        dW_v += dZ^T @ H_c, db_v += sum  only when the weight (bias) needs a gradient

The logits stay fp32 from the GEMM accumulator to the statistics, as in the Triton tiles,
so log-probs from either design round the logits the same way (to fp32, which differs
between them only by summation order): current, old and reference log-probs compare.

Epilogue tiling (forward). grid = (cdiv(rows, BLOCK_N),). A program owns BLOCK_N rows of
the chunk and walks its columns in [BLOCK_N, BLOCK_V] steps. Instead of reducing every
step across the tile (a max, then three sums, each a shuffle/shared-memory round trip),
each lane (element of the tile) keeps its own running (m, s, a, q, z_t) over the columns
it visits, updated with one exponential per element: with d = -|z - m|, either z is the
new max (old sums scale by e^d, the new element adds 1) or it is not (it adds e^d). The
lanes are merged once after the loop, and the chunk's row statistics merged with the
previous chunks' (the same exact rescaling as the Triton design's combine kernel). Lanes
start at m = -1e30 and d is clamped there (finite, so 0 * d is never a NaN and s * d
never overflows); padded columns are -inf and contribute nothing.

Epilogue tiling (backward). grid = (cdiv(rows, BLOCK_N), cdiv(cols, BLOCK_V)), one tile
per program, elementwise: no reductions, so the grid is as wide as the chunk.

Both tiles default to kernels/config.py (1 row x 2048 columns, 8 warps: 8 fp32 a thread
per step; sm_90 `ptxas -v`: forward 48-90 registers, backward 32-44, no spills) and are
overridden at run time by FASTRL_CUBLAS_FWD_TILE / FASTRL_CUBLAS_BWD_TILE ("1x2048x8").

Chunk sizes (kernels/config.py; launcher kwargs `chunk_rows`/`chunk_vocab`, else the
env vars FASTRL_CUBLAS_CHUNK_ROWS / FASTRL_CUBLAS_CHUNK_VOCAB, else the defaults). Extra
memory at V = 128256, d = 4096, bf16:
    forward   1024 x 16384 fp32 Z                                       = 64 MiB
    backward  1024 x 8192 fp32 Z + 1024 x 8192 bf16 dz + 1024 x 4096 fp32 dH acc
              = 32 + 16 + 16                                            = 64 MiB
(fp32 inputs: dz in place over Z and dH accumulated straight into the fp32 output, so
the backward takes 32 MiB; plus [CHUNK_ROWS] statistics and, as in every design, a fp32
[V, d] dW accumulator for a trainable head only). 1024 rows: every GEMM has >= 256 output
tiles of 128x128 for 132 SMs (dH_c is [1024, 4096]), each W_v chunk streamed from HBM is
reused by 1024 rows (~1000 flop/byte, above the ~300 ridge), and rows are a multiple of
the GEMM tile. The vocab chunk trades memory for the fp32 dH accumulator traffic: it is
read and written once per vocab chunk, 8 R d bytes per 2 R C d flops of the dH GEMM
(4 / CHUNK_VOCAB bytes per flop; the same holds for dW with CHUNK_ROWS).

Cost model, N = 16384, d = 4096, V = 128256, bf16, H200 (estimates, not measured): one
N x V x d GEMM is 2NVd = 1.72e13 flop, ~24.6 ms at ~700 TFLOP/s; Z in fp32 is 8.4 GB.
Forward epilogue reads Z once (8.4 GB, ~2.1 ms at ~4 TB/s), backward reads Z and writes
bf16 dz (12.6 GB, ~3.2 ms), the dH accumulator moves 8.6 GB (<= 2.1 ms, partly hidden in
the GEMM epilogue); ~380 launches add ~1 ms of tails. Frozen head: 3 GEMMs 73.8 ms +
6.3-8.4 ms -> ~1.09-1.12x the 3 GEMMs. A trainable head adds the dW GEMM and its fp32
accumulator read + write per row chunk, (N / CHUNK_ROWS) x V x d x 8 B = 67 GB (~17 ms
if not hidden): pass a larger chunk_rows (4096: 4x less) when training the head.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

from .config import (
    CUBLAS_BWD_BLOCK_N,
    CUBLAS_BWD_BLOCK_V,
    CUBLAS_BWD_CHUNK_VOCAB,
    CUBLAS_CHUNK_ROWS,
    CUBLAS_FWD_BLOCK_N,
    CUBLAS_FWD_BLOCK_V,
    CUBLAS_FWD_CHUNK_VOCAB,
    CUBLAS_NUM_WARPS,
)
from .linear_logprobs import (
    addmm_fp32,
    load_logits_step,
    logits_epilogue,
    logits_grad,
    mm_fp32,
)

ENV_CHUNK_ROWS = "FASTRL_CUBLAS_CHUNK_ROWS"
ENV_CHUNK_VOCAB = "FASTRL_CUBLAS_CHUNK_VOCAB"
# epilogue tiles "BLOCK_NxBLOCK_VxWARPS" (e.g. 1x2048x8), for GPU sweeps
ENV_FWD_TILE = "FASTRL_CUBLAS_FWD_TILE"
ENV_BWD_TILE = "FASTRL_CUBLAS_BWD_TILE"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=["N", "v_start", "n_cols", "ignore_index"])
def cublas_logprobs_fwd_kernel(
    Z, Bias, T, Mb, Sb, Ab, Qb, ZTb, Logp, Ent, Lse, Top1, LogSq, RowMax, TgtLogit,
    N, v_start, n_cols, stride_z, inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    HAS_SQ: tl.constexpr, HAS_TOP1: tl.constexpr, HAS_RAW: tl.constexpr,
    IS_FIRST: tl.constexpr, IS_LAST: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    # Z: [N, n_cols] fp32 raw logits of columns [v_start, v_start + n_cols); Mb..ZTb: the
    # rows' statistics over the previous vocab chunks (read unless IS_FIRST, written
    # unless IS_LAST); the last chunk writes the outputs instead (HAS_RAW: also the row
    # max and the target logit, what a vocab shard contributes to the merge across shards).
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(T + rows, mask=row_mask, other=ignore_index)

    # per-lane running statistics (relative to the lane's own max lm)
    lm = tl.full((BLOCK_N, BLOCK_V), -1.0e30, tl.float32)
    ls = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    la = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    lq = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    lzt = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        z, _, _, cols, col_mask = load_logits_step(
            Z, Bias, rows, row_mask, v0, v_start, n_cols, stride_z, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_V,
        )  # fmt: skip
        # one exponential per element: e = e^(-|z - lm|) scales the old sums when z is the
        # new max, else it is the new element's term (clamped: padded z = -inf adds 0)
        up = z > lm
        d = tl.maximum(-tl.abs(z - lm), -1.0e30)
        e = tl.exp(d)
        if HAS_ENTROPY:
            la = tl.where(up, e * (la + ls * d), la + e * d)
        if HAS_SQ:
            lq = tl.where(up, e * e * lq + 1.0, lq + e * e)
        ls = tl.where(up, ls * e + 1.0, ls + e)
        lm = tl.maximum(lm, z)
        # the target's logit: the very float the max is taken over (exact top-1 test);
        # masked columns alias the next chunk's
        hit = (cols[None, :] == tgt[:, None]) & col_mask[None, :]
        lzt += tl.where(hit, z, 0.0)

    # merge the lanes of each row
    m = tl.max(lm, axis=1)
    sc = tl.exp(lm - m[:, None])
    s = tl.sum(ls * sc, axis=1)
    a = s
    q = s
    if HAS_ENTROPY:
        a = tl.sum(sc * (la + ls * (lm - m[:, None])), axis=1)
    if HAS_SQ:
        q = tl.sum(lq * sc * sc, axis=1)
    zt = tl.sum(lzt, axis=1)

    # merge with the previous vocab chunks
    if not IS_FIRST:
        mp = tl.load(Mb + rows, mask=row_mask, other=0.0)
        sp = tl.load(Sb + rows, mask=row_mask, other=0.0)
        mx = tl.maximum(mp, m)
        c_old = tl.exp(mp - mx)
        c_new = tl.exp(m - mx)
        if HAS_ENTROPY:
            ap = tl.load(Ab + rows, mask=row_mask, other=0.0)
            a = c_old * (ap + sp * (mp - mx)) + c_new * (a + s * (m - mx))
        if HAS_SQ:
            qp = tl.load(Qb + rows, mask=row_mask, other=0.0)
            q = qp * c_old * c_old + q * c_new * c_new
        s = sp * c_old + s * c_new
        zt += tl.load(ZTb + rows, mask=row_mask, other=0.0)
        m = mx

    if IS_LAST:
        valid = row_mask & (tgt != ignore_index)
        log_s = tl.log(s)
        tl.store(Lse + rows, m + log_s, mask=row_mask)
        tl.store(Logp + rows, tl.where(valid, zt - m - log_s, 0.0), mask=row_mask)
        if HAS_ENTROPY:
            tl.store(Ent + rows, tl.where(valid, log_s - a / s, 0.0), mask=row_mask)
        if HAS_TOP1:
            tl.store(Top1 + rows, (valid & (zt >= m)).to(tl.uint8), mask=row_mask)
        if HAS_SQ:
            tl.store(LogSq + rows, tl.where(valid, tl.log(q) - 2.0 * log_s, 0.0), mask=row_mask)
        if HAS_RAW:
            tl.store(RowMax + rows, m, mask=row_mask)
            tl.store(TgtLogit + rows, zt, mask=row_mask)
    else:
        tl.store(Mb + rows, m, mask=row_mask)
        tl.store(Sb + rows, s, mask=row_mask)
        tl.store(ZTb + rows, zt, mask=row_mask)
        if HAS_ENTROPY:
            tl.store(Ab + rows, a, mask=row_mask)
        if HAS_SQ:
            tl.store(Qb + rows, q, mask=row_mask)


@triton.jit(do_not_specialize=["N", "v_start", "n_cols", "ignore_index"])
def cublas_logprobs_bwd_kernel(
    Z, dZ, Bias, T, Lse, Ent, GLogp, GEnt,
    N, v_start, n_cols, stride_z, stride_dz, inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # dZ (input dtype; may be Z itself: each element is read and written by one thread)
    # = d loss / d raw logit for the [N, n_cols] chunk Z of columns [v_start, +n_cols)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < N
    col_mask = local < n_cols
    cols = v_start + local
    tgt = tl.load(T + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    keep = valid[:, None] & col_mask[None, :]
    lse = tl.load(Lse + rows, mask=valid, other=0.0)
    x = tl.load(Z + rows[:, None] * stride_z + local[None, :], mask=keep, other=0.0).to(tl.float32)
    z, dzdx = logits_epilogue(x, Bias, cols, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
    dx = logits_grad(
        z, dzdx, keep, cols, tgt, lse, rows, row_mask, GLogp, GEnt, Ent, inv_temp,
        HAS_G_LOGP, HAS_G_ENT,
    )  # fmt: skip
    tl.store(
        dZ + rows[:, None] * stride_dz + local[None, :],
        dx.to(dZ.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def _chunk_arg(value: int | None, env: str, default: int, name: str) -> int:
    if value is None:
        raw = os.environ.get(env)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{env} must be a positive integer, got {raw!r}") from None
        name = env
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def epilogue_tile(backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps) of the forward or backward epilogue kernel: from
    FASTRL_CUBLAS_FWD_TILE / FASTRL_CUBLAS_BWD_TILE ("1x2048x8"), else kernels/config.py."""
    env = ENV_BWD_TILE if backward else ENV_FWD_TILE
    raw = os.environ.get(env)
    if not raw:
        if backward:
            return CUBLAS_BWD_BLOCK_N, CUBLAS_BWD_BLOCK_V, CUBLAS_NUM_WARPS
        return CUBLAS_FWD_BLOCK_N, CUBLAS_FWD_BLOCK_V, CUBLAS_NUM_WARPS
    try:
        tile = tuple(int(x) for x in raw.lower().split("x"))
    except ValueError:
        tile = ()
    if len(tile) != 3 or any(x < 1 or x & (x - 1) for x in tile):
        raise ValueError(f"{env} must be BLOCK_NxBLOCK_VxWARPS, powers of two, got {raw!r}")
    return tile


def chunk_sizes(
    n_rows: int,
    vocab: int,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
    *,
    backward: bool = False,
) -> tuple[int, int]:
    """The (rows, vocab columns) of one logits chunk, clipped to the problem: the kwargs,
    else FASTRL_CUBLAS_CHUNK_ROWS / FASTRL_CUBLAS_CHUNK_VOCAB, else the defaults (the
    backward's vocab default is half the forward's: it also holds dz and dH)."""
    rows = _chunk_arg(chunk_rows, ENV_CHUNK_ROWS, CUBLAS_CHUNK_ROWS, "chunk_rows")
    default_v = CUBLAS_BWD_CHUNK_VOCAB if backward else CUBLAS_FWD_CHUNK_VOCAB
    cols = _chunk_arg(chunk_vocab, ENV_CHUNK_VOCAB, default_v, "chunk_vocab")
    return max(1, min(n_rows, rows)), max(1, min(vocab, cols))


def workspace_bytes(
    n_rows: int,
    vocab: int,
    d: int,
    dtype: torch.dtype,
    *,
    backward: bool,
    need_hidden: bool = True,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
) -> int:
    """Bytes of scratch a launcher allocates beyond its outputs (and, for a trainable
    head, the fp32 [V, d] dW accumulator every design has): the fp32 logits chunk, the
    backward's dz chunk and fp32 dH accumulator (half inputs only), the forward's
    per-row statistics."""
    rows, cols = chunk_sizes(n_rows, vocab, chunk_rows, chunk_vocab, backward=backward)
    total = rows * cols * 4
    half = dtype != torch.float32
    if backward:
        if half:
            total += rows * cols * torch.empty((), dtype=dtype).element_size()
            total += rows * d * 4 if need_hidden else 0
    elif cols < vocab:
        total += 5 * rows * 4
    return total


def _check_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(
            f"cublas_logprobs takes fp32/fp16/bf16 hidden and weight of one dtype, got "
            f"{hidden.dtype} and {weight.dtype}"
        )


def _on_device(t: torch.Tensor):
    # launch on the tensors' GPU, whichever is current (device_map="auto" heads)
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _view(buf: torch.Tensor, n: int, nv: int) -> torch.Tensor:
    # a contiguous [n, nv] matrix at the start of a flat chunk buffer (tails included)
    return buf[: n * nv].view(n, nv)


def cublas_logprobs_fwd(
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
    *,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """hidden [N, d], weight [V, d] (unit stride on d, one dtype), targets [N] int64.

    Returns logp [N] fp32, entropy [N] fp32 (or None), and lse [N] fp32 for the backward;
    fills `top1` ([N] bool, if given) with whether each target has the largest logit,
    `log_sum_sq` ([N] fp32, if given) with log sum_v p_v^2 (0 where ignored), and
    `row_max`, `target_logit` ([N] fp32, both or neither) with each row's largest logit
    and its target's (0 where the target is no column), as `linear_logprobs_fwd` does.
    """
    _check_dtype(hidden, weight)
    N, _ = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if return_entropy else None
    if N == 0:
        return logp, ent, lse
    R, C = chunk_sizes(N, V, chunk_rows, chunk_vocab)
    zbuf = torch.empty(R * C, **f32)
    # running (m, s, a, q, z_t) of a row chunk across its vocab chunks
    stats = torch.empty((5, R), **f32) if C < V else logp.new_empty((5, 1))
    m, s, a, q, zt = stats
    top1_u8 = top1.view(torch.uint8) if top1 is not None else None
    block_n, block_v, warps = epilogue_tile()

    with _on_device(hidden):
        for n0 in range(0, N, R):
            n = min(R, N - n0)
            rows = slice(n0, n0 + n)
            h = hidden[rows]
            for v0 in range(0, V, C):
                nv = min(C, V - v0)
                z = _view(zbuf, n, nv)
                mm_fp32(h, weight[v0 : v0 + nv].T, z)
                cublas_logprobs_fwd_kernel[(triton.cdiv(n, block_n),)](
                    z, bias if bias is not None else z, targets[rows], m, s, a, q, zt,
                    logp[rows], ent[rows] if ent is not None else logp, lse[rows],
                    top1_u8[rows] if top1_u8 is not None else lse,
                    log_sum_sq[rows] if log_sum_sq is not None else lse,
                    row_max[rows] if row_max is not None else lse,
                    target_logit[rows] if target_logit is not None else lse,
                    n, v0, nv, z.stride(0), 1.0 / temperature, softcap or 1.0, ignore_index,
                    HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                    HAS_ENTROPY=return_entropy, HAS_SQ=log_sum_sq is not None,
                    HAS_TOP1=top1 is not None, HAS_RAW=row_max is not None,
                    IS_FIRST=v0 == 0, IS_LAST=v0 + nv == V,
                    BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps,
                )  # fmt: skip
    return logp, ent, lse


def cublas_logprobs_bwd(
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
    *,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns (d_hidden [N, d], d_weight [V, d], d_bias [V]), each in its input's dtype,
    or None where not needed; a frozen weight costs no [V, d] buffer and no dW GEMM, a
    trainable one accumulates dW over row chunks in fp32 (as `linear_logprobs_bwd`)."""
    _check_dtype(hidden, weight)
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    dh = torch.empty_like(hidden) if need_hidden else None
    dw = torch.zeros((V, D), **f32) if need_weight else None
    db = torch.zeros(V, **f32) if need_bias else None
    if N == 0 or (grad_logp is None and grad_entropy is None):
        if dh is not None:
            dh.zero_()
    else:
        grad_logp, grad_entropy = (
            g.float().contiguous() if g is not None else None for g in (grad_logp, grad_entropy)
        )
        R, C = chunk_sizes(N, V, chunk_rows, chunk_vocab, backward=True)
        half = hidden.dtype != torch.float32
        zbuf = torch.empty(R * C, **f32)
        # fp32: dz over Z in place, dH straight into the fp32 output
        dzbuf = torch.empty(R * C, device=hidden.device, dtype=hidden.dtype) if half else zbuf
        dh_acc = torch.empty((R, D), **f32) if need_hidden and half else None
        unused = lse
        block_n, block_v, warps = epilogue_tile(backward=True)
        with _on_device(hidden):
            for n0 in range(0, N, R):
                n = min(R, N - n0)
                rows = slice(n0, n0 + n)
                h = hidden[rows]
                acc = None
                if need_hidden:
                    acc = dh_acc[:n] if half else dh[rows]
                for v0 in range(0, V, C):
                    nv = min(C, V - v0)
                    w = weight[v0 : v0 + nv]
                    z, dz = _view(zbuf, n, nv), _view(dzbuf, n, nv)
                    mm_fp32(h, w.T, z)
                    grid = (triton.cdiv(n, block_n), triton.cdiv(nv, block_v))
                    cublas_logprobs_bwd_kernel[grid](
                        z, dz, bias if bias is not None else unused, targets[rows], lse[rows],
                        entropy[rows] if entropy is not None else unused,
                        grad_logp[rows] if grad_logp is not None else unused,
                        grad_entropy[rows] if grad_entropy is not None else unused,
                        n, v0, nv, z.stride(0), dz.stride(0), 1.0 / temperature,
                        softcap or 1.0, ignore_index,
                        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                        HAS_G_LOGP=grad_logp is not None, HAS_G_ENT=grad_entropy is not None,
                        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps,
                    )  # fmt: skip
                    if acc is not None:
                        if v0 == 0:
                            mm_fp32(dz, w, acc)
                        else:
                            addmm_fp32(acc, dz, w)
                    if dw is not None:
                        addmm_fp32(dw[v0 : v0 + nv], dz.T, h)
                    if db is not None:
                        db[v0 : v0 + nv] += dz.sum(0, dtype=torch.float32)
                if need_hidden and half:
                    dh[rows].copy_(acc)
    return (
        dh,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
