"""`fused_policy_loss`: the GRPO-family loss straight from hidden states and the lm_head.

Two ways to run it, both without [B, T, V] logits:

- single pass (Triton, token-level losses): the loss is linear in its per-token terms
  (loss term, KL, entropy) with coefficients that do not depend on the log-probs
  (`token_coefficients`, next to the aggregation they differentiate), and
  kernels/fused_policy_loss.py forms the hidden-state gradient in the forward: two
  N x V x d GEMMs for a frozen head instead of three. The backward only scales it.
- two passes (everything else: sequence-level ratios, vespo's sequence weight, the
  off-policy and entropy masks, which need whole-sequence or whole-batch statistics of
  the log-probs first, and the PyTorch path): `linear_logprobs`, then `policy_loss`, then autograd.

Both give the value and metrics of `policy_loss` on the same log-probs.
"""

import torch

from fastrl.checks import (
    IGNORE_INDEX,
    check_completion_batch,
    check_target_ids,
)
from fastrl.ops.logprobs.custom_ops import on_device
from fastrl.ops.logprobs.linear import (
    check_logit_inputs,
    linear_logprobs,
    resolve_impl,
    scatter_rows,
    scored_rows,
)
from fastrl.ops.policy.aggregate import sampling_ratio, token_coefficients
from fastrl.ops.policy.inputs import check_tensors, masked
from fastrl.ops.policy.loss import policy_loss
from fastrl.options.policy import PolicyLossOptions

__all__ = ["fused_policy_loss"]


class _LossWithGrads(torch.autograd.Function):
    """A loss value whose gradients w.r.t. `inputs` were computed in the forward, times a
    0-d `scale`; the backward multiplies them by g_out / scale in fp32."""

    @staticmethod
    def forward(ctx, loss, grads, scale, *inputs):
        ctx.grads, ctx.scale = grads, scale
        ctx.dtypes = [None if t is None else t.dtype for t in inputs]
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g):
        # a 0-d fp32 factor: computed in fp32, rounded once to each gradient's dtype (a
        # loss scaler's 2^16 would overflow fp16 if cast first)
        factor = g.float() / ctx.scale
        pairs = zip(ctx.grads, ctx.dtypes, strict=True)
        grads = (None if d is None else (d * factor).to(dt) for d, dt in pairs)
        return (None, None, None, *grads)


def _fp16_grad_scale(*coefficients: torch.Tensor | None) -> torch.Tensor:
    """A power of two that brings the largest |coefficient| to (1/2, 1], on the device.

    In fp16 the single pass's dz ~ p * A / N_tokens (and dH, dW after it) underflow
    before a loss scaler's factor arrives in the backward; scaled, they keep their bits.
    """
    m = torch.stack([c.abs().amax().float() for c in coefficients if c is not None]).amax()
    exponent = torch.ceil(torch.log2(m)).clamp(-64, 64)
    return torch.where(m > 0, torch.exp2(-exponent), torch.ones_like(m))


def _single_pass_ok(impl, opts, old_logps, sampling_logps, hidden, weight, bias) -> bool:
    """Whether the loss is linear in its per-token terms with coefficients that do not
    depend on the log-probs (and a gradient is wanted, from the Triton path)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    return (
        impl == "triton"
        and needs_grad
        and opts.importance_sampling_level == "token"
        # vespo's weight is a function of the whole row's log-probs: known after a pass
        and opts.loss_type != "vespo"
        and opts.off_policy_mask_threshold is None
        and opts.top_entropy_quantile == 1
        # on-policy with a sampler correction weighs tokens by the current log-probs
        and not (old_logps is None and sampling_logps is not None)
    )


def _coefficients(opts, mask, old_logps, ref_logps, sampling_logps, num_items_in_batch):
    """dL/d(per-token loss term), dL/d(KL), dL/d(entropy): [B, T] fp32 each (or None)."""
    keep = mask.bool()
    m = keep.float()
    sampling = None
    if sampling_logps is not None and opts.sampling_correction is not None:
        old, samp = (masked(x.detach(), keep, torch.float32) for x in (old_logps, sampling_logps))
        sampling = sampling_ratio(opts, old, samp, m)
    return token_coefficients(opts, m, sampling, num_items_in_batch, has_kl=ref_logps is not None)


def _single_pass(hidden, weight, bias, scored, mask, advantages, old_logps, ref_logps,
                 temperature, softcap, compact, opts, loss_kwargs):  # fmt: skip
    from fastrl.kernels.fused_policy_loss import fused_policy_loss_fwd
    from fastrl.kernels.policy_loss import TokenTermParams

    B, T, d = hidden.shape
    check_target_ids(scored, weight.shape[0], IGNORE_INDEX)
    sampling_logps = loss_kwargs["sampling_logps"]
    num_items_in_batch = loss_kwargs["num_items_in_batch"]
    check_tensors(
        (B, T), old_logps=old_logps, advantages=advantages, mask=mask, ref_logps=ref_logps,
        entropy=None, sampling_logps=sampling_logps, num_items_in_batch=num_items_in_batch,
    )  # fmt: skip
    opts.check_inputs(
        num_items_in_batch=num_items_in_batch is not None,
        ref_logps=ref_logps is not None,
        entropy=True,
    )
    w_pt, w_kl, w_ent = _coefficients(
        opts, mask, old_logps, ref_logps, sampling_logps, num_items_in_batch
    )
    flat = lambda x: None if x is None else x.detach().reshape(-1).float().contiguous()
    adv = advantages.detach().float()
    adv = (adv.reshape(B, 1) if adv.dim() == 1 or adv.shape[-1] == 1 else adv).expand(B, T)
    with torch.no_grad(), on_device(hidden.device):
        scale = None
        if hidden.dtype == torch.float16 and hidden.numel():
            scale = _fp16_grad_scale(w_pt * adv, w_kl, w_ent)
        h, t = hidden.reshape(-1, d), scored.reshape(-1)
        per_token = [flat(x) for x in (old_logps, adv, ref_logps, w_pt, w_kl, w_ent)]
        rows = scored_rows(t, IGNORE_INDEX) if compact else None
        if rows is not None:  # the valid rows only: padding costs no GEMM work
            h, t = h.index_select(0, rows), t[rows]
            per_token = [None if x is None else x[rows] for x in per_token]
        logp, ent, dh, dw, db = fused_policy_loss_fwd(
            h, weight, bias, t, *per_token, TokenTermParams(**opts.kernel_params()),
            temperature=temperature, softcap=softcap, ignore_index=IGNORE_INDEX,
            need_hidden=hidden.requires_grad, need_weight=weight.requires_grad,
            need_bias=bias is not None and bias.requires_grad, grad_scale=scale,
        )  # fmt: skip
        if rows is not None:
            logp, ent, dh = (
                x if x is None else scatter_rows(x, rows, B * T) for x in (logp, ent, dh)
            )
        loss, metrics = policy_loss(
            logp.view(B, T), old_logps, advantages, mask, ref_logps=ref_logps,
            entropy=ent.view(B, T), **loss_kwargs,
        )  # fmt: skip
    grads = (None if dh is None else dh.view(B, T, d), dw, db)
    if scale is None:
        scale = torch.ones((), device=hidden.device)
    return _LossWithGrads.apply(loss, grads, scale, hidden, weight, bias), metrics


def fused_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    compact: bool = True,
    process_group: "torch.distributed.ProcessGroup | None" = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`policy_loss` straight from the policy's last hidden states and lm_head weight.

    No ``[B, T, V]`` logits exist in the forward or the backward, a frozen ``weight``
    gets no ``[V, d]`` gradient, and masked positions are not scored. With Triton and a
    token-level loss the gradient is formed in the forward pass (two GEMMs of
    ``N x V x d`` for a frozen head); otherwise log-probs, then loss, then backward
    (three).

    Args:
        hidden: ``[B, T, d]`` hidden states at the positions that predict the completion
            tokens (fp32/fp16/bf16); differentiable.
        weight: ``[V, d]`` lm_head weight of the policy, same dtype as ``hidden``.
        targets: ``[B, T]`` integer completion token ids.
        mask: ``[B, T]`` 0/1 completion mask.
        advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``.
        old_logps: ``[B, T]`` sampling-policy log-probs, or None for on-policy.
        ref_logps: ``[B, T]`` reference log-probs, if already computed.
        ref_hidden: ``[B, T, d]`` reference-model hidden states instead of
            ``ref_logps``: their log-probs are computed with the same kernel under
            ``no_grad`` (with ``ref_weight``, default ``weight``).
        num_items_in_batch, sampling_logps: as in `policy_loss`.
        bias, temperature, softcap: the lm_head bias and logit transforms, as in
            `linear_logprobs` (TRL scores completions at the sampling temperature).
        impl: "auto" (Triton for CUDA tensors, else PyTorch), "triton" or "torch".
        compact: score only the positions where ``mask`` is 1 (see `linear_logprobs`).
        process_group: the tensor-parallel group ``weight`` (and ``bias``, ``ref_weight``)
            is split over by vocabulary, as in `linear_logprobs`: each rank passes its
            shard and the same ``hidden``, ``targets``, ``mask``, ...; the loss and
            metrics are the full head's on every rank. Always the two-pass path (the
            single pass forms gradients before the shards' statistics are merged).
        **options: the hyper-parameters of `policy_loss` (``loss_type``, ``epsilon``,
            ``beta``, ``importance_sampling_level``, ``entropy_coef``, ...: the fields of
            `fastrl.options.policy.PolicyLossOptions`).

    Returns:
        ``(loss, metrics)`` as `policy_loss`; ``metrics`` always includes ``entropy``.
    """
    for name in ("logps", "entropy"):
        if name in options:
            raise ValueError(f"fused_policy_loss computes {name} itself; do not pass {name}=")
    unknown = sorted(set(options) - set(PolicyLossOptions.names()))
    if unknown:
        raise TypeError(f"fused_policy_loss() got unexpected keyword arguments {unknown}")
    opts = PolicyLossOptions(**options)
    opts.validate()
    check_completion_batch(targets, mask, ref_weight, ref_hidden, rows="[B, T]")
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError("pass ref_logps or ref_hidden, not both")

    scored = torch.where(mask.bool(), targets, IGNORE_INDEX)
    logit_kw = dict(
        bias=bias, temperature=temperature, softcap=softcap, ignore_index=IGNORE_INDEX,
        process_group=process_group,
    )  # fmt: skip
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logps = linear_logprobs(
                ref_hidden, weight if ref_weight is None else ref_weight, scored, impl=impl,
                compact=compact, **logit_kw,
            )  # fmt: skip

    check_logit_inputs(hidden, weight, scored, bias, temperature, softcap, IGNORE_INDEX)
    if not isinstance(compact, bool):
        raise TypeError(f"compact must be a bool, got {compact!r}")
    # what policy_loss takes besides the tensors it is given below
    loss_kwargs = dict(num_items_in_batch=num_items_in_batch, sampling_logps=sampling_logps)
    loss_kwargs.update(options)
    if (
        hidden.dim() == 3
        and process_group is None
        and _single_pass_ok(
            resolve_impl(impl, hidden.device), opts, old_logps, sampling_logps, hidden, weight, bias
        )
    ):
        return _single_pass(
            hidden, weight, bias, scored, mask, advantages, old_logps, ref_logps,
            float(temperature), None if softcap is None else float(softcap), compact, opts,
            loss_kwargs,
        )  # fmt: skip
    logps, entropy = linear_logprobs(
        hidden, weight, scored, return_entropy=True, impl=impl, compact=compact, **logit_kw
    )
    return policy_loss(
        logps, old_logps, advantages, mask, ref_logps=ref_logps, entropy=entropy, **loss_kwargs
    )
