"""Log-probs that are compared with each other see the same rounding of the logits.

GRPO's ratio and KL compare the current log-probs (from `fused_policy_loss`, which may take
the single pass) with old and reference log-probs (from `linear_logprobs`). On identical
weights the ratio must be 1 and the KL 0 to fp32 rounding, at a trained model's logit
scale (std ~5, half the targets the argmax), whichever impl and input dtype.
"""

import pytest
import torch

from fastrl import fused_policy_loss, linear_logprobs
from tests.support import DEVICE

B, T, D, V = 3, 29, 64, 1000


def realistic_batch(dtype, device=DEVICE, b=B, t=T, d=D, v=V):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(b, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (5.0 / d**0.5)  # logit std ~5
    logits = hidden @ weight.T
    targets = torch.randint(0, v, (b, t), generator=g)
    greedy = torch.rand(b, t, generator=g) < 0.5
    targets = torch.where(greedy, logits.argmax(-1), targets)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t // 2 :] = 0
    adv = torch.randn(b, generator=g)
    to = lambda x, dt=None: x.to(device=device, dtype=dt or x.dtype)
    return (
        to(hidden, dtype).requires_grad_(),
        to(weight, dtype),
        to(targets),
        to(mask),
        to(adv),
    )


def same_weight_metrics(dtype, impl):
    hidden, weight, targets, mask, adv = realistic_batch(dtype)
    scored = torch.where(mask.bool(), targets, -100)
    with torch.no_grad():
        old = linear_logprobs(hidden, weight, scored, impl=impl)
    # the reference model is the same weights here, as at step 0 of a LoRA run; a clip
    # range of 1e-3 turns any rounding mismatch of the log-probs into clipped tokens
    _, metrics = fused_policy_loss(
        hidden, weight, targets, mask, adv, old_logps=old, ref_logps=old, beta=0.04,
        loss_type="grpo", epsilon=1e-3, impl=impl,
    )  # fmt: skip
    return metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_same_weights_give_zero_kl_and_no_clipping(impl, dtype, monkeypatch):
    import fastrl.kernels.fused_policy_loss as k

    calls = []
    real = k.fused_policy_loss_fwd
    monkeypatch.setattr(
        k, "fused_policy_loss_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    metrics = same_weight_metrics(dtype, impl)
    assert len(calls) == (impl == "triton")  # the single pass against linear_logprobs
    assert metrics["kl"].item() < 1e-9
    assert metrics["clip_ratio/region_mean"].item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_same_weights_give_zero_kl_bf16(impl):
    metrics = same_weight_metrics(torch.bfloat16, impl)
    assert metrics["kl"].item() < 1e-9
    assert metrics["clip_ratio/region_mean"].item() == 0
