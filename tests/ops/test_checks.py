"""fastrl.checks: every check accepts what is valid and rejects the rest with an error that
names the argument and the value it got; the module imports without torch."""

import subprocess
import sys

import pytest
import torch

from fastrl.checks import (
    IGNORE_INDEX,
    IMPLS,
    check_bool,
    check_choice,
    check_impl,
    check_number,
    check_same_device,
    check_target_ids,
    check_tensor,
    check_values,
    check_zero_one,
    compute_dtype,
    triton_usable,
)


def test_imports_without_torch():
    code = "import sys, fastrl.checks; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_constants():
    assert IGNORE_INDEX == -100
    assert IMPLS == ("auto", "triton", "torch")


def test_check_choice():
    check_choice("loss_type", "dapo", ("grpo", "dapo"))
    check_choice("loss_type", "grpo", iter(["grpo"]))  # any iterable
    with pytest.raises(ValueError, match=r"loss_type must be one of \('grpo', 'dapo'\), got 'ppo'"):
        check_choice("loss_type", "ppo", ("grpo", "dapo"))


def test_check_bool():
    check_bool("compact", True)
    check_bool("compact", False)
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match=f"compact must be a bool, got {bad!r}"):
            check_bool("compact", bad)


@pytest.mark.parametrize(
    "value,kw",
    [
        (0.5, {}),
        (0, dict(low=0.0)),
        (1.0, dict(low=0.0, high=1.0)),
        (3, dict(low=1, integer=True)),
        (None, dict(optional=True)),
        (1e-4, dict(low=0.0, strict_low=True)),
    ],
)
def test_check_number_accepts(value, kw):
    check_number("x", value, **kw)


@pytest.mark.parametrize(
    "value,kw,exc,match",
    [
        ("0.1", {}, TypeError, "x must be a number, got '0.1'"),
        (True, {}, TypeError, "x must be a number, got True"),
        (None, {}, TypeError, "x must be a number, got None"),
        (2.0, dict(integer=True), TypeError, "x must be an int, got 2.0"),
        ("a", dict(optional=True), TypeError, "x must be a number or None, got 'a'"),
        (2.0, dict(integer=True, type_error=ValueError), ValueError, "x must be an int"),
        (float("nan"), {}, ValueError, "x must be finite, got nan"),
        (float("inf"), dict(low=0.0), ValueError, r"x must be finite and >= 0.0, got inf"),
        (-0.1, dict(low=0.0), ValueError, r"x must be finite and >= 0.0, got -0.1"),
        (0.0, dict(low=0.0, strict_low=True), ValueError, r"x must be finite and > 0.0, got 0.0"),
        (1.5, dict(low=0.0, high=1.0), ValueError, r">= 0.0 and <= 1.0, got 1.5"),
        (0, dict(low=1, integer=True), ValueError, r"x must be finite and >= 1, got 0$"),
        (0.0, dict(low=0.0, strict_low=True, optional=True), ValueError, "> 0.0 or None, got"),
    ],
)
def test_check_number_rejects(value, kw, exc, match):
    with pytest.raises(exc, match=match):
        check_number("x", value, **kw)


def test_check_impl(monkeypatch):
    for impl in IMPLS:
        check_impl(impl)
    with pytest.raises(ValueError, match="impl must be one of .*, got 'cuda'"):
        check_impl("cuda")
    with pytest.raises(ValueError, match="kernel_impl must be one of .*, got 'gpu'"):
        check_impl("gpu", "kernel_impl")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    check_impl("triton", device=cuda)
    check_impl("torch", device=cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_usable(cpu) and triton_usable(cuda)
    check_impl("triton", device=cpu)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_usable(cpu) and triton_usable(cuda)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors .* got device cpu"):
        check_impl("triton", device=cpu)
    check_impl("auto", device=cpu)


def test_check_tensor_accepts():
    check_tensor("logps", torch.zeros(2, 3))
    check_tensor("mask", torch.ones(2, 3, dtype=torch.bool), (2, 3), floating=False)
    check_tensor("targets", torch.zeros(4, dtype=torch.int32), integer=True)
    check_tensor("weight", torch.zeros(2, dtype=torch.float16), dtype=torch.float16)


@pytest.mark.parametrize(
    "x,kw,exc,match",
    [
        ([0.0], {}, TypeError, "t must be a torch.Tensor, got list"),
        (torch.zeros(2, dtype=torch.long), {}, TypeError, "t must be a floating-point tensor, got dtype torch.int64"),  # noqa: E501
        (torch.zeros(2, dtype=torch.complex64), dict(floating=False), TypeError, "t must be real, got dtype torch.complex64"),  # noqa: E501
        (torch.zeros(2), dict(integer=True), TypeError, "t must be an integer tensor, got dtype torch.float32"),  # noqa: E501
        (torch.zeros(2, dtype=torch.bool), dict(integer=True), TypeError, "t must be an integer tensor, got dtype torch.bool"),  # noqa: E501
        (torch.zeros(2), dict(dtype=torch.float16, like="hidden"), TypeError, "t dtype torch.float32 differs from hidden dtype torch.float16"),  # noqa: E501
        (torch.zeros(2, 3), dict(shape=(2, 4)), ValueError, r"t must have the shape of logps \(2, 4\), got \(2, 3\)"),  # noqa: E501
        (torch.zeros(3), dict(shape=(2,), like="chosen_logps"), ValueError, r"shape of chosen_logps \(2,\), got \(3,\)"),  # noqa: E501
    ],
)  # fmt: skip
def test_check_tensor_rejects(x, kw, exc, match):
    with pytest.raises(exc, match=match):
        check_tensor("t", x, **kw)


def test_check_same_device():
    check_same_device(hidden=torch.zeros(1), weight=torch.zeros(1), bias=None)
    with pytest.raises(ValueError, match="tensors must be on one device, got .*'targets': .*meta"):
        check_same_device(hidden=torch.zeros(1), targets=torch.zeros(1, device="meta"))


def test_compute_dtype():
    assert compute_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool):
        assert compute_dtype(torch.zeros(1, dtype=dtype)) == torch.float32


def test_check_values():
    check_values(torch.zeros(3, dtype=torch.bool), "bad", lambda: "never built")
    with pytest.raises(ValueError, match="^the detail$"):
        check_values(torch.tensor([False, True]), "the summary", lambda: "the detail")


def test_check_zero_one():
    for good in (torch.tensor([0, 1, 1]), torch.tensor([0.0, 1.0]), torch.tensor([True])):
        check_zero_one(good)
    with pytest.raises(
        ValueError, match="^mask must be boolean or hold only 0 and 1, got value 2$"
    ):
        check_zero_one(torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="labels must be boolean .* got value 0.5"):
        check_zero_one(torch.tensor([0.5]), "labels")
    with pytest.raises(
        ValueError, match="^labels must be boolean or hold only 0 and 1, got value -1$"
    ):
        check_zero_one(torch.tensor([-1]), "labels")


def test_check_target_ids():
    check_target_ids(torch.tensor([0, 9, IGNORE_INDEX]), 10, IGNORE_INDEX)
    with pytest.raises(ValueError, match=r"targets holds id 10 outside \[0, 10\).*1 such"):
        check_target_ids(torch.tensor([0, 10, IGNORE_INDEX]), 10, IGNORE_INDEX)
    with pytest.raises(ValueError, match=r"targets holds id -100 .* ignore_index \(-1\)"):
        check_target_ids(torch.tensor([-100, -1]), 10, -1)
