"""Per-token log-probs and entropies straight from hidden states and an lm_head weight."""

import contextlib
import math
import os

import torch
from torch._subclasses.fake_tensor import is_fake

from fastrl.checks import check_values
from fastrl.chunked_logprobs import chunked_logprobs_bwd, chunked_logprobs_fwd

IMPLS = ("auto", "triton", "torch")


DESIGNS = ("tiles", "cublas", "frozen")


def _triton_backend(design: str):
    """The launchers (fwd, bwd) of a Triton design of linear_logprobs."""
    if design == "cublas":
        from fastrl.kernels.cublas_logprobs import cublas_logprobs_bwd, cublas_logprobs_fwd

        return cublas_logprobs_fwd, cublas_logprobs_bwd
    from fastrl.kernels.linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd

    return linear_logprobs_fwd, linear_logprobs_bwd


def resolve_design(design: str | None, device: torch.device) -> str:
    """The design of impl="triton": the argument, else FASTRL_LOGPROBS_DESIGN, else
    "cublas" on CUDA (cuBLAS GEMMs into a bounded fp32 buffer + Triton epilogues; by
    analysis ~1.1x the 3 GEMMs against ~1.2-1.5x for the Triton tiles, not yet measured:
    kernels/cublas_logprobs.py) and "tiles" under the interpreter (its test suite).
    "frozen" (opt-in) is two GEMMs instead of three for a frozen head without entropy
    (kernels/frozen_logprobs.py; it holds an [N, d] tensor from forward to backward),
    and "cublas" where that does not apply."""
    if design is None:
        design = os.environ.get("FASTRL_LOGPROBS_DESIGN")
    if design is None:
        design = "cublas" if device.type == "cuda" else "tiles"
    if design not in DESIGNS:
        raise ValueError(
            f"design (or FASTRL_LOGPROBS_DESIGN) must be one of {DESIGNS}, got {design!r}"
        )
    return design


# The backends as torch.library custom ops: torch.compile(fullgraph=True) and CUDA graphs
# go around them (fake implementations give the output shapes), and their bodies run
# eagerly on real tensors, where the value checks live. Outputs that were not asked for
# are empty tensors (a custom op returns no None).
_LIB = "fastrl"


def _stat_dtype(hidden: torch.Tensor, impl: str) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 and impl == "torch" else torch.float32


@torch.library.custom_op(f"{_LIB}::linear_logprobs_fwd", mutates_args=())
def _fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    return_entropy: bool,
    return_is_top1: bool,
    return_log_sum_sq: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """impl: the backend, "torch", "tiles" or "cublas".
    -> logp [N], entropy [N] | [0], lse [N], is_top1 [N] bool | [0], log_sum_sq [N] | [0]"""
    check_target_ids(targets, weight.shape[0], ignore_index)
    dt = _stat_dtype(hidden, impl)
    top1 = torch.empty(
        targets.shape if return_is_top1 else 0, dtype=torch.bool, device=targets.device
    )
    sq = torch.empty(targets.shape if return_log_sum_sq else 0, dtype=dt, device=targets.device)
    fwd = chunked_logprobs_fwd if impl == "torch" else _triton_backend(impl)[0]
    with _on_device(hidden.device):
        logp, ent, lse = fwd(
            hidden, weight, bias, targets, temperature, softcap, ignore_index, return_entropy,
            top1=top1 if return_is_top1 else None, log_sum_sq=sq if return_log_sum_sq else None,
        )  # fmt: skip
    if ent is None:
        ent = logp.new_empty(0)
    return logp, ent, lse, top1, sq


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, temperature, softcap, ignore_index, return_entropy,
      return_is_top1, return_log_sum_sq, impl):  # fmt: skip
    n, dt = targets.shape[0], _stat_dtype(hidden, impl)
    vec = lambda want, dtype=dt: hidden.new_empty(n if want else 0, dtype=dtype)
    return (
        vec(True),
        vec(return_entropy),
        vec(True),
        vec(return_is_top1, torch.bool),
        vec(return_log_sum_sq),
    )


@torch.library.custom_op(f"{_LIB}::linear_logprobs_bwd", mutates_args=())
def _bwd_op(
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
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> d_hidden, d_weight, d_bias in their inputs' dtypes ([0] where not needed)"""
    if impl != "torch":
        bwd = _triton_backend(impl)[1]
        grad_logp, grad_entropy = (
            g.float().contiguous() if g is not None else None for g in (grad_logp, grad_entropy)
        )
    else:
        bwd = chunked_logprobs_bwd
    with _on_device(hidden.device):
        grads = bwd(
            hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, temperature,
            softcap, ignore_index, need_hidden, need_weight, need_bias,
        )  # fmt: skip
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, temperature,
      softcap, ignore_index, need_hidden, need_weight, need_bias, impl):  # fmt: skip
    like = lambda t, want: torch.empty_like(t) if want else hidden.new_empty(0)
    return like(hidden, need_hidden), like(weight, need_weight), like(bias, need_bias)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # entropy often feeds logging only: skip its term
    hidden, weight, bias, targets, temperature, softcap, ignore_index, *_, impl = inputs
    _, ent, lse, _, _ = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
    ctx.args = (temperature, softcap, ignore_index, impl)


def _backward(ctx, grad_logp, grad_ent, _grad_lse, _grad_top1, _grad_sq):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    temperature, softcap, ignore_index, impl = ctx.args
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_logp is None and grad_ent is None or not (need_h or need_w or need_b):
        return (None,) * 11
    dh, dw, db = _bwd_op(
        hidden, weight, bias, targets, lse, ent if ent.numel() else None, grad_logp,
        grad_ent if ent.numel() else None, temperature, softcap, ignore_index, need_h,
        need_w, need_b and bias is not None, impl,
    )  # fmt: skip
    pick = lambda g, need: g if need else None
    return (pick(dh, need_h), pick(dw, need_w), pick(db, need_b and bias is not None)) + (None,) * 8


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# The frozen-head two-GEMM design (kernels/frozen_logprobs.py): its forward returns what
# its backward needs in place of the logsumexp, and the backward is a gather + combine.
@torch.library.custom_op(f"{_LIB}::linear_logprobs_frozen_fwd", mutates_args=())
def _frozen_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    return_is_top1: bool,
    return_log_sum_sq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> logp [N], lse [N], is_top1 [N] | [0], log_sum_sq [N] | [0], o [N, d], ct [N]"""
    from fastrl.kernels.frozen_logprobs import frozen_logprobs_fwd

    check_target_ids(targets, weight.shape[0], ignore_index)
    n = targets.shape[0]
    top1 = torch.empty(n if return_is_top1 else 0, dtype=torch.bool, device=targets.device)
    sq = torch.empty(n if return_log_sum_sq else 0, dtype=torch.float32, device=targets.device)
    with _on_device(hidden.device):
        logp, lse, o, ct = frozen_logprobs_fwd(
            hidden, weight, bias, targets, temperature, softcap, ignore_index,
            top1=top1 if return_is_top1 else None, log_sum_sq=sq if return_log_sum_sq else None,
        )  # fmt: skip
    return logp, lse, top1, sq, o, ct


@_frozen_fwd_op.register_fake
def _(hidden, weight, bias, targets, temperature, softcap, ignore_index, return_is_top1,
      return_log_sum_sq):  # fmt: skip
    n = targets.shape[0]
    vec = lambda want, dtype=torch.float32: hidden.new_empty(n if want else 0, dtype=dtype)
    return (vec(True), vec(True), vec(return_is_top1, torch.bool), vec(return_log_sum_sq),
            torch.empty_like(hidden), vec(True))  # fmt: skip


@torch.library.custom_op(f"{_LIB}::linear_logprobs_frozen_bwd", mutates_args=())
def _frozen_bwd_op(
    weight: torch.Tensor,
    targets: torch.Tensor,
    o: torch.Tensor,
    ct: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    from fastrl.kernels.frozen_logprobs import frozen_logprobs_bwd

    with _on_device(o.device):
        return frozen_logprobs_bwd(weight, targets, o, ct, grad_logp, temperature, ignore_index)


@_frozen_bwd_op.register_fake
def _(weight, targets, o, ct, grad_logp, temperature, ignore_index):
    return torch.empty_like(o)


def _frozen_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    _, weight, _, targets, temperature, _, ignore_index, *_ = inputs
    *_, o, ct = output
    ctx.save_for_backward(weight, targets, o, ct)
    ctx.args = (temperature, ignore_index)


def _frozen_backward(ctx, grad_logp, *_unused):
    if grad_logp is None:
        return (None,) * 9
    weight, targets, o, ct = ctx.saved_tensors
    dh = _frozen_bwd_op(weight, targets, o, ct, grad_logp, *ctx.args)
    return (dh,) + (None,) * 8


_frozen_fwd_op.register_autograd(_frozen_backward, setup_context=_frozen_setup_context)


def _frozen_two_gemm_ok(hidden, weight, bias, return_entropy) -> bool:
    """The two-GEMM design applies to a frozen head with a hidden-state gradient to form
    and no entropy (whose gradient it does not carry); elsewhere "cublas" is as fast."""
    return (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and not return_entropy
    )


def _score(hidden, weight, bias, targets, *args):
    """(logp, entropy, lse, is_top1, log_sum_sq) of the rows, from the backend args[-1]."""
    temperature, softcap, ignore_index, return_entropy, top1, sq, backend = args
    if backend == "frozen":
        if _frozen_two_gemm_ok(hidden, weight, bias, return_entropy):
            logp, lse, top1, sq, _, _ = _frozen_fwd_op(
                hidden, weight, bias, targets, temperature, softcap, ignore_index, top1, sq
            )
            return logp, logp.new_empty(0), lse, top1, sq
        args = (*args[:-1], "cublas")
    return _fwd_op(hidden, weight, bias, targets, *args)


def _on_device(device: torch.device):
    # Triton launches on the current device; device_map="auto" puts the lm_head on the last
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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


def check_target_ids(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is in [0, vocab) or ignore_index (the kernels never read by target id:
    an out-of-range id would only give a wrong log-prob, never an out-of-bounds read)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))

    def detail() -> str:
        value = targets[bad].flatten()[0].item()
        return (
            f"targets holds id {value} outside [0, {vocab}) that is not ignore_index "
            f"({ignore_index}); {int(bad.sum())} such positions"
        )

    summary = f"targets holds ids outside [0, {vocab}) that are not ignore_index ({ignore_index})"
    check_values(bad, summary, detail)


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
    compact: bool = True,
    design: str | None = None,
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

    Returns:
        `logps` float32 `[...]` (float64 for float64 inputs); with any `return_*` a tuple
        `(logps, entropy, is_top1, log_sum_sq_probs)` of the requested ones, in that order
        (`is_top1` bool `[...]`, the others as `logps`).
    """
    _check_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    if not isinstance(compact, bool):
        raise TypeError(f"compact must be a bool, got {compact!r}")
    impl = _resolve_impl(impl, hidden.device)
    backend = "torch" if impl == "torch" else resolve_design(design, hidden.device)
    lead = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    if softcap is not None:
        softcap = float(softcap)
    args = (float(temperature), softcap, ignore_index, return_entropy, return_is_top1,
            return_log_sum_sq_probs, backend)  # fmt: skip
    rows = scored_rows(t1, ignore_index) if compact else None
    if rows is None:
        outputs = _score(h2, w, bias, t1, *args)
    else:  # score the valid rows only; the others are 0 (False) with no gradient
        outputs = _score(h2.index_select(0, rows), w, bias, t1[rows], *args)
        wanted = (True, return_entropy, True, return_is_top1, return_log_sum_sq_probs)
        outputs = [_scatter_rows(t, rows, t1.shape[0]) if want else t
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


def _scatter_rows(t: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
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
