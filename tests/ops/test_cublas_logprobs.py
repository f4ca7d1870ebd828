"""The cuBLAS-chunk design of linear_logprobs (kernels/cublas_logprobs.py) against the
float64 oracle, through its launchers.

Rule (as tests/ops/test_linear_logprobs.py, after Cut Cross-Entropy): the error of an output
or gradient against the float64 oracle may not exceed the error of plain PyTorch
computing it in the input dtype, plus a small per-dtype tolerance. Chunks smaller than N
and V (and not dividing them) exercise the online merge across vocab chunks, the dH
accumulation over vocab chunks and the dW/db accumulation over row chunks.
"""

import pytest
import torch
from fastrl.kernels.cublas_logprobs import (
    ENV_BWD_TILE,
    ENV_CHUNK_ROWS,
    ENV_CHUNK_VOCAB,
    ENV_FWD_TILE,
    chunk_sizes,
    cublas_logprobs_bwd,
    cublas_logprobs_fwd,
    epilogue_tile,
    workspace_bytes,
)

from fastrl.ops.logprobs.naive import naive_linear_logprobs
from tests.support import DEVICE
from tests.support.logprobs import linear_inputs, top1_inputs
from tests.support.memory import AllocationRecorder

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# (N, V, d): odd N, V neither a power of two nor a multiple of any block, odd d
SHAPES = {"N37-V1000-d96": (37, 1000, 96), "N5-V77-d40": (5, 77, 40), "N64-V515-d33": (64, 515, 33)}
# (chunk_rows, chunk_vocab): the defaults (one chunk at these shapes) and chunks that
# divide neither N nor V (several row and vocab chunks, with tails)
CHUNKS = {"default": (None, None), "16x384": (16, 384)}
OUTPUTS = ("logp", "entropy", "log_sum_sq")
GRADS = ("hidden", "weight", "bias")


def make_inputs(N, V, d, dtype, *, bias=True, **kw):
    """`linear_inputs` with a bias by default, without grad, in the launchers' order."""
    hidden, weight, targets, b = linear_inputs(N, V, d, dtype, bias=bias, requires_grad=False, **kw)
    return hidden, weight, b, targets


def oracle(hidden, weight, bias, targets, g_logp, g_ent, *, compute_dtype=torch.float64, **kw):
    """Outputs and gradients of sum(g_logp*logp + g_ent*entropy) the naive way; float64
    leaves for the float64 truth (so its gradients are not rounded to the input dtype)."""
    leaf = (lambda t: t.double()) if compute_dtype == torch.float64 else (lambda t: t.clone())
    h, w = leaf(hidden).requires_grad_(), leaf(weight).requires_grad_()
    b = leaf(bias).requires_grad_() if bias is not None else None
    logp, ent, top1, sq = naive_linear_logprobs(
        h, w, targets, bias=b, return_entropy=True, return_is_top1=True,
        return_log_sum_sq_probs=True, compute_dtype=compute_dtype, **kw,
    )  # fmt: skip
    loss = sum((g * o).sum() for g, o in ((g_logp, logp), (g_ent, ent)) if g is not None)
    leaves = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    out = {"logp": logp.detach(), "entropy": ent.detach(), "top1": top1, "log_sum_sq": sq}
    return {**out, **dict(zip(GRADS, grads, strict=False))}


def kernel(
    hidden, weight, bias, targets, g_logp, g_ent, *, temperature=1.0, softcap=None,
    ignore_index=-100, need=(True, True, True), chunk_rows=None, chunk_vocab=None,
):  # fmt: skip
    N = hidden.shape[0]
    chunks = dict(chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    top1 = torch.empty(N, dtype=torch.bool, device=DEVICE)
    sq = torch.empty(N, device=DEVICE)
    logp, ent, lse = cublas_logprobs_fwd(
        hidden, weight, bias, targets, temperature, softcap, ignore_index, True, top1, sq,
        **chunks,
    )  # fmt: skip
    dh, dw, db = cublas_logprobs_bwd(
        hidden, weight, bias, targets, lse, ent, g_logp, g_ent, temperature, softcap,
        ignore_index, need[0], need[1], need[2] and bias is not None, **chunks,
    )  # fmt: skip
    out = {"logp": logp, "entropy": ent, "lse": lse, "top1": top1, "log_sum_sq": sq}
    return {**out, "hidden": dh, "weight": dw, "bias": db}


def check(hidden, weight, bias, targets, *, grads=("logp", "entropy"), need=(True,) * 3, **kw):
    """Kernel outputs and gradients against the float64 oracle, by the rule above."""
    dtype = hidden.dtype
    N = hidden.shape[0]
    g_logp = torch.randn(N, device=DEVICE) if "logp" in grads else None
    g_ent = torch.randn(N, device=DEVICE) if "entropy" in grads else None
    chunks = {k: kw.pop(k) for k in ("chunk_rows", "chunk_vocab") if k in kw}
    got = kernel(hidden, weight, bias, targets, g_logp, g_ent, need=need, **chunks, **kw)
    ref = oracle(hidden, weight, bias, targets, g_logp, g_ent, **kw)
    same = oracle(hidden, weight, bias, targets, g_logp, g_ent, compute_dtype=dtype, **kw)
    names = [*OUTPUTS]
    for name, needed in zip(GRADS, need, strict=True):
        if needed and (name != "bias" or bias is not None):
            names.append(name)
        else:
            assert got[name] is None, name
    for name in names:
        assert got[name].dtype == (torch.float32 if name in OUTPUTS else dtype), name
        assert got[name].shape == ref[name].shape, name
        assert torch.isfinite(got[name]).all(), name
        err = (got[name].double() - ref[name].double()).abs().max().item()
        base = (same[name].double() - ref[name].double()).abs().max().item()
        scale = ref[name].abs().max().item()
        assert err <= base + TOL[dtype] * max(1.0, scale), (name, err, base, scale)
    ignored = targets == kw.get("ignore_index", -100)
    for name in OUTPUTS:
        assert (got[name][ignored] == 0).all(), name
    if need[0]:
        assert (got["hidden"][ignored] == 0).all()
    return got


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cublas_logprobs(shape, dtype, chunks, nan_empty):
    rows, cols = chunks
    check(*make_inputs(*shape, dtype), chunk_rows=rows, chunk_vocab=cols)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(
    "temperature,softcap",
    [(0.7, None), (1.0, 4.0), (1.3, 2.5)],
    ids=["T0.7", "cap4", "T1.3-cap2.5"],
)
def test_cublas_logprobs_temperature_softcap(temperature, softcap, dtype, nan_empty):
    inputs = make_inputs(37, 1000, 96, dtype)
    check(*inputs, temperature=temperature, softcap=softcap, chunk_rows=16, chunk_vocab=384)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("grads", [("logp",), ("entropy",)], ids=["logp-only", "entropy-only"])
def test_cublas_logprobs_single_output_grads(grads, dtype, nan_empty):
    """A gradient through logp only or entropy only (the other is None: no work for it)."""
    inputs = make_inputs(37, 1000, 96, dtype)
    check(*inputs, grads=grads, softcap=3.0, chunk_rows=16, chunk_vocab=384)


@pytest.mark.parametrize(
    "need", [(True, False, False), (False, True, True), (True, True, False)],
    ids=["frozen-head", "head-only", "no-bias-grad"],
)  # fmt: skip
def test_cublas_logprobs_needed_grads(need, nan_empty):
    got = check(
        *make_inputs(37, 1000, 96, torch.float16), need=need, chunk_rows=16, chunk_vocab=384
    )
    assert all((got[name] is None) != wanted for name, wanted in zip(GRADS, need, strict=True))


def test_cublas_logprobs_small_chunks(nan_empty):
    """Chunks of 3 rows (5 chunks, a tail of 1) x 50 and 47 columns (4 chunks; 5 with a
    tail of 12)."""
    hidden, weight, bias, targets = make_inputs(13, 200, 24, torch.float32, ignore=(0, 12))
    check(hidden, weight, bias, targets, softcap=5.0, temperature=0.9, chunk_rows=3, chunk_vocab=50)
    check(hidden, weight, bias, targets, chunk_rows=3, chunk_vocab=47)  # 47 does not divide 200


@pytest.mark.parametrize("direction", ["rising", "falling"])
def test_cublas_logprobs_online_merge_moving_max(direction, nan_empty):
    """Logits of a large scale (std ~25) that rise (the row max moves in every vocab
    chunk: every chunk rescales the running sums) or fall (later chunks underflow to 0
    against the first chunk's max) along the vocab."""
    hidden, weight, bias, targets = make_inputs(37, 1000, 96, torch.float32, scale=25.0)
    ramp = torch.linspace(-60.0, 60.0, 1000, device=DEVICE)
    bias = ramp if direction == "rising" else -ramp
    check(hidden, weight, bias, targets, chunk_rows=16, chunk_vocab=128)
    check(hidden, weight, bias, targets, chunk_rows=16, chunk_vocab=384)


def test_cublas_logprobs_ignore_index(nan_empty):
    hidden, weight, _, targets = make_inputs(37, 1000, 96, torch.float32, ignore=range(0, 37, 3))
    check(hidden, weight, None, targets, chunk_rows=16, chunk_vocab=384)
    # a custom ignore_index that is also a legal id: rows with that id count as ignored
    t2 = torch.where(targets == -100, 7, targets)
    got = check(hidden, weight, None, t2, ignore_index=7, chunk_rows=16, chunk_vocab=384)
    assert (got["logp"][t2 != 7] != 0).all()


def test_cublas_logprobs_all_ignored(nan_empty):
    hidden, weight, bias, targets = make_inputs(19, 300, 40, torch.float32)
    targets[:] = -100
    g = torch.randn(19, device=DEVICE)
    got = kernel(hidden, weight, bias, targets, g, g, chunk_rows=8, chunk_vocab=128)
    for name in (*OUTPUTS, *GRADS):
        assert (got[name] == 0).all(), name
    assert not got["top1"].any() and torch.isfinite(got["lse"]).all()


def test_cublas_logprobs_empty():
    hidden, weight, bias, targets = make_inputs(0, 50, 8, torch.float32)
    g = torch.zeros(0, device=DEVICE)
    got = kernel(hidden, weight, bias, targets, g, g, chunk_rows=16, chunk_vocab=384)
    assert got["logp"].shape == got["entropy"].shape == got["lse"].shape == (0,)
    assert got["hidden"].shape == (0, 8)
    assert (got["weight"] == 0).all() and (got["bias"] == 0).all()


def test_cublas_logprobs_no_upstream_grad():
    """Neither output gets a gradient: zero gradients and no GEMM."""
    hidden, weight, bias, targets = make_inputs(9, 100, 16, torch.float16)
    lse = torch.zeros(9, device=DEVICE)
    dh, dw, db = cublas_logprobs_bwd(
        hidden, weight, bias, targets, lse, None, None, None, 1.0, None, -100, True, True, True
    )
    assert dh.dtype == dw.dtype == db.dtype == torch.float16
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()


def test_cublas_logprobs_strided_hidden(nan_empty):
    """hidden rows with a stride > d (a slice of a wider tensor) and gradients of the
    launchers' own dtype layout."""
    hidden, weight, bias, targets = make_inputs(37, 1000, 96, torch.float32)
    wide = torch.randn(37, 130, device=DEVICE)
    wide[:, 7:103] = hidden
    check(wide[:, 7:103], weight, bias, targets, chunk_rows=16, chunk_vocab=384)


@pytest.mark.parametrize(
    "chunks", [(None, None), (16, 384), (8, 100)], ids=["1", "16x384", "8x100"]
)
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "cap4"])
def test_cublas_logprobs_top1(chunks, softcap, nan_empty):
    """is_top1 exactly as the oracle, with the max often in another vocab chunk than the
    target (row 0's max sits in the last chunk's tail)."""
    hidden, weight, targets, bias = top1_inputs(
        37, 1000, 96, bias=True, softcap=softcap, requires_grad=False
    )
    top1 = torch.empty(37, dtype=torch.bool, device=DEVICE)
    rows, cols = chunks
    cublas_logprobs_fwd(
        hidden, weight, bias, targets, 0.7, softcap, -100, False, top1,
        chunk_rows=rows, chunk_vocab=cols,
    )  # fmt: skip
    ref = naive_linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.7, softcap=softcap, return_is_top1=True
    )[1]
    assert torch.equal(top1, ref)
    assert 0 < int(top1.sum()) < 37 and not top1[targets == -100].any()


def test_cublas_logprobs_matches_across_chunkings(nan_empty):
    """Chunking changes only fp32 summation order: outputs agree to fp32 rounding."""
    hidden, weight, bias, targets = make_inputs(37, 1000, 96, torch.float16)
    g = torch.randn(37, device=DEVICE)
    a = kernel(hidden, weight, bias, targets, g, g)
    b = kernel(hidden, weight, bias, targets, g, g, chunk_rows=5, chunk_vocab=256)
    for name in ("logp", "entropy", "lse", "log_sum_sq"):
        torch.testing.assert_close(a[name], b[name], atol=2e-6, rtol=1e-6)
    assert torch.equal(a["top1"], b["top1"])


# Chunk selection and memory ------------------------------------------------------------


def test_chunk_sizes_selection(monkeypatch):
    monkeypatch.delenv(ENV_CHUNK_ROWS, raising=False)
    monkeypatch.delenv(ENV_CHUNK_VOCAB, raising=False)
    assert chunk_sizes(16384, 128256) == (1024, 16384)
    assert chunk_sizes(16384, 128256, backward=True) == (1024, 8192)
    assert chunk_sizes(37, 1000) == (37, 1000)  # clipped to the problem
    assert chunk_sizes(0, 1000) == (1, 1000)
    monkeypatch.setenv(ENV_CHUNK_ROWS, "512")
    monkeypatch.setenv(ENV_CHUNK_VOCAB, "32768")
    assert chunk_sizes(16384, 128256) == chunk_sizes(16384, 128256, backward=True) == (512, 32768)
    assert chunk_sizes(16384, 128256, 256, 4096) == (256, 4096)  # kwargs win
    monkeypatch.setenv(ENV_CHUNK_ROWS, "many")
    with pytest.raises(ValueError, match=ENV_CHUNK_ROWS):
        chunk_sizes(10, 10)
    monkeypatch.delenv(ENV_CHUNK_ROWS)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="chunk_vocab"):
            chunk_sizes(10, 10, None, bad)


def test_chunk_env_vars_reach_the_launchers(monkeypatch):
    """Results with the chunks from the environment equal those passed as kwargs (the
    same GEMMs and kernels run), and differ in rounding from the one-chunk run."""
    hidden, weight, bias, targets = make_inputs(37, 1000, 96, torch.float32)
    g = torch.randn(37, device=DEVICE)
    by_kwargs = kernel(hidden, weight, bias, targets, g, g, chunk_rows=16, chunk_vocab=384)
    monkeypatch.setenv(ENV_CHUNK_ROWS, "16")
    monkeypatch.setenv(ENV_CHUNK_VOCAB, "384")
    by_env = kernel(hidden, weight, bias, targets, g, g)
    for name in ("logp", "entropy", "lse", "top1", "log_sum_sq", *GRADS):
        assert torch.equal(by_env[name], by_kwargs[name]), name


def test_epilogue_tiles_from_env(monkeypatch):
    """Other epilogue tiles (rows per program, columns per step) from the environment:
    the same results up to fp32 summation order; bad values are refused."""
    hidden, weight, bias, targets = make_inputs(37, 1000, 96, torch.float32)
    g = torch.randn(37, device=DEVICE)
    chunks = dict(chunk_rows=16, chunk_vocab=384)
    base = kernel(hidden, weight, bias, targets, g, g, softcap=4.0, **chunks)
    monkeypatch.setenv(ENV_FWD_TILE, "2x256x4")
    monkeypatch.setenv(ENV_BWD_TILE, "8x64x2")
    assert epilogue_tile() == (2, 256, 4) and epilogue_tile(backward=True) == (8, 64, 2)
    other = kernel(hidden, weight, bias, targets, g, g, softcap=4.0, **chunks)
    for name in ("logp", "entropy", "lse", "log_sum_sq", *GRADS):
        torch.testing.assert_close(other[name], base[name], atol=2e-6, rtol=1e-6)
    assert torch.equal(other["top1"], base["top1"])
    for bad in ("1x2048", "3x64x4", "ax64x4"):
        monkeypatch.setenv(ENV_FWD_TILE, bad)
        with pytest.raises(ValueError, match=ENV_FWD_TILE):
            epilogue_tile()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_default_chunks_bound_memory(dtype, monkeypatch):
    """The defaults take <= 64 MiB of scratch at Llama-3-8B's head (V=128256, d=4096) and
    N = 16384, forward and backward (frozen or trainable head: a trainable head's fp32
    dW accumulator is every design's and not counted)."""
    monkeypatch.delenv(ENV_CHUNK_ROWS, raising=False)
    monkeypatch.delenv(ENV_CHUNK_VOCAB, raising=False)
    N, V, d = 16384, 128256, 4096
    assert workspace_bytes(N, V, d, dtype, backward=False) <= 64 * 2**20 + 5 * 1024 * 4
    assert workspace_bytes(N, V, d, dtype, backward=True) <= 64 * 2**20
    if dtype != torch.float32:
        assert workspace_bytes(N, V, d, dtype, backward=True) == 64 * 2**20


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cublas_logprobs_scratch_is_bounded(dtype):
    """No tensor of N*V (or, frozen, V*d) elements; the largest is the logits chunk."""
    N, V, d = 45, 1000, 8
    rows, cols = 16, 256
    hidden, weight, _, targets = make_inputs(N, V, d, dtype, bias=False)
    g = torch.randn(N, device=DEVICE)
    with AllocationRecorder() as rec:
        kernel(
            hidden, weight, None, targets, g, g, need=(True, False, False),
            chunk_rows=rows, chunk_vocab=cols,
        )  # fmt: skip
    sizes = [torch.Size(s).numel() for s, _ in rec.allocs]
    # (on CPU, half GEMM operands go through fp32 copies of at most rows x cols elements)
    assert max(sizes) == rows * cols, rec.allocs
    assert not any(n >= V * d for n in sizes)


def test_cublas_logprobs_rejects_other_dtypes():
    hidden, weight, bias, targets = make_inputs(5, 20, 8, torch.float32)
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        cublas_logprobs_fwd(hidden.double(), weight.double(), None, targets, 1.0, None, -100, False)
    with pytest.raises(TypeError, match="one dtype"):
        cublas_logprobs_fwd(hidden, weight.half(), None, targets, 1.0, None, -100, False)


# GPU: bf16 at real head shapes -----------------------------------------------------------

HEADS = {"llama3-8b": (4096, 128256), "qwen2.5-7b": (3584, 152064), "qwen2.5-1.5b": (1536, 151936)}


@pytest.mark.gpu
@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_cublas_logprobs_bf16_real_heads(head, trainable):
    """bf16 against the fp32 PyTorch path, by the rule (baseline: naive bf16)."""
    from fastrl.ops.logprobs.chunked import chunked_logprobs_bwd, chunked_logprobs_fwd

    d, V = head
    N = 1027
    hidden, weight, _, targets = make_inputs(
        N, V, d, torch.bfloat16, bias=False, ignore=range(0, N, 97)
    )
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    need = (True, trainable, False)
    got = kernel(hidden, weight, None, targets, g_logp, g_ent, need=need)
    h32, w32 = hidden.float(), weight.float()
    logp, ent, lse = chunked_logprobs_fwd(h32, w32, None, targets, 1.0, None, -100, True)
    dh, dw, _ = chunked_logprobs_bwd(
        h32, w32, None, targets, lse, ent, g_logp, g_ent, 1.0, None, -100, True, trainable, False
    )
    ref = {"logp": logp, "entropy": ent, "hidden": dh, "weight": dw}
    same = oracle(hidden, weight, None, targets, g_logp, g_ent, compute_dtype=torch.bfloat16)
    for name in ("logp", "entropy", "hidden") + (("weight",) if trainable else ()):
        err = (got[name].float() - ref[name]).abs().max().item()
        base = (same[name].float() - ref[name]).abs().max().item()
        scale = ref[name].abs().max().item()
        assert err <= base + TOL[torch.bfloat16] * max(1.0, scale), (name, err, base)


@pytest.mark.gpu
def test_cublas_logprobs_bf16_same_rounding_as_triton_tiles():
    """fp32 logits in both designs: on a trained model's logit scale (std ~5, half the
    targets the argmax) the log-probs agree to fp32 summation order, not bf16 rounding,
    so a KL between them is ~0 and no ratio is clipped."""
    from fastrl.kernels.linear_logprobs import linear_logprobs_fwd

    torch.manual_seed(3)
    N, V, d = 4096, 128256, 4096
    hidden = torch.randn(N, d, device=DEVICE).to(torch.bfloat16)
    weight = (torch.randn(V, d, device=DEVICE) * 5 / d**0.5).to(torch.bfloat16)
    w32 = weight.float()
    argmax = torch.cat([(h.float() @ w32.T).argmax(-1) for h in hidden.split(512)])
    del w32
    targets = torch.where(torch.arange(N, device=DEVICE) % 2 == 0, argmax, argmax.roll(1))
    a = cublas_logprobs_fwd(hidden, weight, None, targets, 1.0, None, -100, False)[0]
    b = linear_logprobs_fwd(hidden, weight, None, targets, 1.0, None, -100, False)[0]
    diff = a.double() - b.double()
    assert diff.abs().max().item() < 1e-4
    kl = (torch.exp(diff) - 1 - diff).mean().item()  # k3 estimator
    assert kl < 1e-9
    assert ((a - b).exp() - 1).abs().max().item() < 1e-3  # no ratio near a 0.2 clip


@pytest.mark.gpu
def test_cublas_logprobs_bf16_peak_memory():
    """Measured extra peak memory of the defaults at Llama-3-8B's head, frozen: <= 64 MiB
    beyond the inputs and outputs (logp, entropy, lse; d_hidden)."""
    torch.manual_seed(0)
    N, V, d = 4096, 128256, 4096
    hidden, weight, _, targets = make_inputs(N, V, d, torch.bfloat16, bias=False, scale=1.0)
    g = torch.randn(N, device=DEVICE)
    # warm-up: cuBLAS workspaces and Triton compilation happen once, outside the figure
    warm = cublas_logprobs_fwd(hidden, weight, None, targets, 1.0, None, -100, True)
    cublas_logprobs_bwd(
        hidden, weight, None, targets, warm[2], warm[1], g, g, 1.0, None, -100, True, False, False
    )
    del warm
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, ent, lse = cublas_logprobs_fwd(hidden, weight, None, targets, 1.0, None, -100, True)
    torch.cuda.synchronize()
    outs = 3 * N * 4
    assert torch.cuda.max_memory_allocated() - base - outs <= 64 * 2**20 + 2**20
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    dh, _, _ = cublas_logprobs_bwd(
        hidden, weight, None, targets, lse, ent, g, g, 1.0, None, -100, True, False, False
    )
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base - N * d * 2 <= 64 * 2**20 + 2**20
    assert torch.isfinite(dh).all()


# ----------------------------------------------------------------- through the public API


def spy_design(monkeypatch):
    import fastrl.kernels.cublas_logprobs as cub
    import fastrl.kernels.linear_logprobs as tiles

    calls = []
    for module, name in ((cub, "cublas_logprobs_fwd"), (tiles, "linear_logprobs_fwd")):
        real = getattr(module, name)
        spy = lambda *a, _name=name, _real=real, **k: calls.append(_name) or _real(*a, **k)
        monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_linear_logprobs_design_cublas(dtype, monkeypatch):
    """linear_logprobs(design="cublas"): outputs and gradients as the float64 oracle
    (the same rule as above), padding compacted away."""
    from fastrl import linear_logprobs

    calls = spy_design(monkeypatch)
    hidden, weight, bias, targets = make_inputs(37, 1000, 96, dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    g = torch.randn(37, device=DEVICE)
    logp, ent = linear_logprobs(
        hidden, weight, targets, bias=bias, return_entropy=True, impl="triton", design="cublas"
    )
    grads = torch.autograd.grad((logp * g).sum() + ent.sum(), (hidden, weight))
    assert calls == ["cublas_logprobs_fwd"]
    exact = oracle(hidden.detach(), weight.detach(), bias, targets, g, torch.ones_like(g))
    same = oracle(hidden.detach(), weight.detach(), bias, targets, g, torch.ones_like(g),
                  compute_dtype=dtype)  # fmt: skip
    for name, got in (("logp", logp), ("entropy", ent), ("hidden", grads[0]), ("weight", grads[1])):
        err = (got.double() - exact[name]).abs().max()
        allowed = (same[name].double() - exact[name]).abs().max() + TOL[dtype] * max(
            1.0, exact[name].abs().max().item()
        )
        assert err <= allowed, (name, err, allowed)


def test_linear_logprobs_design_from_env(monkeypatch):
    from fastrl import linear_logprobs

    calls = spy_design(monkeypatch)
    hidden, weight, _, targets = make_inputs(5, 77, 40, torch.float32)
    monkeypatch.setenv("FASTRL_LOGPROBS_DESIGN", "cublas")
    a = linear_logprobs(hidden, weight, targets, impl="triton")
    monkeypatch.setenv("FASTRL_LOGPROBS_DESIGN", "tiles")
    b = linear_logprobs(hidden, weight, targets, impl="triton")
    assert calls == ["cublas_logprobs_fwd", "linear_logprobs_fwd"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    monkeypatch.setenv("FASTRL_LOGPROBS_DESIGN", "flash")
    with pytest.raises(ValueError, match="FASTRL_LOGPROBS_DESIGN.*'flash'"):
        linear_logprobs(hidden, weight, targets, impl="triton")
