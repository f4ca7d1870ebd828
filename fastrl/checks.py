"""Checks of tensor values that never make the host wait on an accelerator."""

import os
from collections.abc import Callable

import torch


def check_values(bad: torch.Tensor, summary: str, detail: Callable[[], str]) -> None:
    """Raise ValueError where `bad` holds a True, without waiting on a GPU.

    On the CPU (or with FASTRL_SYNC_CHECKS=1) the check is eager and the message,
    `detail()`, names the value. On an accelerator it is a device-side assert with
    `summary`, as PyTorch's own `nll_loss` checks class ids: the host does not wait, and a
    failure surfaces at the next synchronisation, and, as any device-side assert, leaves
    the CUDA context unusable (restart the process): the price of checking without a sync.
    """
    # FASTRL_SYNC_CHECKS=1 (read per call): eager on accelerators too, naming the value
    if bad.device.type == "cpu" or os.environ.get("FASTRL_SYNC_CHECKS") == "1":
        if bad.any():
            raise ValueError(detail())
    else:
        torch._assert_async(~bad.any(), f"{summary} (FASTRL_SYNC_CHECKS=1 names the value)")


def check_zero_one(x: torch.Tensor, message: str) -> None:
    """A mask or label tensor that is not bool holds only 0 and 1 (ValueError(message),
    naming the first other value where the check is eager)."""
    if x.dtype == torch.bool:
        return
    bad = (x != 0) & (x != 1)
    check_values(bad, message, lambda: f"{message}, got value {x[bad][0].item()!r}")


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
