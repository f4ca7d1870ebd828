"""`gae_advantages`: the Triton scan and the PyTorch path against the float64 oracle, on odd
shapes, every padding layout and the gamma/lambda corners; closed forms; bad input."""

import itertools

import pytest
import torch

from fastrl import gae_advantages, masked_whiten
from fastrl.ops.advantages.naive import naive_gae_advantages
from tests.support import DEVICE, HAS_CUDA

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 against float64: the scan adds in another order


def _mask(B, T, layout, g):
    """[B, T] 0/1 masks with an empty row (when B > 1) in every layout."""
    lens = torch.randint(0, T + 1, (B,), generator=g)
    lens[0] = T
    if B > 1:
        lens[1] = 0
    t = torch.arange(T)[None, :]
    if layout == "right":
        m = t < lens[:, None]
    elif layout == "left":
        m = t >= T - lens[:, None]
    else:  # holes: right padding with masked tokens inside (tool observations)
        m = (t < lens[:, None]) & (torch.rand(B, T, generator=g) > 0.3)
    return m.long()


def _inputs(B, T, layout, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = _mask(B, T, layout, g)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    # garbage where masked must not matter
    r = r.masked_fill(mask == 0, float("nan"))
    v = v.masked_fill(mask == 0, float("inf"))
    return r.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE), mask.to(DEVICE)


SHAPES = [(3, 1), (5, 13), (7, 37)]
DISCOUNTS = [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.95)]
CASES = list(itertools.product(SHAPES, ["right", "left", "holes"], DISCOUNTS))


@pytest.mark.parametrize(
    "shape,layout,discount",
    CASES,
    ids=[f"{s[0]}x{s[1]}-{lay}-g{d[0]}-l{d[1]}" for s, lay, d in CASES],
)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_matches_oracle(shape, layout, discount, impl, nan_empty):
    gamma, lam = discount
    r, v, mask = _inputs(*shape, layout, CASES.index((shape, layout, discount)))
    adv, ret = gae_advantages(r, v, mask, gamma=gamma, lam=lam, impl=impl)
    want_adv, want_ret = naive_gae_advantages(r.cpu(), v.cpu(), mask.cpu(), gamma=gamma, lam=lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == shape
    assert not adv.requires_grad
    torch.testing.assert_close(adv.cpu().double(), want_adv, **TOL)
    torch.testing.assert_close(ret.cpu().double(), want_ret, **TOL)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


@pytest.mark.parametrize(
    "block, chunk_t",
    [((1, 1), 0), ((2, 4), 0), ((8, 16), 0), ((1, 1), 3), ((2, 4), 8), ((4, 2), 2), ((2, 4), 64)],
    ids=["1x1", "2x4", "8x16", "1x1-chunk3", "2x4-chunk8", "4x2-chunk2", "2x4-chunk-past-T"],
)
def test_tile_shapes_agree(block, chunk_t, nan_empty):
    # the launcher's tiles and chunks are a GPU sweep's knobs: every one gives the same
    # numbers (chunks of 2 or 3 tokens over 13: a chain of 5-7 carried maps, holes across
    # chunk borders, a row tail)
    from fastrl.kernels.gae import gae_fwd

    r, v, mask = _inputs(5, 13, "holes", 1)
    want = gae_advantages(r, v, mask, gamma=0.97, lam=0.9, impl="torch")
    tiles = dict(block_b=block[0], block_t=block[1], chunk_t=chunk_t)
    got = gae_fwd(r, v, mask.bool(), 0.97, 0.9, **tiles)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_strided_views(nan_empty):
    # every input has its own row and token strides: views need no copy
    g = torch.Generator().manual_seed(8)
    rv = torch.randn(5, 26, generator=g).to(DEVICE)[:, ::2]  # token stride 2
    vv = torch.randn(13, 5, generator=g).to(DEVICE).t()  # column-major
    mv = (torch.rand(13, 5, generator=g) > 0.3).to(DEVICE).t()
    got = gae_advantages(rv, vv, mv, gamma=0.95, lam=0.9, impl="triton")
    want = gae_advantages(rv.contiguous(), vv.contiguous(), mv.contiguous(), gamma=0.95,
                          lam=0.9, impl="torch")  # fmt: skip
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_float64_and_half_inputs():
    r, v, mask = _inputs(5, 13, "right", 2, torch.float64)
    adv, ret = gae_advantages(r, v, mask, gamma=0.9, lam=0.95)  # float64: the PyTorch path
    want_adv, want_ret = naive_gae_advantages(r.cpu(), v.cpu(), mask.cpu(), gamma=0.9, lam=0.95)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv.cpu(), want_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret.cpu(), want_ret, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"impl='triton' does not cover float64"):
        gae_advantages(r, v, mask, impl="triton")
    *h, mask = _inputs(5, 13, "left", 3, torch.float16)
    got = gae_advantages(*h, mask, gamma=0.9, impl="triton")
    want = gae_advantages(*(x.float() for x in h), mask, gamma=0.9, impl="torch")
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, **TOL)


def test_closed_forms():
    # lam = 1: A_t = (discounted return) - V_t; lam = 0: the one-step TD error
    B, T = 3, 6
    r = torch.randn(B, T, device=DEVICE)
    v = torch.randn(B, T, device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    gamma = 0.9
    disc = gamma ** torch.arange(T, device=DEVICE, dtype=torch.float32)
    mc = torch.stack([(r[:, t:] * disc[: T - t]).sum(1) for t in range(T)], 1)
    for impl in ("triton", "torch"):
        adv, ret = gae_advantages(r, v, mask, gamma=gamma, lam=1.0, impl=impl)
        torch.testing.assert_close(adv, mc - v, **TOL)
        torch.testing.assert_close(ret, mc, **TOL)
        adv0, _ = gae_advantages(r, v, mask, gamma=gamma, lam=0.0, impl=impl)
        v_next = torch.cat([v[:, 1:], torch.zeros(B, 1, device=DEVICE)], 1)
        torch.testing.assert_close(adv0, r + gamma * v_next - v, **TOL)


def test_a_hole_is_skipped_not_a_step():
    # [a, hole, b] gives a's advantage as if the row were [a, b] (verl's skip of masked tokens)
    r = torch.tensor([[1.0, 5.0, 2.0], [1.0, 2.0, 0.0]], device=DEVICE)
    v = torch.tensor([[0.5, 9.0, 0.25], [0.5, 0.25, 0.0]], device=DEVICE)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], device=DEVICE)
    for impl in ("triton", "torch"):
        adv, ret = gae_advantages(r, v, mask, gamma=0.9, lam=0.8, impl=impl)
        torch.testing.assert_close(adv[0, [0, 2]], adv[1, [0, 1]])
        torch.testing.assert_close(ret[0, [0, 2]], ret[1, [0, 1]])


def test_whitening_after_gae_is_openrlhfs():
    r, v, mask = _inputs(7, 13, "right", 4)
    adv, _ = gae_advantages(r, v, mask, gamma=1.0, lam=0.95)
    w = masked_whiten(adv, mask)
    keep = mask.bool()
    vals = adv[keep].double()
    want = (vals - vals.mean()) / vals.var(unbiased=False).clamp(min=1e-8).sqrt()
    torch.testing.assert_close(w[keep].double(), want, rtol=1e-5, atol=1e-5)
    assert (w[~keep] == 0).all()
    centred = masked_whiten(adv, mask, normalize_std=False)
    torch.testing.assert_close(centred[keep].double(), vals - vals.mean(), rtol=1e-5, atol=1e-5)


def test_empty_shapes():
    for B, T in ((0, 5), (3, 0)):
        z = torch.zeros(B, T, device=DEVICE)
        for impl in ("triton", "torch"):
            adv, ret = gae_advantages(z, z, z.long(), impl=impl)
            assert adv.shape == ret.shape == (B, T)


def test_bad_input():
    r, v, mask = _inputs(3, 5, "right", 5)
    bad = [
        (dict(rewards=r[:, :4]), ValueError, r"rewards must have the shape of mask \(3, 5\)"),
        (dict(values=v.long()), TypeError, r"values must be a floating-point tensor"),
        (dict(mask=mask * 2), ValueError, r"mask must be boolean or hold only 0 and 1, got value 2"),  # noqa: E501
        (dict(mask=mask[0]), ValueError, r"mask must have shape \[B, T\], got \(5,\)"),
        (dict(gamma=1.5), ValueError, r"gamma must be finite and >= 0.0 and <= 1.0, got 1.5"),
        (dict(gamma=-0.1), ValueError, r"gamma must be .*got -0.1"),
        (dict(lam=float("nan")), ValueError, r"lam must be .*got nan"),
        (dict(lam="0.9"), TypeError, r"lam must be a number, got '0.9'"),
        (dict(impl="cuda"), ValueError, r"impl must be one of"),
    ]  # fmt: skip
    for change, exc, match in bad:
        kw = {**dict(rewards=r, values=v, mask=mask), **change}
        with pytest.raises(exc, match=match):
            gae_advantages(kw.pop("rewards"), kw.pop("values"), kw.pop("mask"), **kw)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU refusal")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    r, v, mask = _inputs(3, 5, "right", 6)
    with pytest.raises(ValueError, match=r"impl='triton' needs CUDA tensors"):
        gae_advantages(r, v, mask, impl="triton")
    gae_advantages(r, v, mask)  # auto: the PyTorch path


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("chunk_t", [0, 1024], ids=["one-pass", "chunks-of-1024"])
def test_gpu_long_rows_bf16(chunk_t):
    # GPU tiles (1024 tokens a step) over several steps and a row tail; the scan's GPU
    # lowering is covered only here (the interpreter runs associative_scan sequentially)
    from fastrl.kernels.gae import gae_fwd

    g = torch.Generator().manual_seed(7)
    B, T = 33, 3000
    r = torch.randn(B, T, generator=g).cuda().bfloat16()
    v = torch.randn(B, T, generator=g).cuda().bfloat16()
    mask = (torch.rand(B, T, generator=g) > 0.1).cuda()
    adv, ret = gae_fwd(r, v, mask, 0.999, 0.95, chunk_t=chunk_t)
    want_adv, want_ret = naive_gae_advantages(
        r.float().cpu(), v.float().cpu(), mask.cpu(), gamma=0.999, lam=0.95
    )
    torch.testing.assert_close(adv.cpu().double(), want_adv, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ret.cpu().double(), want_ret, rtol=1e-4, atol=1e-3)


def test_chunk_not_a_multiple_of_the_block_is_refused():
    from fastrl.kernels.gae import gae_fwd

    r, v, mask = _inputs(2, 9, "right", 3)
    for chunk_t in (6, -8, 8.0):
        with pytest.raises(ValueError, match=rf"chunk_t={chunk_t} must be 0 .* of block_t=4"):
            gae_fwd(r, v, mask.bool(), 0.9, 0.9, block_b=1, block_t=4, chunk_t=chunk_t)
    # the default chunk (GAE_CHUNK_T) is rounded up to the caller's tile, never refused
    want = gae_advantages(r, v, mask, gamma=0.9, lam=0.9, impl="torch")
    for g, w in zip(gae_fwd(r.float(), v.float(), mask.bool(), 0.9, 0.9, block_t=32), want,
                    strict=True):  # fmt: skip
        torch.testing.assert_close(g, w.float(), **TOL)
