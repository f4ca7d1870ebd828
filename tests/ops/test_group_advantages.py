"""`group_advantages` against hand-computed values and the float64 oracle.

Parity with TRL's own GRPOTrainer / RLOOTrainer is in test_trl_parity_grpo.py.
"""

import itertools
import math

import pytest
import torch

from fastrl import group_advantages
from fastrl.ops.advantages.group import _KERNEL
from fastrl.ops.advantages.naive import naive_group_advantages

NAN = float("nan")
EPS = 1e-4

MODES = [
    (baseline, scale, "sum_then_normalize")
    for baseline, scale in itertools.product(["mean", "rloo"], ["group", "batch", "none"])
] + [("mean", "group", "normalize_then_sum")]


def _rewards(n_groups, group_size, k, seed):
    """Random rewards with the awkward cases: a constant group, missing rewards, an
    unscorable completion, a group with a single scored completion."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n_groups * group_size, k, generator=g)
    r[:group_size] = 0.1  # constant group, not exact in binary
    if n_groups > 2 and group_size > 2:
        r[group_size, :] = NAN  # unscorable completion
        r[group_size + 1, 0] = NAN  # one reward function returned None
        r[2 * group_size : 3 * group_size - 1, :] = NAN  # one scored completion left
    return r


@pytest.mark.parametrize("baseline,scale,normalize", MODES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_matches_oracle(baseline, scale, normalize, k, group_size):
    rewards = _rewards(4, group_size, k, seed=group_size * 10 + k)
    weights = [1.0, -0.5, 2.0][:k]
    kw = dict(baseline=baseline, scale=scale, weights=weights, normalize=normalize)
    got = group_advantages(rewards, group_size, **kw)
    want = naive_group_advantages(rewards, group_size, **kw)
    assert got.dtype == torch.float32 and got.shape == (rewards.shape[0],)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # float64 in, float64 out, and then the agreement is to float64 rounding
    got64 = group_advantages(rewards.double(), group_size, **kw)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-12)


def test_grpo_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    std1 = math.sqrt(1 / 3)  # Bessel-corrected: sum of squares 1, n - 1 = 3
    std2 = math.sqrt(2 / 3)
    want = [0.5 / (std1 + EPS) * s for s in (1, -1, -1, 1)] + [
        x / (std2 + EPS) for x in (1.0, -1.0, 0.0, 0.0)
    ]
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor(want))
    # Dr. GRPO: centred only
    torch.testing.assert_close(
        group_advantages(r, 4, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 1, -1, 0, 0])
    )
    # batch: centred per group, scaled by the batch std of the rewards
    std_b = r.std().item()  # torch.std is Bessel-corrected too
    torch.testing.assert_close(
        group_advantages(r, 4, scale="batch"),
        torch.tensor([0.5, -0.5, -0.5, 0.5, 1, -1, 0, 0]) / (std_b + EPS),
    )


def test_rloo_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # baseline of each: the mean of the three others
    want = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])
    torch.testing.assert_close(group_advantages(r, 4, baseline="rloo", scale="none"), want)
    torch.testing.assert_close(
        group_advantages(r, 4, baseline="rloo", scale="batch"),
        (want - want.mean()) / (want.std() + EPS),
    )
    torch.testing.assert_close(
        group_advantages(r, 4, baseline="rloo", scale="group"), want / (r.std() + EPS)
    )


def test_multi_reward_sum_then_normalize_is_the_weighted_sum():
    r = torch.randn(12, 3)
    w = torch.tensor([0.5, 2.0, -1.0])
    for baseline, scale in itertools.product(["mean", "rloo"], ["group", "batch", "none"]):
        torch.testing.assert_close(
            group_advantages(r, 4, weights=w, baseline=baseline, scale=scale),
            group_advantages(r @ w, 4, baseline=baseline, scale=scale),
        )


def test_normalize_then_sum_standardises_each_objective():
    # objective 1 is objective 0 scaled by 100: after per-group standardisation they
    # weigh the same, unlike in sum_then_normalize
    r0 = torch.tensor([1.0, 0.0, 2.0, 1.0, 5.0, 3.0, 4.0, 4.0])
    r = torch.stack([r0, 100 * r0.flip(0)], 1)
    a = group_advantages(r, 4, normalize="normalize_then_sum")
    z = lambda x: (
        (x - x.view(2, 4).mean(1).repeat_interleave(4))
        / (x.view(2, 4).std(1).repeat_interleave(4) + EPS)
    )
    s = z(r[:, 0]) + z(r[:, 1])
    torch.testing.assert_close(a, (s - s.mean()) / (s.std() + EPS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("baseline,scale,normalize", MODES)
def test_zero_variance_groups_give_exactly_zero(baseline, scale, normalize):
    r = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 0.3, 0.2])
    a = group_advantages(r, 4, baseline=baseline, scale=scale, normalize=normalize)
    assert torch.equal(a[:8], torch.zeros(8))
    assert (a[8:] != 0).all()
    # every group constant, so the batch std is 0 too
    a = group_advantages(r[:8], 4, baseline=baseline, scale=scale, normalize=normalize)
    assert torch.equal(a, torch.zeros(8))


@pytest.mark.parametrize("baseline,scale,normalize", MODES)
def test_never_nan(baseline, scale, normalize):
    kw = dict(baseline=baseline, scale=scale, normalize=normalize)
    assert torch.equal(group_advantages(torch.full((6,), NAN), 3, **kw), torch.zeros(6))
    assert torch.equal(group_advantages(torch.tensor([2.5]), 1, **kw), torch.zeros(1))
    assert torch.equal(group_advantages(torch.randn(5), 1, **kw), torch.zeros(5))
    r = torch.tensor([NAN, 1.0, NAN, NAN, 2.0, 1.0])  # lone scored completion in group 0
    a = group_advantages(r, 3, **kw)
    assert not torch.isnan(a).any() and torch.equal(a[:3], torch.zeros(3))
    assert a[3] == 0  # unscorable
    assert group_advantages(torch.zeros(0), 4, **kw).shape == (0,)


def test_dtypes_and_no_grad():
    r = torch.tensor([1, 0, 0, 1])
    assert group_advantages(r, 2).dtype == torch.float32
    assert group_advantages(r.bool(), 2).dtype == torch.float32
    assert group_advantages(r.bfloat16(), 2).dtype == torch.float32
    assert group_advantages(r.double(), 2).dtype == torch.float64
    x = torch.randn(8, requires_grad=True)
    assert not group_advantages(x, 4).requires_grad


def test_bad_input():
    r = torch.randn(8)
    with pytest.raises(ValueError, match=r"group_size=3.*B=8|B=8.*group_size=3"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 0)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 2.0)
    with pytest.raises(ValueError, match="baseline.*'median'"):
        group_advantages(r, 4, baseline="median")
    with pytest.raises(ValueError, match="scale.*'std'"):
        group_advantages(r, 4, scale="std")
    with pytest.raises(ValueError, match="normalize.*'sum'"):
        group_advantages(r, 4, normalize="sum")
    with pytest.raises(ValueError, match="impl.*'cuda'"):
        group_advantages(r, 4, impl="cuda")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(r, 4, eps=-1.0)
    with pytest.raises(ValueError, match=r"weights.*\[K\]=\[1\]"):
        group_advantages(r, 4, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        group_advantages(torch.randn(8, 2), 4, weights=[1.0, float("inf")])
    with pytest.raises(ValueError, match="rewards.*shape"):
        group_advantages(torch.randn(8, 2, 2), 4)
    with pytest.raises(TypeError, match="rewards"):
        group_advantages([1.0, 2.0], 2)
    for baseline, scale in [("rloo", "group"), ("mean", "batch"), ("mean", "none")]:
        with pytest.raises(ValueError, match="normalize_then_sum"):
            group_advantages(r, 4, baseline=baseline, scale=scale, normalize="normalize_then_sum")


@pytest.mark.skipif(_KERNEL is not None, reason="a Triton kernel is plugged in")
def test_triton_impl_without_kernel_is_an_error():
    with pytest.raises(ValueError, match="impl='triton'"):
        group_advantages(torch.randn(8), 4, impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("baseline,scale,normalize", MODES)
def test_cuda_matches_cpu(baseline, scale, normalize):
    r = _rewards(64, 8, 3, seed=7)
    kw = dict(baseline=baseline, scale=scale, normalize=normalize, weights=[1.0, 0.5, 2.0])
    torch.testing.assert_close(
        group_advantages(r.cuda(), 8, **kw).cpu(),
        group_advantages(r, 8, **kw),
        rtol=1e-5,
        atol=1e-5,
    )


# --------------------------------------------------------------------------- Triton kernel
# impl="triton" runs kernels/group_advantages.py (the interpreter on a CPU). Odd group
# counts and sizes, so that tiles have padded groups and padded slots.


@pytest.mark.parametrize("baseline,scale,normalize", MODES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("group_size", [1, 3, 5, 7])
def test_triton_matches_oracle(baseline, scale, normalize, k, group_size, nan_empty):
    rewards = _rewards(7, group_size, k, seed=100 + group_size * 10 + k)
    weights = [1.0, -0.5, 2.0][:k]
    kw = dict(baseline=baseline, scale=scale, weights=weights, normalize=normalize)
    want = naive_group_advantages(rewards, group_size, **kw)
    got = group_advantages(rewards, group_size, impl="triton", **kw)
    assert got.dtype == torch.float32 and got.shape == (rewards.shape[0],)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got == 0, want == 0)  # exact zeros exactly where the oracle has them
    got64 = group_advantages(rewards.double(), group_size, impl="triton", **kw)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("baseline,scale,normalize", MODES)
def test_triton_edge_cases_match_torch(baseline, scale, normalize, nan_empty):
    kw = dict(baseline=baseline, scale=scale, normalize=normalize)
    r = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 0.3, 0.2])
    cases = [
        (r, 4),  # constant groups give exactly 0
        (r[:8], 4),  # every group constant: the batch std is 0 too
        (torch.full((6,), NAN), 3),  # nothing scored
        (torch.tensor([2.5]), 1),  # a batch of one
        (torch.randn(67), 1),  # groups of one, more than one tile, batch pass of 5 blocks
        (torch.tensor([NAN, 1.0, NAN, NAN, 2.0, 1.0]), 3),  # lone scored completion
        (torch.randn(3 * 21, 2), 21),  # a group wider than the interpreter's tile
        (torch.randint(0, 2, (9 * 4,)).float(), 4),  # binary rewards: many flat groups
    ]
    for rewards, n in cases:
        got = group_advantages(rewards, n, impl="triton", **kw)
        want = group_advantages(rewards, n, impl="torch", **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got == 0, want == 0)


def test_triton_dispatch(monkeypatch):
    r = torch.randn(8)
    # CPU tensors take the PyTorch path with impl="auto"
    calls = []
    monkeypatch.setattr("fastrl.ops.advantages.group._KERNEL", lambda *a: calls.append(a))
    group_advantages(r, 4)
    assert not calls
    monkeypatch.undo()
    with pytest.raises(ValueError, match="impl='triton'.*group_size=5000"):
        group_advantages(torch.randn(10000), 5000, impl="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if r.device.type == "cpu":
        with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
            group_advantages(r, 4, impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("baseline,scale,normalize", MODES)
def test_triton_on_gpu_matches_oracle(baseline, scale, normalize):
    # several programs and a batch pass of more than one block, on the GPU's tiles
    for n_groups, group_size, k in [(301, 8, 1), (77, 16, 3), (5, 1000, 1), (2051, 2, 2)]:
        r = _rewards(n_groups, group_size, k, seed=n_groups)
        kw = dict(baseline=baseline, scale=scale, normalize=normalize)
        kw["weights"] = [1.0, 0.5, 2.0][:k]
        # fp32: against PyTorch in fp32 (groups of two near-equal rewards are ill-conditioned,
        # (r - mean) / (std + eps) amplifies fp32 rounding alike in both); fp64: the oracle
        got = group_advantages(r.cuda(), group_size, **kw)  # auto: the kernel on CUDA
        want32 = group_advantages(r.cuda(), group_size, impl="torch", **kw)
        torch.testing.assert_close(got, want32, rtol=1e-5, atol=1e-6)
        assert torch.equal(got == 0, want32 == 0)
        want = naive_group_advantages(r, group_size, **kw)
        got64 = group_advantages(r.double().cuda(), group_size, impl="triton", **kw).cpu()
        torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-12)
