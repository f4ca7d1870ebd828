"""fused_policy_loss against the float64 oracles: naive log-probs, then naive_policy_loss."""

import pytest
import torch

from fastrl import fused_policy_loss, linear_logprobs
from fastrl.ops.logprobs.naive import naive_linear_logprobs
from fastrl.ops.policy.naive import naive_policy_loss
from tests.support import DEVICE
from tests.support.memory import AllocationRecorder

B, T, D, V = 3, 13, 40, 300


def make_batch(trainable=True):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, D, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 2).to(DEVICE).requires_grad_(trainable)
    targets = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[0, 9:] = 0
    mask[2, 4:] = 0
    advantages = torch.randn(B, generator=g).to(DEVICE)
    with torch.no_grad():
        base = naive_linear_logprobs(hidden, weight, targets).float()
    old = base + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)
    ref = base + 0.2 * torch.randn(B, T, generator=g).to(DEVICE)
    return hidden, weight, targets, mask, advantages, old, ref


def oracle(hidden, weight, targets, mask, advantages, old, ref, temperature, **kw):
    scored = torch.where(mask.bool(), targets, -100)
    logps, ent = naive_linear_logprobs(
        hidden, weight, scored, temperature=temperature, return_entropy=True
    )
    return naive_policy_loss(
        logps, old.double(), advantages.double(), mask, ref_logps=ref.double(), entropy=ent, **kw
    )


CASES = {
    "dapo-token": dict(loss_type="dapo", num_items_in_batch=22),
    "grpo-seq-beta": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    "bnpo-delta-beta": dict(loss_type="bnpo", delta=1.5, beta=0.1, epsilon_high=0.28),
    "dr_grpo-entropy": dict(loss_type="dr_grpo", max_completion_length=T, entropy_coef=0.01),
    "cispo": dict(loss_type="cispo", num_items_in_batch=22, epsilon_high=4.0),
    "sapo-beta": dict(loss_type="sapo", beta=0.04),
    "vespo-beta": dict(loss_type="vespo", num_items_in_batch=22, beta=0.04, vespo_k_neg=1.5),
}


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_policy_loss(case, impl):
    hidden, weight, targets, mask, adv, old, ref = make_batch()
    loss, metrics = fused_policy_loss(
        hidden,
        weight,
        targets,
        mask,
        adv,
        old_logps=old,
        ref_logps=ref,
        temperature=0.9,
        impl=impl,
        **case,
    )
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, ref_metrics = oracle(hidden, weight, targets, mask, adv, old, ref, 0.9, **case)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight))
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        scale = rg.abs().max().item()
        assert (g.double() - rg).abs().max().item() <= 1e-5 * max(scale, 1e-3), scale
    assert metrics.keys() == ref_metrics.keys() and "entropy" in metrics
    for k in metrics:
        torch.testing.assert_close(
            metrics[k].double(), ref_metrics[k].double(), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_policy_loss_ref_hidden(impl):
    """Reference log-probs from reference hidden states equal passing them in, and get no grad."""
    hidden, weight, targets, mask, adv, old, _ = make_batch(trainable=False)
    ref_hidden = (hidden.detach() + 0.1 * torch.randn_like(hidden)).requires_grad_()
    kw = dict(old_logps=old, beta=0.04, loss_type="grpo", impl=impl)
    loss, _ = fused_policy_loss(hidden, weight, targets, mask, adv, ref_hidden=ref_hidden, **kw)
    scored = torch.where(mask.bool(), targets, -100)
    ref_logps = linear_logprobs(ref_hidden.detach(), weight, scored, impl=impl)
    expected, _ = fused_policy_loss(hidden, weight, targets, mask, adv, ref_logps=ref_logps, **kw)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert ref_hidden.grad is None and weight.grad is None and hidden.grad is not None


def test_fused_policy_loss_fully_masked_row_and_zero_advantages():
    hidden, weight, targets, mask, adv, old, _ = make_batch()
    mask[1] = 0
    adv.zero_()
    loss, _ = fused_policy_loss(
        hidden, weight, targets, mask, adv, old_logps=old, loss_type="grpo", impl="torch"
    )
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(hidden.grad).all()
    assert (hidden.grad == 0).all()  # zero advantages and no KL: nothing to learn


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(ref_hidden="h", ref_logps="r"), "ref_logps or ref_hidden"),
        (dict(ref_weight="w"), "ref_weight is only used with ref_hidden"),
        (dict(mask=lambda m: m * 2), "mask must be boolean or hold only 0 and 1"),
        (dict(mask=lambda m: m[:, :5]), "mask shape"),
        (dict(entropy="e"), "computes entropy itself"),
        (dict(loss_type="ppo"), "loss_type.*'ppo'"),
    ],
    ids=["ref-both", "ref-weight-alone", "mask-values", "mask-shape", "entropy-kw", "loss-type"],
)
def test_fused_policy_loss_bad_input(change, match):
    hidden, weight, targets, mask, adv, old, ref = make_batch()
    values = dict(h=hidden, r=ref, w=weight, e=ref)
    kw = dict(mask=mask, loss_type="grpo")
    for name, v in change.items():
        kw[name] = v(kw[name]) if callable(v) else values.get(v, v)
    with pytest.raises(ValueError, match=match):
        fused_policy_loss(hidden, weight, targets, kw.pop("mask"), adv, **kw)


# The single pass (gradient formed in the forward, Triton) against the two-pass PyTorch path


def spy_single_pass(monkeypatch):
    import fastrl.kernels.fused_policy_loss as k

    calls = []
    real = k.fused_policy_loss_fwd
    monkeypatch.setattr(
        k, "fused_policy_loss_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    return calls


SINGLE = {
    f"{lt}-beta{beta}-delta{delta}": dict(loss_type=lt, beta=beta, delta=delta)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
    for beta in (0.0, 0.04)
    for delta in ((None, 1.5) if lt not in ("cispo", "sapo") else (None,))
}
NORMALISERS = dict(max_completion_length=T, num_items_in_batch=22)


@pytest.mark.parametrize("case", SINGLE.values(), ids=SINGLE.keys())
def test_fused_policy_loss_single_pass(case, monkeypatch, nan_empty):
    calls = spy_single_pass(monkeypatch)
    hidden, weight, targets, mask, adv, old, ref = make_batch()
    kw = dict(old_logps=old, ref_logps=ref, temperature=0.8, epsilon_high=0.28, **NORMALISERS)
    loss, metrics = fused_policy_loss(
        hidden, weight, targets, mask, adv, impl="triton", **kw, **case
    )
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert calls == [1]
    ref_loss, ref_metrics = fused_policy_loss(
        hidden, weight, targets, mask, adv, impl="torch", **kw, **case
    )
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight))
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-6 * max(1.0, rg.abs().max().item()), rtol=1e-4)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], atol=1e-6, rtol=1e-5)


OPTIONS = {
    "bias-softcap-entropy": dict(entropy_coef=0.05, softcap=3.0, bias=True),
    "ga4-advantages-per-token": dict(gradient_accumulation_steps=4, adv_per_token=True),
    "sampling-token-truncate": dict(sampling_correction="token_truncate", sampling=True),
    "on-policy-k2": dict(on_policy=True, kl_estimator="k2", use_bias_correction_kl=False),
}


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_fused_policy_loss_single_pass_options(opts, monkeypatch):
    calls = spy_single_pass(monkeypatch)
    opts = dict(opts)
    hidden, weight, targets, mask, adv, old, ref = make_batch()
    bias = torch.randn(V, device=DEVICE, requires_grad=True) if opts.pop("bias", False) else None
    if opts.pop("adv_per_token", False):
        adv = torch.randn(B, T, device=DEVICE)
    if opts.pop("sampling", False):
        opts["sampling_logps"] = old + 0.1 * torch.randn_like(old)
    if opts.pop("on_policy", False):
        old = None
    kw = dict(
        old_logps=old,
        ref_logps=ref,
        beta=0.04,
        loss_type="dapo",
        num_items_in_batch=22,
        bias=bias,
        **opts,
    )
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    loss, _ = fused_policy_loss(hidden, weight, targets, mask, adv, impl="triton", **kw)
    grads = torch.autograd.grad(loss, inputs)
    assert calls == [1]
    ref_loss, _ = fused_policy_loss(hidden, weight, targets, mask, adv, impl="torch", **kw)
    ref_grads = torch.autograd.grad(ref_loss, inputs)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-6 * max(1.0, rg.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        dict(importance_sampling_level="sequence"),
        dict(top_entropy_quantile=0.5),
        dict(off_policy_mask_threshold=0.1),
        dict(loss_type="vespo", num_items_in_batch=22),
    ],
    ids=["gspo", "entropy-quantile", "off-policy-mask", "vespo"],
)
def test_fused_policy_loss_two_pass_when_needed(kw, monkeypatch):
    """Options that need whole-sequence or whole-batch statistics of the log-probs first."""
    calls = spy_single_pass(monkeypatch)
    hidden, weight, targets, mask, adv, old, ref = make_batch()
    kw = {"loss_type": "grpo", **kw}
    loss, _ = fused_policy_loss(
        hidden, weight, targets, mask, adv, old_logps=old, impl="triton", **kw
    )
    loss.backward()
    assert calls == [] and hidden.grad is not None


def test_fused_policy_loss_single_pass_memory(monkeypatch):
    """Z chunks of 16 rows: nothing of B*T*V elements, and a frozen head gets no [V, d]."""
    import fastrl.kernels.fused_policy_loss as k

    monkeypatch.setattr(k, "CHUNK_BYTES", 16 * V * 4)
    hidden, weight, targets, mask, adv, old, ref = make_batch(trainable=False)
    with AllocationRecorder() as rec:
        loss, _ = fused_policy_loss(
            hidden,
            weight,
            targets,
            mask,
            adv,
            old_logps=old,
            ref_logps=ref,
            beta=0.04,
            loss_type="grpo",
            impl="triton",
        )
        loss.backward()
    sizes = [torch.Size(s).numel() for s in rec.shapes]
    assert max(sizes) < B * T * V and V * D not in sizes
    assert weight.grad is None and hidden.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
def test_fused_policy_loss_bf16_real_head(loss_type):
    """bf16 single pass at the Llama-3-8B head: error vs an fp32 run <= bf16 eager's + tol."""
    torch.manual_seed(0)
    Bq, Tq, d, Vq = 4, 300, 4096, 128256
    hidden = torch.randn(Bq, Tq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(Vq, d, device="cuda") / d**0.5 * 3).to(torch.bfloat16)
    targets = torch.randint(0, Vq, (Bq, Tq), device="cuda")
    mask = torch.ones(Bq, Tq, dtype=torch.long, device="cuda")
    mask[1, 200:] = 0
    adv = torch.randn(Bq, device="cuda")
    old = -torch.rand(Bq, Tq, device="cuda") * 12
    kw = dict(old_logps=old, loss_type=loss_type, num_items_in_batch=int(mask.sum()))

    def run(h, w, impl, logits_dtype=None):
        if logits_dtype is None:
            loss, _ = fused_policy_loss(h, w, targets, mask, adv, impl=impl, **kw)
        else:  # eager: materialised logits in logits_dtype
            from fastrl import policy_loss

            logps = torch.log_softmax((h @ w.T).to(logits_dtype).float(), -1)
            logps = logps.gather(-1, targets[..., None])[..., 0]
            loss, _ = policy_loss(logps, old, adv, mask, **kw)
        (g,) = torch.autograd.grad(loss, h)
        return loss.double(), g.double()

    h32 = hidden.detach().float().requires_grad_()
    ref_loss, ref_g = run(h32, weight.float(), "torch")
    loss, g = run(hidden, weight, "triton")
    eager_loss, eager_g = run(hidden, weight, None, torch.bfloat16)
    assert (loss - ref_loss).abs() <= (eager_loss - ref_loss).abs() + 2e-3 * ref_loss.abs()
    scale = ref_g.abs().max()
    assert (g - ref_g).abs().max() <= (eager_g - ref_g).abs().max() + 2e-2 * scale


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_fused_policy_loss_single_pass_fp16_loss_scaler(trainable):
    """fp16 with a loss scaler's 2^16: the gradient formed in the forward keeps its bits
    as eager fp16's does. dz ~ p A / N: with N = 10^6 here (or p ~ 1e-5 at a 128k vocab
    and 16k tokens) it lies below fp16's normal range (6e-5) before the scale arrives."""
    hidden, weight, targets, mask, adv, old, _ = make_batch(trainable)
    kw = dict(loss_type="dapo", num_items_in_batch=1_000_000)

    def grads(h, w, impl, eager=False):
        h = h.detach().requires_grad_()
        w = w.detach().requires_grad_(trainable)
        if eager:  # materialised fp16 logits, the loss scale flowing from the start
            from fastrl import policy_loss

            logits = (h @ w.T).float()
            logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
            loss, _ = policy_loss(logps, old, adv, mask, **kw)
        else:
            loss, _ = fused_policy_loss(h, w, targets, mask, adv, old_logps=old, impl=impl, **kw)
        inputs = (h, w) if trainable else (h,)
        return [g.double() for g in torch.autograd.grad(loss * 65536.0, inputs)]

    half = lambda x: x.detach().half()
    exact = grads(hidden.double(), weight.double(), "torch")
    fused = grads(half(hidden), half(weight), "triton")
    eager = grads(half(hidden), half(weight), None, eager=True)
    for g, e, x in zip(fused, eager, exact, strict=True):
        scale = x.abs().max()
        assert torch.isfinite(g).all() and scale > 1e-3
        assert (g - x).abs().max() <= (e - x).abs().max() + 1e-3 * scale


@pytest.mark.parametrize("row_kernel", ["lanes", "reduced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("chunk_mb", [None, 0.02], ids=["chunk-default", "chunk-16rows"])
def test_fused_policy_loss_single_pass_variants(row_kernel, dtype, chunk_mb, monkeypatch):
    """Both row kernels (FASTRL_FUSED_ROW_KERNEL) and chunk sizes (FASTRL_FUSED_CHUNK_MB)
    give the two-pass result, with a bias, softcap and entropy term, a vocab tail (V=300
    is no multiple of the interpreter's 64-column steps) and padded rows."""
    monkeypatch.setenv("FASTRL_FUSED_ROW_KERNEL", row_kernel)
    if chunk_mb is not None:
        monkeypatch.setenv("FASTRL_FUSED_CHUNK_MB", str(chunk_mb))
    calls = spy_single_pass(monkeypatch)
    hidden, weight, targets, mask, adv, old, ref = make_batch()
    hidden, weight = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype)
    bias = torch.randn(V, device=DEVICE).to(dtype)
    kw = dict(old_logps=old, ref_logps=ref, beta=0.04, loss_type="dapo", num_items_in_batch=22,
              bias=bias, softcap=3.0, entropy_coef=0.05)  # fmt: skip
    loss, _ = fused_policy_loss(hidden, weight, targets, mask, adv, impl="triton", **kw)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert calls == [1]
    ref_loss, _ = fused_policy_loss(hidden, weight, targets, mask, adv, impl="torch", **kw)
    (ref_grad,) = torch.autograd.grad(ref_loss, hidden)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    scale = max(1.0, ref_grad.abs().max().item())
    if dtype == torch.float32:  # the tolerance of the single-pass tests above
        torch.testing.assert_close(grad, ref_grad, atol=1e-6 * scale, rtol=1e-4)
    else:  # dz and dH are stored in fp16 (2^-11 relative each)
        torch.testing.assert_close(grad.float(), ref_grad.float(), atol=2e-3 * scale, rtol=0)


def test_fused_policy_loss_row_kernel_unknown(monkeypatch):
    monkeypatch.setenv("FASTRL_FUSED_ROW_KERNEL", "warp")
    hidden, weight, targets, mask, adv, old, _ = make_batch()
    with pytest.raises(ValueError, match="FASTRL_FUSED_ROW_KERNEL.*'warp'"):
        fused_policy_loss(
            hidden, weight, targets, mask, adv, old_logps=old, loss_type="grpo", impl="triton"
        )
