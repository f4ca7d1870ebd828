"""fastrl.integrations.liger against the installed Liger-Kernel (0.8.5) on CPU.

Liger's chunked losses are PyTorch (``compiled=False`` here: the same math without
torch.compile), so both run on the same fp32 inputs: odd shapes (V=101, a vocabulary tail
for every block size; B*T not a block multiple), ignored / masked positions, a bias.
Asserted: the loss, every metric / aux output Liger returns, and the gradients w.r.t. the
hidden states, the lm_head weight and its bias; the reference model's inputs get none.

Tolerance: both compute fp32 log-softmaxes of the same logits in different orders
(Liger: whole-vocabulary rows; fastrl: vocabulary blocks with an online logsumexp), so
values agree to a few fp32 ulps of the tensor's scale: ``rtol=2e-5`` and ``atol=2e-6 *
max(1, max|Liger's|)`` for losses, metrics and gradients. (A weight gradient is a sum over
tokens: with entries up to ~10 both sit ~1e-5 from a float64 oracle, measured on the
cross-entropy case.)
"""

import pytest
import torch

liger = pytest.importorskip("liger_kernel")

from liger_kernel.chunked_loss import (  # noqa: E402
    LigerFusedLinearCPOLoss as LCPO,
)
from liger_kernel.chunked_loss import (  # noqa: E402
    LigerFusedLinearDPOLoss as LDPO,
)
from liger_kernel.chunked_loss import (  # noqa: E402
    LigerFusedLinearGRPOLoss as LGRPO,
)
from liger_kernel.chunked_loss import (  # noqa: E402
    LigerFusedLinearKTOLoss as LKTO,
)
from liger_kernel.chunked_loss import (  # noqa: E402
    LigerFusedLinearORPOLoss as LORPO,
)
from liger_kernel.chunked_loss import (  # noqa: E402
    LigerFusedLinearSimPOLoss as LSimPO,
)
from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as LCE  # noqa: E402

from fastrl.integrations import liger as F  # noqa: E402

RTOL, ATOL = 2e-5, 2e-6
D, V = 24, 101


def _close(got, want, what):
    atol = ATOL * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def _head(bias=True):
    w = (torch.randn(V, D) * 0.4).requires_grad_()
    b = (torch.randn(V) * 0.5).requires_grad_() if bias else None
    return w, b


def _leaves(*xs):
    return [x for x in xs if x is not None]


def _compare(run_liger, run_fastrl, leaves, *, detached=True):
    """Run both on fresh copies of `leaves`; compare outputs (metrics: `detached`, no
    gradient, as Liger's) and the leaves' gradients."""
    results = []
    for run in (run_liger, run_fastrl):
        copies = [x.detach().clone().requires_grad_(x.requires_grad) for x in leaves]
        loss, aux = run(*copies)
        loss.backward()
        results.append((loss, aux, [c.grad for c in copies]))
    (l_loss, l_aux, l_grads), (f_loss, f_aux, f_grads) = results
    _close(f_loss, l_loss, "loss")
    assert len(f_aux) == len(l_aux), (len(f_aux), len(l_aux))
    for i, (a, b) in enumerate(zip(f_aux, l_aux, strict=True)):
        _close(a.float(), torch.as_tensor(b).float(), f"output {i}")
        assert a.requires_grad != detached, f"output {i}"
    for i, (a, b) in enumerate(zip(f_grads, l_grads, strict=True)):
        if b is None:
            assert a is None, f"grad {i}: Liger gives none"
        else:
            _close(a, b, f"grad of leaf {i}")
    return results


# --------------------------------------------------------------------------- GRPO


def _grpo_batch(B=3, T=7, off_policy=True):
    h = torch.randn(B, T, D).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    adv = torch.tensor([1.0, -0.7, 0.4])[:B]
    w, b = _head()
    with torch.no_grad():
        true = torch.log_softmax(h @ w.T + b, -1).gather(-1, ids[..., None])[..., 0]
    old = (true + 0.3 * torch.randn(B, T)) if off_policy else None
    ref = true + 0.2 * torch.randn(B, T)
    return h, w, b, ids, mask, adv, old, ref


GRPO_CASES = {
    # name: (constructor kwargs, forward extras)
    "dapo": (dict(), {}),
    "dapo-num-items": (dict(), {"num_items_in_batch": 30}),
    "grpo": (dict(loss_type="grpo"), {}),
    "bnpo": (dict(loss_type="bnpo", epsilon_high=0.28), {}),
    "dr_grpo": (dict(loss_type="dr_grpo", max_completion_length=9), {}),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.2), {}),
    "sapo": (dict(loss_type="sapo"), {}),
    "delta": (dict(loss_type="grpo", delta=1.3), {}),
    "temperature": (dict(loss_type="bnpo", temperature=0.7), {}),
    "bias-corrected-kl": (dict(use_bias_correction_kl=True), {}),
    "seq-grpo": (dict(loss_type="grpo", importance_sampling_level="sequence"), {}),
    "seq-dapo": (dict(importance_sampling_level="sequence", use_bias_correction_kl=True), {}),
    "seq-luspo": (
        dict(
            loss_type="luspo", importance_sampling_level="sequence", beta=0.0, use_ref_model=False
        ),
        {},
    ),
    "vllm-token": (dict(loss_type="bnpo"), {"vllm_is_ratio": "token"}),
    "vllm-seq": (dict(loss_type="grpo"), {"vllm_is_ratio": "seq"}),
    "no-ref": (dict(beta=0.0, use_ref_model=False), {}),
    "no-ref-beta": (dict(beta=0.04, use_ref_model=False), {}),
    "on-policy": (dict(loss_type="grpo"), {"on_policy": True}),
    "vespo": (dict(loss_type="vespo"), {}),
    "vespo-options": (
        dict(
            loss_type="vespo",
            vespo_k_pos=1.5,
            vespo_lambda_pos=2.5,
            vespo_k_neg=2.0,
            vespo_lambda_neg=1.0,
            use_bias_correction_kl=True,
        ),
        {"num_items_in_batch": 30},
    ),  # fmt: skip
    # the sampler ratio goes into VESPO's weight, not onto the loss
    "vespo-vllm-token": (dict(loss_type="vespo"), {"vllm_is_ratio": "token"}),
    "vespo-vllm-seq": (dict(loss_type="vespo"), {"vllm_is_ratio": "seq"}),
    "vespo-vllm-seq-2d": (dict(loss_type="vespo"), {"vllm_is_ratio": "seq-2d"}),
    "vespo-vllm-on-policy": (
        dict(loss_type="vespo"),
        {"vllm_is_ratio": "token", "on_policy": True},
    ),
}


def _grpo_run(cls, kwargs, extras, ids, mask, adv, old, ref, ratio, ref_mode, impl):
    kw = dict(kwargs)
    if cls is F.LigerFusedLinearGRPOLoss:
        kw["impl"] = impl
    else:
        kw["compiled"] = False
    module = cls(**kw)

    def run(h, w, b, ref_h=None):
        fwd = dict(old_per_token_logps=old, vllm_is_ratio=ratio)
        if "num_items_in_batch" in extras:
            fwd["num_items_in_batch"] = extras["num_items_in_batch"]
        if module.use_ref_model:
            if ref_mode == "logps":
                fwd["ref_per_token_logps"] = ref
            else:
                fwd.update(ref_input=ref_h, ref_weight=w.detach() * 0.9, ref_bias=b.detach())
        return module(h, w, ids, mask, adv, bias=b, **fwd)

    return run


# every case with precomputed reference log-probs and with reference hidden states (once
# where there is no reference model)
GRPO_RUNS = [
    (case, ref_mode)
    for case, (kwargs, _) in GRPO_CASES.items()
    for ref_mode in (("logps", "input") if kwargs.get("use_ref_model", True) else ("none",))
]


def _vllm_ratio(kind, mask, *, vespo):
    """A sampler importance ratio of Liger's shapes (None for `kind` None)."""
    if kind is None:
        return None
    B, T = mask.shape
    if kind != "token":
        ratio = torch.rand(B) + 0.5
        return ratio[:, None] if kind == "seq-2d" else ratio
    if vespo:  # log-ratios summed over a row: near 1, so that the weight is not ~0
        ratio = torch.rand(B, T) * 0.6 + 0.7
        ratio[mask == 0] = 1.0  # as TRL's (Liger would sum them, fastrl refuses others)
    else:
        ratio = torch.rand(B, T) * 1.5
        ratio[2, 5] = 7.0  # a masked-out token: no effect on the loss
    assert mask[1].all()
    # a scored token with weight 0: the clip metric still uses the raw advantage (VESPO:
    # log 0 clamped to log 1e-8, the row's weight ~0)
    ratio[1, 2] = 0.0
    return ratio


@pytest.mark.parametrize("case, ref_mode", GRPO_RUNS, ids=["-".join(r) for r in GRPO_RUNS])
def test_grpo_matches_liger(case, ref_mode):
    kwargs, extras = GRPO_CASES[case]
    h, w, b, ids, mask, adv, old, ref = _grpo_batch(off_policy=not extras.get("on_policy"))
    ratio = _vllm_ratio(extras.get("vllm_is_ratio"), mask, vespo=kwargs.get("loss_type") == "vespo")
    ref_h = torch.randn_like(h).requires_grad_()
    leaves = [h, w, b, ref_h]
    args = (kwargs, extras, ids, mask, adv, old, ref, ratio, ref_mode, "torch")
    _, (_, aux, grads) = _compare(
        _grpo_run(LGRPO, *args), _grpo_run(F.LigerFusedLinearGRPOLoss, *args), leaves
    )
    assert grads[3] is None  # the reference hidden states get no gradient
    if case in ("dapo", "bnpo", "delta", "vllm-token"):
        assert aux[-1] > 0  # the clip metric is exercised


@pytest.mark.parametrize(
    "case", ["dapo", "grpo", "seq-grpo", "cispo", "vllm-token", "vespo", "vespo-vllm-token"]
)
def test_grpo_triton_matches_liger(case):
    """fastrl's Triton head (the single-pass kernel for token-level losses) under the
    interpreter."""
    kwargs, extras = GRPO_CASES[case]
    h, w, b, ids, mask, adv, old, ref = _grpo_batch()
    ratio = _vllm_ratio(extras.get("vllm_is_ratio"), mask, vespo=kwargs.get("loss_type") == "vespo")
    args = (kwargs, extras, ids, mask, adv, old, ref, ratio, "input", "triton")
    ref_h = torch.randn_like(h)
    _compare(
        _grpo_run(LGRPO, *(args[:-1] + ("torch",))),
        _grpo_run(F.LigerFusedLinearGRPOLoss, *args),
        [h, w, b, ref_h],
    )


def test_grpo_frozen_head_gets_no_gradient():
    h, w, b, ids, mask, adv, old, ref = _grpo_batch()
    w, b = w.detach(), b.detach()
    loss, _ = F.LigerFusedLinearGRPOLoss(impl="torch")(
        h, w, ids, mask, adv, bias=b, ref_per_token_logps=ref, old_per_token_logps=old
    )
    loss.backward()
    assert w.grad is None and h.grad is not None and h.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vespo_k_pos=3.0), "vespo_k_pos"),
        (dict(loss_type="grpo", vespo_lambda_neg=1.0), "vespo_lambda_neg"),
        (dict(loss_type="vespo", importance_sampling_level="sequence"), "Sequence-level"),
        (dict(loss_type="nope"), "loss_type"),
        (dict(loss_type="cispo", importance_sampling_level="sequence"), "Sequence-level"),
        (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
        (dict(delta=-1.0), "delta"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_grpo_refuses_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.LigerFusedLinearGRPOLoss(**kwargs)


def test_grpo_refuses_inputs():
    h, w, b, ids, mask, adv, old, ref = _grpo_batch()
    with pytest.raises(ValueError, match="ref_per_token_logps or ref_input"):
        F.LigerFusedLinearGRPOLoss()(h, w, ids, mask, adv)
    with pytest.raises(ValueError, match="use_ref_model=False"):
        F.LigerFusedLinearGRPOLoss(use_ref_model=False)(
            h, w, ids, mask, adv, ref_per_token_logps=ref
        )
    with pytest.raises(ValueError, match="luspo"):
        F.LigerFusedLinearGRPOLoss(loss_type="luspo", beta=0.0, use_ref_model=False)(
            h, w, ids, mask, adv
        )
    with pytest.raises(ValueError, match="vllm_is_ratio must have shape"):
        F.LigerFusedLinearGRPOLoss(use_ref_model=False)(
            h, w, ids, mask, adv, vllm_is_ratio=torch.ones(3, 2)
        )
    with pytest.raises(ValueError, match=">= 0"):
        F.LigerFusedLinearGRPOLoss(use_ref_model=False)(
            h, w, ids, mask, adv, vllm_is_ratio=-torch.ones(3)
        )
    for loss_type in ("dapo", "vespo"):
        with pytest.raises(ValueError, match=r">= 0 .*: -0\.5"):
            F.LigerFusedLinearGRPOLoss(loss_type=loss_type, use_ref_model=False)(
                h, w, ids, mask, adv, vllm_is_ratio=torch.tensor([1.0, -0.5, 1.0])
            )
    with pytest.raises(ValueError, match="delta"):  # Liger ignores it with vespo
        F.LigerFusedLinearGRPOLoss(loss_type="vespo", delta=1.5, use_ref_model=False)(
            h, w, ids, mask, adv
        )
    ratio = torch.ones(3, 7)
    ratio[0, 6] = 0.5  # masked out: Liger would sum its log into VESPO's weight
    with pytest.raises(ValueError, match="must be 1 at the masked-out positions.*; got 0.5"):
        F.LigerFusedLinearGRPOLoss(loss_type="vespo", use_ref_model=False)(
            h, w, ids, mask, adv, vllm_is_ratio=ratio
        )
    with pytest.raises(ValueError, match="max_completion_length"):
        F.LigerFusedLinearGRPOLoss(loss_type="dr_grpo", use_ref_model=False)(h, w, ids, mask, adv)
    with pytest.raises(ValueError, match="advantages must have shape"):
        F.LigerFusedLinearGRPOLoss(use_ref_model=False)(h, w, ids, mask, adv[:, None])
    with pytest.raises(ValueError, match=r"\[B, T, d\]"):
        F.LigerFusedLinearGRPOLoss(use_ref_model=False)(h[0], w, ids, mask, adv)
    with pytest.warns(UserWarning, match="Using ref_per_token_logps"):
        F.LigerFusedLinearGRPOLoss()(h, w, ids, mask, adv, ref_per_token_logps=ref, ref_input=h)


# --------------------------------------------------------------------------- preference


def _pref_batch(B=2, T=6, ignore_index=-100):
    h = torch.randn(2 * B, T, D).requires_grad_()
    target = torch.randint(0, V, (2 * B, T))
    target[:, :2] = ignore_index  # the prompt
    target[1, 5:] = ignore_index  # padding
    target[2, 4:] = ignore_index
    return h, target


def _pref_pair(liger_cls, fastrl_cls, kwargs, impl="torch", forward_kw=None):
    lmod = liger_cls(**kwargs, compiled=False)
    fmod = fastrl_cls(**kwargs, impl=impl)
    forward_kw = forward_kw or (lambda *a: {})

    def wrap(module):
        def run(h, w, b=None, *rest):
            return module(w, h, TARGET[0], b, **forward_kw(w, b, *rest))

        return run

    return wrap(lmod), wrap(fmod)


TARGET = [None]  # the target of the case being run (the wrappers read it)

DPO_CASES = {
    "sigmoid": dict(),
    "sigmoid-avg-nll": dict(average_log_prob=True, compute_nll_loss=True, alpha=0.5),
    "hinge": dict(loss_type="hinge"),
    "exo_pair": dict(loss_type="exo_pair", label_smoothing=1e-3),
    "nca_pair": dict(loss_type="nca_pair"),
    "robust": dict(loss_type="robust", label_smoothing=0.2),
    "bco_pair": dict(loss_type="bco_pair"),
    "sppo_hard": dict(loss_type="sppo_hard", beta=0.5),
    "apo_zero": dict(loss_type="apo_zero"),
    "apo_down": dict(loss_type="apo_down"),
    "discopop": dict(loss_type="discopop", discopop_tau=0.1),
    "no-ref": dict(use_ref_model=False),
}


@pytest.mark.parametrize("case", DPO_CASES, ids=str)
def test_dpo_matches_liger(case):
    kwargs = DPO_CASES[case]
    h, TARGET[0] = _pref_batch()
    w, b = _head()
    ref_h = torch.randn_like(h).requires_grad_()
    ref_w = (w.detach() + 0.05 * torch.randn(V, D)).requires_grad_()
    use_ref = kwargs.get("use_ref_model", True)

    def fwd(w, b, ref_h, ref_w):
        return dict(ref_input=ref_h, ref_weight=ref_w, ref_bias=b.detach()) if use_ref else {}

    runs = _pref_pair(LDPO, F.LigerFusedLinearDPOLoss, kwargs, forward_kw=fwd)
    _, (_, _, grads) = _compare(*runs, [h, w, b, ref_h, ref_w])
    assert grads[3] is None and grads[4] is None  # the reference model gets no gradient


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("cpo", dict()),
        ("cpo", dict(average_log_prob=True, label_smoothing=0.1, alpha=0.3)),
        ("cpo", dict(compute_nll_loss=False)),
        ("simpo", dict()),
        ("simpo", dict(gamma=0.2, beta=2.0, label_smoothing=0.1, compute_nll_loss=False)),
        ("orpo", dict()),
        ("orpo", dict(beta=0.5, compute_nll_loss=False)),
    ],
)
def test_reference_free_match_liger(name, kwargs):
    classes = {
        "cpo": (LCPO, F.LigerFusedLinearCPOLoss),
        "simpo": (LSimPO, F.LigerFusedLinearSimPOLoss),
        "orpo": (LORPO, F.LigerFusedLinearORPOLoss),
    }[name]
    h, TARGET[0] = _pref_batch()
    w, b = _head()
    _compare(*_pref_pair(*classes, kwargs), [h, w, b])


def test_orpo_nll_target_matches_liger():
    h, TARGET[0] = _pref_batch()
    nll_target = torch.randint(0, V, TARGET[0].shape)
    nll_target[0, 0] = -100
    w, b = _head()
    runs = _pref_pair(
        LORPO, F.LigerFusedLinearORPOLoss, {}, forward_kw=lambda w, b: {"nll_target": nll_target}
    )
    _compare(*runs, [h, w, b])


@pytest.mark.parametrize("name", ["dpo", "simpo"])
def test_preference_triton_matches_liger(name):
    h, TARGET[0] = _pref_batch()
    w, b = _head()
    if name == "dpo":
        kwargs = dict(use_ref_model=False, compute_nll_loss=True)
        runs = _pref_pair(LDPO, F.LigerFusedLinearDPOLoss, kwargs, impl="triton")
    else:
        runs = _pref_pair(LSimPO, F.LigerFusedLinearSimPOLoss, {}, impl="triton")
    _compare(*runs, [h, w, b])


def test_preference_custom_ignore_index_and_no_bias():
    h, TARGET[0] = _pref_batch(ignore_index=-1)
    w, _ = _head(bias=False)
    kwargs = dict(ignore_index=-1, use_ref_model=False, compute_nll_loss=True)
    runs = _pref_pair(LDPO, F.LigerFusedLinearDPOLoss, kwargs)
    _compare(*runs, [h, w])


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (F.LigerFusedLinearDPOLoss, dict(loss_type="ipo"), "Unsupported loss_type"),
        (F.LigerFusedLinearDPOLoss, dict(label_smoothing=0.1), "label_smoothing"),
        (F.LigerFusedLinearDPOLoss, dict(loss_type="hinge", discopop_tau=0.2), "discopop_tau"),
        (F.LigerFusedLinearDPOLoss, dict(loss_type="exo_pair"), "label_smoothing must be > 0"),
        (F.LigerFusedLinearDPOLoss, dict(loss_type="robust", label_smoothing=0.6), "robust"),
        (F.LigerFusedLinearCPOLoss, dict(chunk_size=0), "chunk_size"),
        (F.LigerFusedLinearORPOLoss, dict(impl="gpu"), "impl"),
    ],
)
def test_preference_refuses_options(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_preference_refuses_inputs():
    h, target = _pref_batch()
    w, b = _head()
    with pytest.raises(ValueError, match="ref_input"):
        F.LigerFusedLinearDPOLoss()(w, h, target)
    with pytest.raises(ValueError, match="use_ref_model=False"):
        F.LigerFusedLinearDPOLoss(use_ref_model=False)(w, h, target, ref_input=h)
    with pytest.raises(ValueError, match="odd row count"):
        F.LigerFusedLinearCPOLoss()(w, h[:3], target[:3])
    with pytest.raises(ValueError, match="nll_target"):
        F.LigerFusedLinearORPOLoss()(w, h, target, nll_target=target[:, :3])
    with pytest.raises(ValueError, match="weight must have shape"):
        F.LigerFusedLinearSimPOLoss()(w[:, :5], h, target)


# --------------------------------------------------------------------------- KTO


@pytest.mark.parametrize(
    "kwargs, kl",
    [
        (dict(), None),
        (dict(use_ref_model=True), None),
        (dict(use_ref_model=True, average_log_prob=True, beta=0.5), 0.3),
        (dict(), torch.tensor(0.2)),
    ],
)
def test_kto_matches_liger(kwargs, kl):
    h, target = _pref_batch()
    labels = torch.tensor([True, False, True, False])
    w, b = _head()
    ref_h = torch.randn_like(h).requires_grad_()
    use_ref = kwargs.get("use_ref_model", False)

    def wrap(module):
        def run(h, w, b, ref_h):
            extra = (
                dict(ref_input=ref_h, ref_weight=w.detach(), ref_bias=b.detach()) if use_ref else {}
            )
            return module(h, w, target, b, preference_labels=labels, kl=kl, **extra)

        return run

    runs = wrap(LKTO(**kwargs, compiled=False)), wrap(F.LigerFusedLinearKTOLoss(**kwargs))
    _, (_, _, grads) = _compare(*runs, [h, w, b, ref_h])
    assert grads[3] is None


def test_kto_refuses_inputs():
    h, target = _pref_batch()
    w, b = _head()
    labels = torch.tensor([True, False, True, False])
    kto = F.LigerFusedLinearKTOLoss()
    with pytest.raises(ValueError, match="preference_labels"):
        kto(h, w, target)
    with pytest.raises(ValueError, match="kl must be one number"):
        kto(h, w, target, preference_labels=labels, kl=torch.ones(4))
    with pytest.raises(ValueError, match="kl must be >= 0"):
        kto(h, w, target, preference_labels=labels, kl=-0.1)
    with pytest.raises(ValueError, match="ref_input"):
        F.LigerFusedLinearKTOLoss(use_ref_model=True)(h, w, target, preference_labels=labels)


# --------------------------------------------------------------------------- CE


@pytest.mark.parametrize("selected", [False, True], ids=["", "selected"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_scaled_cross_entropy_matches_liger(impl, return_entropy, temperature, selected):
    M = 37
    w, _ = _head(bias=False)
    h = torch.randn(M, D).requires_grad_()
    target = torch.randint(0, V, (M,))
    target[[3, 20, 36]] = -100
    sel = torch.tensor([5, 0, 100, 5, 42]) if selected else None  # a duplicate, both ends
    g = torch.randn(3, M)
    g_sel = torch.randn(M, 5)

    def wrap(fn, **kw):
        def run(h, w):
            out = fn(h, w, target, temperature, -100, 1, return_entropy, sel, **kw)
            outs = out if isinstance(out, tuple) else (out,)
            assert len(outs) == 1 + return_entropy + selected
            # a weighted sum reaches every output's gradient
            loss = sum(
                (o.float() * (g_sel if o.dim() == 2 else g[i])).sum() for i, o in enumerate(outs)
            )
            return loss, outs

        return run

    fastrl_apply = F.LigerFusedLinearScaledCrossEntropyFunction.apply
    _, (_, outs, _) = _compare(
        wrap(LCE.apply), wrap(fastrl_apply, impl=impl), [h, w], detached=False
    )
    assert (outs[0][[3, 20, 36]] == 0).all()
    if selected:
        assert (outs[-1][[3, 20, 36]] == 0).all() and outs[-1].shape == (M, 5)


def test_scaled_cross_entropy_refuses():
    apply = F.LigerFusedLinearScaledCrossEntropyFunction.apply
    h, (w, _), t = torch.randn(5, D), _head(bias=False), torch.randint(0, V, (5,))
    with pytest.raises(ValueError, match="selected_token_ids must be in"):
        apply(h, w, t, selected_token_ids=torch.tensor([1, V]))
    with pytest.raises(TypeError, match="selected_token_ids must be an int64"):
        apply(h, w, t, selected_token_ids=torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="temperature"):
        apply(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="m_tiles_per_cluster"):
        apply(h, w, t, m_tiles_per_cluster=0)
    with pytest.raises(TypeError, match="int64"):
        apply(h, w, t.int())
    with pytest.raises(ValueError, match="incompatible"):
        apply(h, w, t[:4])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scaled_cross_entropy_selected_in_bf16_is_the_target_logp(temperature):
    """bf16 inputs: ``selected`` at the target id is ``-nll``. Both come from fp32 logits
    (the head accumulates in fp32): a bf16 ``z_target`` would be off by ~|z| 2^-9 (logits
    of ~40 here, ~0.1)."""
    M = 37
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(V, D, generator=g) * 1.5).bfloat16()
    h = (torch.randn(M, D, generator=g) * 1.5).bfloat16()
    target = torch.randint(0, V, (M,), generator=g)
    target[[4, 30]] = -100
    apply = F.LigerFusedLinearScaledCrossEntropyFunction.apply
    nll, selected = apply(
        h, w, target, temperature, selected_token_ids=torch.arange(V), impl="torch"
    )
    assert (h.float() @ w.float().T).abs().max() > 20  # large logits: bf16 rounding shows
    valid = target != -100
    at_target = selected[valid].gather(1, target[valid, None])[:, 0]
    # fp32 rounding of logits of ~40 and of the logsumexp (a few ulps of 40)
    torch.testing.assert_close(at_target, -nll[valid], rtol=0, atol=2e-5)
    assert (selected[~valid] == 0).all()
