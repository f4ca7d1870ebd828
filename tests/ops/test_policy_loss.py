"""`policy_loss` against the float64 oracle, closed forms, edge cases and bad input.

Parity with TRL's own GRPOTrainer is in test_trl_parity_grpo.py.
"""

import itertools

import pytest
import torch

from fastrl import policy_loss
from fastrl.ops.policy.naive import naive_policy_loss
from fastrl.options.policy import APPLIES_TO, LOSS_TYPES

B, T = 6, 9
CLIPPED = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]


def _inputs(seed, dtype=torch.float64, adv_shape="B"):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate([9, 6, 0, 1, 4, 8]):  # ragged, one empty row, one single token
        mask[b, n:] = 0
    shift = 0.4 * torch.randn(B, 1, generator=g, dtype=torch.float64)
    old = lp - shift - 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    samp = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    samp[0, 3] = float("nan")  # a token the sampler could not score
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    if adv_shape == "B":
        adv = torch.randn(B, generator=g, dtype=torch.float64)
        adv[4] = 0.0
    else:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    # garbage at masked positions must not matter
    lp = lp.masked_fill(mask == 0, float("-inf"))
    old = old.masked_fill(mask == 0, float("nan"))
    cast = lambda x: x.to(dtype)
    return dict(
        logps=cast(lp),
        old_logps=cast(old),
        advantages=cast(adv),
        mask=mask,
        ref_logps=cast(ref),
        sampling_logps=cast(samp),
        entropy=cast(ent),
    )


BASE = dict(
    max_completion_length=12,
    num_items_in_batch=70,
    gradient_accumulation_steps=2,
    steps_per_generation=4,
    epsilon_high=0.28,
)
OPTION_SETS = {
    "plain": dict(),
    "kl_k3_delta": dict(beta=0.04, delta=1.5),
    "kl_k1_nobias": dict(beta=0.1, kl_estimator="k1", use_bias_correction_kl=False),
    "kl_k2_eps": dict(beta=0.1, kl_estimator="k2", epsilon=0.1, epsilon_high=3.0),
    "sampling_token_truncate": dict(
        sampling_correction="token_truncate", sampling_clip_min=0.8, sampling_clip_max=1.2
    ),
    "sampling_sequence_mask_opsm": dict(
        sampling_correction="sequence_mask", sampling_clip_max=1.5, off_policy_mask_threshold=0.05
    ),
    "sampling_token_mask_entropy": dict(
        sampling_correction="token_mask",
        sampling_clip_min=0.9,
        top_entropy_quantile=0.3,
        entropy_coef=0.02,
        sapo_temperature_pos=0.5,
        sapo_temperature_neg=2.0,
    ),
    "opsm_without_sampler": dict(off_policy_mask_threshold=0.0, beta=0.02, entropy_coef=-0.01),
}
CASES = list(itertools.product(LOSS_TYPES, ["token", "sequence"], OPTION_SETS))


def _run(fn, inputs, **kw):
    """Loss, metrics and gradients w.r.t. logps and entropy; the reference log-probs are
    passed when there is a KL term, the sampler's when a correction is asked for."""
    lp = inputs["logps"].clone().requires_grad_()
    ent = inputs["entropy"].clone().requires_grad_()
    opts = {**BASE, "sampling_correction": None, **kw}
    if opts.get("beta"):
        opts["ref_logps"] = inputs["ref_logps"]
    if opts["sampling_correction"] is not None:
        opts["sampling_logps"] = inputs["sampling_logps"]
    loss, metrics = fn(
        lp, inputs["old_logps"], inputs["advantages"], inputs["mask"], entropy=ent, **opts
    )
    grads = torch.autograd.grad(loss, [lp, ent], allow_unused=True, materialize_grads=True)
    return loss, metrics, grads


@pytest.mark.parametrize("loss_type,level,options", CASES, ids=["-".join(c) for c in CASES])
def test_matches_oracle(loss_type, level, options):
    kw = dict(OPTION_SETS[options], loss_type=loss_type, importance_sampling_level=level)
    for rule in APPLIES_TO:  # the option sets' loss-type-specific options, where they apply
        if loss_type not in rule.loss_types:
            kw.pop(rule.option, None)
    inputs = _inputs(CASES.index((loss_type, level, options)))
    if loss_type == "vespo" and kw.get("sampling_correction", "").startswith("sequence"):
        # TRL's rule: vespo folds token-level sampler ratios into its weight
        with pytest.raises(ValueError, match=r"loss_type='vespo' .*sampling_correction"):
            _run(policy_loss, inputs, **kw)
        return
    loss, metrics, grads = _run(policy_loss, inputs, **kw)
    want_loss, want_metrics, want_grads = _run(naive_policy_loss, inputs, **kw)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert set(metrics) == set(want_metrics)
    for name in metrics:
        assert metrics[name].dim() == 0 and not metrics[name].requires_grad, name
        torch.testing.assert_close(
            metrics[name], want_metrics[name], rtol=1e-12, atol=1e-12, equal_nan=True, msg=name
        )
    assert torch.isfinite(loss)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_float32_against_float64_oracle(loss_type, level):
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04)
    loss, _, grads = _run(policy_loss, _inputs(1, torch.float32), **kw)
    want_loss, _, want_grads = _run(naive_policy_loss, _inputs(1, torch.float64), **kw)
    assert loss.dtype == torch.float32 and grads[0].dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0].double(), want_grads[0], rtol=1e-5, atol=1e-6)


def test_bfloat16_logps_compute_in_float32():
    x = _inputs(2, torch.float32)
    lp = x["logps"].masked_fill(x["mask"] == 0, 0).bfloat16().requires_grad_()
    loss, metrics = policy_loss(lp, None, x["advantages"], x["mask"], loss_type="grpo")
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
    loss.backward()
    assert lp.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_default_and_grpo_closed_form(loss_type):
    x = _inputs(3)
    lp = x["logps"].clone().requires_grad_()
    kw = dict(BASE, loss_type=loss_type)
    loss, _ = policy_loss(lp, None, x["advantages"], x["mask"], **kw)
    loss2, _ = policy_loss(lp, lp.detach(), x["advantages"], x["mask"], **kw)
    torch.testing.assert_close(loss, loss2)
    (g,) = torch.autograd.grad(loss, lp)
    # on-policy, every ratio is 1: no clipping, and d loss / d logp = -A * w with w the
    # loss type's per-token weight
    m = x["mask"].double()
    n = m.sum(-1, keepdim=True)
    A = x["advantages"][:, None]
    weight = {
        "grpo": 1 / (n.clamp(min=1) * B * 2),
        "sapo": 1 / (n.clamp(min=1) * B * 2),
        "bnpo": 1 / (m.sum() * 2),
        "dr_grpo": 1 / (B * 12 * 2),
        "luspo": 1 / (B * 2),
        "dapo": 1 / (70 * 2 / 4),
        "cispo": 1 / (70 * 2 / 4),
        "vespo": 1 / (70 * 2 / 4),  # on-policy w = 1: phi(1) = 1
    }[loss_type]
    ratio_cap = 0.28 if loss_type == "cispo" else 1.0  # cispo: min(ratio, epsilon_high)
    torch.testing.assert_close(g, -A * weight * m * ratio_cap)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_advantage_shapes_agree(loss_type):
    x = _inputs(4)
    kw = dict(BASE, loss_type=loss_type, beta=0.04, ref_logps=x["ref_logps"])
    a = x["advantages"]
    args = (x["logps"], x["old_logps"])
    l1, m1 = policy_loss(*args, a, x["mask"], **kw)
    l2, m2 = policy_loss(*args, a[:, None], x["mask"], **kw)
    l3, m3 = policy_loss(*args, a[:, None].expand(B, T), x["mask"], **kw)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(l1, l3)
    assert m1.keys() == m2.keys() == m3.keys()


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fully_masked_rows_and_batches(loss_type, level):
    x = _inputs(5)
    lp = x["logps"].clone().requires_grad_()
    kw = dict(
        BASE, loss_type=loss_type, importance_sampling_level=level, beta=0.1, entropy_coef=0.1
    )
    loss, metrics = policy_loss(
        lp,
        x["old_logps"],
        x["advantages"],
        x["mask"],
        ref_logps=x["ref_logps"],
        entropy=x["entropy"],
        **kw,
    )
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert torch.equal(g[x["mask"] == 0], torch.zeros_like(g[x["mask"] == 0]))
    assert all(not torch.isnan(v) for k, v in metrics.items())

    zero = torch.zeros_like(x["mask"])
    lp = x["logps"].clone().requires_grad_()
    loss, metrics = policy_loss(
        lp,
        x["old_logps"],
        x["advantages"],
        zero,
        ref_logps=x["ref_logps"],
        entropy=x["entropy"],
        **kw,
    )
    (g,) = torch.autograd.grad(loss, lp)
    assert loss.item() == 0 and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_advantages_give_zero_loss_and_gradient(loss_type, level):
    x = _inputs(6)
    lp = x["logps"].clone().requires_grad_()
    kw = dict(BASE, loss_type=loss_type, importance_sampling_level=level)
    loss, _ = policy_loss(lp, x["old_logps"], torch.zeros(B), x["mask"], **kw)
    (g,) = torch.autograd.grad(loss, lp)
    assert loss.item() == 0 and torch.equal(g, torch.zeros_like(g))


def test_gradient_accumulation_scaling():
    x = _inputs(7)
    args = (x["logps"], x["old_logps"], x["advantages"], x["mask"])
    for loss_type in ["grpo", "bnpo", "dr_grpo", "sapo", "luspo"]:
        kw = dict(loss_type=loss_type, max_completion_length=12)
        one, _ = policy_loss(*args, **kw)
        four, m4 = policy_loss(*args, gradient_accumulation_steps=4, **kw)
        torch.testing.assert_close(four, one / 4)
        torch.testing.assert_close(m4["policy_loss"], one)  # logged before the / GA
    for loss_type in ["dapo", "cispo"]:
        kw = dict(loss_type=loss_type, num_items_in_batch=40)
        one, _ = policy_loss(*args, **kw)
        # steps_per_generation defaults to gradient_accumulation_steps: the factors cancel
        torch.testing.assert_close(policy_loss(*args, gradient_accumulation_steps=4, **kw)[0], one)
        split, _ = policy_loss(*args, gradient_accumulation_steps=2, steps_per_generation=8, **kw)
        torch.testing.assert_close(split, one * 4)
        procs, _ = policy_loss(*args, num_processes=4, **kw)
        torch.testing.assert_close(procs, one * 4)
        as_tensor, _ = policy_loss(*args, **{**kw, "num_items_in_batch": torch.tensor(40)})
        torch.testing.assert_close(as_tensor, one)


def test_entropy_bonus_gradient():
    x = _inputs(8)
    ent = x["entropy"].clone().requires_grad_()
    loss, _ = policy_loss(
        x["logps"],
        None,
        x["advantages"],
        x["mask"],
        loss_type="grpo",
        entropy=ent,
        entropy_coef=0.3,
        gradient_accumulation_steps=2,
    )
    (g,) = torch.autograd.grad(loss, ent)
    m = x["mask"].double()
    torch.testing.assert_close(g, -0.3 * m / m.sum() / 2)


def test_mask_dtypes_agree():
    x = _inputs(9)
    args = (x["logps"], x["old_logps"], x["advantages"])
    kw = dict(loss_type="bnpo")
    want, _ = policy_loss(*args, x["mask"], **kw)
    for mask in (x["mask"].bool(), x["mask"].float(), x["mask"].to(torch.int8)):
        torch.testing.assert_close(policy_loss(*args, mask, **kw)[0], want)


def test_metric_names():
    x = _inputs(10)
    args = (x["logps"], x["old_logps"], x["advantages"], x["mask"])
    clip = {
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "clip_ratio/low_min",
        "clip_ratio/high_max",
    }
    sampling = {
        "sampling/sampling_logp_difference/mean",
        "sampling/sampling_logp_difference/max",
        "sampling/importance_sampling_ratio/min",
        "sampling/importance_sampling_ratio/mean",
        "sampling/importance_sampling_ratio/max",
    }
    for loss_type in LOSS_TYPES:
        _, m = policy_loss(*args, **BASE, loss_type=loss_type)
        extra = (
            clip
            if loss_type in CLIPPED
            else {"cispo_clip_ratio"}
            if loss_type == "cispo"
            else {"vespo/phi_seq_mean"}
            if loss_type == "vespo"
            else set()
        )
        assert set(m) == {"policy_loss"} | extra
    _, m = policy_loss(
        *args,
        **BASE,
        ref_logps=x["ref_logps"],
        entropy=x["entropy"],
        sampling_logps=x["sampling_logps"],
        loss_type="dapo",
    )
    assert set(m) == {"policy_loss", "kl", "entropy"} | clip | sampling


def test_ref_logps_without_beta_only_feeds_the_kl_metric():
    x = _inputs(11)
    args = (x["logps"], x["old_logps"], x["advantages"], x["mask"])
    without, _ = policy_loss(*args, **BASE)
    with_ref, metrics = policy_loss(*args, **BASE, ref_logps=x["ref_logps"])
    torch.testing.assert_close(with_ref, without)
    assert metrics["kl"] > 0


def _bad(match, exc=ValueError, **overrides):
    x = _inputs(12)
    kw = dict(
        logps=x["logps"],
        old_logps=x["old_logps"],
        advantages=x["advantages"],
        mask=x["mask"],
        loss_type="dapo",
        num_items_in_batch=10,
    )
    kw.update(overrides)
    with pytest.raises(exc, match=match):
        policy_loss(
            kw.pop("logps"), kw.pop("old_logps"), kw.pop("advantages"), kw.pop("mask"), **kw
        )


def test_bad_input():
    x = _inputs(13)
    _bad("loss_type.*'ppo'", loss_type="ppo")
    _bad("importance_sampling_level.*'batch'", importance_sampling_level="batch")
    _bad("kl_estimator.*'k4'", kl_estimator="k4")
    _bad("max_completion_length.*None", loss_type="dr_grpo")
    _bad("num_items_in_batch.*None", num_items_in_batch=None)
    _bad("num_items_in_batch.*None", loss_type="cispo", num_items_in_batch=None)
    _bad(r"old_logps.*\(6, 9\).*\(6, 8\)", old_logps=x["old_logps"][:, :8])
    _bad(r"ref_logps.*\(6, 8\)", ref_logps=x["ref_logps"][:, :8], beta=0.1)
    _bad(r"mask.*\(5, 9\)", mask=x["mask"][:5])
    _bad(r"advantages.*\(5,\)", advantages=x["advantages"][:5])
    _bad(r"logps.*\[B, T\].*\(54,\)", logps=x["logps"].reshape(-1))
    _bad("mask must be boolean or hold only 0 and 1.*2", mask=x["mask"] * 2)
    _bad("mask must be boolean or hold only 0 and 1.*0.5", mask=x["mask"] * 0.5)
    _bad("beta=0.1 needs ref_logps", beta=0.1)
    _bad(r"beta must be finite and >= 0.0, got -0.1", beta=-0.1, ref_logps=x["ref_logps"])
    _bad("delta=1.5.*'cispo'", loss_type="cispo", delta=1.5)
    _bad("delta=1.5.*'sapo'", loss_type="sapo", delta=1.5)
    _bad("delta", delta=-1.0)
    _bad("epsilon", epsilon=-0.1)
    _bad("entropy_coef=0.1 needs", entropy_coef=0.1)
    _bad("top_entropy_quantile=0.2 needs", top_entropy_quantile=0.2)
    _bad("top_entropy_quantile", top_entropy_quantile=1.5, entropy=x["entropy"])
    _bad("sampling_correction.*'token'", sampling_correction="token")
    _bad(
        "sampling_correction='token_truncate' needs",
        sampling_logps=x["sampling_logps"],
        sampling_correction="token_truncate",
        sampling_clip_max=None,
    )
    _bad(
        "sampling_clip_min=2.0 must be less than",
        sampling_logps=x["sampling_logps"],
        sampling_clip_min=2.0,
        sampling_clip_max=1.0,
    )
    _bad("gradient_accumulation_steps", gradient_accumulation_steps=0)
    _bad("steps_per_generation", steps_per_generation=0)
    _bad("num_processes", num_processes=0)
    _bad("num_items_in_batch", num_items_in_batch=torch.ones(2))
    _bad("logps must be a torch.Tensor", TypeError, logps=[[0.0]])
    _bad("logps must be a floating-point", TypeError, logps=torch.zeros(B, T, dtype=torch.long))
    _bad("mask must be a torch.Tensor", TypeError, mask=None)
    _bad("gradient_accumulation_steps must be an int", TypeError, gradient_accumulation_steps=2.0)
    _bad("epsilon must be a number", TypeError, epsilon="0.2")


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_cuda_matches_cpu(loss_type):
    x = _inputs(14, torch.float32)
    kw = dict(BASE, loss_type=loss_type, beta=0.04, importance_sampling_level="token")
    cpu, _, cpu_grads = _run(policy_loss, x, **kw)
    gpu, _, gpu_grads = _run(policy_loss, {k: v.cuda() for k, v in x.items()}, **kw)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu_grads[0].cpu(), cpu_grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_coefficients_are_the_aggregation_gradient(loss_type):
    # the fused head's single pass forms its gradient from these coefficients: the
    # derivative of the aggregation and the entropy bonus, written next to them
    from fastrl.ops.policy.aggregate import aggregate, entropy_bonus, token_coefficients
    from fastrl.options.policy import PolicyLossOptions

    m = _inputs(15)["mask"].double()
    n_items = BASE["num_items_in_batch"]
    settings = {k: v for k, v in BASE.items() if k != "num_items_in_batch"}
    opts = PolicyLossOptions(
        loss_type=loss_type, beta=0.04, entropy_coef=0.02, num_processes=2, **settings
    )
    g = torch.Generator().manual_seed(15)
    sampling = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    pt, kl, ent = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    pt, kl, ent = (t.requires_grad_() for t in (pt, kl, ent))
    loss, _ = aggregate(opts, pt * sampling + opts.beta * kl, m, n_items)
    loss = loss - opts.entropy_coef * entropy_bonus(opts, ent, m, None)
    want = torch.autograd.grad(loss, (pt, kl, ent))
    got = token_coefficients(opts, m, sampling, n_items, has_kl=True)
    for got_w, want_w in zip(got, want, strict=True):
        torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-15)
    # the terms the loss does not have get no coefficient
    plain = PolicyLossOptions(loss_type=loss_type, num_processes=2, **settings)
    w_pt, w_kl, w_ent = token_coefficients(plain, m, None, n_items, has_kl=True)
    assert w_kl is None and w_ent is None
    torch.testing.assert_close(w_pt * sampling, got[0])
