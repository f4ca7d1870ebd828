"""Validation in one place: tensors, masks, target ids, choices, numbers, `impl`.

Every check raises a ValueError or TypeError that names the argument and the value it got.
This module imports no torch at import time: the options dataclasses (`fastrl.options`),
which the command line validates before it loads torch, use its scalar checks.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: the target id whose position is not scored (PyTorch's and TRL's convention)
IGNORE_INDEX = -100
#: where an op runs: "auto" (Triton on CUDA tensors, else PyTorch), "triton", "torch"
IMPLS = ("auto", "triton", "torch")


# --------------------------------------------------------------------------- scalars


def check_choice(name: str, x, choices: Iterable) -> None:
    choices = tuple(choices)
    if x not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {x!r}")


def check_impl(impl: str, name: str = "impl") -> None:
    check_choice(name, impl, IMPLS)


def check_number(name: str, x, *, low=None, high=None, strict_low=False, integer=False) -> None:
    """`x` a finite real (an int with `integer`) with `low <= x` (`<` with `strict_low`) and
    `x <= high`: TypeError for a wrong type, ValueError for a wrong value."""
    ok_type = numbers.Integral if integer else numbers.Real
    if isinstance(x, bool) or not isinstance(x, ok_type):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {x!r}")
    x = float(x)
    bad = x != x or x in (float("inf"), float("-inf"))
    if low is not None:
        bad = bad or (x <= low if strict_low else x < low)
    if high is not None:
        bad = bad or x > high
    if bad:
        rng = []
        if low is not None:
            rng.append(f"{'>' if strict_low else '>='} {low}")
        if high is not None:
            rng.append(f"<= {high}")
        raise ValueError(
            f"{name} must be finite{' and ' + ' and '.join(rng) if rng else ''}, got {x!r}"
        )


# --------------------------------------------------------------------------- tensors


def check_tensor(name: str, x, shape=None, floating: bool = True, like: str = "logps") -> None:
    """`x` a tensor (floating-point unless `floating=False`) of `shape`, the shape of the
    argument `like`, where a shape is given."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have the shape of {like} {tuple(shape)}, got {tuple(x.shape)}"
        )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the losses compute in: float64 for float64 inputs, else float32."""
    import torch

    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_values(bad: torch.Tensor, summary: str, detail: Callable[[], str]) -> None:
    """Raise ValueError where `bad` holds a True, without waiting on a GPU.

    On the CPU (or with FASTRL_SYNC_CHECKS=1) the check is eager and the message,
    `detail()`, names the value. On an accelerator it is a device-side assert with
    `summary`, as PyTorch's own `nll_loss` checks class ids: the host does not wait, and a
    failure surfaces at the next synchronisation, and, as any device-side assert, leaves
    the CUDA context unusable (restart the process): the price of checking without a sync.
    """
    import torch

    # FASTRL_SYNC_CHECKS=1 (read per call): eager on accelerators too, naming the value
    if bad.device.type == "cpu" or os.environ.get("FASTRL_SYNC_CHECKS") == "1":
        if bad.any():
            raise ValueError(detail())
    else:
        torch._assert_async(~bad.any(), f"{summary} (FASTRL_SYNC_CHECKS=1 names the value)")


def check_zero_one(x: torch.Tensor, message: str) -> None:
    """A mask or label tensor that is not bool holds only 0 and 1 (ValueError(message),
    naming the first other value where the check is eager)."""
    import torch

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
