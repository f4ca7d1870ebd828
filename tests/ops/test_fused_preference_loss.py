"""fused_preference_loss against the float64 oracles: naive log-probs, sums, then
naive_preference_loss; pairs of unequal lengths, odd shapes."""

import pytest
import torch

from fastrl import fused_preference_loss
from fastrl.ops.logprobs.naive import naive_linear_logprobs
from fastrl.ops.preference.naive import naive_ld_tail_logps, naive_preference_loss
from tests.support import DEVICE

B, T, D, V = 3, 11, 24, 257


def make_pairs(trainable=True):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2 * B, T, D, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 2).to(DEVICE).requires_grad_(trainable)
    targets = torch.randint(0, V, (2 * B, T), generator=g).to(DEVICE)
    mask = torch.ones(2 * B, T, dtype=torch.long, device=DEVICE)
    mask[0, 7:] = 0  # chosen shorter than its rejected
    mask[B + 1, 4:] = 0  # rejected shorter than its chosen
    mask[2, :2] = 0  # a gap at the start
    ref_hidden = hidden.detach() + 0.3 * torch.randn(2 * B, T, D, generator=g).to(DEVICE)
    return hidden, weight, targets, mask, ref_hidden


def oracle(hidden, weight, targets, mask, ref_hidden, **kw):
    scored = torch.where(mask.bool(), targets, -100)
    tok = naive_linear_logprobs(hidden, weight, scored, temperature=0.9)
    ref_tok = naive_linear_logprobs(ref_hidden, weight, scored, temperature=0.9).detach()
    seq, ref_seq, lens = tok.sum(1), ref_tok.sum(1), mask.sum(1)
    extra = {}
    if kw.get("ld_alpha") is not None:
        c, r = naive_ld_tail_logps(tok, mask)
        rc, rr = naive_ld_tail_logps(ref_tok, mask)
        extra = dict(chosen_tail_logps=c, rejected_tail_logps=r, ref_chosen_tail_logps=rc,
                     ref_rejected_tail_logps=rr)  # fmt: skip
    free = kw.get("loss_type") in ("simpo", "cpo", "orpo")
    return naive_preference_loss(
        seq[:B], seq[B:], None if free else ref_seq[:B], None if free else ref_seq[B:],
        chosen_lengths=lens[:B], rejected_lengths=lens[B:], **extra, **kw,
    )  # fmt: skip


CASES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.1),
    "cdpo": dict(loss_type="sigmoid", beta=0.2, label_smoothing=0.1),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "hinge-js": dict(loss_type="hinge", f_divergence_type="js_divergence"),
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "ld-dpo": dict(loss_type="sigmoid", ld_alpha=0.5),
    "r-dpo": dict(loss_type="sigmoid", rdpo_alpha=0.05),
    "dpop": dict(loss_type="sigmoid", dpop_lambda=5.0),
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
    "cpo": dict(loss_type="cpo", beta=0.1, cpo_alpha=1.0),
    "orpo": dict(loss_type="orpo", beta=0.1),
}


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_preference_loss(case, impl):
    hidden, weight, targets, mask, ref_hidden = make_pairs()
    free = case["loss_type"] in ("simpo", "cpo", "orpo")
    loss, metrics = fused_preference_loss(
        hidden, weight, targets, mask, ref_hidden=None if free else ref_hidden,
        temperature=0.9, impl=impl, **case,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, ref_metrics = oracle(hidden, weight, targets, mask, ref_hidden, **case)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight))
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    for gr, rg in zip(grads, ref_grads, strict=True):
        scale = max(rg.abs().max().item(), 1e-3)
        assert (gr.double() - rg).abs().max().item() <= 2e-5 * scale
    assert metrics.keys() == ref_metrics.keys() and "rewards/accuracies" in metrics
    for k in metrics:
        torch.testing.assert_close(
            metrics[k].double(), ref_metrics[k].double(), atol=1e-5, rtol=1e-5
        )


def test_fused_preference_loss_precomputed_reference_and_frozen_head():
    hidden, weight, targets, mask, ref_hidden = make_pairs(trainable=False)
    scored = torch.where(mask.bool(), targets, -100)
    ref_seq = naive_linear_logprobs(ref_hidden, weight, scored).float().sum(1)
    kw = dict(loss_type="sigmoid", impl="torch")
    a, _ = fused_preference_loss(hidden, weight, targets, mask, ref_hidden=ref_hidden, **kw)
    b, _ = fused_preference_loss(
        hidden, weight, targets, mask, ref_chosen_logps=ref_seq[:B], ref_rejected_logps=ref_seq[B:],
        **kw,
    )  # fmt: skip
    torch.testing.assert_close(a, b)
    a.backward()
    assert weight.grad is None and hidden.grad is not None


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(rows=5), "odd row count 5"),
        (dict(ref_both=True), "not both"),
        (dict(chosen_logps=True), "computes chosen_logps itself"),
        (dict(no_ref=True), "ref_chosen_logps"),
        (dict(loss_type="dpo2"), "loss_type"),
    ],
    ids=["odd-rows", "ref-both", "chosen-logps-kw", "missing-ref", "unknown-type"],
)
def test_fused_preference_loss_bad_input(change, match):
    hidden, weight, targets, mask, ref_hidden = make_pairs()
    kw = dict(ref_hidden=ref_hidden, loss_type="sigmoid", impl="torch")
    if change.get("rows"):
        n = change["rows"]
        hidden, targets, mask, kw["ref_hidden"] = hidden[:n], targets[:n], mask[:n], ref_hidden[:n]
    if change.get("ref_both"):
        kw["ref_chosen_logps"] = torch.zeros(B, device=DEVICE)
    if change.get("chosen_logps"):
        kw["chosen_logps"] = torch.zeros(B, device=DEVICE)
    if change.get("no_ref"):
        kw.pop("ref_hidden")
    if "loss_type" in change:
        kw["loss_type"] = change["loss_type"]
    with pytest.raises(ValueError, match=match):
        fused_preference_loss(hidden, weight, targets, mask, **kw)


def test_fused_preference_loss_refuses_before_the_log_prob_pass(monkeypatch):
    import fastrl.ops.preference.fused as fused

    hidden, weight, targets, mask, ref_hidden = make_pairs()
    monkeypatch.setattr(fused, "linear_logprobs", lambda *a, **k: pytest.fail("log-probs ran"))
    kw = dict(ref_hidden=ref_hidden, impl="torch")
    with pytest.raises(TypeError, match="unexpected keyword argument 'betta'"):
        fused_preference_loss(hidden, weight, targets, mask, betta=0.1, **kw)
    with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect"):
        fused_preference_loss(
            hidden, weight, targets, mask, loss_type="ipo", label_smoothing=0.1, **kw
        )
    with pytest.raises(ValueError, match="computes ref_chosen_tail_logps itself"):
        zero = torch.zeros(B, device=DEVICE)
        fused_preference_loss(
            hidden, weight, targets, mask, ld_alpha=0.5, ref_chosen_tail_logps=zero, **kw
        )
