"""The backends of `linear_logprobs` as torch.library custom ops, with their autograd.

torch.compile(fullgraph=True) and CUDA graphs go around them (fake implementations give
the output shapes), and their bodies run eagerly on real tensors, where the value checks
live. Outputs that were not asked for are empty tensors (a custom op returns no None).
Every op takes its tensors by position and a `LogprobsParams` as keyword-only arguments
(`**params.op_kwargs()`), so each backward returns one gradient per tensor input.
"""

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from fastrl.checks import check_target_ids, compute_dtype
from fastrl.ops.logprobs.chunked import chunked_logprobs_bwd, chunked_logprobs_fwd
from fastrl.ops.logprobs.params import SCHEMA, LogprobsParams

_HEAD = "Tensor hidden, Tensor weight, Tensor? bias, Tensor targets"


def _custom_op(name: str, tensors: str, returns: str, keywords: str = "") -> Callable:
    """torch.library.custom_op "fastrl::`name`" with the schema
    (`tensors`, *, <the LogprobsParams fields>, `keywords`) -> `returns`."""
    schema = f"({tensors}, *, {', '.join(filter(None, (SCHEMA, keywords)))}) -> {returns}"
    return torch.library.custom_op(f"fastrl::{name}", mutates_args=(), schema=schema)


def _triton_backend(design: str):
    """The launchers (fwd, bwd) of a Triton design of linear_logprobs."""
    if design == "cublas":
        from fastrl.kernels.cublas_logprobs import cublas_logprobs_bwd, cublas_logprobs_fwd

        return cublas_logprobs_fwd, cublas_logprobs_bwd
    from fastrl.kernels.linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd

    return linear_logprobs_fwd, linear_logprobs_bwd


def _stat_dtype(hidden: torch.Tensor, p: LogprobsParams) -> torch.dtype:
    # the Triton designs keep their statistics in fp32 whatever the input
    return compute_dtype(hidden) if p.backend == "torch" else torch.float32


def _vectors(like: torch.Tensor, n: int, p: LogprobsParams, *wanted: bool) -> list:
    # [n] vectors (else [0]) of the statistics dtype on like's device
    kw = dict(dtype=_stat_dtype(like, p), device=like.device)
    return [torch.empty(n if want else 0, **kw) for want in wanted]


def _flags(targets: torch.Tensor, want: bool) -> torch.Tensor:
    # is_top1: [N] bool, else [0]
    return torch.empty(targets.shape[0] if want else 0, dtype=torch.bool, device=targets.device)


@_custom_op("linear_logprobs_fwd", _HEAD, "(Tensor, Tensor, Tensor, Tensor, Tensor)")
def _fwd_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, **params
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> logp [N], entropy [N] | [0], lse [N], is_top1 [N] bool | [0], log_sum_sq [N] | [0]"""
    p = LogprobsParams(**params)
    check_target_ids(targets, weight.shape[0], p.ignore_index)
    top1 = _flags(targets, p.return_is_top1)
    (sq,) = _vectors(hidden, targets.shape[0], p, p.return_log_sum_sq)
    fwd = chunked_logprobs_fwd if p.backend == "torch" else _triton_backend(p.backend)[0]
    with on_device(hidden.device):
        logp, ent, lse = fwd(
            hidden, weight, bias, targets, p.temperature, p.softcap, p.ignore_index,
            p.return_entropy, top1=top1 if p.return_is_top1 else None,
            log_sum_sq=sq if p.return_log_sum_sq else None,
        )  # fmt: skip
    return logp, logp.new_empty(0) if ent is None else ent, lse, top1, sq


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, **params):
    p = LogprobsParams(**params)
    vecs = (True, p.return_entropy, True, p.return_log_sum_sq)
    logp, ent, lse, sq = _vectors(hidden, targets.shape[0], p, *vecs)
    return logp, ent, lse, _flags(targets, p.return_is_top1), sq


@_custom_op(
    "linear_logprobs_bwd",
    f"{_HEAD}, Tensor lse, Tensor? entropy, Tensor? grad_logp, Tensor? grad_entropy",
    "(Tensor, Tensor, Tensor)",
    "bool need_hidden, bool need_weight, bool need_bias",
)
def _bwd_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
    entropy: Tensor | None, grad_logp: Tensor | None, grad_entropy: Tensor | None, *,
    need_hidden: bool, need_weight: bool, need_bias: bool, **params,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """-> d_hidden, d_weight, d_bias in their inputs' dtypes ([0] where not needed)"""
    p = LogprobsParams(**params)
    bwd = chunked_logprobs_bwd if p.backend == "torch" else _triton_backend(p.backend)[1]
    with on_device(hidden.device):
        grads = bwd(
            hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, p.temperature,
            p.softcap, p.ignore_index, need_hidden, need_weight, need_bias,
        )  # fmt: skip
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, *, need_hidden,
      need_weight, need_bias, **params):  # fmt: skip
    like = lambda t, want: torch.empty_like(t) if want else hidden.new_empty(0)
    return like(hidden, need_hidden), like(weight, need_weight), like(bias, need_bias)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.set_materialize_grads(False)  # entropy often feeds logging only: skip its term
    _, ent, lse, _, _ = output
    ctx.save_for_backward(*inputs, lse, ent)
    ctx.params = LogprobsParams(**keyword_only_inputs)


def _backward(ctx, grad_logp, grad_ent, _grad_lse, _grad_top1, _grad_sq):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    p = ctx.params
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_logp is None and grad_ent is None or not (need_h or need_w or need_b):
        return None, None, None, None
    if not p.return_entropy:
        ent = grad_ent = None
    dh, dw, db = _bwd_op(
        hidden, weight, bias, targets, lse, ent, grad_logp, grad_ent, **p.op_kwargs(),
        need_hidden=need_h, need_weight=need_w, need_bias=need_b,
    )  # fmt: skip
    return dh if need_h else None, dw if need_w else None, db if need_b else None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# One vocabulary shard's statistics (fastrl/ops/logprobs/vocab_parallel.py merges them
# across a tensor-parallel group and defines the backward with `_bwd_op`): the designs'
# forwards with the row max and target logit stored too. Its targets are shard-local ids;
# an id that is no column of this shard (another shard's token) matches no column, which
# is what it must do, so there is no range check here: the caller checks the global ids.
@_custom_op("linear_logprobs_shard_fwd", _HEAD, "(Tensor, Tensor, Tensor, Tensor, Tensor)")
def _shard_fwd_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, **params
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> lse [N], entropy [N] | [0], row_max [N], target_logit [N] (0 where the target is
    not in the shard), log_sum_sq [N] | [0]; all over this shard's columns only"""
    p = LogprobsParams(**params)
    n = targets.shape[0]
    row_max, target_logit, sq = _vectors(hidden, n, p, True, True, p.return_log_sum_sq)
    fwd = chunked_logprobs_fwd if p.backend == "torch" else _triton_backend(p.backend)[0]
    with on_device(hidden.device):
        _, ent, lse = fwd(
            hidden, weight, bias, targets, p.temperature, p.softcap, p.ignore_index,
            p.return_entropy, log_sum_sq=sq if p.return_log_sum_sq else None,
            row_max=row_max, target_logit=target_logit,
        )  # fmt: skip
    return lse, lse.new_empty(0) if ent is None else ent, row_max, target_logit, sq


@_shard_fwd_op.register_fake
def _(hidden, weight, bias, targets, **params):
    p = LogprobsParams(**params)
    vecs = (True, p.return_entropy, True, True, p.return_log_sum_sq)
    return tuple(_vectors(hidden, targets.shape[0], p, *vecs))


def shard_statistics(hidden, weight, bias, targets, params: LogprobsParams) -> tuple[Tensor, ...]:
    """(lse, entropy, row_max, target_logit, log_sum_sq) of the rows of `hidden` [N, d]
    over the vocab shard `weight` [V_local, d], `targets` [N] int64 shard-local ids (ids
    outside [0, V_local) other than ignore_index are other shards' tokens); no autograd."""
    return _shard_fwd_op(hidden, weight, bias, targets, **params.op_kwargs())


def shard_gradients(
    hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
    params: LogprobsParams, need: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The backward of one vocab shard with the GLOBAL `lse` [N] and `entropy` [N] (or
    None): (d_hidden [N, d], this shard's part of it; d_weight; d_bias), [0] where `need`
    (hidden, weight, bias) is False."""
    need_h, need_w, need_b = need
    return _bwd_op(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
        **params.op_kwargs(), need_hidden=need_h, need_weight=need_w, need_bias=need_b,
    )  # fmt: skip


# The frozen-head two-GEMM design (kernels/frozen_logprobs.py): its forward returns what
# its backward needs in place of the logsumexp, and the backward is a gather + combine.
@_custom_op("linear_logprobs_frozen_fwd", _HEAD, "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _frozen_fwd_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, **params
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> logp [N], lse [N], is_top1 [N] | [0], log_sum_sq [N] | [0], o [N, d], ct [N]"""
    from fastrl.kernels.frozen_logprobs import frozen_logprobs_fwd

    p = LogprobsParams(**params)
    check_target_ids(targets, weight.shape[0], p.ignore_index)
    top1 = _flags(targets, p.return_is_top1)
    (sq,) = _vectors(hidden, targets.shape[0], p, p.return_log_sum_sq)
    with on_device(hidden.device):
        logp, lse, o, ct = frozen_logprobs_fwd(
            hidden, weight, bias, targets, p.temperature, p.softcap, p.ignore_index,
            top1=top1 if p.return_is_top1 else None,
            log_sum_sq=sq if p.return_log_sum_sq else None,
        )  # fmt: skip
    return logp, lse, top1, sq, o, ct


@_frozen_fwd_op.register_fake
def _(hidden, weight, bias, targets, **params):
    p = LogprobsParams(**params)
    logp, lse, sq, ct = _vectors(hidden, targets.shape[0], p, True, True, p.return_log_sum_sq, True)
    return logp, lse, _flags(targets, p.return_is_top1), sq, torch.empty_like(hidden), ct


@_custom_op(
    "linear_logprobs_frozen_bwd",
    "Tensor weight, Tensor targets, Tensor o, Tensor ct, Tensor grad_logp",
    "Tensor",
)
def _frozen_bwd_op(
    weight: Tensor, targets: Tensor, o: Tensor, ct: Tensor, grad_logp: Tensor, **params
) -> Tensor:
    """-> d_hidden [N, d] in o's dtype"""
    from fastrl.kernels.frozen_logprobs import frozen_logprobs_bwd

    p = LogprobsParams(**params)
    with on_device(o.device):
        return frozen_logprobs_bwd(weight, targets, o, ct, grad_logp, p.temperature, p.ignore_index)


@_frozen_bwd_op.register_fake
def _(weight, targets, o, ct, grad_logp, **params):
    return torch.empty_like(o)


def _frozen_setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.set_materialize_grads(False)
    _, weight, _, targets = inputs
    *_, o, ct = output
    ctx.save_for_backward(weight, targets, o, ct)
    ctx.params = LogprobsParams(**keyword_only_inputs)


def _frozen_backward(ctx, grad_logp, *_unused):
    if grad_logp is None:
        return None, None, None, None
    weight, targets, o, ct = ctx.saved_tensors
    dh = _frozen_bwd_op(weight, targets, o, ct, grad_logp, **ctx.params.op_kwargs())
    return dh, None, None, None


_frozen_fwd_op.register_autograd(_frozen_backward, setup_context=_frozen_setup_context)


def frozen_applies(hidden, weight, bias, return_entropy: bool) -> bool:
    """The two-GEMM design applies to a frozen head with a hidden-state gradient to form
    and no entropy (whose gradient it does not carry); elsewhere "cublas" is as fast."""
    return (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and not return_entropy
    )


def score(hidden, weight, bias, targets, params: LogprobsParams) -> tuple[torch.Tensor, ...]:
    """(logp, entropy, lse, is_top1, log_sum_sq) of the rows of `hidden` [N, d] with
    `targets` [N] int64, from the backend `params.backend` ([0] where not asked for)."""
    if params.backend == "frozen":
        logp, lse, top1, sq, _, _ = _frozen_fwd_op(
            hidden, weight, bias, targets, **params.op_kwargs()
        )
        return logp, logp.new_empty(0), lse, top1, sq
    return _fwd_op(hidden, weight, bias, targets, **params.op_kwargs())


def on_device(device: torch.device):
    # Triton launches on the current device; device_map="auto" puts the lm_head on the last
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
