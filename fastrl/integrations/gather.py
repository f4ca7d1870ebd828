"""The full lm_head weight for one head call, when FSDP2 or DeepSpeed ZeRO-3 hold shards.

fastrl's fused heads read `lm_head.weight` directly and never call the `lm_head` module,
so the engines' module hooks, which gather a module's parameters around its forward, do
not fire for it: under FSDP2 the weight can be a sharded `DTensor`, under ZeRO-3 an empty
partition (`numel() == 0`, `ds_status` NOT_AVAILABLE). `gathered_weight` gives the full
`[V, d]` tensor for the duration of a call and, through saved-tensor hooks, keeps only a
handle to it for the backward: a head that recomputes its logits in the backward
(`linear_logprobs`) gathers the weight again there, so no full weight lives between the
forward and the backward (TRL re-gathers the same way in `maybe_gather_lm_head_ctx`).

A weight that is already whole (one process, DDP, ZeRO-1/2, an FSDP2 group left
unsharded after its forward) is used as it is, and no hook is installed, unless `dtype=`
asks for another dtype: then the cast `[V, d]` copy is used for the call and, as a gathered
one, kept in the graph only as a handle that casts it again in the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["gathered_weight", "is_sharded"]


def _is_dtensor(weight: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(weight, DTensor)


def _is_zero3(weight: torch.Tensor) -> bool:
    # DeepSpeed ZeRO-3 tags every parameter it partitions with a ds_id and a ds_status
    return hasattr(weight, "ds_id") and hasattr(weight, "ds_status")


def is_sharded(weight: torch.Tensor) -> bool:
    """Whether `weight` is an FSDP2 `DTensor` or a ZeRO-3 partitioned parameter (gathered
    or not)."""
    return _is_dtensor(weight) or _is_zero3(weight)


@contextlib.contextmanager
def _zero3_gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """ZeRO-3 parameters' full data within the block (those another owner, e.g. the tied
    embedding's module hook, has gathered already are left as they are)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = {id(p): p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE}
    if not todo:
        yield
        return
    import deepspeed

    # modifier_rank=None: read-only, nothing is broadcast back on exit
    with deepspeed.zero.GatheredParameters(list(todo.values()), modifier_rank=None):
        yield


def _again(param: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
    """A function that gathers `param` (and casts it to `dtype`) again, without autograd:
    the backward's copy."""

    def again() -> torch.Tensor:
        with torch.no_grad():
            if _is_dtensor(param):
                full = param.full_tensor()
            elif _is_zero3(param):
                with _zero3_gathered([param]):
                    # a reference to the gathered storage: re-partitioning swaps the
                    # parameter's .data for an empty tensor, it does not free this one
                    full = param.data
            else:
                full = param.detach()
            return full if dtype is None else full.to(dtype)

    return again


class _Regather:
    """What the autograd graph saves in place of a gathered tensor."""

    __slots__ = ("again",)

    def __init__(self, again: Callable[[], torch.Tensor]):
        self.again = again


def _check(name: str, t: torch.Tensor | None, optional: bool) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


@contextlib.contextmanager
def gathered_weight(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The full lm_head `weight` `[V, d]` and `bias` `[V]` (or None), cast to `dtype` when
    given, for the head calls inside the block: `with gathered_weight(w, b) as (w, b):`.

    - FSDP2 `DTensor`: `full_tensor()` (an all-gather; differentiable, so a trainable
      head's gradient is reduce-scattered back to the shards);
    - DeepSpeed ZeRO-3 parameter: gathered with `deepspeed.zero.GatheredParameters` for
      the block (unless already available) and partitioned again after it;
    - any other tensor: itself (or its `dtype` copy).

    Every tensor an op inside the block saves for its backward that shares a gathered
    (or cast) tensor's storage is replaced, in the graph, by a handle that gathers it
    again when the backward needs it, so those copies are freed at the end of the block.
    Outside the block, use the results only in ops that do not save them.

    Every process of the sharding group must enter the block (and run the backward) the
    same number of times: the gathers are collectives.
    """
    _check("weight", weight, optional=False)
    _check("bias", bias, optional=True)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    params = [t for t in (weight, bias) if t is not None]
    if not any(is_sharded(t) or (dtype is not None and t.dtype != dtype) for t in params):
        yield weight, bias
        return
    with contextlib.ExitStack() as stack:
        zero3 = [t for t in params if _is_zero3(t)]
        if zero3:
            stack.enter_context(_zero3_gathered(zero3))
        # storage address -> (shape, stride, handle); never the tensor itself: the graph's
        # saved variables keep the pack hook (and what it refers to) alive
        handles: dict[int, tuple[torch.Size, tuple[int, ...], _Regather]] = {}
        out = []
        for t in (weight, bias):
            if t is None:
                out.append(None)
                continue
            full = t.full_tensor() if _is_dtensor(t) else t
            if dtype is not None and full.dtype != dtype:
                full = full.to(dtype)
            if full is not t or is_sharded(t):
                key = full.untyped_storage().data_ptr()
                handles[key] = (full.shape, full.stride(), _Regather(_again(t, dtype)))
            out.append(full)
        if out[0].dim() != 2 or out[0].numel() == 0:
            raise ValueError(
                f"the gathered lm_head weight has shape {tuple(out[0].shape)}, expected [V, d]"
            )

        def pack(t: torch.Tensor):
            try:
                found = handles.get(t.untyped_storage().data_ptr()) if t.numel() else None
            except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
                found = None
            if found is None:
                return t
            shape, stride, handle = found
            if t.shape != shape or t.stride() != stride:
                # a view (a slice of the vocabulary) would need its own re-gather
                raise RuntimeError(
                    f"an op saved a view {tuple(t.shape)} of a gathered lm_head tensor "
                    f"{tuple(shape)}; only whole tensors are gathered again"
                )
            return handle

        def unpack(saved):
            return saved.again() if isinstance(saved, _Regather) else saved

        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
        yield out[0], out[1]
