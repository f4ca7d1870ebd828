"""Per-token log-probs and entropies straight from hidden states and an lm_head weight."""

import os
from functools import partial

import torch
from torch._subclasses.fake_tensor import is_fake

from fastrl.checks import (
    IGNORE_INDEX,
    check_bool,
    check_choice,
    check_impl,
    check_number,
    check_same_device,
    check_tensor,
    check_zero_one,
)
from fastrl.ops.logprobs.custom_ops import frozen_applies, score
from fastrl.ops.logprobs.params import LogprobsParams
from fastrl.ops.logprobs.vocab_parallel import vocab_parallel_score, vocab_shard

DESIGNS = ("tiles", "cublas", "frozen")


def resolve_design(design: str | None, device: torch.device) -> str:
    """The design of impl="triton": the argument, else FASTRL_LOGPROBS_DESIGN, else
    "cublas" on CUDA (cuBLAS GEMMs into a bounded fp32 buffer + Triton epilogues; by
    analysis ~1.1x the 3 GEMMs against ~1.2-1.5x for the Triton tiles, not yet measured:
    kernels/cublas_logprobs.py) and "tiles" under the interpreter (its test suite).
    "frozen" (opt-in) is two GEMMs instead of three for a frozen head without entropy
    (kernels/frozen_logprobs.py; it holds an [N, d] tensor from forward to backward),
    and "cublas" where that does not apply (see `frozen_applies`)."""
    if design is None:
        design = os.environ.get("FASTRL_LOGPROBS_DESIGN")
    if design is None:
        design = "cublas" if device.type == "cuda" else "tiles"
    check_choice("design (or FASTRL_LOGPROBS_DESIGN)", design, DESIGNS)
    return design


def resolve_impl(impl: str, device: torch.device) -> str:
    """The path, "triton" or "torch", of `impl` on tensors of `device` ("auto": Triton on
    CUDA)."""
    check_impl(impl, device=device)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def check_logit_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index) -> None:
    """The arguments of `linear_logprobs` (also those of the fused heads, which score
    through it)."""
    check_tensor("hidden", hidden)
    check_tensor("weight", weight, dtype=hidden.dtype, like="hidden")
    check_tensor("targets", targets, integer=True)
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"expected hidden [..., d] and weight [V, d], got hidden {tuple(hidden.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} does not match hidden size d={hidden.shape[-1]} "
            f"of hidden {tuple(hidden.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])}"
        )
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias shape {tuple(bias.shape)} must be ({weight.shape[0]},), one per vocab row"
            )
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_number("temperature", temperature, low=0.0, strict_low=True)
    check_number("softcap", softcap, low=0.0, strict_low=True, optional=True)
    check_number("ignore_index", ignore_index, integer=True)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    return_is_top1: bool = False,
    return_log_sum_sq_probs: bool = False,
    impl: str = "auto",
    compact: bool = True,
    design: str | None = None,
    process_group: "torch.distributed.ProcessGroup | None" = None,
    reduce_hidden_grad: bool = True,
):
    """Log-probs (and entropies) of `targets` under `softcap(hidden @ weight.T + bias) / T`.

    Never builds the `[tokens, vocab]` logits: the Triton kernels work tile by tile, the
    PyTorch path in blocks.

    Args:
        hidden: `[..., d]` fp32/fp16/bf16 last hidden states.
        weight: `[V, d]` lm_head weight, same dtype as `hidden`. When it does not require
            grad, the backward allocates no `[V, d]` buffer and runs no dW matmul.
        targets: `[...]` integer ids in `[0, V)`, or `ignore_index`.
        bias: optional `[V]` lm_head bias.
        temperature: logits are divided by it (after softcap), > 0.
        softcap: final-logit soft capping `c * tanh(x / c)` (Gemma 2), > 0, or None.
        ignore_index: positions with this target give 0 and no gradient.
        return_entropy: also return the entropy of each position's distribution
            (differentiable).
        return_is_top1: also return whether each target has the largest logit (greedy
            decoding would pick it; a tie with another token counts; False where
            ignored): token accuracy for free, from the same pass.
        return_log_sum_sq_probs: also return `log sum_v p_v^2` of each position (0 where
            ignored; no gradient): WPO's weights, from the same pass.
        impl: "auto" (Triton for CUDA tensors, else PyTorch), "triton", or "torch".
        compact: score only the positions whose target is not ignore_index (gathered,
            and their results and gradients scattered back), so padding costs no GEMM
            work; one host read of their count (see `scored_rows`). False: score every
            row and zero the ignored ones (no host read; for CUDA-graph capture this
            happens by itself).
        design: the Triton path's design, "cublas", "tiles" or "frozen" (see
            `resolve_design`; default FASTRL_LOGPROBS_DESIGN, else by device).
        process_group: a tensor-parallel group the head is split over by vocabulary
            (Megatron's vocab-parallel lm_head): `weight` [V_local, d] and `bias`
            [V_local] are this rank's rows [rank * V_local, (rank + 1) * V_local) of the
            full head, every rank holding an equal shard; `hidden` and `targets` are the
            same on every rank, the targets global ids in [0, world * V_local). The
            outputs are the full head's, the same on every rank; the backward gives each
            rank its shard's weight/bias gradient and all-reduces the hidden-state one
            (see fastrl/ops/logprobs/vocab_parallel.py). One all-gather of [N] statistics
            per forward; "frozen" runs as "cublas" there.
        reduce_hidden_grad: with `process_group`, sum the hidden-state gradient over the
            group in the backward (True: `hidden` is a replicated leaf of this call).
            False leaves each rank its shard's part, for a graph that sums it itself:
            Megatron's `copy_to_tensor_model_parallel_region` in front of the head, and
            verl's `linear_cross_entropy(..., dist_process_group=...)` convention.

    Returns:
        `logps` float32 `[...]` (float64 for float64 inputs); with any `return_*` a tuple
        `(logps, entropy, is_top1, log_sum_sq_probs)` of the requested ones, in that order
        (`is_top1` bool `[...]`, the others as `logps`).
    """
    check_logit_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    check_bool("compact", compact)
    check_bool("reduce_hidden_grad", reduce_hidden_grad)
    if process_group is None and not reduce_hidden_grad:
        raise ValueError(
            "reduce_hidden_grad=False applies to a vocab-parallel head only: pass the "
            "process_group the weight is split over, or leave it True"
        )
    shard = vocab_shard(process_group, weight, reduce_hidden_grad=reduce_hidden_grad)
    backend = resolve_impl(impl, hidden.device)
    if backend == "triton":
        backend = resolve_design(design, hidden.device)
        # the two-GEMM design's backward needs the target rows of the whole head
        frozen = shard is None and frozen_applies(hidden, weight, bias, return_entropy)
        if backend == "frozen" and not frozen:
            backend = "cublas"
    params = LogprobsParams(
        temperature=float(temperature), softcap=None if softcap is None else float(softcap),
        ignore_index=int(ignore_index), return_entropy=return_entropy,
        return_is_top1=return_is_top1, return_log_sum_sq=return_log_sum_sq_probs,
        backend=backend,
    )  # fmt: skip
    lead = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    run = score if shard is None else partial(vocab_parallel_score, shard=shard)
    # every rank has the same targets, so the same rows: the shards stay aligned
    rows = scored_rows(t1, ignore_index) if compact else None
    if rows is None:
        outputs = run(h2, w, bias, t1, params)
    else:  # score the valid rows only; the others are 0 (False) with no gradient
        outputs = run(h2.index_select(0, rows), w, bias, t1[rows], params)
        wanted = (True, return_entropy, True, return_is_top1, return_log_sum_sq_probs)
        outputs = [scatter_rows(t, rows, t1.shape[0]) if want else t
                   for t, want in zip(outputs, wanted, strict=True)]  # fmt: skip
    logp, ent, _, top1, sq = outputs
    out = [logp]
    if return_entropy:
        out.append(ent)
    if return_is_top1:
        out.append(top1)
    if return_log_sum_sq_probs:
        out.append(sq.detach())  # a weight (WPO), not differentiated
    out = tuple(t.view(lead) for t in out)
    return out[0] if len(out) == 1 else out


def scored_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """The indices of the rows whose target is not ignore_index, or None to score them all.

    Compaction costs one host read of the count (a sync on a GPU: TRL's head does the
    same with `hidden[mask]`), so it is skipped where that is not allowed or not worth it:
    under torch.compile, CUDA-graph capture and fake tensors, and when every row is valid.
    """
    if (
        torch.compiler.is_compiling()
        or is_fake(targets)
        or targets.device.type == "meta"
        or (targets.is_cuda and torch.cuda.is_current_stream_capturing())
    ):
        return None
    rows = (targets != ignore_index).nonzero().squeeze(1)
    return None if rows.shape[0] == targets.shape[0] else rows


def scatter_rows(t: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    return t.new_zeros((n, *t.shape[1:])).index_copy(0, rows, t)


def sequence_logprobs(
    logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Sum (or mean) of per-token log-probs over the completion tokens of each sequence.

    Args:
        logps: `[B, T]` float per-token log-probs.
        mask: `[B, T]` bool or 0/1 tensor, 1 on tokens that count.
        average: divide by the number of counted tokens (rows with none give 0).

    Returns:
        `[B]` tensor of `logps.dtype`.
    """
    check_tensor("logps", logps)
    check_tensor("mask", mask, floating=False)
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(
            f"logps and mask must both be [B, T], got {tuple(logps.shape)} and {tuple(mask.shape)}"
        )
    check_zero_one(mask)
    m = mask.to(logps.dtype)
    total = (logps * m).sum(-1)
    return total / m.sum(-1).clamp(min=1) if average else total
