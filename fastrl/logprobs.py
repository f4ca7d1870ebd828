"""Per-token log-probs and entropies straight from hidden states and an lm_head weight."""

import math
import os

import torch

from fastrl.chunked_logprobs import chunked_logprobs_bwd, chunked_logprobs_fwd

IMPLS = ("auto", "triton", "torch")


def _triton_backend():
    from fastrl.kernels.linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd

    return linear_logprobs_fwd, linear_logprobs_bwd


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        temperature,
        softcap,
        ignore_index,
        return_entropy,
        return_is_top1,
        return_log_sum_sq,
        impl,
    ):
        # entropy is often wanted for logging only: skip its backward term when unused
        ctx.set_materialize_grads(False)
        fwd = _triton_backend()[0] if impl == "triton" else chunked_logprobs_fwd
        # metrics and weights without a gradient: is_top1, log sum_v p_v^2
        top1 = sq = None
        if return_is_top1:
            top1 = torch.empty(targets.shape, dtype=torch.bool, device=targets.device)
        if return_log_sum_sq:
            dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            sq = torch.empty(targets.shape, dtype=dt, device=targets.device)
        ctx.mark_non_differentiable(*(t for t in (top1, sq) if t is not None))
        logp, ent, lse = fwd(
            hidden, weight, bias, targets, temperature, softcap, ignore_index, return_entropy,
            top1=top1, log_sum_sq=sq,
        )  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.args = (temperature, softcap, ignore_index, impl)
        return logp, ent, top1, sq

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, _grad_top1, _grad_sq):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        temperature, softcap, ignore_index, impl = ctx.args
        if grad_logp is None and grad_ent is None:
            return (None,) * 11
        if impl == "triton":
            bwd = _triton_backend()[1]
            grad_logp, grad_ent = (
                g.float().contiguous() if g is not None else None for g in (grad_logp, grad_ent)
            )
        else:
            bwd = chunked_logprobs_bwd
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh, dw, db = bwd(
            hidden,
            weight,
            bias,
            targets,
            lse,
            ent,
            grad_logp,
            grad_ent,
            temperature,
            softcap,
            ignore_index,
            need_h,
            need_w,
            need_b and bias is not None,
        )
        return dh, dw, db, None, None, None, None, None, None, None, None


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and not _triton_usable(device):
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
        )
    return impl


def _check_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index):
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one"
        )
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
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {bias!r:.80}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias shape {tuple(bias.shape)} must be ({weight.shape[0]},), one per vocab row"
            )
    tensors = {"hidden": hidden, "weight": weight, "targets": targets}
    if bias is not None:
        tensors["bias"] = bias
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if softcap is not None and not (
        isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0
    ):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    vocab = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bad.any():
        value = targets[bad].flatten()[0].item()
        raise ValueError(
            f"targets holds id {value} outside [0, {vocab}) that is not ignore_index "
            f"({ignore_index}); {int(bad.sum())} such positions"
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_is_top1: bool = False,
    return_log_sum_sq_probs: bool = False,
    impl: str = "auto",
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

    Returns:
        `logps` float32 `[...]` (float64 for float64 inputs); with any `return_*` a tuple
        `(logps, entropy, is_top1, log_sum_sq_probs)` of the requested ones, in that order
        (`is_top1` bool `[...]`, the others as `logps`).
    """
    _check_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    impl = _resolve_impl(impl, hidden.device)
    lead = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    if softcap is not None:
        softcap = float(softcap)
    outputs = LinearLogprobsFunction.apply(
        h2, w, bias, t1, float(temperature), softcap, ignore_index, return_entropy,
        return_is_top1, return_log_sum_sq_probs, impl,
    )  # fmt: skip
    out = tuple(t.view(lead) for t in outputs if t is not None)
    return out[0] if len(out) == 1 else out


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
    if not isinstance(logps, torch.Tensor) or not logps.is_floating_point():
        raise TypeError(f"logps must be a floating-point tensor, got {logps!r:.80}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(
            f"logps and mask must both be [B, T], got {tuple(logps.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must be boolean or hold only 0 and 1")
    m = mask.to(logps.dtype)
    total = (logps * m).sum(-1)
    return total / m.sum(-1).clamp(min=1) if average else total
