"""GRPO-family policy losses on per-token log-probs, with TRL 1.16's semantics.

`policy_loss` computes, from per-token log-probs ``[B, T]`` of the completions, the loss that
TRL's ``GRPOTrainer._compute_loss`` computes for the same inputs: loss types ``grpo``,
``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo`` and ``luspo``, token- or sequence-level
(GSPO) importance ratios, decoupled (``epsilon_high``) and two-sided (``delta``) clipping,
a KL penalty to a reference policy, the vLLM/sampler importance-sampling correction, the
off-policy sequence mask, high-entropy token masking and the entropy bonus, and TRL's
gradient-accumulation scaling. Loss and gradients agree with TRL's to float rounding
(tests/test_trl_parity_grpo.py runs TRL's own trainer).

The computation has two parts: `_per_token_terms` (elementwise; for token-level ratios the
Triton kernel of kernels/policy_loss.py takes it over, KL included, see `impl`) and the
reductions and normalisers in `policy_loss`.
"""

from __future__ import annotations

import torch

from fastrl.checks import check_choice, check_number, check_tensor, check_zero_one

__all__ = ["policy_loss"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO-style clipped surrogate
_LEVELS = ("token", "sequence")
_KL_ESTIMATORS = ("k1", "k2", "k3")
_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


# --------------------------------------------------------------------------- validation


# --------------------------------------------------------------------------- per-token part


def _kl(logps, ref_logps, estimator):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3)."""
    d = ref_logps - logps  # log(pi_ref / pi)
    if estimator == "k3":
        return torch.exp(d) - d - 1
    if estimator == "k2":
        return 0.5 * d * d
    return -d  # k1


def _per_token_terms(
    lp, old, adv, m, *, loss_type, level, eps_low, eps_high, delta, sapo_pos, sapo_neg
):
    """The elementwise part of the loss.

    lp, old, m: [B, T] (compute dtype; masked positions already zeroed); adv: [B, 1] or
    [B, T]. Returns (per_token_loss, coef_1, clipped_coef_1): per_token_loss is [B, T], or
    [B, 1] for a sequence-level ratio whose loss does not involve the log-probs; coef_1 is
    the importance ratio (exp of the token or sequence log-ratio) before the ``delta``
    clamp, clipped_coef_1 after it (what TRL's clip metrics look at).
    """
    log_ratio = lp - old
    if level == "sequence":  # GSPO: the length-normalised sequence log-ratio
        log_w = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        log_w = log_ratio
    coef_1 = torch.exp(log_w)

    if loss_type in _CLIPPED:
        clipped = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        ratio = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        return per_token, coef_1, ratio
    if loss_type == "cispo":  # REINFORCE on log-probs, weighted by the capped, detached ratio
        weight = torch.clamp(coef_1, max=eps_high).detach()
        return -weight * adv * lp, coef_1, coef_1
    # sapo: a sigmoid gate in place of the hard clip, temperature by the advantage's sign
    tau = torch.where(adv > 0, adv.new_tensor(sapo_pos), adv.new_tensor(sapo_neg))
    gate = torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau
    return -gate * adv, coef_1, coef_1


class _TokenTermsFunction(torch.autograd.Function):
    """The per-token terms of a token-level loss from the Triton kernel
    (kernels/policy_loss.py): ``(per_token_loss, per_token_kl or None, clip_coef)``, fp32
    ``[B, T]``. Differentiable in ``logps`` only; the KL only when it is in the loss."""

    @staticmethod
    def forward(ctx, logps, old_logps, advantages, keep, ref_logps, kl_in_loss, opts):
        from fastrl.kernels.policy_loss import policy_loss_fwd

        ctx.set_materialize_grads(False)
        need_grad = ctx.needs_input_grad[0]
        pt, kl, ratio, d_pt, d_kl = policy_loss_fwd(
            logps,
            old_logps,
            advantages,
            keep,
            ref_logps,
            **opts,
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


def _use_token_kernel(impl, logps, level):
    """Whether the per-token terms run in the Triton kernel: ``impl="auto"`` on CUDA
    tensors when it covers the options, ``"triton"`` always (or a ValueError naming what
    it does not cover), ``"torch"`` never."""
    from fastrl.ops.logprobs.linear import IMPLS, _triton_usable

    check_choice("impl", impl, IMPLS)
    if impl == "torch":
        return False
    uncovered = None
    if level != "token":
        uncovered = (
            f"importance_sampling_level={level!r} (the sequence-level ratio needs a row "
            "reduction first; it runs in PyTorch)"
        )
    elif logps.dtype == torch.float64:
        uncovered = "float64 logps (the kernel computes in float32)"
    if impl == "auto":
        return logps.is_cuda and uncovered is None
    if uncovered is not None:
        raise ValueError(f"impl='triton' does not cover {uncovered}; use impl='auto' or 'torch'")
    if not _triton_usable(logps.device):
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {logps.device}"
        )
    return True


def _sampling_ratio(old, sampling, m, mode, clip_min, clip_max):
    """Importance weight pi_old / pi_sampler (TRL's vLLM correction), without gradient."""
    diff = torch.nan_to_num((old - sampling) * m, nan=0.0)  # unscored tokens: no correction
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = float("-inf") if clip_min is None else clip_min
    hi = float("inf") if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def _masked_mean(x, m):
    """TRL's metric mean: over unmasked tokens, or over sequences for [B, 1] values."""
    if x.shape[1] == 1:
        return x.sum() / x.shape[0]
    return (x * m).sum() / m.sum().clamp(min=1.0)


def _masked_seq_mean(x, m):
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * m).sum(-1) / m.sum(-1)  # NaN for empty rows, skipped by the nan-min/max


def _nanmin(x):
    x = x[~torch.isnan(x)]
    return x.min() if x.numel() else torch.tensor(float("nan"), dtype=x.dtype, device=x.device)


def _nanmax(x):
    x = x[~torch.isnan(x)]
    return x.max() if x.numel() else torch.tensor(float("nan"), dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------- public API


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = True,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
    num_processes: int = 1,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    sampling_logps: torch.Tensor | None = None,
    sampling_correction: str | None = "sequence_mask",
    sampling_clip_min: float | None = None,
    sampling_clip_max: float | None = 3.0,
    off_policy_mask_threshold: float | None = None,
    impl: str = "auto",
    _token_terms: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family policy loss on per-token log-probs, as TRL 1.16's ``GRPOTrainer``.

    Shapes: ``B`` completions, ``T`` completion tokens (right-padded). Every per-token
    input is ``[B, T]``; positions where ``mask`` is 0 never contribute (their values may
    be anything finite or not). The math runs in float32 (float64 for float64 ``logps``);
    the loss and metrics come back in that dtype, gradients in the inputs' dtypes.

    Args:
        logps: ``[B, T]`` float, log-probs of the completion tokens under the policy being
            trained; differentiable.
        old_logps: ``[B, T]`` log-probs under the policy that sampled (TRL's
            ``old_per_token_logps``), or ``None`` for on-policy (``logps.detach()``).
            Treated as a constant.
        advantages: ``[B]``, ``[B, 1]`` or ``[B, T]`` real tensor (e.g. from
            `group_advantages`). Treated as a constant.
        mask: ``[B, T]`` bool, integer or float tensor of 0/1: the completion tokens that
            count (TRL's ``completion_mask``, times its ``tool_mask`` if any).
        ref_logps: ``[B, T]`` log-probs under the reference model; needed when ``beta``
            is not 0. When given with ``beta == 0`` it only feeds the ``kl`` metric.
        loss_type: how per-token losses are aggregated (TRL's normalisers; ``GA`` is
            ``gradient_accumulation_steps``):

            - ``"grpo"``, ``"sapo"``: mean over sequences of the per-sequence token mean,
              ``/ GA``;
            - ``"bnpo"``: sum over tokens ``/ mask.sum()``, ``/ GA``;
            - ``"dr_grpo"``: sum ``/ (B * max_completion_length)``, ``/ GA``;
            - ``"dapo"``, ``"cispo"``: sum ``/ (num_items_in_batch / num_processes * GA /
              steps_per_generation)``, i.e. by the active-token count of the accumulation
              window;
            - ``"luspo"``: mean over sequences of the per-sequence token sum, ``/ GA``.

            ``grpo``/``bnpo``/``dr_grpo``/``dapo``/``luspo`` use the PPO clipped surrogate
            ``-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)``; ``cispo`` uses
            ``-min(r, epsilon_high).detach() * A * logps``; ``sapo`` the soft gate
            ``-sigmoid(tau (r - 1)) * 4 / tau * A``.
        epsilon: lower clip, ``1 - epsilon``.
        epsilon_high: upper clip ``1 + epsilon_high`` (default ``epsilon``); for ``cispo``
            the cap on the ratio itself (TRL's default is then ``epsilon``, 0.2; MiniMax
            and ScaleRL use about 5).
        delta: two-sided clipping (INTELLECT-2): the unclipped ratio is capped at
            ``delta``. Clipped-surrogate loss types only.
        beta: weight of the per-token KL penalty ``beta * KL`` added to the loss; >= 0.
        kl_estimator: ``"k3"`` (TRL: ``exp(ref - logp) - (ref - logp) - 1``), ``"k2"``
            (``(logp - ref)^2 / 2``) or ``"k1"`` (``logp - ref``).
        use_bias_correction_kl: multiply the KL by the (differentiable) importance ratio,
            as TRL does by default (DeepSeek-V3.2's unbiased KL gradient).
        importance_sampling_level: ``"token"`` (a ratio per token) or ``"sequence"``
            (GSPO: ``exp`` of the masked mean of the token log-ratios, per sequence).
        max_completion_length: the constant of ``dr_grpo`` (required by it).
        num_items_in_batch: active tokens of the whole generation batch over all
            processes, as TRL passes it (required by ``dapo`` and ``cispo``).
        gradient_accumulation_steps: micro-batches per optimizer step. TRL divides every
            loss by it in training (``dapo``/``cispo`` through their normaliser). Pass 1
            to reproduce TRL's evaluation loss.
        steps_per_generation: micro-batches a generation batch is split into (TRL's
            ``steps_per_generation``; default ``gradient_accumulation_steps``). Pass 1 for
            TRL's evaluation loss.
        num_processes: data-parallel processes ``num_items_in_batch`` was summed over.
        sapo_temperature_pos, sapo_temperature_neg: ``sapo`` temperatures for tokens with
            positive and non-positive advantages (TRL's defaults).
        entropy: ``[B, T]`` per-token entropy of the policy (``linear_logprobs(...,
            return_entropy=True)``). Feeds the ``entropy`` metric, the high-entropy mask
            and the entropy bonus (differentiable there).
        entropy_coef: entropy bonus: ``loss -= entropy_coef * mean_masked(entropy) / GA``.
            TRL's adaptive controller is stateful: pass its current coefficient.
        top_entropy_quantile: keep only tokens whose entropy is at or above this upper
            quantile of the batch's masked entropies (``torch.quantile``; "Beyond the
            80/20 rule"); 1.0 keeps all tokens.
        sampling_logps: ``[B, T]`` log-probs the sampler (e.g. vLLM) reported. NaN marks a
            token it could not score.
        sampling_correction: importance-sampling correction ``pi_old / pi_sampler`` applied
            to the policy term when ``sampling_logps`` is given: ``"token_truncate"``,
            ``"token_mask"``, ``"sequence_truncate"``, ``"sequence_mask"`` (TRL's
            ``vllm_importance_sampling_mode``), or ``None`` for none.
        sampling_clip_min, sampling_clip_max: bounds of the correction: truncate modes
            clamp to them, mask modes zero the ratios outside them.
        off_policy_mask_threshold: DeepSeek-V3.2's off-policy sequence mask: drop
            sequences with a negative advantage whose mean ``log pi_sampler - log pi``
            exceeds it (``sampling_logps`` if given, else ``old_logps``).
        impl: where the per-token terms (ratio, clip, KL and their gradient) run:
            ``"auto"`` (the Triton kernel for CUDA tensors with token-level ratios and
            fp32/fp16/bf16 ``logps``, else PyTorch), ``"triton"`` (an error for the
            sequence level or float64), or ``"torch"``. The reductions are PyTorch's.
        _token_terms: internal: ``(per_token_loss, per_token_kl, clip_ratio)`` ``[B, T]``
            to aggregate in place of the ones from ``logps`` (token level only).
            `fused_policy_loss` passes leaves here to read the aggregation's per-token
            coefficients with autograd.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d tensor to call ``backward()`` on; ``metrics`` a
        dict of detached 0-d tensors named as TRL logs them, computed on this batch only:

        - ``policy_loss``: the loss before the entropy bonus (before the ``/ GA`` for
          the loss types that divide by it, as TRL logs it; TRL only logs it when the
          entropy bonus is on);
        - ``kl`` (when ``ref_logps`` is given), ``entropy`` (when ``entropy`` is given):
          means over the masked tokens;
        - clipped-surrogate types: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
          ``clip_ratio/region_mean`` (fraction of masked tokens, or of sequences at the
          sequence level, where the clip is active), ``clip_ratio/low_min``,
          ``clip_ratio/high_max`` (min/max over sequences of the per-sequence fraction);
        - ``cispo``: ``cispo_clip_ratio``;
        - with the sampling correction: ``sampling/sampling_logp_difference/mean`` and
          ``/max``, ``sampling/importance_sampling_ratio/min``, ``/mean``, ``/max``.

        Across processes TRL reduces the token-mean metrics as global means (sums and
        counts all-reduced), takes the min/max of the per-sequence and sampling min/max
        values over all processes, and averages ``policy_loss`` and the sampling means
        over processes; the values here are the single-process ones.

    Raises:
        ValueError: unknown ``loss_type``, ``importance_sampling_level``,
            ``kl_estimator`` or ``sampling_correction``; ``dr_grpo`` without
            ``max_completion_length``; ``dapo``/``cispo`` without ``num_items_in_batch``;
            ``beta != 0`` without ``ref_logps``; ``delta`` with a loss type that has no
            clipped surrogate; an entropy option without ``entropy``; mismatched shapes; a
            ``mask`` with values other than 0 and 1; out-of-range numbers; unknown
            ``impl``, or ``impl="triton"`` for an option the kernel does not cover.
        TypeError: a tensor argument that is not a (floating-point) tensor, a
            non-numeric hyper-parameter.
    """
    # ---- validation: every message names the argument and the value it got.
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("importance_sampling_level", importance_sampling_level, _LEVELS)
    check_choice("kl_estimator", kl_estimator, _KL_ESTIMATORS)
    check_tensor("logps", logps)
    if logps.dim() != 2:
        raise ValueError(f"logps must have shape [B, T], got {tuple(logps.shape)}")
    shape = tuple(logps.shape)
    B, T = shape
    if old_logps is not None:
        check_tensor("old_logps", old_logps, shape)
    if ref_logps is not None:
        check_tensor("ref_logps", ref_logps, shape)
    if entropy is not None:
        check_tensor("entropy", entropy, shape)
    if sampling_logps is not None:
        check_tensor("sampling_logps", sampling_logps, shape)
    check_tensor("advantages", advantages, floating=False)
    if advantages.is_complex() or advantages.dtype == torch.bool:
        raise TypeError(f"advantages must be a real tensor, got dtype {advantages.dtype}")
    if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
        raise ValueError(
            f"advantages must have shape [B]=({B},), [B, 1] or [B, T]={shape}, "
            f"got {tuple(advantages.shape)}"
        )
    check_tensor("mask", mask, shape, floating=False)
    if mask.is_complex():
        raise TypeError(f"mask must be a bool, integer or float tensor, got dtype {mask.dtype}")
    check_zero_one(mask, "mask must contain only 0 and 1")

    check_number("epsilon", epsilon, low=0.0)
    if epsilon_high is not None:
        check_number("epsilon_high", epsilon_high, low=0.0)
    if delta is not None:
        check_number("delta", delta, low=0.0, strict_low=True)
        if loss_type not in _CLIPPED:
            raise ValueError(
                f"delta={delta!r} caps the unclipped ratio of the clipped surrogate, which "
                f"loss_type={loss_type!r} does not have (it applies to {_CLIPPED})"
            )
    check_number("beta", beta, low=0.0)  # a negative KL coefficient rewards divergence
    if beta != 0 and ref_logps is None:
        raise ValueError(f"beta={beta!r} needs ref_logps (the KL penalty's reference)")
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError(
                "loss_type='dr_grpo' normalises by B * max_completion_length: pass "
                "max_completion_length (got None)"
            )
    if max_completion_length is not None:
        check_number("max_completion_length", max_completion_length, low=1, integer=True)
    if loss_type in ("dapo", "cispo") and num_items_in_batch is None:
        raise ValueError(
            f"loss_type={loss_type!r} normalises by the active-token count of the generation "
            "batch: pass num_items_in_batch (got None)"
        )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    "num_items_in_batch must be a number or a one-element tensor, got shape "
                    f"{tuple(num_items_in_batch.shape)}"
                )
        else:
            check_number("num_items_in_batch", num_items_in_batch, low=0.0)
    check_number("gradient_accumulation_steps", gradient_accumulation_steps, low=1, integer=True)
    if steps_per_generation is None:
        steps_per_generation = gradient_accumulation_steps
    check_number("steps_per_generation", steps_per_generation, low=1, integer=True)
    check_number("num_processes", num_processes, low=1, integer=True)
    check_number("sapo_temperature_pos", sapo_temperature_pos, low=0.0, strict_low=True)
    check_number("sapo_temperature_neg", sapo_temperature_neg, low=0.0, strict_low=True)
    check_number("entropy_coef", entropy_coef)
    check_number("top_entropy_quantile", top_entropy_quantile, low=0.0, high=1.0)
    if entropy is None and entropy_coef != 0:
        raise ValueError(
            f"entropy_coef={entropy_coef!r} needs the per-token entropy (entropy=None)"
        )
    if entropy is None and top_entropy_quantile < 1:
        raise ValueError(
            f"top_entropy_quantile={top_entropy_quantile!r} needs the per-token entropy "
            "(entropy=None)"
        )
    if sampling_correction is not None:
        check_choice("sampling_correction", sampling_correction, _SAMPLING_MODES)
    if sampling_clip_min is not None:
        check_number("sampling_clip_min", sampling_clip_min)
    if sampling_clip_max is not None:
        check_number("sampling_clip_max", sampling_clip_max)
    correct = sampling_logps is not None and sampling_correction is not None
    if correct:
        both = sampling_clip_min is not None and sampling_clip_max is not None
        if both and sampling_clip_min >= sampling_clip_max:
            raise ValueError(
                f"sampling_clip_min={sampling_clip_min!r} must be less than "
                f"sampling_clip_max={sampling_clip_max!r}"
            )
        if sampling_correction.endswith("truncate") and sampling_clip_min is None:
            if sampling_clip_max is None:
                raise ValueError(
                    f"sampling_correction={sampling_correction!r} needs sampling_clip_min or "
                    "sampling_clip_max (both None)"
                )
    if off_policy_mask_threshold is not None:
        check_number("off_policy_mask_threshold", off_policy_mask_threshold)
    use_kernel = _use_token_kernel(impl, logps, importance_sampling_level)
    if _token_terms is not None and importance_sampling_level != "token":
        raise ValueError("_token_terms is for importance_sampling_level='token' only")

    # ---- inputs in the compute dtype; masked positions zeroed so that inf/NaN padding
    # cannot leak into sums (their gradient is zero, as with TRL's masking).
    cdt = torch.float64 if logps.dtype == torch.float64 else torch.float32
    keep = mask.bool() if mask.dtype != torch.bool else mask
    m = keep.to(cdt)
    zero = torch.zeros((), dtype=cdt, device=logps.device)

    def clean(x):
        return torch.where(keep, x.to(cdt), zero)

    lp = clean(logps)
    old = lp.detach() if old_logps is None else clean(old_logps.detach())
    adv = advantages.detach().to(cdt)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    if adv.shape[1] == T and T != 1:
        adv = torch.where(keep, adv, zero)
    ent = clean(entropy) if entropy is not None else None
    eps_low = float(epsilon)
    eps_high = float(epsilon if epsilon_high is None else epsilon_high)
    GA = gradient_accumulation_steps
    metrics: dict[str, torch.Tensor] = {}

    # ---- per-token terms: given, the Triton kernel (token level), or PyTorch
    if _token_terms is not None:
        per_token, per_token_kl, clip_coef = _token_terms
        coef_1 = clip_coef
    elif use_kernel:
        per_token, per_token_kl, clip_coef = _TokenTermsFunction.apply(
            logps,
            None if old_logps is None else old_logps.detach(),
            advantages.detach(),
            keep,
            None if ref_logps is None else ref_logps.detach(),
            beta != 0,
            dict(
                loss_type=loss_type,
                epsilon_low=eps_low,
                epsilon_high=eps_high,
                delta=None if delta is None else float(delta),
                kl_estimator=kl_estimator,
                kl_times_ratio=bool(use_bias_correction_kl),
                sapo_temperature_pos=float(sapo_temperature_pos),
                sapo_temperature_neg=float(sapo_temperature_neg),
            ),
        )
        coef_1 = clip_coef  # no delta cap where coef_1 is read below (cispo's metric)
    else:
        per_token, coef_1, clip_coef = _per_token_terms(
            lp,
            old,
            adv,
            m,
            loss_type=loss_type,
            level=importance_sampling_level,
            eps_low=eps_low,
            eps_high=eps_high,
            delta=None if delta is None else float(delta),
            sapo_pos=float(sapo_temperature_pos),
            sapo_neg=float(sapo_temperature_neg),
        )
        per_token_kl = None
        if ref_logps is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and beta != 0):
                per_token_kl = _kl(lp, clean(ref_logps.detach()), kl_estimator)
                if use_bias_correction_kl:
                    per_token_kl = per_token_kl * coef_1

    if off_policy_mask_threshold is not None:
        with torch.no_grad():
            src = clean(sampling_logps) if sampling_logps is not None else old
            kl_div = torch.nan_to_num(src - lp, nan=0.0)
            seq_kl = (kl_div * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
            opsm = ((adv >= 0) | (seq_kl <= off_policy_mask_threshold)).to(cdt)
        per_token = per_token * opsm

    entropy_mask = None
    if top_entropy_quantile < 1:
        with torch.no_grad():
            local = ent[keep]
            if local.numel() == 0:
                entropy_mask = torch.zeros_like(keep)
            else:
                threshold = torch.quantile(local, 1 - top_entropy_quantile)
                entropy_mask = (ent >= threshold) & keep
        per_token = per_token * entropy_mask.to(cdt)

    if correct:
        with torch.no_grad():
            sampling = torch.where(keep, sampling_logps.to(cdt), zero)
            is_ratio = _sampling_ratio(
                old, sampling, m, sampling_correction, sampling_clip_min, sampling_clip_max
            )
        per_token = per_token * is_ratio

    if beta != 0:
        per_token = per_token + beta * per_token_kl

    # ---- aggregation (TRL's normalisers)
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        metrics["policy_loss"] = loss.detach()
        loss = loss / GA
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
        metrics["policy_loss"] = loss.detach()
        loss = loss / GA
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (B * max_completion_length)
        metrics["policy_loss"] = loss.detach()
        loss = loss / GA
    elif loss_type == "luspo":
        loss = (per_token * m).sum(-1).mean()
        metrics["policy_loss"] = loss.detach()
        loss = loss / GA
    else:  # dapo, cispo: the token count of one accumulation window
        n = torch.as_tensor(num_items_in_batch, device=lp.device).reshape(())
        normalizer = n.to(cdt).clamp(min=1.0) / num_processes
        normalizer = normalizer * GA / steps_per_generation
        loss = (per_token * m).sum() / normalizer
        metrics["policy_loss"] = loss.detach()

    if entropy_coef != 0:
        eff = m if entropy_mask is None else m * entropy_mask.to(cdt)
        bonus = (ent * eff).sum() / eff.sum().clamp(min=1.0) / GA
        loss = loss - entropy_coef * bonus

    # ---- metrics (local values; see the docstring for TRL's cross-process reduction)
    with torch.no_grad():
        if per_token_kl is not None:
            metrics["kl"] = _masked_mean(per_token_kl.detach(), m)
        if ent is not None:
            metrics["entropy"] = _masked_mean(ent.detach(), m)
        if loss_type in _CLIPPED:
            low = ((clip_coef < 1 - eps_low) & (adv < 0)).to(cdt)
            high = ((clip_coef > 1 + eps_high) & (adv > 0)).to(cdt)
            region = torch.maximum(low, high)
            metrics["clip_ratio/low_mean"] = _masked_mean(low, m)
            metrics["clip_ratio/high_mean"] = _masked_mean(high, m)
            metrics["clip_ratio/region_mean"] = _masked_mean(region, m)
            metrics["clip_ratio/low_min"] = _nanmin(_masked_seq_mean(low, m))
            metrics["clip_ratio/high_max"] = _nanmax(_masked_seq_mean(high, m))
        elif loss_type == "cispo":
            clipped = ((coef_1 > eps_high) & (adv > 0)).to(cdt)
            metrics["cispo_clip_ratio"] = _masked_mean(clipped, m)
        if correct:
            diff = (old - sampling).abs()
            diff = diff[keep & ~torch.isnan(diff)]
            metrics["sampling/sampling_logp_difference/mean"] = (
                diff.mean() if diff.numel() else zero
            )
            metrics["sampling/sampling_logp_difference/max"] = diff.max() if diff.numel() else zero
            flat = is_ratio.flatten() if is_ratio.shape[1] == 1 else is_ratio[keep]
            metrics["sampling/importance_sampling_ratio/min"] = flat.min() if flat.numel() else zero
            metrics["sampling/importance_sampling_ratio/mean"] = (
                flat.mean() if flat.numel() else zero
            )
            metrics["sampling/importance_sampling_ratio/max"] = flat.max() if flat.numel() else zero
    metrics = {k: v.detach().to(cdt) for k, v in metrics.items()}
    return loss, metrics
