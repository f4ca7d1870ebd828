"""Validation in one place: tensors, masks, target ids, choices, numbers, `impl`.

Every check raises a ValueError or TypeError that names the argument and the value it got.
This module imports no torch at import time: the options dataclasses of
`fastrl.trainers`, which the command line validates before it loads torch, use its scalar
checks. The tensor checks import torch when they run.
"""

from __future__ import annotations

import math
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
    """`x` one of `choices` (ValueError)."""
    choices = tuple(choices)
    if x not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {x!r}")


def check_bool(name: str, x) -> None:
    """`x` True or False (TypeError: an int or a string is not taken for a flag)."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {x!r}")


def check_num_items(num_items_in_batch) -> None:
    """`num_items_in_batch` (a token count, as transformers' Trainer passes it): None, a real
    number >= 0, or a one-element tensor (read on the device, never on the host)."""
    import torch

    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch must be a number or a one-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
    elif num_items_in_batch is not None:
        check_number("num_items_in_batch", num_items_in_batch, low=0.0)


def check_number(
    name: str,
    x,
    *,
    low=None,
    high=None,
    strict_low=False,
    integer=False,
    optional=False,
    type_error: type[Exception] = TypeError,
) -> None:
    """`x` a finite real (an int with `integer`) with `low <= x` (`<` with `strict_low`) and
    `x <= high`; None passes when `optional`. A wrong type raises `type_error` (ValueError
    where callers report ValueErrors as user errors), a wrong value ValueError."""
    if x is None and optional:
        return
    ok_type = numbers.Integral if integer else numbers.Real
    if isinstance(x, bool) or not isinstance(x, ok_type):
        kind = "an int" if integer else "a number"
        raise type_error(f"{name} must be {kind}{' or None' if optional else ''}, got {x!r}")
    value = float(x)
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or (value <= low if strict_low else value < low)
    if high is not None:
        bad = bad or value > high
    if bad:
        rng = [] if low is None else [f"{'>' if strict_low else '>='} {low}"]
        rng += [] if high is None else [f"<= {high}"]
        what = " and ".join(["finite", *rng]) + (" or None" if optional else "")
        raise ValueError(f"{name} must be {what}, got {x!r}")


def check_impl(impl: str, name: str = "impl", *, device: torch.device | None = None) -> None:
    """`impl` one of IMPLS; with `device`, "triton" must be able to run there (CUDA, or any
    device under Triton's interpreter, TRITON_INTERPRET=1)."""
    check_choice(name, impl, IMPLS)
    if impl == "triton" and device is not None and not triton_usable(device):
        raise ValueError(
            f"{name}='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
        )


def triton_usable(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of `device` (read per call: tests and
    users switch the interpreter on and off)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------- tensors


def check_tensor(
    name: str,
    x,
    shape=None,
    floating: bool = True,
    like: str = "logps",
    *,
    integer: bool = False,
    dtype: torch.dtype | None = None,
) -> None:
    """`x` a real tensor: floating-point (any real dtype with `floating=False`, integer
    ids, not bool, with `integer`), of `dtype` and of `shape` where given: the dtype or
    shape of the argument named `like`."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    if integer and (x.is_floating_point() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if floating and not integer and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} dtype {x.dtype} differs from {like} dtype {dtype}; cast one")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have the shape of {like} {tuple(shape)}, got {tuple(x.shape)}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """The tensors given by name (None skipped) are on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the losses and the PyTorch paths compute in: float64 for float64 inputs,
    else float32."""
    import torch

    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- tensor values


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


def check_zero_one(x: torch.Tensor, name: str = "mask") -> None:
    """A mask or label tensor `name` that is not bool holds only 0 and 1: ValueError
    "`name` must be boolean or hold only 0 and 1", with the first other value where the
    check is eager."""
    import torch

    if x.dtype == torch.bool:
        return
    message = f"{name} must be boolean or hold only 0 and 1"
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


def check_completion_batch(
    targets: torch.Tensor,
    mask: torch.Tensor,
    ref_weight: torch.Tensor | None,
    ref_hidden: torch.Tensor | None,
    *,
    rows: str,
) -> None:
    """Validation shared by the fused heads: `targets` and `mask` `[rows, T]`, a 0/1 mask,
    `ref_weight` only with `ref_hidden`."""
    import torch

    check_tensor("mask", mask, floating=False)
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError(
            f"targets must be a {rows} tensor, got {getattr(targets, 'shape', targets)}"
        )
    if mask.shape != targets.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal targets shape {tuple(targets.shape)}"
        )
    if ref_weight is not None and ref_hidden is None:
        raise ValueError("ref_weight is only used with ref_hidden; got ref_hidden=None")
    check_zero_one(mask)
