"""`fused_preference_loss`: DPO-family losses straight from hidden states and the lm_head.

A preference loss depends on whole-sequence log-probs, so the per-token gradient is only
known once every token of a pair is scored: per-token log-probs come from
`linear_logprobs` (no [2B, T, V] logits, a frozen head costs no [V, d] gradient), are
summed per completion, and `preference_loss` and autograd do the rest; the backward is
`linear_logprobs`' (recompute, then dH).
"""

from dataclasses import fields

import torch

from fastrl.checks import IGNORE_INDEX, check_completion_batch
from fastrl.ops.logprobs.linear import linear_logprobs
from fastrl.ops.preference.inputs import PreferenceInputs
from fastrl.ops.preference.ld import ld_tail_logps
from fastrl.ops.preference.loss import compute_preference_loss
from fastrl.options.preference import OPTION_NAMES, PreferenceLossOptions

__all__ = ["fused_preference_loss"]

_INPUTS = tuple(f.name for f in fields(PreferenceInputs))
_COMPUTED = (
    "chosen_logps",
    "rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
    "chosen_tail_logps",
    "rejected_tail_logps",
)
_REF_TAILS = ("ref_chosen_tail_logps", "ref_rejected_tail_logps")  # from ref_hidden


def fused_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    compact: bool = True,
    process_group: "torch.distributed.ProcessGroup | None" = None,
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`preference_loss` straight from the policy's last hidden states and lm_head weight.

    Rows are ``[chosen; rejected]``: row ``i`` and row ``B + i`` are the two completions
    of prompt ``i``.

    Args:
        hidden: ``[2B, T, d]`` hidden states at the positions that predict the completion
            tokens (fp32/fp16/bf16); differentiable.
        weight: ``[V, d]`` lm_head weight, same dtype as ``hidden``.
        targets: ``[2B, T]`` integer completion token ids.
        mask: ``[2B, T]`` 0/1 completion mask (pairs may have unequal lengths).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs, if
            precomputed (e.g. once per dataset, TRL's ``precompute_ref_log_probs``). With
            ``ld_alpha`` also pass ``ref_chosen_tail_logps``/``ref_rejected_tail_logps``
            (zeros if the precomputed values are already LD-weighted, as TRL's are).
        ref_hidden: ``[2B, T, d]`` reference-model hidden states instead: their log-probs
            are computed with the same kernel under ``no_grad`` (with ``ref_weight``,
            default ``weight``; with ``ld_alpha`` their tails too).
        bias, temperature, softcap: lm_head bias and logit transforms, as in
            `linear_logprobs`.
        impl: "auto" (Triton for CUDA tensors, else PyTorch), "triton" or "torch".
        compact: score only the positions where ``mask`` is 1 (see `linear_logprobs`).
        process_group: the tensor-parallel group ``weight`` (and ``bias``, ``ref_weight``)
            is split over by vocabulary, as in `linear_logprobs`: each rank passes its
            shard and the same ``hidden``, ``targets``, ``mask``, ...; the loss and
            metrics are the full head's on every rank.
        **kwargs: the options of `preference_loss` (`PreferenceLossOptions`: ``loss_type``,
            ``beta``, ``label_smoothing``, ``ld_alpha``, ``use_weighting``, ...), validated
            before any log-prob is computed, and its other inputs (``nll``, precomputed
            reference tails or aligned log-probs). The sequence log-probs, the lengths,
            LD-DPO's tails and, with ``use_weighting`` (WPO), the aligned log-probs ``sum
            (log p - log sum_v p_v^2)`` are computed here (the last from the same pass,
            unless passed).

    Returns:
        ``(loss, metrics)`` as `preference_loss`.
    """
    options = PreferenceLossOptions.from_mapping(kwargs)
    inputs = {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}
    computed = _COMPUTED + (_REF_TAILS if ref_hidden is not None else ())
    for name in inputs:
        if name in computed:
            raise ValueError(f"fused_preference_loss computes {name} itself; do not pass it")
        if name not in _INPUTS:
            raise TypeError(f"fused_preference_loss() got an unexpected keyword argument {name!r}")
    options.validate()  # before the log-prob pass: a bad option costs no matmul
    check_completion_batch(targets, mask, ref_weight, ref_hidden, rows="[2B, T]")
    if targets.shape[0] % 2:
        raise ValueError(
            f"rows must be [chosen; rejected] pairs, got an odd row count {targets.shape[0]}"
        )
    if ref_hidden is not None and (ref_chosen_logps is not None or ref_rejected_logps is not None):
        raise ValueError("pass ref_chosen_logps/ref_rejected_logps or ref_hidden, not both")

    B = targets.shape[0] // 2
    ld = options.ld_alpha is not None
    scored = torch.where(mask.bool(), targets, IGNORE_INDEX)
    logit_kw = dict(
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        ignore_index=IGNORE_INDEX,
        compact=compact,
        process_group=process_group,
    )
    lengths = mask.sum(1)
    inputs.update(chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])

    if ref_hidden is not None:
        with torch.no_grad():
            ref_tok = linear_logprobs(
                ref_hidden, weight if ref_weight is None else ref_weight, scored, impl=impl,
                **logit_kw,
            )  # fmt: skip
            ref_seq = ref_tok.sum(1)
            ref_chosen_logps, ref_rejected_logps = ref_seq[:B], ref_seq[B:]
            if ld:
                c, r = ld_tail_logps(ref_tok, mask)
                inputs.update(ref_chosen_tail_logps=c, ref_rejected_tail_logps=r)

    wpo = options.use_weighting and "chosen_aligned_logps" not in inputs
    logps = linear_logprobs(
        hidden, weight, scored, impl=impl, return_log_sum_sq_probs=wpo, **logit_kw
    )
    if wpo:  # WPO's weights carry no gradient; both terms are 0 off the mask
        logps, log_sum_sq = logps
        aligned = (logps.detach() - log_sum_sq).sum(1)
        inputs.update(chosen_aligned_logps=aligned[:B], rejected_aligned_logps=aligned[B:])
    seq = logps.sum(1)
    if ld:
        c, r = ld_tail_logps(logps, mask)
        inputs.update(chosen_tail_logps=c, rejected_tail_logps=r)
    pairs = PreferenceInputs(seq[:B], seq[B:], ref_chosen_logps, ref_rejected_logps, **inputs)
    return compute_preference_loss(pairs, options)
