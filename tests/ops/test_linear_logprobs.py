"""linear_logprobs: Triton (interpreter on CPU) and PyTorch paths against the float64 oracle.

Rule (after Cut Cross-Entropy): the error of a path against the float64 oracle may not
exceed the error of plain PyTorch computing the same thing in the input dtype, plus a
small per-dtype tolerance.
"""

import pytest
import torch

import fastrl.ops.logprobs.chunked as chunked
from fastrl import linear_logprobs, sequence_logprobs
from fastrl.ops.logprobs.naive import naive_linear_logprobs
from tests.support import DEVICE
from tests.support.logprobs import linear_inputs, top1_inputs
from tests.support.memory import AllocationRecorder

IMPLS = ["triton", "torch"]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (N, V, d): odd N, V neither a power of two nor a multiple of any block, odd d
SHAPES = {"N37-V1000-d96": (37, 1000, 96), "N5-V77-d40": (5, 77, 40), "N64-V515-d33": (64, 515, 33)}


def run(fn, hidden, weight, targets, bias, g_logp, g_ent, **kw):
    """Outputs and gradients of `fn` for the loss sum(g_logp*logp + g_ent*entropy)."""
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    for t in inputs:
        t.grad = None
    logp, ent = fn(hidden, weight, targets, bias=bias, return_entropy=True, **kw)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    grads = {
        name: t.grad
        for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias))
        if t is not None and t.requires_grad
    }
    for t in inputs:
        t.grad = None
    return {"logp": logp.detach(), "entropy": ent.detach(), **grads}


def check_against_oracle(impl, hidden, weight, targets, bias, **kw):
    dtype = hidden.dtype
    g_logp = torch.randn(targets.shape, device=DEVICE)
    g_ent = torch.randn(targets.shape, device=DEVICE)
    got = run(linear_logprobs, hidden, weight, targets, bias, g_logp, g_ent, impl=impl, **kw)
    ref = run(naive_linear_logprobs, hidden, weight, targets, bias, g_logp, g_ent, **kw)
    same = run(
        naive_linear_logprobs,
        hidden,
        weight,
        targets,
        bias,
        g_logp,
        g_ent,
        compute_dtype=dtype,
        **kw,
    )
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == (torch.float32 if name in ("logp", "entropy") else dtype)
        assert torch.isfinite(got[name]).all(), name
        err = (got[name].double() - ref[name]).abs().max().item()
        base = (same[name].double() - ref[name]).abs().max().item()
        scale = ref[name].abs().max().item()
        assert err <= base + TOL[dtype] * max(1.0, scale), (name, err, base, scale)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs(impl, shape, dtype, nan_empty):
    check_against_oracle(impl, *linear_inputs(*shape, dtype, bias=True))


@pytest.mark.parametrize(
    "temperature,softcap",
    [(0.7, None), (1.0, 4.0), (1.3, 2.5)],
    ids=["T0.7", "cap4", "T1.3-cap2.5"],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_temperature_softcap(impl, temperature, softcap, nan_empty):
    inputs = linear_inputs(37, 1000, 96, torch.float32, bias=True)
    check_against_oracle(impl, *inputs, temperature=temperature, softcap=softcap)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_leading_dims(impl, nan_empty):
    hidden, weight, targets, _ = linear_inputs(21, 300, 48, torch.float32, lead=(3, 7))
    got = check_against_oracle(impl, hidden, weight, targets, None)
    assert got["logp"].shape == (3, 7) and got["hidden"].shape == (3, 7, 48)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_ignore_index(impl, nan_empty):
    hidden, weight, targets, _ = linear_inputs(37, 1000, 96, torch.float32, ignore=range(0, 37, 3))
    hidden.detach_().requires_grad_()
    got = check_against_oracle(impl, hidden, weight, targets, None, ignore_index=-100)
    ignored = targets == -100
    assert (got["logp"][ignored] == 0).all() and (got["entropy"][ignored] == 0).all()
    assert (got["hidden"][ignored] == 0).all()
    # a custom ignore_index that is also a legal id: rows with that id count as ignored
    t2 = targets.clone()
    t2[ignored] = 7
    logp = linear_logprobs(hidden, weight, t2, ignore_index=7, impl=impl)
    assert (logp[t2 == 7] == 0).all() and (logp[t2 != 7] != 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_all_ignored(impl, nan_empty):
    hidden, weight, targets, bias = linear_inputs(19, 300, 40, torch.float32, bias=True)
    targets[:] = -100
    logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, impl=impl)
    (logp.sum() + ent.sum()).backward()
    assert (logp == 0).all() and (ent == 0).all()
    for t in (hidden, weight, bias):
        assert (t.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_empty(impl):
    hidden, weight, targets, _ = linear_inputs(0, 50, 8, torch.float32, lead=(0, 3))
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
    (logp.sum() + ent.sum()).backward()
    assert logp.shape == ent.shape == (0, 3) and hidden.grad.shape == (0, 3, 8)
    assert (weight.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_single_output_grads(impl):
    """Gradient through logp only, and through entropy only (the other gets no grad)."""
    hidden, weight, targets, _ = linear_inputs(13, 200, 24, torch.float32)
    for which in (0, 1):
        outs = linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
        refs = naive_linear_logprobs(hidden, weight, targets, return_entropy=True)
        g = torch.autograd.grad(outs[which].sum(), hidden)[0]
        gr = torch.autograd.grad(refs[which].sum(), hidden)[0]
        torch.testing.assert_close(g, gr.float(), atol=1e-5, rtol=1e-4)


def test_linear_logprobs_triton_vocab_splits(nan_empty):
    """The split-vocab forward (several programs per row, merged by the combine kernel)."""
    from fastrl.kernels.linear_logprobs import linear_logprobs_fwd

    hidden, weight, targets, bias = linear_inputs(37, 1000, 96, torch.float32, bias=True)
    ref_logp, ref_ent = naive_linear_logprobs(
        hidden, weight, targets, bias=bias, softcap=3.0, return_entropy=True
    )
    for splits in (2, 3, 4):
        logp, ent, _ = linear_logprobs_fwd(
            hidden.detach(),
            weight.detach(),
            bias.detach(),
            targets,
            1.0,
            3.0,
            -100,
            True,
            num_splits=splits,
        )
        torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_linear_logprobs_is_top1(impl, shape, nan_empty):
    N, V, d = shape
    hidden, weight, targets, bias = top1_inputs(N, V, d, bias=True, softcap=4.0)
    kw = dict(bias=bias, softcap=4.0, temperature=0.7, return_entropy=True)
    logp, ent, top1 = linear_logprobs(hidden, weight, targets, return_is_top1=True, impl=impl, **kw)
    ref_logp, ref_ent, ref_top1 = naive_linear_logprobs(
        hidden, weight, targets, return_is_top1=True, **kw
    )
    assert top1.dtype == torch.bool and torch.equal(top1, ref_top1)
    assert 0 < int(top1.sum()) < N and not top1[targets == -100].any()
    # the extra output changes nothing else, and its gradient is not asked for
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=1e-5, rtol=0)
    assert not top1.requires_grad
    only_top1 = linear_logprobs(
        hidden, weight, targets, return_is_top1=True, impl=impl, bias=bias, softcap=4.0
    )
    assert len(only_top1) == 2 and torch.equal(only_top1[1], ref_top1)


def test_linear_logprobs_triton_vocab_splits_is_top1(nan_empty):
    """is_top1 merged across vocab splits: the max may sit in another split than the target."""
    from fastrl.kernels.linear_logprobs import linear_logprobs_fwd

    hidden, weight, targets, bias = top1_inputs(37, 1000, 96, bias=False, softcap=None)
    ref = naive_linear_logprobs(hidden, weight, targets, return_is_top1=True)[1]
    for splits in (1, 2, 3, 4):
        top1 = torch.empty(37, dtype=torch.bool)
        linear_logprobs_fwd(
            hidden.detach(), weight.detach(), None, targets, 1.0, None, -100, False,
            num_splits=splits, top1=top1,
        )  # fmt: skip
        assert torch.equal(top1, ref), splits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_linear_logprobs_log_sum_sq_probs(impl, shape, dtype, nan_empty):
    hidden, weight, targets, bias = linear_inputs(*shape, dtype, bias=True)
    kw = dict(bias=bias, softcap=3.0, temperature=0.6)
    logp, sq = linear_logprobs(
        hidden, weight, targets, return_log_sum_sq_probs=True, impl=impl, **kw
    )
    truth = naive_linear_logprobs(hidden, weight, targets, return_log_sum_sq_probs=True, **kw)[1]
    same_dtype = naive_linear_logprobs(
        hidden, weight, targets, return_log_sum_sq_probs=True, compute_dtype=dtype, **kw
    )[1]
    assert not sq.requires_grad and sq.dtype == logp.dtype == torch.float32
    assert (sq[targets == -100] == 0).all() and (sq[targets != -100] < 0).all()
    # kernel error <= same-dtype PyTorch error + tolerance
    err = (sq.double() - truth.detach()).abs().max()
    torch_err = (same_dtype.double() - truth.detach()).abs().max()
    assert err <= torch_err + TOL[dtype], (err, torch_err)
    # every output at once keeps its place in the tuple
    outs = linear_logprobs(
        hidden, weight, targets, return_entropy=True, return_is_top1=True,
        return_log_sum_sq_probs=True, impl=impl, **kw,
    )  # fmt: skip
    assert len(outs) == 4 and outs[2].dtype == torch.bool and torch.equal(outs[3], sq)


def test_linear_logprobs_triton_vocab_splits_log_sum_sq(nan_empty):
    from fastrl.kernels.linear_logprobs import linear_logprobs_fwd

    hidden, weight, targets, _ = linear_inputs(37, 1000, 96, torch.float32)
    truth = naive_linear_logprobs(hidden, weight, targets, return_log_sum_sq_probs=True)[1]
    for splits in (1, 2, 3, 4):
        sq = torch.empty(37)
        linear_logprobs_fwd(
            hidden.detach(), weight.detach(), None, targets, 1.0, None, -100, False,
            num_splits=splits, log_sum_sq=sq,
        )  # fmt: skip
        torch.testing.assert_close(sq.double(), truth.detach(), atol=1e-5, rtol=0)


def test_linear_logprobs_triton_bwd_blocks(monkeypatch, nan_empty):
    """Backward blocks of 16 rows x 128 vocab: 3 x 3 blocks, dH summed over vocab blocks,
    dW and dbias over row blocks."""
    import fastrl.kernels.linear_logprobs as k

    monkeypatch.setattr(k, "BWD_CHUNK_ROWS", 16)
    monkeypatch.setattr(k, "BWD_CHUNK_VOCAB", 128)
    for dtype in (torch.float16, torch.float32):
        check_against_oracle("triton", *linear_inputs(37, 300, 96, dtype, bias=True))


def test_linear_logprobs_torch_chunks(monkeypatch):
    """The PyTorch path with blocks smaller than N and V, so the online merge is exercised."""
    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 8)
    monkeypatch.setattr(chunked, "CHUNK_VOCAB", 96)
    check_against_oracle(
        "torch",
        *linear_inputs(37, 1000, 40, torch.float32, bias=True),
        temperature=0.8,
        softcap=3.0,
    )


def test_linear_logprobs_gradcheck(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 4)
    monkeypatch.setattr(chunked, "CHUNK_VOCAB", 16)
    hidden, weight, targets, bias = linear_inputs(9, 50, 7, torch.float64, bias=True, ignore=(2,))

    def f(h, w, b):
        return linear_logprobs(
            h, w, targets, bias=b, temperature=0.9, softcap=2.0, return_entropy=True, impl="torch"
        )

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("impl,N,V,d", [("torch", 1100, 20000, 32), ("triton", 45, 1000, 16)])
def test_linear_logprobs_never_allocates_logits(impl, N, V, d, monkeypatch):
    """Nothing of N*V elements, forward or backward. The Triton backward's scratch is
    works on [BWD_CHUNK_ROWS, BWD_CHUNK_VOCAB] blocks (1024 x 16384), shrunk here to stand
    for a real N and V."""
    import fastrl.kernels.linear_logprobs as k

    monkeypatch.setattr(k, "BWD_CHUNK_ROWS", 16)
    monkeypatch.setattr(k, "BWD_CHUNK_VOCAB", 256)
    hidden, weight, targets, _ = linear_inputs(N, V, d, torch.float32)
    with AllocationRecorder() as rec:
        logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
        (logp.sum() + ent.sum()).backward()
    largest = max(torch.Size(s).numel() for s in rec.shapes)
    assert largest < N * V, largest
    assert weight.grad is not None and hidden.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_frozen_weight(impl):
    """A frozen lm_head gets no gradient and no [V, d] buffer is ever allocated."""
    N, V, d = 37, 1000, 96
    hidden, weight, targets, _ = linear_inputs(N, V, d, torch.float32, weight_grad=False)
    with AllocationRecorder() as rec:
        linear_logprobs(hidden, weight, targets, impl=impl).sum().backward()
    assert weight.grad is None and hidden.grad is not None
    assert (V, d) not in rec.shapes and not any(torch.Size(s).numel() >= V * d for s in rec.shapes)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_noncontiguous_and_int32(impl):
    hidden, weight, targets, _ = linear_inputs(20, 300, 48, torch.float32)
    h_t = hidden.detach().t().contiguous().t()  # same values, column-major
    ref = naive_linear_logprobs(hidden, weight, targets)
    got = linear_logprobs(h_t, weight, targets.to(torch.int32), impl=impl)
    torch.testing.assert_close(got.double(), ref.detach(), atol=1e-5, rtol=0)


def test_linear_logprobs_auto_picks_torch_on_cpu(monkeypatch):
    calls = []
    real = chunked.chunked_logprobs_fwd
    monkeypatch.setattr(
        "fastrl.ops.logprobs.custom_ops.chunked_logprobs_fwd",
        lambda *a, **k: calls.append(1) or real(*a, **k),
    )
    hidden, weight, targets, _ = linear_inputs(5, 50, 16, torch.float32)
    linear_logprobs(hidden.cpu(), weight.cpu(), targets.cpu())
    assert calls == [1]


BAD_INPUTS = {
    "target-too-large": (
        dict(targets=lambda t: t.fill_(300)),
        ValueError,
        r"targets.*300.*\[0, 300\)",
    ),
    "target-negative": (dict(targets=lambda t: t.fill_(-5)), ValueError, r"targets.*-5"),
    "float-targets": (dict(targets=lambda t: t.float()), TypeError, "targets.*integer"),
    "bool-targets": (dict(targets=lambda t: t > 0), TypeError, "targets.*integer"),
    "int-hidden": (dict(hidden=lambda h: h.long()), TypeError, "hidden.*floating"),
    "dtype-mix": (dict(weight=lambda w: w.double()), TypeError, "weight dtype.*hidden dtype"),
    "hidden-size": (dict(weight=lambda w: w[:, :10]), ValueError, "hidden size d=16"),
    "weight-1d": (dict(weight=lambda w: w[0]), ValueError, "weight"),
    "targets-shape": (dict(targets=lambda t: t[:3]), ValueError, "targets shape"),
    "bias-shape": (dict(bias=lambda b: b[:5]), ValueError, "bias shape"),
    "bias-int": (dict(bias=lambda b: b.long()), TypeError, "bias"),
    "temperature-0": (dict(temperature=0.0), ValueError, "temperature.*0.0"),
    "temperature-neg": (dict(temperature=-1.0), ValueError, "temperature"),
    "temperature-nan": (dict(temperature=float("nan")), ValueError, "temperature"),
    "softcap-0": (dict(softcap=0.0), ValueError, "softcap.*0.0"),
    "softcap-neg": (dict(softcap=-30.0), ValueError, "softcap"),
    "impl-unknown": (dict(impl="cuda"), ValueError, "impl.*'cuda'"),
    "device-mix": (dict(targets=lambda t: t.to("meta")), ValueError, "one device"),
    "ignore-index-float": (dict(ignore_index=-100.0), TypeError, "ignore_index"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_linear_logprobs_bad_input(case):
    changes, exc, match = case
    hidden, weight = torch.randn(6, 16), torch.randn(300, 16)
    kw = dict(
        hidden=hidden, weight=weight, targets=torch.randint(0, 300, (6,)), bias=torch.randn(300)
    )
    for name, change in changes.items():
        kw[name] = change(kw[name]) if callable(change) else change
    with pytest.raises(exc, match=match):
        linear_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


def test_linear_logprobs_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        linear_logprobs(
            torch.randn(2, 8), torch.randn(10, 8), torch.zeros(2, dtype=torch.long), impl="triton"
        )


def test_sequence_logprobs():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    torch.testing.assert_close(sequence_logprobs(logps, mask), torch.tensor([-3.0, -10.0, 0.0]))
    torch.testing.assert_close(
        sequence_logprobs(logps, mask.bool(), average=True), torch.tensor([-1.5, -10 / 3, 0.0])
    )
    with pytest.raises(ValueError, match="mask must be boolean or hold only 0 and 1"):
        sequence_logprobs(logps, mask * 2)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sequence_logprobs(logps, mask[:, :2])


# GPU: bf16 at real head shapes against an fp32 oracle ---------------------------------------

HEADS = {"llama3-8b": (4096, 128256), "qwen2.5-7b": (3584, 152064), "qwen2.5-1.5b": (1536, 151936)}


@pytest.mark.gpu
@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_linear_logprobs_bf16_real_heads(head, trainable):
    d, V = head
    N = 1027
    hidden, weight, targets, _ = linear_inputs(
        N, V, d, torch.bfloat16, weight_grad=trainable, ignore=range(0, N, 97)
    )
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    got = run(linear_logprobs, hidden, weight, targets, None, g_logp, g_ent, impl="triton")
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_(trainable)
    ref = run(linear_logprobs, h32, w32, targets, None, g_logp, g_ent, impl="torch")
    same = run(
        naive_linear_logprobs,
        hidden,
        weight,
        targets,
        None,
        g_logp,
        g_ent,
        compute_dtype=torch.bfloat16,
    )
    for name in ref:
        err = (got[name].float() - ref[name]).abs().max().item()
        base = (same[name].float() - ref[name]).abs().max().item()
        assert err <= base + TOL[torch.bfloat16] * max(1.0, ref[name].abs().max().item()), (
            name,
            err,
            base,
        )
