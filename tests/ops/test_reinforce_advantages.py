"""REINFORCE++, REINFORCE++-baseline and ReMax advantages (and their steps: KL-shaped
rewards, returns-to-go) against the float64 oracle and closed forms; bad input."""

import itertools

import pytest
import torch

from fastrl import (
    discounted_returns,
    kl_shaped_rewards,
    reinforce_plus_plus_advantages,
    remax_advantages,
)
from fastrl.ops.advantages.naive import (
    naive_reinforce_plus_plus_advantages,
    naive_remax_advantages,
)
from tests.support import DEVICE

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(B, T, layout, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, T + 1, (B,), generator=g)
    lens[0] = T
    if B > 1:
        lens[1] = 0  # an empty row
    t = torch.arange(T)[None, :]
    if layout == "right":
        mask = t < lens[:, None]
    elif layout == "left":
        mask = t >= T - lens[:, None]
    else:  # holes inside right-padded rows
        mask = (t < lens[:, None]) & (torch.rand(B, T, generator=g) > 0.3)
    rewards = torch.randn(B, generator=g, dtype=torch.float64)
    kl = 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    kl = kl.masked_fill(~mask, float("nan"))  # garbage where masked must not matter
    cast = lambda x: x.to(dtype).to(DEVICE)
    return cast(rewards), mask.long().to(DEVICE), cast(kl)


SHAPES = [(3, 1), (5, 13), (7, 37)]
OPTIONS = {
    "plain": dict(),
    "kl-gamma": dict(kl_coef=0.05, gamma=0.9),
    "kl-gamma0-nostd": dict(kl_coef=0.2, gamma=0.0, normalize_std=False),
    "baseline": dict(baseline="mean", kl_coef=0.1),
    "baseline-nostd": dict(baseline="mean", normalize_std=False),
}
CASES = list(itertools.product(SHAPES, ["right", "left", "holes"], OPTIONS))


@pytest.mark.parametrize(
    "shape,layout,options", CASES, ids=[f"{s[0]}x{s[1]}-{lay}-{o}" for s, lay, o in CASES]
)
def test_reinforce_plus_plus_matches_oracle(shape, layout, options):
    B, T = shape
    rewards, mask, kl = _inputs(B, T, layout, CASES.index((shape, layout, options)))
    kw = dict(OPTIONS[options])
    if kw.get("baseline") == "mean":
        kw["group_size"] = B  # B = 3, 5, 7: one group a batch (odd groups)
    if kw.get("kl_coef"):
        kw["kl"] = kl
    adv, ret = reinforce_plus_plus_advantages(rewards, mask, **kw)
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    want_adv, want_ret = naive_reinforce_plus_plus_advantages(rewards.cpu(), mask.cpu(), **cpu)
    assert adv.dtype == torch.float32 and adv.shape == (B, T) and not adv.requires_grad
    torch.testing.assert_close(adv.cpu().double(), want_adv, **TOL)
    torch.testing.assert_close(ret.cpu().double(), want_ret, **TOL)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    keep = mask.bool()
    if keep.sum() > 1 and kw.get("normalize_std", True) and adv[keep].std() > 0:
        # whitened over the batch: zero mean, unit (biased) variance over the tokens
        assert abs(adv[keep].mean().item()) < 1e-5
        assert abs(adv[keep].var(unbiased=False).item() - 1) < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_remax_matches_oracle(shape, layout):
    B, T = shape
    rewards, mask, _ = _inputs(B, T, layout, 50 + SHAPES.index(shape))
    greedy = torch.randn(B, device=DEVICE)
    adv, ret = remax_advantages(rewards, greedy, mask)
    want_adv, want_ret = naive_remax_advantages(rewards.cpu(), greedy.cpu(), mask.cpu())
    torch.testing.assert_close(adv.cpu().double(), want_adv, **TOL)
    torch.testing.assert_close(ret.cpu().double(), want_ret, **TOL)
    # undiscounted, reward at the end: every token's return is the sequence's reward
    keep = mask.bool()
    torch.testing.assert_close(ret, torch.where(keep, rewards[:, None], 0.0))
    torch.testing.assert_close(adv, torch.where(keep, (rewards - greedy)[:, None], 0.0))


def test_kl_shaped_rewards_and_returns_closed_forms():
    rewards = torch.tensor([1.0, -2.0, 3.0], device=DEVICE)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], device=DEVICE)
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0]] * 3, device=DEVICE)
    r = kl_shaped_rewards(rewards, mask, kl=kl, kl_coef=0.5)
    # -0.5 * kl on unmasked tokens (row 0's t=3 is masked: its 9.0 is never read), the
    # reward on the last unmasked one, nothing on an empty row
    want = torch.tensor(
        [[-0.05, -0.1, -0.15 + 1.0, 0.0], [0.0, -0.1, -0.15, -4.5 - 2.0], [0.0] * 4],
        device=DEVICE,
    )
    torch.testing.assert_close(r, want)
    g = discounted_returns(r, mask, gamma=0.5)
    torch.testing.assert_close(g[0, 2], r[0, 2])
    torch.testing.assert_close(g[0, 0], r[0, 0] + 0.5 * r[0, 1] + 0.25 * r[0, 2])
    assert (g[2] == 0).all() and g[0, 3] == 0


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.97])
@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_discounted_returns_scan_kernel_equals_the_loop(layout, gamma):
    """impl="triton" (the GAE scan, values 0, lambda 1, every token kept) gives the token
    loop's returns: masked tokens reward 0 and still discount (OpenRLHF)."""
    _, mask, kl = _inputs(7, 37, layout, seed=3)
    r = torch.nan_to_num(kl, nan=5.0)  # garbage where masked must not matter
    loop = discounted_returns(r, mask, gamma=gamma, impl="torch")
    scan = discounted_returns(r, mask, gamma=gamma, impl="triton")
    assert scan.dtype == loop.dtype == torch.float32
    torch.testing.assert_close(scan, loop, **TOL)
    if layout == "holes":
        assert (loop[mask == 0] == 0).all() and loop.abs().sum() > 0


def test_baseline_groups_and_float64():
    # two groups of 3: each reward minus its own group's mean (prompt-major layout)
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=torch.float64, device=DEVICE)
    mask = torch.ones(6, 1, dtype=torch.bool, device=DEVICE)
    adv, ret = reinforce_plus_plus_advantages(
        rewards, mask, baseline="mean", group_size=3, normalize_std=False
    )
    assert adv.dtype == torch.float64
    want = torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(ret[:, 0].cpu(), want)
    torch.testing.assert_close(adv[:, 0].cpu(), want)  # already zero-mean
    # a group of one is centred to 0 (OpenRLHF's mean of one value)
    one, _ = reinforce_plus_plus_advantages(rewards, mask, baseline="mean", group_size=1)
    assert (one == 0).all()


def test_empty_shapes():
    for B, T in ((0, 4), (3, 0)):
        mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
        rewards = torch.randn(B, device=DEVICE)
        for adv, ret in (
            reinforce_plus_plus_advantages(rewards, mask),
            remax_advantages(rewards, rewards, mask),
        ):
            assert adv.shape == ret.shape == (B, T)


def test_bad_input():
    rewards, mask, kl = _inputs(4, 5, "right", 9)
    rpp = reinforce_plus_plus_advantages
    cases = [
        (lambda: rpp(rewards[:3], mask), ValueError, r"rewards must have shape \[B\]=\(4,\)"),
        (lambda: rpp(rewards, mask * 3), ValueError, r"mask must be boolean or hold only 0 and 1"),
        (lambda: rpp(rewards, mask, kl=kl[:, :2], kl_coef=0.1), ValueError, r"kl must have the shape of mask"),  # noqa: E501
        (lambda: rpp(rewards, mask, kl_coef=0.1), ValueError, r"kl_coef=0.1 needs kl"),
        (lambda: rpp(rewards, mask, kl=kl, kl_coef=-0.1), ValueError, r"kl_coef must be finite and >= 0.0, got -0.1"),  # noqa: E501
        (lambda: rpp(rewards, mask, gamma=1.01), ValueError, r"gamma must be .*got 1.01"),
        (lambda: rpp(rewards, mask, baseline="rloo"), ValueError, r"baseline must be one of \('none', 'mean'\), got 'rloo'"),  # noqa: E501
        (lambda: rpp(rewards, mask, baseline="mean"), ValueError, r"baseline='mean' needs group_size"),  # noqa: E501
        (lambda: rpp(rewards, mask, baseline="mean", group_size=3), ValueError, r"B=4 rows, not a multiple of group_size=3"),  # noqa: E501
        (lambda: rpp(rewards, mask, baseline="mean", group_size=2, gamma=0.9), ValueError, r"baseline='mean' needs gamma=1"),  # noqa: E501
        (lambda: rpp(rewards, mask, group_size=2), ValueError, r"group_size=2 is only read by baseline='mean'"),  # noqa: E501
        (lambda: rpp(rewards, mask, normalize_std=1), TypeError, r"normalize_std must be a bool"),
        (lambda: rpp(rewards.long(), mask), TypeError, r"rewards must be a floating-point tensor"),
        (lambda: remax_advantages(rewards, rewards[:2], mask), ValueError, r"baseline_rewards must have shape \[B\]"),  # noqa: E501
        (lambda: discounted_returns(kl, mask, gamma=-1.0), ValueError, r"gamma must be"),
    ]  # fmt: skip
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
