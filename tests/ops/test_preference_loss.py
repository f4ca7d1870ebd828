"""`preference_loss`, `kto_loss` and `ld_tail_logps` against the float64 oracles, closed
forms, edge cases and bad input.

Parity with TRL's own DPO, KTO, CPO and ORPO trainers is in test_trl_parity_dpo.py.
"""

import math

import pytest
import torch

from fastrl import kto_loss, ld_tail_logps, preference_loss
from fastrl.ops.preference.naive import naive_kto_loss, naive_ld_tail_logps, naive_preference_loss
from fastrl.options.preference import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCES,
    LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
)

B = 7
TOL64 = dict(rtol=1e-12, atol=1e-12)
# The loss types whose f-divergence generalisation TRL allows.
F_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
SMOOTHED = ["sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"]


def _pairs(seed, dtype=torch.float64, *, empty=True):
    """Summed log-probs of B pairs with their lengths, tails and WPO inputs.

    `empty`: one rejected completion of length 0 (log-prob 0), for the length clamps.
    """
    g = torch.Generator().manual_seed(seed)
    n_c = torch.randint(1, 13, (B,), generator=g)
    n_r = torch.randint(1, 13, (B,), generator=g)
    n_r[2] = n_c[2]  # a pair of equal length: no tail on either side
    per_tok_c = -0.2 - 2.5 * torch.rand(B, generator=g, dtype=torch.float64)
    per_tok_r = -0.2 - 2.5 * torch.rand(B, generator=g, dtype=torch.float64)
    c = per_tok_c * n_c
    r = per_tok_r * n_r
    if empty:
        n_r[5] = 0
        r[5] = 0.0
    rc = c + 1.5 * torch.randn(B, generator=g, dtype=torch.float64)
    rr = r + 1.5 * torch.randn(B, generator=g, dtype=torch.float64)
    shared = torch.minimum(n_c, n_r)
    frac_c = (n_c - shared) / n_c.clamp(min=1)
    frac_r = (n_r - shared) / n_r.clamp(min=1)
    wiggle = 1 + 0.2 * torch.randn(B, generator=g, dtype=torch.float64)
    cast = lambda x: x.to(dtype)
    return dict(
        chosen_logps=cast(c),
        rejected_logps=cast(r),
        ref_chosen_logps=cast(rc),
        ref_rejected_logps=cast(rr),
        chosen_lengths=n_c,
        rejected_lengths=n_r,
        # the tail: the tokens beyond the shared length, about that fraction of the sum
        chosen_tail_logps=cast(c * frac_c * wiggle),
        rejected_tail_logps=cast(r * frac_r * wiggle),
        ref_chosen_tail_logps=cast(rc * frac_c),
        ref_rejected_tail_logps=cast(rr * frac_r),
        chosen_aligned_logps=cast(c + 0.3 * n_c),
        rejected_aligned_logps=cast(r + 0.3 * n_r),
    )


DIFFERENTIABLE = ("chosen_logps", "rejected_logps", "chosen_tail_logps", "rejected_tail_logps")


def _run(fn, inputs, **kw):
    """Loss, metrics and gradients w.r.t. the policy log-probs, tails and `nll`; passes the
    inputs each option needs (reference log-probs unless reference-free, tails with
    ld_alpha, aligned log-probs with use_weighting)."""
    x = {k: v.clone().requires_grad_() if k in DIFFERENTIABLE else v for k, v in inputs.items()}
    nll = kw.pop("nll", None)
    if nll is not None:
        nll = nll.clone().requires_grad_()
        kw["nll"] = nll
    types = [kw["loss_type"]] if isinstance(kw["loss_type"], str) else kw["loss_type"]
    args = [x["chosen_logps"], x["rejected_logps"]]
    if types[0] not in REFERENCE_FREE_LOSS_TYPES and not kw.pop("no_ref", False):
        args += [x["ref_chosen_logps"], x["ref_rejected_logps"]]
    kw.setdefault("chosen_lengths", x["chosen_lengths"])
    kw.setdefault("rejected_lengths", x["rejected_lengths"])
    if kw.get("ld_alpha") is not None:
        for k in ("chosen_tail_logps", "rejected_tail_logps"):
            kw[k] = x[k]
        if len(args) == 4:
            for k in ("ref_chosen_tail_logps", "ref_rejected_tail_logps"):
                kw[k] = x[k]
    if kw.get("use_weighting"):
        kw["chosen_aligned_logps"] = x["chosen_aligned_logps"]
        kw["rejected_aligned_logps"] = x["rejected_aligned_logps"]
    loss, metrics = fn(*args, **kw)
    wrt = [x[k] for k in DIFFERENTIABLE] + ([nll] if nll is not None else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    return loss, metrics, grads


def _compare(inputs, tol=TOL64, **kw):
    loss, metrics, grads = _run(preference_loss, inputs, **dict(kw))
    want_loss, want_metrics, want_grads = _run(naive_preference_loss, inputs, **dict(kw))
    torch.testing.assert_close(loss.double(), want_loss, **tol)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **tol)
    assert set(metrics) == set(want_metrics)
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, name
        torch.testing.assert_close(value.double(), want_metrics[name], **tol, msg=name)
    assert torch.isfinite(loss)
    return loss, metrics, grads


# --------------------------------------------------------------------------- oracle


def _defaults(loss_type):
    return dict(label_smoothing=1e-3) if loss_type == "exo_pair" else {}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_matches_oracle(loss_type, beta):
    inputs = _pairs(LOSS_TYPES.index(loss_type), empty=loss_type != "orpo")
    _compare(inputs, loss_type=loss_type, beta=beta, **_defaults(loss_type))


@pytest.mark.parametrize("loss_type", SMOOTHED + ["cpo", "simpo", "alphapo"])
@pytest.mark.parametrize("eps", [0.05, 0.3, 0.49])
def test_label_smoothing_matches_oracle(loss_type, eps):
    _compare(_pairs(10), loss_type=loss_type, label_smoothing=eps)


@pytest.mark.parametrize("loss_type", F_TYPES)
@pytest.mark.parametrize(
    "f_type,coef",
    [(f, None) for f in F_DIVERGENCES] + [("alpha_divergence", c) for c in (2.0, 1.0, -0.5)],
)
def test_f_divergence_matches_oracle(loss_type, f_type, coef):
    kw = dict(f_divergence_type=f_type, **_defaults(loss_type))
    if coef is not None:
        kw["f_alpha_divergence_coef"] = coef
    _compare(_pairs(20), loss_type=loss_type, **kw)


def test_alpha_divergence_cap():
    # (coef - 1) * log-ratio beyond 80 is capped (TRL's float32 cap), without gradient
    x = _pairs(21)
    x["ref_chosen_logps"] = x["ref_chosen_logps"].clone()
    x["ref_chosen_logps"][0] -= 100.0
    kw = dict(loss_type="hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=2.0)
    _, _, grads = _compare(x, **kw)
    assert grads[0][0] == 0


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
def test_ld_alpha_matches_oracle(loss_type, ld_alpha):
    _compare(_pairs(30), loss_type=loss_type, ld_alpha=ld_alpha, **_defaults(loss_type))


@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSS_TYPES if not t.startswith("aot")])
def test_wpo_weighting_matches_oracle(loss_type):
    _compare(_pairs(40), loss_type=loss_type, use_weighting=True, **_defaults(loss_type))


@pytest.mark.parametrize(
    "types,weights",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
        (["apo_zero", "apo_down", "nca_pair", "sppo_hard"], None),
        (["aot", "aot_unpaired", "robust", "hinge"], [1.0, -0.5, 2.0, 0.25]),
    ],
)
def test_loss_lists_match_oracle(types, weights):
    eps = 0.1 if set(types) & set(SMOOTHED) else 0.0
    _compare(_pairs(50), loss_type=types, loss_weights=weights, label_smoothing=eps)
    _compare(_pairs(51), loss_type=types, loss_weights=weights, ld_alpha=0.5)


@pytest.mark.parametrize("rdpo_alpha,dpop_lambda", [(0.2, 0.0), (0.0, 5.0), (-0.1, 50.0)])
def test_rdpo_and_dpop_match_oracle(rdpo_alpha, dpop_lambda):
    kw = dict(rdpo_alpha=rdpo_alpha, dpop_lambda=dpop_lambda)
    _compare(_pairs(60), loss_type="sigmoid", **kw)
    _compare(_pairs(61), loss_type="sigmoid", label_smoothing=0.1, ld_alpha=0.5, **kw)
    _compare(_pairs(62), loss_type=["sigmoid", "ipo"], use_weighting=True, **kw)


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, -0.2])
@pytest.mark.parametrize("cpo_alpha", [None, 0.0, 0.5])
def test_cpo_family_matches_oracle(loss_type, alpha, cpo_alpha):
    kw = dict(loss_type=loss_type, alpha=alpha, beta=0.4)
    if cpo_alpha is not None:
        kw["cpo_alpha"] = cpo_alpha
    if loss_type in ("simpo", "alphapo"):
        kw["simpo_gamma"] = 1.3
    loss, metrics, _ = _compare(_pairs(70), **kw)
    has_nll = (cpo_alpha if cpo_alpha is not None else float(loss_type != "alphapo")) != 0
    assert (metrics["nll_loss"] != 0) == has_nll


@pytest.mark.parametrize("loss_type", ["sft", "orpo", "cpo", ["sigmoid", "sft"]])
def test_given_nll_matches_oracle(loss_type):
    _compare(
        _pairs(80, empty=False), loss_type=loss_type, nll=torch.tensor(2.5, dtype=torch.float64)
    )


@pytest.mark.parametrize("beta", [0.0, 0.1, 2.0])
def test_orpo_matches_oracle(beta):
    x = _pairs(90, empty=False)
    # average log-probs near 0 and far from it: both branches of log(1 - exp(x))
    x["chosen_logps"] = x["chosen_logps"] * torch.linspace(0.02, 2.0, B, dtype=torch.float64)
    _compare(x, loss_type="orpo", beta=beta)


def test_sft_without_reference_matches_oracle():
    loss, metrics, _ = _compare(_pairs(95), loss_type="sft", no_ref=True)
    assert set(metrics) == {"logps/chosen", "logps/rejected"}


# --------------------------------------------------------------------------- dtypes, KTO


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float32_against_float64_oracle(loss_type):
    kw = dict(loss_type=loss_type, **_defaults(loss_type))
    if loss_type not in REFERENCE_FREE_LOSS_TYPES:
        kw["ld_alpha"] = 0.5
        if not loss_type.startswith("aot"):
            kw["use_weighting"] = True
    empty = loss_type != "orpo"
    loss, metrics, grads = _run(preference_loss, _pairs(100, torch.float32, empty=empty), **kw)
    want, want_metrics, want_grads = _run(naive_preference_loss, _pairs(100, empty=empty), **kw)
    assert loss.dtype == torch.float32 and grads[0].dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for got, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-6)
    for name, value in metrics.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), want_metrics[name], rtol=1e-5, atol=1e-5)


def test_bfloat16_logps_compute_in_float32():
    x = _pairs(110, torch.float32)
    c = x["chosen_logps"].bfloat16().requires_grad_()
    loss, metrics = preference_loss(
        c, x["rejected_logps"], x["ref_chosen_logps"], x["ref_rejected_logps"]
    )
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
    loss.backward()
    assert c.grad.dtype == torch.bfloat16


def _unpaired(seed, labels, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    lp = -30 * torch.rand(n, generator=g, dtype=torch.float64)
    ref = lp + 3 * torch.randn(n, generator=g, dtype=torch.float64)
    kl = -30 * torch.rand(5, generator=g, dtype=torch.float64)
    ref_kl = kl - 1 + 2 * torch.randn(5, generator=g, dtype=torch.float64)
    cast = lambda x: x.to(dtype)
    return cast(lp), cast(ref), torch.tensor(labels), cast(kl), cast(ref_kl)


KTO_LABELS = [[1, 0, 1, 1, 0, 0], [True] * 4, [0] * 3, [1]]


@pytest.mark.parametrize("labels", KTO_LABELS)
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.5)])
@pytest.mark.parametrize("kl_shift", [0.0, -10.0])
def test_kto_matches_oracle(labels, loss_type, weights, kl_shift):
    lp, ref, lab, kl, ref_kl = _unpaired(KTO_LABELS.index(labels), labels)
    kw = dict(loss_type=loss_type, beta=0.3, desirable_weight=weights[0])
    kw["undesirable_weight"] = weights[1]
    if loss_type == "kto":
        kw.update(kl_logps=kl, ref_kl_logps=ref_kl - kl_shift)  # -10: KL clamped to 0
    outs = []
    for fn in (kto_loss, naive_kto_loss):
        x = lp.clone().requires_grad_()
        loss, metrics = fn(x, ref, lab, **kw)
        outs.append((loss, metrics, torch.autograd.grad(loss, x)[0]))
    (loss, metrics, grad), (want, want_metrics, want_grad) = outs
    torch.testing.assert_close(loss, want, **TOL64)
    torch.testing.assert_close(grad, want_grad, **TOL64)
    assert set(metrics) == set(want_metrics)
    for name in metrics:  # NaN where the batch has no row of the kind, as the oracle
        torch.testing.assert_close(
            metrics[name], want_metrics[name], **TOL64, equal_nan=True, msg=name
        )
    if len(set(labels)) == 1:
        kind = "rejected" if labels[0] else "chosen"
        assert metrics[f"rewards/{kind}"].isnan() and metrics["rewards/margins"].isnan()
    if kl_shift and loss_type == "kto":
        assert metrics["kl"] == 0


def test_kto_float32_and_closed_form():
    lp, ref, lab, kl, ref_kl = _unpaired(5, [1, 0, 1], torch.float32)
    loss, metrics = kto_loss(lp, lp, lab, kl_logps=kl, ref_kl_logps=kl)
    # policy == reference and KL 0: every row's loss is 1 - sigmoid(0) = 0.5
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(0.5))
    assert metrics["kl"] == 0 and metrics["rewards/margins"] == 0


# --------------------------------------------------------------------------- LD split


@pytest.mark.parametrize("seed", range(3))
def test_ld_tail_logps_matches_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    Bp, T = 5, 11
    logps = -torch.rand(2 * Bp, T, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(2 * Bp, T, generator=g) < 0.6  # scattered, not contiguous
    mask[0] = False  # an empty completion: the whole partner is tail
    mask[Bp + 1] = mask[1]  # equal masks: no tail
    x = logps.clone().requires_grad_()
    tails = ld_tail_logps(x, mask.long())
    want = naive_ld_tail_logps(logps, mask)
    for got, w in zip(tails, want, strict=True):
        assert got.shape == (Bp,)
        torch.testing.assert_close(got, w, **TOL64)
    assert tails[0][1] == 0 and tails[1][1] == 0
    (tails[0].sum() + 2 * tails[1].sum()).backward()
    # gradient 1 (chosen) or 2 (rejected) on tail tokens, 0 elsewhere
    for row in range(2 * Bp):
        toks = mask[row].nonzero().flatten().tolist()
        pair = row % Bp
        shared = min(int(mask[pair].sum()), int(mask[pair + Bp].sum()))
        expect = torch.zeros(T, dtype=torch.float64)
        expect[toks[shared:]] = 1.0 if row < Bp else 2.0
        torch.testing.assert_close(x.grad[row], expect)


def test_ld_alpha_one_is_plain_dpo_and_zero_drops_the_tail():
    x = _pairs(120)
    refs = (x["ref_chosen_logps"], x["ref_rejected_logps"])
    tails = {k: x[k] for k in x if "tail" in k}
    plain, _ = preference_loss(x["chosen_logps"], x["rejected_logps"], *refs)
    one, _ = preference_loss(x["chosen_logps"], x["rejected_logps"], *refs, ld_alpha=1.0, **tails)
    torch.testing.assert_close(one, plain, **TOL64)
    zero, _ = preference_loss(x["chosen_logps"], x["rejected_logps"], *refs, ld_alpha=0.0, **tails)
    shared = [
        x[k] - x[k.replace("logps", "tail_logps")] for k in ("chosen_logps", "rejected_logps")
    ]
    ref_shared = [
        x[k] - x[k.replace("logps", "tail_logps")]
        for k in ("ref_chosen_logps", "ref_rejected_logps")
    ]
    want, _ = preference_loss(*shared, *ref_shared)
    torch.testing.assert_close(zero, want, **TOL64)


# --------------------------------------------------------------------------- closed forms


def test_dpo_closed_forms():
    c = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-4.0, -2.0], dtype=torch.float64)
    rc = torch.tensor([-3.5, -4.0], dtype=torch.float64)
    rr = torch.tensor([-4.0, -2.5], dtype=torch.float64)
    loss, m = preference_loss(c, r, rc, rr, beta=0.5)
    z = 0.5 * torch.tensor([0.5 - 0.0, -1.0 - 0.5], dtype=torch.float64)
    torch.testing.assert_close(loss, torch.nn.functional.softplus(-z).mean())
    (g,) = torch.autograd.grad(loss, c)
    torch.testing.assert_close(g, -0.5 * torch.sigmoid(-z) / 2)  # d/dc of mean softplus(-z)
    torch.testing.assert_close(m["rewards/chosen"], torch.tensor(0.5 * (0.5 - 1.0) / 2).double())
    torch.testing.assert_close(m["rewards/accuracies"], torch.tensor(0.5).double())
    torch.testing.assert_close(m["rewards/margins"], z.mean())
    torch.testing.assert_close(m["logps/chosen"], torch.tensor(-4.0).double())
    # policy == reference: every sigmoid-family loss is log 2 and the rewards 0
    loss0, m0 = preference_loss(rc, rr, rc, rr)
    torch.testing.assert_close(loss0, torch.tensor(math.log(2)).double())
    assert m0["rewards/accuracies"] == 0 and m0["rewards/margins"] == 0


def test_options_that_reduce_to_dpo():
    x = _pairs(130)
    args = [
        x[k] for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    ]
    plain, _ = preference_loss(*args)
    same = x["chosen_lengths"]
    for kw in [
        dict(rdpo_alpha=0.3, chosen_lengths=same, rejected_lengths=same),  # equal lengths
        dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
        dict(loss_type=["sigmoid"], loss_weights=[1.0]),
        dict(
            use_weighting=True,  # aligned log-probs 0: weights 1
            chosen_aligned_logps=torch.zeros(B, dtype=torch.float64),
            rejected_aligned_logps=torch.zeros(B, dtype=torch.float64),
            chosen_lengths=same,
            rejected_lengths=same,
        ),
    ]:
        got, _ = preference_loss(*args, **kw)
        torch.testing.assert_close(got, plain, **TOL64)
    # DPOP is inactive where the chosen log-prob is above the reference's
    up = [args[0].clone(), args[1], args[0] - 1.0, args[3]]
    torch.testing.assert_close(preference_loss(*up, dpop_lambda=9.0)[0], preference_loss(*up)[0])
    # cDPO with eps: (1 - eps) DPO(z) + eps DPO(-z)
    flip = [args[1], args[0], args[3], args[2]]
    eps = 0.2
    want = (1 - eps) * plain + eps * preference_loss(*flip)[0]
    torch.testing.assert_close(preference_loss(*args, label_smoothing=eps)[0], want, **TOL64)


def test_simpo_closed_form():
    c, r = torch.tensor([-6.0]), torch.tensor([-9.0])
    n_c, n_r = torch.tensor([3]), torch.tensor([3])
    loss, m = preference_loss(
        c,
        r,
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.5,
        cpo_alpha=0.0,
        chosen_lengths=n_c,
        rejected_lengths=n_r,
    )
    # -log sigmoid(beta * (-2 - (-3)) - gamma)
    torch.testing.assert_close(loss, torch.nn.functional.softplus(torch.tensor(-1.5)))
    torch.testing.assert_close(m["logps/chosen"], torch.tensor(-2.0))
    torch.testing.assert_close(m["rewards/margins"], torch.tensor(2.0))


# --------------------------------------------------------------------------- bad input


def _z(n=B):
    return torch.zeros(n)


BAD = [
    (dict(loss_type="dpo"), ValueError, r"loss_type must be one of .*'dpo'"),
    (dict(loss_type=["sigmoid", "nope"]), ValueError, "'nope'"),
    (dict(loss_type=[]), ValueError, "at least one"),
    (dict(loss_type=3), TypeError, "loss_type must be a str"),
    (dict(loss_type=["sigmoid", "sigmoid"]), ValueError, "repeat"),
    (dict(loss_type=["sigmoid", "simpo"]), ValueError, "'simpo' is a reference-free"),
    (dict(label_smoothing=0.5), ValueError, r"label_smoothing must be in \[0, 0.5\), got 0.5"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 0.5\), got -0.1"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a number"),
    (dict(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing=0.1 has no effect"),
    (dict(loss_type="exo_pair"), ValueError, "exo_pair.*label_smoothing > 0"),
    (dict(beta=0.0), ValueError, "beta must be finite and > 0"),
    (dict(beta=-0.1), ValueError, r"beta must be finite and > 0.0, got -0.1"),
    (dict(beta=float("nan")), ValueError, "beta must be finite"),
    (dict(beta=True), TypeError, "beta must be a number"),
    (dict(f_divergence_type="kl"), ValueError, "f_divergence_type must be one of"),
    (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), ValueError, "'bco_pair'"),
    (dict(f_alpha_divergence_coef=0.3), ValueError, "f_alpha_divergence_coef=0.3 is for"),
    (dict(discopop_tau=0.1), ValueError, "discopop_tau=0.1 is for loss_type='discopop'"),
    (dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau must be"),
    (dict(loss_weights=[1.0, 2.0]), ValueError, "loss_weights must have one weight"),
    (dict(loss_weights=["a"]), TypeError, r"loss_weights\[0\] must be a number"),
    (dict(loss_weights=1.0), TypeError, "loss_weights must be a sequence"),
    (dict(loss_type="hinge", rdpo_alpha=0.1), ValueError, "rdpo_alpha=0.1 is R-DPO's"),
    (dict(loss_type="ipo", dpop_lambda=1.0), ValueError, "dpop_lambda=1.0 is DPOP's"),
    (dict(dpop_lambda=-1.0), ValueError, "dpop_lambda must be finite and >= 0"),
    (dict(rdpo_alpha=0.1), ValueError, "rdpo_alpha=0.1 needs chosen_lengths"),
    (dict(loss_type="ipo"), ValueError, "loss_type='ipo' needs chosen_lengths"),
    (dict(loss_type="sft"), ValueError, "NLL term.*needs chosen_lengths"),
    (dict(alpha=0.5), ValueError, "alpha=0.5 is AlphaPO's"),
    (dict(cpo_alpha=1.0), ValueError, "cpo_alpha=1.0 is for the CPO loss types"),
    (dict(simpo_gamma=0.5), ValueError, "simpo_gamma=0.5 is SimPO's"),
    (dict(nll=torch.tensor(1.0)), ValueError, "nll is for loss types with an NLL term"),
    (dict(use_weighting=True), ValueError, "needs chosen_aligned_logps"),
    (dict(use_weighting=1), TypeError, "use_weighting must be a bool"),
    (dict(chosen_aligned_logps=_z()), ValueError, "needs use_weighting=True"),
    (dict(loss_type="aot", use_weighting=True), ValueError, "cannot weight 'aot'"),
    (dict(ld_alpha=0.5), ValueError, "ld_alpha=0.5 needs chosen_tail_logps"),
    (dict(ld_alpha=1.5), ValueError, r"ld_alpha must be finite and >= 0.0 and <= 1.0, got 1.5"),
    (dict(chosen_tail_logps=_z()), ValueError, "chosen_tail_logps is for LD-DPO"),
    (dict(chosen_lengths=torch.tensor([1] * (B - 1) + [-1])), ValueError, "got value -1"),
    (
        dict(chosen_lengths=torch.ones(B, dtype=torch.bool)),
        TypeError,
        "chosen_lengths must be a real",
    ),
    (
        dict(chosen_lengths=torch.ones(B + 1)),
        ValueError,
        r"chosen_lengths must have shape \[B\]=\(7,\)",
    ),
]


@pytest.mark.parametrize("kw,error,match", BAD)
def test_bad_options(kw, error, match):
    z = _z()
    with pytest.raises(error, match=match):
        preference_loss(z, z, z, z, **kw)


def test_bad_tensors():
    z, z6 = _z(), _z(B - 1)
    with pytest.raises(ValueError, match=r"same shape \[B\], got \(7,\) and \(6,\)"):
        preference_loss(z, z6, z, z6)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \[B\]=\(7,\)"):
        preference_loss(z, z, z6, z)
    with pytest.raises(ValueError, match=r"chosen_logps must have shape \[B\], got \(7, 1\)"):
        preference_loss(z[:, None], z, z, z)
    with pytest.raises(TypeError, match="chosen_logps must be a floating-point tensor"):
        preference_loss(torch.zeros(B, dtype=torch.long), z, z, z)
    with pytest.raises(TypeError, match="rejected_logps must be a torch.Tensor"):
        preference_loss(z, [0.0] * B, z, z)
    with pytest.raises(ValueError, match="at least one pair"):
        preference_loss(_z(0), _z(0), _z(0), _z(0))
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        preference_loss(z, z)
    with pytest.raises(ValueError, match="ref_chosen_logps was given without its pair"):
        preference_loss(z, z, z)
    for t in REFERENCE_FREE_LOSS_TYPES:
        with pytest.raises(ValueError, match=f"loss_type='{t}' is reference-free"):
            preference_loss(z, z, z, z, loss_type=t)
    with pytest.raises(ValueError, match="nll must be a 0-d"):
        preference_loss(z, z, loss_type="cpo", nll=torch.zeros(2))
    with pytest.raises(ValueError, match="ld_alpha=0.5 \\(LD-DPO\\) is for DPO loss types"):
        preference_loss(z, z, loss_type="cpo", chosen_lengths=z, ld_alpha=0.5)
    with pytest.raises(ValueError, match="loss_type='orpo'.*needs chosen_lengths"):
        preference_loss(z, z, loss_type="orpo")


def test_kto_bad_input():
    lp, lab = torch.zeros(4), torch.tensor([1, 0, 1, 1])
    kl = dict(kl_logps=torch.zeros(3), ref_kl_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="loss_type must be one of"):
        kto_loss(lp, lp, lab, loss_type="sigmoid", **kl)
    with pytest.raises(ValueError, match="pass kl_logps"):
        kto_loss(lp, lp, lab)
    with pytest.raises(ValueError, match="has no KL term: kl_logps must be None"):
        kto_loss(lp, lp, lab, loss_type="apo_zero_unpaired", **kl)
    with pytest.raises(
        ValueError, match="labels must be boolean or hold only 0 and 1, got value 2"
    ):
        kto_loss(lp, lp, torch.tensor([1, 2, 0, 0]), **kl)
    with pytest.raises(ValueError, match=r"labels must have shape \[B\]=\(4,\)"):
        kto_loss(lp, lp, lab[:3], **kl)
    with pytest.raises(ValueError, match=r"ref_logps must have shape \[B\]=\(4,\) like logps"):
        kto_loss(lp, lp[:3], lab, **kl)
    with pytest.raises(
        ValueError, match=r"ref_kl_logps must have shape \[B\]=\(3,\) like kl_logps"
    ):
        kto_loss(lp, lp, lab, kl_logps=torch.zeros(3), ref_kl_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="desirable_weight must be finite and >= 0"):
        kto_loss(lp, lp, lab, desirable_weight=-1.0, **kl)
    with pytest.raises(TypeError, match="logps must be a floating-point tensor"):
        kto_loss(lab, lp, lab, **kl)


def test_ld_tail_logps_bad_input():
    with pytest.raises(ValueError, match="even number of rows"):
        ld_tail_logps(torch.zeros(3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"must both be \[2B, T\]"):
        ld_tail_logps(torch.zeros(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ld_tail_logps(torch.zeros(2, 4), torch.full((2, 4), 2))
    with pytest.raises(TypeError, match="logps must be a floating-point tensor"):
        ld_tail_logps(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))


def test_orpo_beta_may_be_zero_but_not_negative():
    z, n = _z(), torch.ones(B)
    kw = dict(loss_type="orpo", chosen_lengths=n, rejected_lengths=n)
    preference_loss(z - 1, z - 1, beta=0.0, **kw)  # the NLL term alone
    with pytest.raises(ValueError, match=r"beta must be finite and >= 0.0, got -0.1"):
        preference_loss(z - 1, z - 1, beta=-0.1, **kw)


def test_kto_reads_no_value_back():
    """No host synchronisation: on meta tensors, whose values cannot be read, it runs."""
    lp = torch.zeros(6, device="meta", requires_grad=True)
    lab = torch.ones(6, dtype=torch.long, device="meta")
    kl = torch.zeros(6, device="meta")
    loss, metrics = kto_loss(lp, lp.detach(), lab, kl_logps=kl, ref_kl_logps=kl)
    assert loss.device.type == "meta" and set(metrics) >= {"kl", "rewards/margins"}
