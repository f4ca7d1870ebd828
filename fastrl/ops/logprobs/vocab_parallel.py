"""`linear_logprobs` with the lm_head split by vocabulary across a tensor-parallel group.

The layout of Megatron's vocab-parallel output layer, which verl's Megatron actor passes
on: rank r of the group holds rows [r * V_local, (r + 1) * V_local) of the `[V, d]`
weight (and bias); hidden states and target ids are replicated (the same on every rank),
target ids are global, in [0, world * V_local). Shards must be equal (Megatron pads the
vocabulary to a multiple of the group size), which fixes each rank's offset without a
collective; a mismatch is caught by the one forward collective and raises ValueError.

Forward. Each rank runs the usual design (chunked PyTorch, Triton tiles or cuBLAS) over
its shard (`shard_statistics`: the shard's lse, entropy, largest logit, target logit and
log sum p^2 per row) and ONE all-gather of those per-row statistics ([world, k N + 1]
floats, k <= 5: negligible next to the GEMMs) lets every rank merge them the same way,
so every rank gets the same outputs, bit for bit, as the merge runs on the same data in
the same order. With w_r = exp(lse_r - lse) the weight of shard r:

    lse       = logsumexp_r lse_r
    logp      = z_t - lse                           (z_t from the shard holding the target)
    entropy   = sum_r w_r (H_r - log w_r)           (the entropy of a mixture of the shards)
    is_top1   = z_t >= max_r max_v z_v
    log sum p^2 = logsumexp_r (2 log w_r + log sum p_r^2)

An all-gather rather than an all-reduce: summing exp(lse_r) needs a common reference
first (a max all-reduce, then a sum all-reduce: two collectives), while the gathered
statistics merge locally in one, exactly as the single-rank kernels merge their splits.

Backward. Local: each rank recomputes its shard's logits and forms dz with the GLOBAL
lse and entropy, which is exactly the global dz restricted to its columns, so its
d_weight and d_bias are the shard's rows of the single-rank gradients. d_hidden is a sum
over shards; hidden is replicated, so the backward all-reduces (sums) it over the group,
as the backward of Megatron's `copy_to_tensor_model_parallel_region` does in front of a
column-parallel lm_head. Hidden states whose own backward sums over the group (the output
of such a copy region, or of a sequence-parallel all-gather, whose backward
reduce-scatters) take `reduce_hidden_grad=False`: each rank then keeps its shard's part,
verl's convention for `linear_cross_entropy(..., dist_process_group=...)`.

Every rank of the group must call the forward and the backward together (the same
shapes, the same options), as with any collective.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fastrl.checks import check_target_ids, check_values
from fastrl.ops.logprobs.custom_ops import shard_gradients, shard_statistics
from fastrl.ops.logprobs.params import LogprobsParams

# The shard-local target ids: ignored positions and other shards' tokens as negative ids,
# which match no column of any design (the kernels only compare ids with column numbers).
_LOCAL_IGNORE = -1
_OTHER_SHARD = -2


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of a vocab-parallel lm_head."""

    group: object  # torch.distributed.ProcessGroup
    rank: int
    world: int
    size: int  # V_local, the rows of this rank's weight
    reduce_hidden_grad: bool = True  # False: the caller's graph sums d_hidden itself

    @property
    def offset(self) -> int:
        return self.rank * self.size

    @property
    def vocab(self) -> int:
        return self.world * self.size


def vocab_shard(
    process_group, weight: Tensor, *, reduce_hidden_grad: bool = True
) -> VocabShard | None:
    """The `VocabShard` of `weight` in `process_group` (None for None); TypeError for a
    process_group that is not a torch.distributed.ProcessGroup."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup (the tensor-parallel "
            f"group the weight is split over) or None, got {type(process_group).__name__}"
        )
    return VocabShard(
        process_group, process_group.rank(), process_group.size(), weight.shape[0],
        reduce_hidden_grad,
    )  # fmt: skip


def local_targets(targets: Tensor, shard: VocabShard, ignore_index: int) -> Tensor:
    """Global ids [N] int64 -> this shard's ids: t - offset inside the shard, _OTHER_SHARD
    for another shard's token, _LOCAL_IGNORE where the target is ignore_index."""
    local = targets - shard.offset
    inside = (local >= 0) & (local < shard.size)
    local = torch.where(inside, local, _OTHER_SHARD)
    return torch.where(targets == ignore_index, _LOCAL_IGNORE, local)


def _all_gather(x: Tensor, group) -> Tensor:
    """[n] -> [world, n], row r from rank r."""
    import torch.distributed as dist

    out = x.new_empty((group.size(), x.shape[0]))
    # the list form: every backend takes it (torch 2.13's gloo refuses a [world, n] output
    # for all_gather_into_tensor), and the views write straight into `out`
    dist.all_gather(list(out.unbind(0)), x, group=group)
    return out


def _merge(gathered: Tensor, k: int, valid: Tensor, p: LogprobsParams):
    """Every shard's `k` rows (lse, row_max, target_logit[, entropy][, log_sum_sq]) of
    [N] statistics, gathered as [world, k N + 1] -> the global (logp, entropy | [0], lse,
    is_top1 | [0], log_sum_sq | [0])."""
    n = valid.shape[0]
    stats = gathered[:, : k * n].view(gathered.shape[0], k, n)
    lse_r, max_r, zt_r = stats[:, 0], stats[:, 1], stats[:, 2]
    lse = torch.logsumexp(lse_r, 0)
    log_w = lse_r - lse  # each shard's share of the probability mass, in log
    zt = zt_r.sum(0)  # one shard holds the target, the others add exact zeros
    logp = torch.where(valid, zt - lse, 0.0)
    k, empty = 3, logp.new_empty(0)
    ent = sq = empty
    if p.return_entropy:  # the entropy of a mixture: sum_r w_r (H_r - log w_r)
        ent = torch.where(valid, (log_w.exp() * (stats[:, k] - log_w)).sum(0), 0.0)
        k += 1
    if p.return_log_sum_sq:  # sum_v p_v^2 = sum_r w_r^2 sum_{v in r} p_{r,v}^2
        sq = torch.where(valid, torch.logsumexp(2 * log_w + stats[:, k], 0), 0.0)
    top1 = valid & (zt >= max_r.amax(0)) if p.return_is_top1 else valid.new_empty(0)
    return logp, ent, lse, top1, sq


def _check_equal_shards(gathered: Tensor, shard: VocabShard) -> None:
    sizes = gathered[:, -1]
    message = "every rank of process_group must hold an equal vocab shard of weight"
    check_values(
        sizes != shard.size,
        message,
        lambda: (
            f"{message}: got shard sizes {[int(s) for s in sizes.tolist()]} (weight rows "
            "per rank); pad the vocabulary to a multiple of the group size, as Megatron does"
        ),
    )


class _VocabParallelLogprobs(torch.autograd.Function):
    """(hidden [N, d], weight shard, bias shard | None, global targets [N]) -> the global
    (logp, entropy, lse, is_top1, log_sum_sq) as `custom_ops.score` returns them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, global_targets, params: LogprobsParams, shard):
        targets = local_targets(global_targets, shard, params.ignore_index)
        local_p = replace(params, ignore_index=_LOCAL_IGNORE)
        lse_r, ent_r, max_r, zt_r, sq_r = shard_statistics(hidden, weight, bias, targets, local_p)
        rows = [lse_r, max_r, zt_r]
        rows += [ent_r] if params.return_entropy else []
        rows += [sq_r] if params.return_log_sum_sq else []
        size = lse_r.new_full((1,), shard.size)  # exact in fp32 up to 2^24 rows
        gathered = _all_gather(torch.cat([*rows, size]), shard.group)
        # after the collective, so that every rank raises or none does (a rank that raised
        # before it would leave the others waiting in it)
        _check_equal_shards(gathered, shard)
        check_target_ids(global_targets, shard.vocab, params.ignore_index)
        valid = targets != _LOCAL_IGNORE
        logp, ent, lse, top1, sq = _merge(gathered, len(rows), valid, params)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.params, ctx.shard = local_p, shard
        ctx.mark_non_differentiable(lse, top1, sq)
        return logp, ent, lse, top1, sq

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, _grad_lse, _grad_top1, _grad_sq):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        p = ctx.params
        need = tuple(ctx.needs_input_grad[:3])
        if grad_logp is None and grad_ent is None or not any(need):
            return None, None, None, None, None, None
        if not p.return_entropy:
            ent = grad_ent = None
        dh, dw, db = shard_gradients(
            hidden, weight, bias, targets, lse, ent, grad_logp, grad_ent, p, need
        )
        if need[0] and ctx.shard.reduce_hidden_grad:
            import torch.distributed as dist

            # hidden is replicated: its gradient is the sum of every shard's part
            dist.all_reduce(dh, group=ctx.shard.group)
        grads = (g if want else None for g, want in zip((dh, dw, db), need, strict=True))
        return *grads, None, None, None


def vocab_parallel_score(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
    params: LogprobsParams, shard: VocabShard,
) -> tuple[Tensor, ...]:  # fmt: skip
    """`custom_ops.score` over a vocab-parallel head: (logp, entropy, lse, is_top1,
    log_sum_sq) of the rows of `hidden` [N, d] with global `targets` [N] int64, the same
    on every rank ([0] where not asked for)."""
    return _VocabParallelLogprobs.apply(hidden, weight, bias, targets, params, shard)
