"""Padding costs nothing: the heads score only the valid rows (compact=True, the default)
and give the outputs and gradients of scoring every row (compact=False) to float rounding."""

import fastrl.kernels.linear_logprobs as kernels
import pytest
import torch

import fastrl.ops.logprobs.custom_ops as custom_ops
from fastrl import fused_policy_loss, fused_preference_loss, linear_logprobs
from tests.support import DEVICE

B, T, D, V = 4, 11, 40, 300


def padded_mask(kind: str) -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    if kind == "suffix":  # completions of different lengths, padded right
        for b, n in enumerate((11, 3, 7, 0)):
            mask[b, n:] = 0
    elif kind == "prefix":  # left padding
        for b, n in enumerate((0, 8, 4, 11)):
            mask[b, :n] = 0
    elif kind == "interleaved":
        mask[:, ::3] = 0
        mask[1, 4:9] = 0
    elif kind == "none":
        mask[:, :] = 0
    return mask.to(DEVICE)


PADDINGS = ["suffix", "prefix", "interleaved", "none"]


def inputs(trainable=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, T, D, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 3).to(DEVICE, dtype)
    bias = torch.randn(V, generator=g).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    return hidden, weight.requires_grad_(trainable), bias, targets


def spy_rows(monkeypatch, module, name):
    """Record how many rows each call of module.name scores."""
    rows, real = [], getattr(module, name)
    monkeypatch.setattr(
        module, name, lambda h, *a, **k: rows.append(h.shape[0]) or real(h, *a, **k)
    )
    return rows


def assert_grads_close(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6 * max(1.0, y.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_logprobs_compact(impl, padding, monkeypatch):
    hidden, weight, bias, targets = inputs()
    mask = padded_mask(padding)
    scored = torch.where(mask.bool(), targets, -100)
    w = torch.randn(B, T, device=DEVICE)
    kw = dict(bias=bias, return_entropy=True, return_is_top1=True, return_log_sum_sq_probs=True)
    if impl == "triton":
        rows = spy_rows(monkeypatch, kernels, "linear_logprobs_fwd")
    else:
        rows = spy_rows(monkeypatch, custom_ops, "chunked_logprobs_fwd")

    def run(compact):
        logp, ent, top1, sq = linear_logprobs(
            hidden, weight, scored, impl=impl, compact=compact, **kw
        )
        loss = (logp * w).sum() + (ent * w.flip(0)).sum()
        return (logp, ent, top1, sq), torch.autograd.grad(loss, (hidden, weight, bias))

    out, grads = run(True)
    ref_out, ref_grads = run(False)
    assert rows == [int(mask.sum()), B * T]  # the compact call scored the valid rows only
    for x, y in zip(out, ref_out, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, ref_grads)
    assert (out[0][~mask.bool()] == 0).all() and (grads[0][~mask.bool()] == 0).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_logprobs_fully_masked_is_a_differentiable_zero(impl):
    """So that a DDP rank whose batch is all padding still runs the backward."""
    hidden, weight, _, targets = inputs(trainable=False)
    logp = linear_logprobs(hidden, weight, torch.full_like(targets, -100), impl=impl)
    assert logp.requires_grad and (logp == 0).all()
    (g,) = torch.autograd.grad(logp.sum(), hidden)
    assert (g == 0).all()


CASES = {
    "dapo": dict(loss_type="dapo", num_items_in_batch=20),
    "grpo-beta": dict(loss_type="grpo", beta=0.04),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "dr_grpo-entropy": dict(loss_type="dr_grpo", max_completion_length=T, entropy_coef=0.01),
}


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_policy_loss_compact(impl, case, padding, monkeypatch):
    import fastrl.kernels.fused_policy_loss as k

    hidden, weight, bias, targets = inputs()
    mask = padded_mask(padding)
    g = torch.Generator().manual_seed(6)
    adv = torch.randn(B, generator=g).to(DEVICE)
    old = (-torch.rand(B, T, generator=g) * 5).to(DEVICE)
    single = spy_rows(monkeypatch, k, "fused_policy_loss_fwd")
    kw = dict(old_logps=old, ref_logps=old + 0.1, bias=bias, impl=impl, **case)

    def run(compact):
        loss, metrics = fused_policy_loss(hidden, weight, targets, mask, adv, compact=compact, **kw)
        return loss, metrics, torch.autograd.grad(loss, (hidden, weight, bias), allow_unused=True)

    loss, metrics, grads = run(True)
    ref_loss, ref_metrics, ref_grads = run(False)
    if single:  # the single pass ran (Triton, token level): on the valid rows only
        assert single == [int(mask.sum()), B * T]
    torch.testing.assert_close(loss, ref_loss, atol=1e-7, rtol=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        torch.testing.assert_close(
            metrics[name], ref_metrics[name], atol=1e-7, rtol=1e-6, equal_nan=True
        )
    assert_grads_close(grads, ref_grads)
    assert loss.requires_grad  # a fully masked batch included


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_preference_loss_compact(impl):
    hidden, weight, bias, targets = inputs()
    mask = padded_mask("suffix")

    def run(compact):
        loss, metrics = fused_preference_loss(
            hidden, weight, targets, mask, ref_chosen_logps=torch.zeros(B // 2, device=DEVICE),
            ref_rejected_logps=torch.zeros(B // 2, device=DEVICE), bias=bias, impl=impl,
            compact=compact, loss_type="sigmoid", beta=0.1,
        )  # fmt: skip
        return loss, metrics, torch.autograd.grad(loss, (hidden, weight, bias))

    loss, metrics, grads = run(True)
    ref_loss, ref_metrics, ref_grads = run(False)
    torch.testing.assert_close(loss, ref_loss, atol=1e-7, rtol=1e-6)
    for name in metrics:
        torch.testing.assert_close(metrics[name], ref_metrics[name], atol=1e-7, rtol=1e-6)
    assert_grads_close(grads, ref_grads)


def test_compact_must_be_a_bool():
    hidden, weight, _, targets = inputs()
    with pytest.raises(TypeError, match="compact must be a bool, got 'yes'"):
        linear_logprobs(hidden, weight, targets, compact="yes")
