"""`value_loss` (PPO's clipped value loss, OpenRLHF's ValueLoss) against the float64 oracle:
loss, gradient w.r.t. the values and metrics on odd shapes; closed forms; bad input."""

import itertools

import pytest
import torch

from fastrl import value_loss
from fastrl.ops.value.naive import naive_value_loss
from tests.support import DEVICE


def _inputs(B, T, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, T + 1, (B,), generator=g)
    lens[0] = T
    if B > 1:
        lens[1] = 0  # an empty row
    mask = (torch.arange(T)[None, :] < lens[:, None]).long()
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = old + torch.randn(B, T, generator=g, dtype=torch.float64)
    values = values.masked_fill(mask == 0, float("nan"))  # never read where masked
    cast = lambda x: x.to(dtype).to(DEVICE)
    return cast(values), cast(old), cast(returns), mask.to(DEVICE)


def _run(fn, x, **kw):
    values = x[0].clone().requires_grad_()
    loss, metrics = fn(values, *x[1:], **kw)
    (grad,) = torch.autograd.grad(loss, values)
    return loss, metrics, grad


SHAPES = [(3, 1), (5, 13), (7, 37)]
OPTIONS = {
    "clip0.2": dict(value_clip=0.2),
    "clip0.5-seq": dict(value_clip=0.5, token_level_loss=False),
    "noclip": dict(),
    "noclip-seq": dict(token_level_loss=False),
    "clip-num-items": dict(value_clip=0.3, num_items_in_batch=100),
}
CASES = list(itertools.product(SHAPES, OPTIONS))


@pytest.mark.parametrize("shape,options", CASES, ids=[f"{s[0]}x{s[1]}-{o}" for s, o in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_oracle(shape, options, dtype):
    x = _inputs(*shape, CASES.index((shape, options)), dtype)
    kw = OPTIONS[options]
    loss, metrics, grad = _run(value_loss, x, **kw)
    oracle_inputs = (*(t.cpu().double() for t in x[:3]), x[3].cpu())  # the same rounded values
    want_loss, want_metrics, want_grad = _run(naive_value_loss, oracle_inputs, **kw)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss.cpu().double(), want_loss, **tol)
    torch.testing.assert_close(grad.cpu().double(), want_grad, **tol)
    assert set(metrics) == set(want_metrics) == {"value_loss", "values", "vf_clipfrac"}
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad
        torch.testing.assert_close(value.cpu().double(), want_metrics[name], **tol, msg=name)
    assert (grad[x[3] == 0] == 0).all()
    if "value_clip" in kw and shape[1] > 1:
        assert 0 < metrics["vf_clipfrac"] < 1  # the clip is active somewhere, not everywhere


def test_closed_forms():
    v = torch.tensor([[1.0, 2.0]], device=DEVICE, requires_grad=True)
    old = torch.tensor([[0.0, 2.0]], device=DEVICE)
    ret = torch.tensor([[3.0, 1.0]], device=DEVICE)
    mask = torch.ones(1, 2, device=DEVICE)
    # token 0: clipped prediction 0.5, (0.5 - 3)^2 = 6.25 > (1 - 3)^2 = 4 -> 6.25, no gradient
    # token 1: clipped = unclipped = 2, (2 - 1)^2 = 1 -> 1, gradient 0.5 * 2 * (2 - 1) / 2
    loss, metrics = value_loss(v, old, ret, mask, value_clip=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (6.25 + 1) / 2, device=DEVICE))
    (g,) = torch.autograd.grad(loss, v)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.5]], device=DEVICE))
    assert metrics["vf_clipfrac"] == 0.5
    plain, m = value_loss(v, None, ret, mask)  # no clip: 0.5 * MSE
    torch.testing.assert_close(plain, torch.tensor(0.5 * (4 + 1) / 2, device=DEVICE))
    assert m["vf_clipfrac"] == 0


def test_empty_batch_gives_zero():
    v = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    mask = torch.zeros(2, 3, device=DEVICE)
    for seq in (True, False):
        loss, _ = value_loss(v, v.detach(), v.detach(), mask, value_clip=0.2, token_level_loss=seq)
        assert loss == 0
        (g,) = torch.autograd.grad(loss, v)
        assert (g == 0).all()


def test_bad_input():
    v, old, ret, mask = _inputs(3, 4, 5)
    cases = [
        (dict(returns=ret[:, :3]), ValueError, r"returns must have the shape of values \(3, 4\)"),
        (dict(values=v[0]), ValueError, r"values must have shape \[B, T\], got \(4,\)"),
        (dict(mask=mask - 2), ValueError, r"mask must be boolean or hold only 0 and 1"),
        (dict(old_values=old.long()), TypeError, r"old_values must be a floating-point tensor"),
        (dict(value_clip=0.0), ValueError, r"value_clip must be finite and > 0.0 or None, got 0.0"),
        (dict(value_clip=0.2, old_values=None), ValueError, r"value_clip=0.2 clips around old_values"),  # noqa: E501
        (dict(token_level_loss="yes"), TypeError, r"token_level_loss must be a bool"),
        (dict(num_items_in_batch=10, token_level_loss=False), ValueError, r"num_items_in_batch is the token count"),  # noqa: E501
        (dict(num_items_in_batch=-1), ValueError, r"num_items_in_batch must be finite and >= 0.0"),
    ]  # fmt: skip
    for change, exc, match in cases:
        kw = {**dict(values=v, old_values=old, returns=ret, mask=mask), **change}
        args = [kw.pop(k) for k in ("values", "old_values", "returns", "mask")]
        with pytest.raises(exc, match=match):
            value_loss(*args, **kw)
