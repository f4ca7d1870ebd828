"""What a piece of code allocates, seen from aten: the memory tests of the heads check that
no `[N, V]` logits tensor (nor, frozen, a `[V, d]` weight gradient) is ever created."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AllocationRecorder(TorchDispatchMode):
    """Records (shape, dtype) of every new tensor aten creates (not a view of an existing
    one) while the mode is active.

    The Triton interpreter stages each kernel argument's storage through host byte
    buffers (`set_` and uint8 copies): those are the interpreter's, not the kernel's, and
    are left out.
    """

    def __init__(self) -> None:
        super().__init__()
        self.allocs: list[tuple[tuple[int, ...], torch.dtype]] = []

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The shapes of `allocs`, in order."""
        return [shape for shape, _ in self.allocs]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("set_"):
            return out
        flat_args = [*args, *(kwargs or {}).values()]
        seen = {a.untyped_storage().data_ptr() for a in flat_args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor)
                and t.dtype != torch.uint8
                and t.untyped_storage().data_ptr() not in seen
            ):
                self.allocs.append((tuple(t.shape), t.dtype))
        return out
