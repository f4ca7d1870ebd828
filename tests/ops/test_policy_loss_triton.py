"""`policy_loss(..., impl="triton")`: the per-token Triton kernel against the float64 oracle.

On a CPU the kernel runs in the Triton interpreter (fp32, fp16; bf16 only on a GPU). Shapes
are odd (B=5, T=37: several token blocks per row with a ragged tail), with a fully masked
row, a one-token row, and inf/NaN garbage at masked positions that must not leak.
"""

import itertools

import pytest
import torch

from fastrl import policy_loss
from fastrl.ops.policy.naive import naive_policy_loss
from fastrl.ops.policy.terms import kl_estimate, per_token_terms
from fastrl.ops.policy.vespo import gamma_weights
from fastrl.options.policy import APPLIES_TO, LOSS_TYPES, PolicyLossOptions
from tests.support import DEVICE, HAS_CUDA

B, T = 5, 37
CLIPPED = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]
BASE = dict(max_completion_length=40, num_items_in_batch=70, epsilon_high=0.28)
TOL = dict(rtol=1e-5, atol=1e-6)


def _inputs(seed, adv_shape="B", dtype=torch.float32, b=B, t=T, lengths=(37, 20, 0, 1, 30)):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(b, t, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, n:] = 0
    shift = 0.4 * torch.randn(b, 1, generator=g, dtype=torch.float64)
    old = lp - shift - 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    samp = old + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    samp[0, 3] = float("nan")  # a token the sampler could not score
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    if adv_shape == "B":
        adv = torch.randn(b, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    # keep every ratio clear of the clip bounds and delta, where the gradient jumps: fp32
    # and float64 (or two exp implementations) could land on different sides
    cast = lambda x: x.to(device=DEVICE, dtype=dtype)
    r = torch.exp(cast(lp).double() - cast(old).double())
    near = sum((r - c).abs() < 1e-4 for c in (0.8, 1.28, 1.5, 0.95, 1.1, 0.28))
    old = torch.where(near.cpu() > 0, lp, old)
    # garbage at masked positions must not matter
    lp = lp.masked_fill(mask == 0, float("-inf"))
    old = old.masked_fill(mask == 0, float("nan"))
    ref = ref.masked_fill(mask == 0, float("inf"))
    return dict(
        logps=cast(lp),
        old_logps=cast(old),
        advantages=cast(adv),
        mask=mask.to(DEVICE),
        ref_logps=cast(ref),
        sampling_logps=cast(samp),
        entropy=cast(ent),
    )


def _run(fn, x, oracle=False, **kw):
    """Loss, metrics and d loss / d logps; the oracle gets the same values in float64."""
    cast = (lambda v: v.double().cpu()) if oracle else (lambda v: v)
    lp = cast(x["logps"]).clone().requires_grad_()
    opts = {**BASE, **kw}
    for name in ("ref_logps", "sampling_logps", "entropy"):
        if isinstance(opts.get(name), torch.Tensor):
            opts[name] = cast(opts[name])
    old = opts.pop("old_logps", x["old_logps"])
    old = None if old is None else cast(old)
    mask = x["mask"].cpu() if oracle else x["mask"]
    loss, metrics = fn(lp, old, cast(x["advantages"]), mask, **opts)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, metrics, grad


def _check(x, grad_tol=TOL, **kw):
    loss, metrics, grad = _run(policy_loss, x, impl="triton", **kw)
    want_loss, want_metrics, want_grad = _run(naive_policy_loss, x, oracle=True, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == x["logps"].dtype
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double().cpu(), want_loss, **TOL)
    torch.testing.assert_close(grad.double().cpu(), want_grad, **grad_tol)
    masked = x["mask"] == 0
    assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))
    assert set(metrics) == set(want_metrics)
    for name in metrics:
        assert metrics[name].dim() == 0 and not metrics[name].requires_grad, name
        torch.testing.assert_close(
            metrics[name].double().cpu(), want_metrics[name], equal_nan=True, msg=name, **TOL
        )
    return loss, metrics, grad


GRID = [
    (loss_type, beta, delta)
    for loss_type, beta, delta in itertools.product(LOSS_TYPES, [0.0, 0.04], [None, 1.5])
    if delta is None or loss_type in CLIPPED
]


@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("loss_type,beta,delta", GRID, ids=[f"{a}-b{b}-d{c}" for a, b, c in GRID])
def test_matches_oracle(loss_type, beta, delta, adv_shape, nan_empty):
    x = _inputs(GRID.index((loss_type, beta, delta)), adv_shape)
    _check(x, loss_type=loss_type, beta=beta, delta=delta, ref_logps=x["ref_logps"])


OPTIONS = {
    # on-policy every ratio is exactly 1: on the clip bounds and delta, where PyTorch's
    # subgradients (clamp passes on its bounds, minimum splits ties) decide
    "on_policy_on_the_bounds": dict(old_logps=None, epsilon=0.0, epsilon_high=0.0, delta=1.0),
    "on_policy_k2_nobias": dict(
        old_logps=None, beta=0.1, kl_estimator="k2", use_bias_correction_kl=False
    ),
    "k1_ga_tight_clip": dict(
        beta=0.1,
        kl_estimator="k1",
        epsilon=0.05,
        epsilon_high=0.1,
        gradient_accumulation_steps=3,
        steps_per_generation=2,
    ),
    "sampling_token_truncate_entropy": dict(
        sampling_correction="token_truncate",
        sampling_clip_min=0.8,
        sampling_clip_max=1.2,
        top_entropy_quantile=0.4,
        entropy_coef=0.02,
    ),
    "sampling_sequence_mask_opsm": dict(
        sampling_correction="sequence_mask",
        sampling_clip_max=1.5,
        off_policy_mask_threshold=0.05,
        beta=0.02,
        sapo_temperature_pos=0.5,
        sapo_temperature_neg=2.0,
    ),
}


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_options_on_top_of_the_kernel_match_oracle(loss_type, options):
    # the sampler correction, off-policy and entropy masks, GA scaling and the
    # normalisers act in PyTorch on the kernel's per-token terms
    x = _inputs(100 + LOSS_TYPES.index(loss_type), "BT" if "k1" in options else "B")
    kw = dict(OPTIONS[options], loss_type=loss_type)
    for rule in APPLIES_TO:  # the option sets' loss-type-specific options, where they apply
        if loss_type not in rule.loss_types:
            kw.pop(rule.option, None)
    for name in ("ref_logps", "sampling_logps", "entropy"):
        kw[name] = x[name]
    if "sampling_correction" not in kw:
        kw["sampling_correction"] = None
    if loss_type == "vespo" and (kw["sampling_correction"] or "").startswith("sequence"):
        kw["sampling_correction"] = "token_mask"  # vespo refuses a sequence-level one (TRL)
    _check(x, **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_per_token_outputs_match_the_torch_terms(loss_type):
    # the launcher itself, on strided views, a float mask and broadcast advantages,
    # against `per_token_terms` / `kl_estimate` at every position (masked ones included)
    from fastrl.kernels.policy_loss import TokenTermParams, policy_loss_bwd, policy_loss_fwd

    x = _inputs(7, "B")
    wide = lambda v: torch.cat([v, torch.randn_like(v[:, :3])], 1)[:, :T]  # row stride T+3
    lp, old, ref = wide(x["logps"]), wide(x["old_logps"]), wide(x["ref_logps"])
    keep = x["mask"].bool()
    adv = x["advantages"][:, None].expand(B, T)  # token stride 0
    delta = 1.5 if loss_type in CLIPPED else None
    opts = PolicyLossOptions(
        loss_type=loss_type,
        epsilon=0.2,
        epsilon_high=0.28,
        delta=delta,
        kl_estimator="k3",
        use_bias_correction_kl=True,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
    )
    phi = None
    if loss_type == "vespo":  # the kernel takes phi * A (phi: a row reduction, in PyTorch)
        c = lambda v: torch.where(keep, v, 0.0)
        phi = gamma_weights(opts, c(lp) - c(old), c(adv), keep.float(), None)
    pt, kl, ratio, d_pt, d_kl = policy_loss_fwd(
        lp,
        old,
        adv if phi is None else adv * phi,
        x["mask"].float(),
        ref,
        TokenTermParams(**opts.kernel_params()),
        need_grad=True,
        need_kl_grad=True,
    )
    clean = lambda v: torch.where(keep, v, 0.0)
    lp_t = clean(lp).requires_grad_()
    want_pt, coef_1, want_ratio = per_token_terms(
        lp_t,
        clean(old),
        clean(adv),  # a [B, T] advantage (even a broadcast one) is zeroed where masked
        keep.float(),
        opts,  # token-level ratios (the default importance_sampling_level)
        phi,
    )
    want_kl = kl_estimate(lp_t, clean(ref), "k3") * coef_1
    for got, want in ((pt, want_pt), (ratio, want_ratio), (kl, want_kl)):
        torch.testing.assert_close(got, want.detach(), **TOL)
    # d_pt, d_kl are the local derivatives; the backward combines them with any strides
    g_pt = torch.randn(B, 1, device=DEVICE).expand(B, T)
    g_kl = torch.randn(T, device=DEVICE).expand(B, T)
    got = policy_loss_bwd(g_pt, g_kl, d_pt, d_kl, torch.float16)
    (want,) = torch.autograd.grad((want_pt * g_pt + want_kl * g_kl).sum(), lp_t)
    assert got.dtype == torch.float16 and got.is_contiguous()
    torch.testing.assert_close(got.float(), want * keep, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fully_masked_batch_and_zero_advantages(loss_type):
    x = _inputs(8)
    kw = dict(BASE, loss_type=loss_type, impl="triton")
    lp = x["logps"].masked_fill(x["mask"] == 0, -1.0).requires_grad_()
    old = x["old_logps"].nan_to_num(-1.5)
    # nothing to learn from: every token masked (garbage everywhere), KL term on
    nothing = torch.zeros_like(x["mask"])
    loss, metrics = policy_loss(
        x["logps"].requires_grad_(),
        x["old_logps"],
        x["advantages"],
        nothing,
        **kw,
        beta=0.1,
        ref_logps=x["ref_logps"],
    )
    (g,) = torch.autograd.grad(loss, x["logps"])
    assert loss.item() == 0 and torch.equal(g, torch.zeros_like(g))
    _, want = policy_loss(
        x["logps"],
        x["old_logps"],
        x["advantages"],
        nothing,
        **{**kw, "impl": "torch"},
        beta=0.1,
        ref_logps=x["ref_logps"],
    )
    for name in want:  # the per-sequence min/max of no sequence are NaN, as TRL's
        torch.testing.assert_close(metrics[name], want[name], equal_nan=True, msg=name)
    # all-zero advantages on every token, off-policy, no KL term
    for adv in (torch.zeros(B, device=DEVICE), torch.zeros(B, T, device=DEVICE)):
        loss, _ = policy_loss(lp, old, adv, torch.ones_like(x["mask"]), **kw)
        (g,) = torch.autograd.grad(loss, lp)
        assert loss.item() == 0 and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_ref_logps_only_feed_the_kl(loss_type):
    # beta = 0: ref_logps change no loss and no gradient, only the kl metric; and the
    # reference never gets a gradient, with or without the KL term
    x = _inputs(9)
    ref = x["ref_logps"].clone().requires_grad_()
    kw = dict(loss_type=loss_type, impl="triton")
    without_loss, without_m, without_g = _run(policy_loss, x, **kw)
    loss, metrics, g = _run(policy_loss, x, ref_logps=ref, **kw)
    assert torch.equal(loss, without_loss) and torch.equal(g, without_g)
    assert metrics["kl"] > 0 and "kl" not in without_m
    lp = x["logps"].clone().requires_grad_()
    for beta in (0.0, 0.1):
        loss, _ = policy_loss(
            lp, x["old_logps"], x["advantages"], x["mask"], **BASE, **kw, ref_logps=ref, beta=beta
        )
        assert torch.autograd.grad(loss, ref, allow_unused=True) == (None,)


def test_no_grad_and_int_advantages():
    x = _inputs(10)
    kw = dict(BASE, loss_type="grpo", beta=0.04, ref_logps=x["ref_logps"], impl="triton")
    args = (x["logps"], x["old_logps"], x["advantages"], x["mask"])
    want, want_m = policy_loss(*args, **kw)
    with torch.no_grad():
        loss, metrics = policy_loss(*args, **kw)
    assert torch.equal(loss, want) and all(torch.equal(metrics[k], want_m[k]) for k in want_m)
    adv = torch.tensor([1, -2, 0, 3, -1], device=DEVICE)
    loss, _ = policy_loss(*args[:2], adv, args[3], **kw)
    torch.testing.assert_close(loss, policy_loss(*args[:2], adv.float(), args[3], **kw)[0])


def test_fp16_inputs():
    x = _inputs(11, "BT", dtype=torch.float16)
    # the gradient is rounded to fp16 at the end: half an fp16 ulp
    grad_tol = dict(rtol=5e-4, atol=1e-7)
    _, _, grad = _check(x, grad_tol, loss_type="bnpo", beta=0.04, ref_logps=x["ref_logps"])
    assert grad.dtype == torch.float16


def test_impl_dispatch(monkeypatch):
    x = _inputs(12)
    args = (x["logps"], x["old_logps"], x["advantages"], x["mask"])
    kw = dict(BASE, loss_type="dapo")
    if not HAS_CUDA:  # auto is the PyTorch path on CPU tensors
        auto, _ = policy_loss(*args, **kw)
        torch.testing.assert_close(auto, policy_loss(*args, **kw, impl="torch")[0])
        torch.testing.assert_close(auto, policy_loss(*args, **kw, impl="triton")[0], **TOL)
    with pytest.raises(ValueError, match="impl='triton'.*importance_sampling_level='sequence'"):
        policy_loss(*args, **kw, importance_sampling_level="sequence", impl="triton")
    with pytest.raises(ValueError, match="impl='triton'.*float64"):
        policy_loss(*(a.double() for a in args[:3]), args[3], **kw, impl="triton")
    with pytest.raises(ValueError, match="impl.*'cuda'"):
        policy_loss(*args, **kw, impl="cuda")
    # sequence level and float64 fall back with impl="auto"
    for level_args, level in (
        (args, "sequence"),
        ((*(a.double() for a in args[:3]), args[3]), "token"),
    ):
        policy_loss(*level_args, **kw, importance_sampling_level=level)
    if not HAS_CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
            policy_loss(*args, **kw, impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16_on_gpu(loss_type):
    # bf16 log-probs, computed in fp32: against the oracle on the same (bf16) values
    # rows longer than one 1024-token block, a ragged tail; small enough for the oracle
    x = _inputs(13, "B", dtype=torch.bfloat16, b=4, t=1100, lengths=(1100, 0, 1, 1025))
    kw = dict(loss_type=loss_type, beta=0.04, ref_logps=x["ref_logps"])
    if loss_type in CLIPPED:
        kw["delta"] = 1.5
    loss, metrics, grad = _run(policy_loss, x, **kw)  # impl="auto": the kernel on CUDA
    want_loss, want_metrics, want_grad = _run(naive_policy_loss, x, oracle=True, **kw)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), want_grad, rtol=1e-2, atol=1e-6)
    for name in want_metrics:
        torch.testing.assert_close(
            metrics[name].double().cpu(), want_metrics[name], rtol=1e-4, atol=1e-6, msg=name
        )


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gpu_kernel_matches_torch_path(loss_type):
    x = _inputs(14, "BT", b=64, t=4099, lengths=(4099, 0, 1, 2048, 4000, 17, 1024, 3) * 8)
    kw = dict(BASE, loss_type=loss_type, beta=0.04, ref_logps=x["ref_logps"])
    got = _run(policy_loss, x, impl="triton", **kw)
    want = _run(policy_loss, x, impl="torch", **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-9)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-7, msg=name)
