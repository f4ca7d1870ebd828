"""GRPO-family policy losses on per-token log-probs, with TRL 1.16's semantics.

`policy_loss` computes, from per-token log-probs ``[B, T]`` of the completions, the loss
that TRL's ``GRPOTrainer._compute_loss`` computes for the same inputs: loss types
``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``, ``luspo`` and ``vespo``,
token- or sequence-level (GSPO) importance ratios, decoupled (``epsilon_high``) and
two-sided (``delta``) clipping, a KL penalty to a reference policy, the vLLM/sampler
importance-sampling correction, the off-policy sequence mask, high-entropy token masking
and the entropy bonus, and TRL's gradient-accumulation scaling. Loss and gradients agree
with TRL's to float rounding (tests/parity/test_trl_parity_grpo.py runs TRL's own
trainer).

The steps, one module each: the options (`fastrl.options.policy`, validated once), the
tensors (`inputs.py`), the elementwise terms (`terms.py`: PyTorch, or for token-level
ratios the Triton kernel of kernels/policy_loss.py, KL included, see `impl`), the factors,
normalisers and entropy bonus (`aggregate.py`), the metrics (`metrics.py`).
"""

from __future__ import annotations

import torch

from fastrl.checks import check_tensor
from fastrl.ops.policy.aggregate import aggregate, apply_factors, entropy_bonus, token_factors
from fastrl.ops.policy.inputs import LossInputs, check_tensors
from fastrl.ops.policy.metrics import policy_metrics
from fastrl.ops.policy.terms import token_terms, use_token_kernel
from fastrl.options.policy import DEFAULTS, PolicyLossOptions

__all__ = ["policy_loss"]

_D = DEFAULTS  # every option's default is PolicyLossOptions'


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    loss_type: str = _D.loss_type,
    epsilon: float = _D.epsilon,
    epsilon_high: float | None = _D.epsilon_high,
    delta: float | None = _D.delta,
    beta: float = _D.beta,
    kl_estimator: str = _D.kl_estimator,
    use_bias_correction_kl: bool = _D.use_bias_correction_kl,
    importance_sampling_level: str = _D.importance_sampling_level,
    max_completion_length: int | None = _D.max_completion_length,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    gradient_accumulation_steps: int = _D.gradient_accumulation_steps,
    steps_per_generation: int | None = _D.steps_per_generation,
    num_processes: int = _D.num_processes,
    sapo_temperature_pos: float = _D.sapo_temperature_pos,
    sapo_temperature_neg: float = _D.sapo_temperature_neg,
    vespo_k_pos: float = _D.vespo_k_pos,
    vespo_lambda_pos: float = _D.vespo_lambda_pos,
    vespo_k_neg: float = _D.vespo_k_neg,
    vespo_lambda_neg: float = _D.vespo_lambda_neg,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = _D.entropy_coef,
    top_entropy_quantile: float = _D.top_entropy_quantile,
    sampling_logps: torch.Tensor | None = None,
    sampling_correction: str | None = _D.sampling_correction,
    sampling_clip_min: float | None = _D.sampling_clip_min,
    sampling_clip_max: float | None = _D.sampling_clip_max,
    off_policy_mask_threshold: float | None = _D.off_policy_mask_threshold,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family policy loss on per-token log-probs, as TRL 1.16's ``GRPOTrainer``.

    (Long for its documentation only: the body validates the options once and hands the
    work to `inputs`, `terms`, `aggregate` and `metrics` in this package.)

    Shapes: ``B`` completions, ``T`` completion tokens (right-padded). Every per-token
    input is ``[B, T]``; positions where ``mask`` is 0 never contribute (their values may
    be anything finite or not). The math runs in float32 (float64 for float64 ``logps``);
    the loss and metrics come back in that dtype, gradients in the inputs' dtypes.

    The hyper-parameters (``loss_type``, ``epsilon``, ``epsilon_high``, ``delta``, ``beta``,
    ``kl_estimator``, ``use_bias_correction_kl``, ``importance_sampling_level``,
    ``max_completion_length``, ``gradient_accumulation_steps``, ``steps_per_generation``,
    ``num_processes``, ``sapo_temperature_pos``/``_neg``, ``vespo_k_pos``/``_neg``,
    ``vespo_lambda_pos``/``_neg``, ``entropy_coef``,
    ``top_entropy_quantile``, ``sampling_correction``, ``sampling_clip_min``/``_max``,
    ``off_policy_mask_threshold``) are TRL's, with its defaults, and documented where they
    are declared: `fastrl.options.policy.PolicyLossOptions`. In short, ``loss_type`` picks
    the per-token loss (PPO's clipped surrogate, CISPO's or SAPO's) and TRL's normaliser
    (``dr_grpo`` needs ``max_completion_length``, ``dapo``/``cispo``/``vespo``
    ``num_items_in_batch``). ``vespo`` (TRL's ``get_gamma_weights``) weighs ``-A * logps`` by
    a detached Gamma function of each sequence's summed log-ratio and folds a token-level
    sampler correction into that weight instead of multiplying the loss by it (a
    ``sequence_*`` correction is refused with it, as TRL refuses it).

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
        num_items_in_batch: active tokens of the whole generation batch over all
            processes, as TRL passes it (a number or a one-element tensor; required by
            ``dapo`` and ``cispo``).
        entropy: ``[B, T]`` per-token entropy of the policy (``linear_logprobs(...,
            return_entropy=True)``). Feeds the ``entropy`` metric, the high-entropy mask
            and the entropy bonus (differentiable there).
        sampling_logps: ``[B, T]`` log-probs the sampler (e.g. vLLM) reported, for
            ``sampling_correction`` and the off-policy mask. NaN marks a token it could
            not score.
        impl: where the per-token terms (ratio, clip, KL and their gradient) run:
            ``"auto"`` (the Triton kernel for CUDA tensors with token-level ratios and
            fp32/fp16/bf16 ``logps``, else PyTorch), ``"triton"`` (an error for the
            sequence level or float64), or ``"torch"``. The reductions are PyTorch's.

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
        - ``vespo``: ``vespo/phi_seq_mean`` (the mean over sequences of the weight);
        - with the sampling correction: ``sampling/sampling_logp_difference/mean`` and
          ``/max``, ``sampling/importance_sampling_ratio/min``, ``/mean``, ``/max``.

        Across processes TRL reduces the token-mean metrics as global means (sums and
        counts all-reduced), takes the min/max of the per-sequence and sampling min/max
        values over all processes, and averages ``policy_loss`` and the sampling means
        over processes; the values here are the single-process ones.

    Raises:
        ValueError: an option out of range or not among its choices, or a combination
            `PolicyLossOptions.validate` refuses (``delta`` with a loss type that has no
            clipped surrogate, ``dr_grpo`` without ``max_completion_length``, ...); an
            option without the tensor it needs (``beta != 0`` without ``ref_logps``, an
            entropy option without ``entropy``, ``dapo``/``cispo``/``vespo`` without
            ``num_items_in_batch``); ``vespo`` with ``sampling_logps`` and a
            ``sequence_*`` ``sampling_correction``; mismatched shapes; a ``mask`` with
            values other than 0 and 1; unknown ``impl``, or ``impl="triton"`` for an
            option the kernel does not cover.
        TypeError: a tensor argument that is not a (floating-point) tensor, a
            non-numeric hyper-parameter.
    """
    opts = PolicyLossOptions.from_mapping(locals())  # first: locals() are the arguments
    opts.validate()
    check_tensor("logps", logps)
    if logps.dim() != 2:
        raise ValueError(f"logps must have shape [B, T], got {tuple(logps.shape)}")
    check_tensors(
        tuple(logps.shape),
        old_logps=old_logps,
        advantages=advantages,
        mask=mask,
        ref_logps=ref_logps,
        entropy=entropy,
        sampling_logps=sampling_logps,
        num_items_in_batch=num_items_in_batch,
    )
    opts.check_inputs(
        num_items_in_batch=num_items_in_batch is not None,
        ref_logps=ref_logps is not None,
        entropy=entropy is not None,
        sampling_logps=sampling_logps is not None,
    )
    use_kernel = use_token_kernel(impl, logps, opts)

    x = LossInputs.prepare(logps, old_logps, advantages, mask, entropy, sampling_logps)
    factors = token_factors(opts, x)
    vespo = opts.loss_type == "vespo"
    terms = token_terms(
        opts, x, logps, old_logps, advantages, ref_logps, use_kernel=use_kernel,
        sampling=factors.sampling if vespo else None,
    )  # fmt: skip
    # vespo's weight holds the sampler correction already (TRL does not multiply it again)
    per_token = apply_factors(terms.loss, factors._replace(sampling=None) if vespo else factors)
    if opts.beta != 0:
        per_token = per_token + opts.beta * terms.kl
    loss, logged = aggregate(opts, per_token, x.m, num_items_in_batch)
    if opts.entropy_coef != 0:
        loss = loss - opts.entropy_coef * entropy_bonus(opts, x.ent, x.m, factors.high_entropy)
    return loss, policy_metrics(opts, x, terms, factors, logged)
