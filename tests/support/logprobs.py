"""Inputs of the log-prob tests: a linear head's hidden states, weight, targets and bias."""

import torch

from tests.support import DEVICE


def linear_inputs(
    N, V, d, dtype, *, bias=False, requires_grad=True, weight_grad=True, lead=None,
    ignore=(3, 10), scale=3.0,
):  # fmt: skip
    """hidden (N, d), weight (V, d), targets (N,) int64 and bias (V,) or None, on DEVICE.

    Drawn from the current seed in that order (so `bias` does not change the others);
    hidden, weight and bias in `dtype`; the weight scaled so the logits' std is about
    `scale`; the targets at rows `ignore` are -100. `lead` views hidden and targets as
    (*lead, d) and `lead`. With `requires_grad` hidden, bias and (if `weight_grad`) the
    weight are leaves that require grad.
    """
    hidden = torch.randn(N, d, device=DEVICE).to(dtype)
    weight = (torch.randn(V, d, device=DEVICE) / d**0.5 * scale).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[[i for i in ignore if i < N]] = -100
    if lead is not None:
        hidden, targets = hidden.view(*lead, d), targets.view(*lead)
    b = torch.randn(V, device=DEVICE).to(dtype) if bias else None
    if requires_grad:
        hidden.requires_grad_()
        weight.requires_grad_(weight_grad)
        if b is not None:
            b.requires_grad_()
    return hidden, weight, targets, b


def top1_inputs(N, V, d, *, bias, softcap, requires_grad=True):
    """float32 `linear_inputs` from seed 7 with every other target set to its row's argmax
    (so both answers of is_top1 occur), row 0's argmax the vocab tail's last column, and no
    near-tie at the top (`softcap`: the logits' cap, None for none)."""
    torch.manual_seed(7)
    hidden, weight, targets, b = linear_inputs(
        N, V, d, torch.float32, bias=bias, requires_grad=requires_grad
    )
    with torch.no_grad():
        weight[V - 1] = 5 * hidden[0] / hidden[0].norm()  # row 0's best: the last column
        x = hidden.double() @ weight.double().T + (b.double() if bias else 0)
        z = softcap * torch.tanh(x / softcap) if softcap else x
    top2 = z.topk(2, dim=-1)
    assert (top2.values[:, 0] - top2.values[:, 1]).min() > 1e-4  # float error cannot flip it
    assert top2.indices[0, 0] == V - 1
    even = (torch.arange(N, device=DEVICE) % 2 == 0) & (targets != -100)
    return hidden, weight, torch.where(even, top2.indices[:, 0], targets), b
