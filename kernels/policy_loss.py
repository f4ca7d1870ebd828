"""Per-token terms of the GRPO-family policy loss (token-level importance ratios), `[B, T]`.

For every token, from logps, old_logps, the advantage and the mask (and ref_logps when
there is a KL term), `policy_loss_fwd_kernel` computes what `fastrl.ops.policy.loss` computes
elementwise, with the same operations in the same order:

- the importance ratio r = exp(logp - old) (old = logp on-policy: r == 1 exactly);
- the per-token policy loss: the clipped surrogate -min(min(r, delta) A, clip(r, 1 - eps_low,
  1 + eps_high) A) (grpo, bnpo, dr_grpo, dapo, luspo: one per-token formula, they differ
  only in the normaliser), CISPO's -min(r, eps_high) A logp with the capped ratio held
  constant, SAPO's -sigmoid(tau (r - 1)) 4 / tau A with tau chosen by the sign of A, or
  VESPO's -phi A logp, whose sequence weight phi (a detached function of the row's summed
  log-ratios: a row reduction first) the caller folds into the advantage it passes, so the
  kernel's term is -a logp;
- the per-token KL to the reference (k1, k2 or k3), times r with the bias correction;
- the ratio the clip metrics look at (after the delta cap);
- and, when logps needs a gradient, the local derivatives d(loss term)/d(logp) and
  d(KL)/d(logp), with PyTorch's subgradient conventions (torch.minimum splits a tie
  evenly, clamp passes the gradient on its bounds), so gradients match the PyTorch path.

Masked positions load 0 for logp, old, ref and a per-token advantage (a per-row one is
kept, as `policy_loss` does): their garbage (inf, NaN) is never read, their terms are the
PyTorch path's, and their derivatives are exactly 0. The loss-type family, the KL
estimator and which inputs exist are constexpr; B, T, epsilons, delta, the SAPO
temperatures are runtime arguments, so a new completion length or schedule does not
recompile. Everything is computed in fp32 from inputs of any float dtype (fp16, bf16,
fp32); float64 is left to the PyTorch path (a Python float kernel argument is an fp32).
The normalisers (per-row token counts, batch token counts, max_completion_length,
num_items_in_batch), the sampler correction, the off-policy and entropy masks and the
metric reductions stay in PyTorch: they are reductions and [B]-sized factors applied on
top of these terms.

Tiling. grid = (B * cdiv(T, BLOCK_T),): program p owns row p // nT and the BLOCK_T tokens
[(p % nT) * BLOCK_T, ...) of it, a 1-D block of coalesced loads (every input has its own
row and token strides, so [B] / [B, 1] advantages broadcast with a token stride of 0 and
views need no copy). The outputs are contiguous [B, T] fp32.

Where the gradient is formed. The derivative of each term w.r.t. its own token's logp
depends only on that token's inputs, which the forward already has in registers, so the
forward writes them (d_pt, and d_kl when the KL is in the loss) and the backward is one
elementwise pass: dlogp = g_pt * d_pt + g_kl * d_kl, stored in logps' dtype. Recomputing
them instead would make the backward re-read logps, old_logps, advantages, mask and
ref_logps (and keep them alive for it): 5 reads instead of 2, against 1-2 extra fp32
writes in the forward. The forward skips the derivatives when no gradient is needed.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .config import POLICY_LOSS_BLOCK_T, on_tensor_device

# loss families (constexpr): the per-token formula; the loss types within a family
# differ only in their normaliser, which stays in PyTorch
CLIPPED, CISPO, SAPO, VESPO = 0, 1, 2, 3
FAMILY = {
    "grpo": CLIPPED,
    "bnpo": CLIPPED,
    "dr_grpo": CLIPPED,
    "dapo": CLIPPED,
    "luspo": CLIPPED,
    "cispo": CISPO,
    "sapo": SAPO,
    "vespo": VESPO,  # the advantage passed is phi * A (fastrl.ops.policy.terms)
}
KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}


class TokenTermParams(NamedTuple):
    """The loss options `token_terms` reads, as plain values (the caller resolves the
    defaults: ``epsilon_high`` is a number here). Shared by this launcher and the fused
    head's."""

    loss_type: str
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    kl_estimator: str
    kl_times_ratio: bool
    sapo_temperature_pos: float
    sapo_temperature_neg: float

    def runtime_args(self) -> tuple[float, ...]:
        """`token_terms`' runtime arguments: clip_low, clip_high, delta, cispo_cap, tau_pos,
        tau_neg (Python floats, fp32 kernel arguments: a new schedule does not recompile)."""
        delta = 0.0 if self.delta is None else self.delta
        return (
            1.0 - self.epsilon_low,
            1.0 + self.epsilon_high,
            delta,
            self.epsilon_high,
            self.sapo_temperature_pos,
            self.sapo_temperature_neg,
        )

    def constexprs(self, has_ref: bool) -> dict[str, int | bool]:
        """`token_terms`' constexpr arguments (KL_EST 0: no reference log-probs)."""
        family = FAMILY[self.loss_type]
        return dict(
            FAMILY=family,
            HAS_DELTA=self.delta is not None and family == CLIPPED,
            KL_EST=KL_ESTIMATORS[self.kl_estimator] if has_ref else 0,
            KL_TIMES_RATIO=self.kl_times_ratio,
        )


@triton.jit
def token_terms(
    lp,
    old,
    a,
    ref,
    clip_low,
    clip_high,
    delta,
    cispo_cap,
    tau_pos,
    tau_neg,
    FAMILY: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    KL_EST: tl.constexpr,
    KL_TIMES_RATIO: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    # One token's (or a block of tokens') loss term pt, clip-metric ratio, KL and their
    # derivatives w.r.t. lp (0 when not NEED_GRAD / no KL). Shared with the fused head.
    r = tl.exp(lp - old)
    dpt = 0.0 * r
    if FAMILY == 0:  # clipped surrogate
        clipped = tl.minimum(tl.maximum(r, clip_low), clip_high)
        if HAS_DELTA:
            ratio = tl.minimum(r, delta)
        else:
            ratio = r
        u = ratio * a
        v = clipped * a
        pt = -tl.minimum(u, v)
        if NEED_GRAD:
            du = a * r
            if HAS_DELTA:
                du = tl.where(r <= delta, du, 0.0)
            dv = tl.where((r >= clip_low) & (r <= clip_high), a * r, 0.0)
            dpt = -tl.where(u < v, du, tl.where(u > v, dv, 0.5 * (du + dv)))
    elif FAMILY == 1:  # cispo: the capped ratio is a constant weight on -A logp
        ratio = r
        w = tl.minimum(r, cispo_cap)
        pt = -w * a * lp
        if NEED_GRAD:
            dpt = -w * a
    elif FAMILY == 3:  # vespo: a = phi * A, phi a constant per sequence
        ratio = r
        pt = -a * lp
        if NEED_GRAD:
            dpt = -a + 0.0 * r
    else:  # sapo: a sigmoid gate, its temperature by the advantage's sign
        ratio = r
        tau = tl.where(a > 0, tau_pos, tau_neg)
        sig = tl.sigmoid(tau * (r - 1.0))
        pt = -(sig * 4.0 / tau) * a
        if NEED_GRAD:
            dpt = -a * (4.0 / tau) * (sig * (1.0 - sig)) * tau * r

    kl = 0.0 * r
    dkl = 0.0 * r
    if KL_EST != 0:
        d = ref - lp  # log(pi_ref / pi)
        if KL_EST == 3:
            e = tl.exp(d)
            kl = e - d - 1.0
            dkl = 1.0 - e
        elif KL_EST == 2:
            kl = 0.5 * d * d
            dkl = -d
        else:
            kl = -d
            dkl = 1.0 + 0.0 * d
        if KL_TIMES_RATIO:  # DeepSeek-V3.2's bias correction, differentiable through r
            dkl = dkl * r + kl * r
            kl = kl * r
    return pt, ratio, dpt, kl, dkl


@triton.jit(do_not_specialize=["B", "T", "n_tblocks"])
def policy_loss_fwd_kernel(
    LP,
    OLD,
    ADV,
    M,
    REF,
    PT,
    KL,
    RATIO,
    DPT,
    DKL,
    B,
    T,
    n_tblocks,
    s_lp_b,
    s_lp_t,
    s_old_b,
    s_old_t,
    s_adv_b,
    s_adv_t,
    s_m_b,
    s_m_t,
    s_ref_b,
    s_ref_t,
    clip_low,
    clip_high,
    delta,
    cispo_cap,
    tau_pos,
    tau_neg,
    FAMILY: tl.constexpr,
    HAS_OLD: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    KL_EST: tl.constexpr,  # 0: no ref_logps; 1, 2, 3: k1, k2, k3
    KL_TIMES_RATIO: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    NEED_KL_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_tblocks).to(tl.int64)
    t = ((pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    inb = t < T
    keep = tl.load(M + b * s_m_b + t * s_m_t, mask=inb, other=0) != 0
    ld = inb & keep  # masked tokens are not read: they count as 0, as `clean` makes them

    lp = tl.load(LP + b * s_lp_b + t * s_lp_t, mask=ld, other=0.0).to(tl.float32)
    if HAS_OLD:
        old = tl.load(OLD + b * s_old_b + t * s_old_t, mask=ld, other=0.0).to(tl.float32)
    else:
        old = lp
    if ADV_PER_TOKEN:
        a = tl.load(ADV + b * s_adv_b + t * s_adv_t, mask=ld, other=0.0).to(tl.float32)
    else:
        a = tl.load(ADV + b * s_adv_b + t * 0, mask=inb, other=0.0).to(tl.float32)
    if KL_EST != 0:
        ref = tl.load(REF + b * s_ref_b + t * s_ref_t, mask=ld, other=0.0).to(tl.float32)
    else:
        ref = lp
    pt, ratio, dpt, kl, dkl = token_terms(
        lp,
        old,
        a,
        ref,
        clip_low,
        clip_high,
        delta,
        cispo_cap,
        tau_pos,
        tau_neg,
        FAMILY,
        HAS_DELTA,
        KL_EST,
        KL_TIMES_RATIO,
        NEED_GRAD,
    )

    out = b * T + t
    tl.store(PT + out, pt, mask=inb)
    tl.store(RATIO + out, ratio, mask=inb)
    if NEED_GRAD:
        tl.store(DPT + out, tl.where(keep, dpt, 0.0), mask=inb)
    if KL_EST != 0:
        tl.store(KL + out, kl, mask=inb)
        if NEED_KL_GRAD:
            tl.store(DKL + out, tl.where(keep, dkl, 0.0), mask=inb)


@triton.jit(do_not_specialize=["B", "T", "n_tblocks"])
def policy_loss_bwd_kernel(
    GPT,
    GKL,
    DPT,
    DKL,
    DLP,
    B,
    T,
    n_tblocks,
    s_gpt_b,
    s_gpt_t,
    s_gkl_b,
    s_gkl_t,
    HAS_GPT: tl.constexpr,
    HAS_GKL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # dlogp = g_pt * d_pt + g_kl * d_kl, in logps' dtype (DLP is contiguous [B, T])
    pid = tl.program_id(0)
    b = (pid // n_tblocks).to(tl.int64)
    t = ((pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    inb = t < T
    out = b * T + t
    g = tl.zeros((BLOCK_T,), tl.float32)
    if HAS_GPT:
        gpt = tl.load(GPT + b * s_gpt_b + t * s_gpt_t, mask=inb, other=0.0).to(tl.float32)
        g += gpt * tl.load(DPT + out, mask=inb, other=0.0)
    if HAS_GKL:
        gkl = tl.load(GKL + b * s_gkl_b + t * s_gkl_t, mask=inb, other=0.0).to(tl.float32)
        g += gkl * tl.load(DKL + out, mask=inb, other=0.0)
    tl.store(DLP + out, g.to(DLP.dtype.element_ty), mask=inb)


def _grid(B: int, T: int) -> tuple[int, int]:
    n_tblocks = triton.cdiv(T, POLICY_LOSS_BLOCK_T)
    return B * n_tblocks, n_tblocks


def _strides2d(x: torch.Tensor, B: int, T: int) -> tuple[int, int]:
    """Row and token strides of x viewed as [B, T]: [B] and [B, 1] broadcast along T."""
    if x.dim() == 1:
        return x.stride(0), 0
    if x.shape[1] == 1 and T != 1:
        return x.stride(0), 0
    return x.stride(0), x.stride(1)


@on_tensor_device
def policy_loss_fwd(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None,
    params: TokenTermParams,
    *,
    need_grad: bool,
    need_kl_grad: bool,
):
    """Launch the forward. logps, old_logps, ref_logps [B, T] float (fp32/fp16/bf16, any
    strides); advantages [B], [B, 1] or [B, T] real; mask [B, T] bool or 0/1 numbers;
    params: the loss options.

    Returns fp32 contiguous [B, T] tensors (per_token_loss, per_token_kl or None, ratio,
    d_pt or None, d_kl or None): the per-token loss term, the per-token KL (with
    ref_logps), the importance ratio after the delta cap (what the clip metrics compare),
    and the derivatives w.r.t. logps of the loss term (if need_grad) and of the KL (if
    need_kl_grad), zero at masked positions.
    """
    B, T = logps.shape
    dev = logps.device
    f32 = dict(device=dev, dtype=torch.float32)
    pt, ratio = torch.empty((B, T), **f32), torch.empty((B, T), **f32)
    kl = torch.empty((B, T), **f32) if ref_logps is not None else None
    dpt = torch.empty((B, T), **f32) if need_grad else None
    dkl = torch.empty((B, T), **f32) if need_kl_grad else None
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if not advantages.is_floating_point():
        advantages = advantages.float()
    adv_per_token = advantages.dim() == 2 and advantages.shape[1] == T and T != 1
    grid, n_tblocks = _grid(B, T)
    if grid == 0:
        return pt, kl, ratio, dpt, dkl
    policy_loss_fwd_kernel[(grid,)](
        logps,
        old_logps if old_logps is not None else logps,
        advantages,
        mask,
        ref_logps if ref_logps is not None else logps,
        pt,
        kl if kl is not None else pt,
        ratio,
        dpt if dpt is not None else pt,
        dkl if dkl is not None else pt,
        B,
        T,
        n_tblocks,
        *_strides2d(logps, B, T),
        *(_strides2d(old_logps, B, T) if old_logps is not None else (0, 0)),
        *_strides2d(advantages, B, T),
        *_strides2d(mask, B, T),
        *(_strides2d(ref_logps, B, T) if ref_logps is not None else (0, 0)),
        *params.runtime_args(),
        **params.constexprs(has_ref=ref_logps is not None),
        HAS_OLD=old_logps is not None,
        ADV_PER_TOKEN=adv_per_token,
        NEED_GRAD=need_grad,
        NEED_KL_GRAD=need_kl_grad,
        BLOCK_T=POLICY_LOSS_BLOCK_T,
        num_warps=4,
    )
    return pt, kl, ratio, dpt, dkl


@on_tensor_device
def policy_loss_bwd(
    grad_pt: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    d_pt: torch.Tensor | None,
    d_kl: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Launch the backward: dlogps = grad_pt * d_pt + grad_kl * d_kl, [B, T] in `dtype`.
    The incoming gradients may have any strides (a broadcast sum's gradient has 0)."""
    has_pt = grad_pt is not None and d_pt is not None
    has_kl = grad_kl is not None and d_kl is not None
    if not (has_pt or has_kl):
        return None
    ref = d_pt if has_pt else d_kl
    B, T = ref.shape
    dlp = torch.empty((B, T), device=ref.device, dtype=dtype)
    grid, n_tblocks = _grid(B, T)
    if grid == 0:
        return dlp
    policy_loss_bwd_kernel[(grid,)](
        grad_pt if has_pt else ref,
        grad_kl if has_kl else ref,
        d_pt if has_pt else ref,
        d_kl if has_kl else ref,
        dlp,
        B,
        T,
        n_tblocks,
        *(_strides2d(grad_pt, B, T) if has_pt else (0, 0)),
        *(_strides2d(grad_kl, B, T) if has_kl else (0, 0)),
        HAS_GPT=has_pt,
        HAS_GKL=has_kl,
        BLOCK_T=POLICY_LOSS_BLOCK_T,
        num_warps=4,
    )
    return dlp
