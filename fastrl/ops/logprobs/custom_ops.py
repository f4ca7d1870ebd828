"""The backends of `linear_logprobs` as torch.library custom ops, with their autograd.

torch.compile(fullgraph=True) and CUDA graphs go around them (fake implementations give
the output shapes), and their bodies run eagerly on real tensors, where the value checks
live. Outputs that were not asked for are empty tensors (a custom op returns no None).
"""

import contextlib

import torch

from fastrl.checks import check_target_ids
from fastrl.ops.logprobs.chunked import chunked_logprobs_bwd, chunked_logprobs_fwd


def _triton_backend(design: str):
    """The launchers (fwd, bwd) of a Triton design of linear_logprobs."""
    if design == "cublas":
        from fastrl.kernels.cublas_logprobs import cublas_logprobs_bwd, cublas_logprobs_fwd

        return cublas_logprobs_fwd, cublas_logprobs_bwd
    from fastrl.kernels.linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd

    return linear_logprobs_fwd, linear_logprobs_bwd


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
    with on_device(hidden.device):
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
    bwd = chunked_logprobs_bwd if impl == "torch" else _triton_backend(impl)[1]
    with on_device(hidden.device):
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
    with on_device(hidden.device):
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

    with on_device(o.device):
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


def score(hidden, weight, bias, targets, *args):
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


def on_device(device: torch.device):
    # Triton launches on the current device; device_map="auto" puts the lm_head on the last
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
