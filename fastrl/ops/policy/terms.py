"""The elementwise part of the policy loss: per token, the loss term, the KL to the
reference and the importance ratios, in PyTorch or (token-level ratios) in the Triton
kernel of kernels/policy_loss.py, which also forms their derivatives in its forward."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastrl.checks import check_impl
from fastrl.ops.policy.inputs import LossInputs
from fastrl.ops.policy.vespo import gamma_weights
from fastrl.options.policy import CLIPPED_LOSS_TYPES, PolicyLossOptions


class TokenTerms(NamedTuple):
    """The per-token terms, compute dtype: ``loss`` ``[B, T]`` (``[B, 1]`` for a sequence-level
    ratio whose loss does not involve the log-probs), ``kl`` ``[B, T]`` or None (no
    ``ref_logps``), the importance ratio before the ``delta`` cap (``ratio``) and after it
    (``clip_ratio``, what TRL's clip metrics compare); ``phi``, VESPO's sequence weight
    (`fastrl.ops.policy.vespo.gamma_weights`), for ``vespo`` only."""

    loss: torch.Tensor
    kl: torch.Tensor | None
    ratio: torch.Tensor
    clip_ratio: torch.Tensor
    phi: torch.Tensor | None = None


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3)."""
    d = ref_logps - logps  # log(pi_ref / pi)
    if estimator == "k3":
        return torch.exp(d) - d - 1
    if estimator == "k2":
        return 0.5 * d * d
    return -d  # k1


def per_token_terms(
    lp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    m: torch.Tensor,
    opts: PolicyLossOptions,
    phi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss term and the ratios of `TokenTerms`, in PyTorch.

    lp, old, m: ``[B, T]`` (compute dtype, masked positions zeroed); adv: ``[B, 1]`` or
    ``[B, T]``; phi: VESPO's weight (``vespo`` only, `gamma_weights`). Returns ``(loss,
    ratio, clip_ratio)``.
    """
    log_ratio = lp - old
    if opts.importance_sampling_level == "sequence":  # GSPO: the length-normalised log-ratio
        log_w = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        log_w = log_ratio
    coef_1 = torch.exp(log_w)
    eps_high = opts.upper_epsilon

    if opts.loss_type in CLIPPED_LOSS_TYPES:
        clipped = torch.clamp(coef_1, 1 - float(opts.epsilon), 1 + eps_high)
        ratio = coef_1 if opts.delta is None else torch.clamp(coef_1, max=float(opts.delta))
        return -torch.minimum(ratio * adv, clipped * adv), coef_1, ratio
    if opts.loss_type == "cispo":  # REINFORCE on log-probs, weighted by the capped, detached ratio
        weight = torch.clamp(coef_1, max=eps_high).detach()
        return -weight * adv * lp, coef_1, coef_1
    if opts.loss_type == "vespo":  # REINFORCE on log-probs, weighted by the constant phi(w)
        return -phi * adv * lp, coef_1, coef_1
    # sapo: a sigmoid gate in place of the hard clip, temperature by the advantage's sign
    pos, neg = float(opts.sapo_temperature_pos), float(opts.sapo_temperature_neg)
    tau = torch.where(adv > 0, adv.new_tensor(pos), adv.new_tensor(neg))
    gate = torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau
    return -gate * adv, coef_1, coef_1


class _TokenTermsFunction(torch.autograd.Function):
    """The per-token terms of a token-level loss from the Triton kernel
    (kernels/policy_loss.py): ``(loss, kl or None, clip_ratio)``, fp32 ``[B, T]``.
    Differentiable in ``logps`` only; the KL only when it is in the loss."""

    @staticmethod
    def forward(ctx, logps, old_logps, advantages, keep, ref_logps, kl_in_loss, params):
        from fastrl.kernels.policy_loss import policy_loss_fwd

        ctx.set_materialize_grads(False)
        need_grad = ctx.needs_input_grad[0]
        pt, kl, ratio, d_pt, d_kl = policy_loss_fwd(
            logps,
            old_logps,
            advantages,
            keep,
            ref_logps,
            params,
            need_grad=need_grad,
            need_kl_grad=need_grad and kl_in_loss and ref_logps is not None,
        )
        ctx.save_for_backward(d_pt, d_kl)
        ctx.logps_dtype = logps.dtype
        ctx.mark_non_differentiable(ratio)
        if kl is not None and not kl_in_loss:
            ctx.mark_non_differentiable(kl)
        return pt, kl, ratio

    @staticmethod
    def backward(ctx, grad_pt, grad_kl, grad_ratio):
        from fastrl.kernels.policy_loss import policy_loss_bwd

        d_pt, d_kl = ctx.saved_tensors
        grad = policy_loss_bwd(grad_pt, grad_kl, d_pt, d_kl, ctx.logps_dtype)
        return grad, None, None, None, None, None, None


def use_token_kernel(impl: str, logps: torch.Tensor, opts: PolicyLossOptions) -> bool:
    """Whether the per-token terms run in the Triton kernel: ``impl="auto"`` on CUDA
    tensors when it covers the options, ``"triton"`` always (or a ValueError naming what
    it does not cover), ``"torch"`` never."""
    check_impl(impl)
    if impl == "torch":
        return False
    uncovered = None
    if opts.importance_sampling_level != "token":
        uncovered = (
            f"importance_sampling_level={opts.importance_sampling_level!r} (the sequence-level "
            "ratio needs a row reduction first; it runs in PyTorch)"
        )
    elif logps.dtype == torch.float64:
        uncovered = "float64 logps (the kernel computes in float32)"
    if impl == "auto":
        return logps.is_cuda and uncovered is None
    if uncovered is not None:
        raise ValueError(f"impl='triton' does not cover {uncovered}; use impl='auto' or 'torch'")
    check_impl(impl, device=logps.device)
    return True


def token_terms(
    opts: PolicyLossOptions,
    x: LossInputs,
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    ref_logps: torch.Tensor | None,
    *,
    use_kernel: bool,
    sampling: torch.Tensor | None = None,
) -> TokenTerms:
    """The per-token terms: from the kernel (on the arguments as given: it masks and
    converts them itself) or from PyTorch (on `x`). `sampling`: the sampler correction's
    token ratios, which ``vespo`` folds into its weight (and nothing else reads here)."""
    phi = None
    if opts.loss_type == "vespo":
        phi = gamma_weights(opts, x.lp - x.old, x.adv, x.m, sampling)
    if use_kernel:
        from fastrl.kernels.policy_loss import TokenTermParams

        # vespo: the kernel's per-token term is -a * logp with a = phi * A (phi constant)
        adv = advantages.detach() if phi is None else phi * x.adv
        loss, kl, clip_ratio = _TokenTermsFunction.apply(
            logps,
            None if old_logps is None else old_logps.detach(),
            adv,
            x.keep,
            None if ref_logps is None else ref_logps.detach(),
            opts.beta != 0,
            TokenTermParams(**opts.kernel_params()),
        )
        # no delta cap where the ratio before it is read (cispo's metric)
        return TokenTerms(loss, kl, clip_ratio, clip_ratio, phi)
    loss, ratio, clip_ratio = per_token_terms(x.lp, x.old, x.adv, x.m, opts, phi)
    kl = None
    if ref_logps is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and opts.beta != 0):
            kl = kl_estimate(x.lp, x.clean(ref_logps.detach()), opts.kl_estimator)
            if opts.use_bias_correction_kl:
                kl = kl * ratio
    return TokenTerms(loss, kl, ratio, clip_ratio, phi)
