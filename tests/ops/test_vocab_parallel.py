"""linear_logprobs (and the fused heads) with the lm_head split by vocabulary over two gloo
CPU ranks, against the single-rank result on the full head and the float64 oracle:
outputs and every gradient (hidden, the weight shard, the bias shard).

One 2-rank job (torch.multiprocessing, spawned once for the module) runs every case and
saves each rank's results; the tests compare them here. N=37 tokens, d=48, 2 x 67 vocab
rows (tails in every design's vocab blocks; the children also shrink the PyTorch path's
and cuBLAS design's vocab chunks to 32 columns, so each shard merges several chunks).
"""

import datetime
import os
import re
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastrl import fused_policy_loss, fused_preference_loss, linear_logprobs
from fastrl.ops.logprobs import custom_ops
from fastrl.ops.logprobs.naive import naive_linear_logprobs
from fastrl.ops.logprobs.params import LogprobsParams
from tests.support.logprobs import top1_inputs
from tests.support.memory import AllocationRecorder
from tests.support.ranks import join_processes, sleep_forever

N, D, V_LOCAL, WORLD = 37, 48, 67, 2
V = WORLD * V_LOCAL
ALL = dict(return_entropy=True, return_is_top1=True, return_log_sum_sq_probs=True)
# name -> options of one linear_logprobs case
CASES = {
    "torch-bias-softcap-T": dict(impl="torch", bias=True, temperature=0.7, softcap=5.0, **ALL),
    "tiles-bias-softcap-T": dict(
        impl="triton", design="tiles", bias=True, temperature=0.7, softcap=5.0, **ALL
    ),
    "cublas-bias-T": dict(impl="triton", design="cublas", bias=True, temperature=1.3, **ALL),
    # the two-GEMM design falls back to cuBLAS over a shard; a frozen head, no compaction
    "frozen-frozen-head": dict(
        impl="triton", design="frozen", weight_grad=False, compact=False, return_is_top1=True
    ),
    "torch-frozen-head-3d": dict(
        impl="torch",
        weight_grad=False,
        compact=False,
        lead=(1, N),
        softcap=3.0,
        return_entropy=True,
    ),  # fmt: skip
    "tiles-all-ignored": dict(impl="triton", design="tiles", all_ignored=True, **ALL),
    "torch-all-ignored-no-compact": dict(
        impl="torch", all_ignored=True, compact=False, bias=True, **ALL
    ),
}
# reduce_hidden_grad=False (verl's / Megatron's convention): each rank keeps its shard's
# part of the hidden-state gradient, and the parts sum to the full one
LOCAL_GRAD_CASES = {
    "torch-local-hidden-grad": dict(impl="torch", bias=True, return_entropy=True),
    "tiles-local-hidden-grad": dict(impl="triton", design="tiles", temperature=0.8, **ALL),
}
HEADS = {  # name -> (head, impl)
    "policy-torch": ("policy", "torch"),
    "policy-tiles": ("policy", "triton"),
    "preference-torch": ("preference", "torch"),
    "preference-tiles": ("preference", "triton"),
}
ERRORS = {  # name -> the ValueError every rank must raise
    "targets-out-of-range": r"targets holds id 134 outside \[0, 134\)",
    "unequal-shards": r"equal vocab shard of weight: got shard sizes \[67, 66\]",
}


# --------------------------------------------------------------------------- the cases


def case_inputs(case: dict):
    """Full-head hidden [N, d], weight [V, d], targets [N] (half of them their row's
    argmax, rows 3 and 10 ignored, row 0's target the last column), bias or None, and the
    loss coefficients of logp and entropy [N]."""
    hidden, weight, targets, bias = top1_inputs(
        N, V, D, bias=case.get("bias", False), softcap=case.get("softcap"), requires_grad=False
    )
    if case.get("all_ignored"):
        targets = torch.full_like(targets, -100)
    g = torch.Generator().manual_seed(11)
    return hidden, weight, targets, bias, torch.randn(N, generator=g), torch.randn(N, generator=g)


def shard_rows(rank: int | None) -> slice:
    return slice(None) if rank is None else slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)


class CountCollectives:
    """Records the names of the torch.distributed collectives called while active."""

    NAMES = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "reduce_scatter")

    def __enter__(self):
        self.calls, self.saved = [], {n: getattr(dist, n) for n in self.NAMES}
        for name, fn in self.saved.items():
            setattr(dist, name, self._counted(name, fn))
        return self

    def _counted(self, name, fn):
        def call(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return call

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def run_case(name: str, rank: int | None = None, group=None) -> dict:
    """linear_logprobs on rank `rank`'s shard with `group` (None, None: the full head),
    its outputs and the gradients of sum(g1 logp + g2 entropy) (hidden, weight, bias)."""
    local = name in LOCAL_GRAD_CASES
    case = LOCAL_GRAD_CASES[name] if local else CASES[name]
    hidden, weight, targets, bias, g1, g2 = case_inputs(case)
    rows = shard_rows(rank)
    if local and group is not None:
        kw_group = dict(process_group=group, reduce_hidden_grad=False)
    else:
        kw_group = dict(process_group=group)
    h = hidden.clone().requires_grad_()
    w = weight[rows].clone().requires_grad_(case.get("weight_grad", True))
    b = None if bias is None else bias[rows].clone().requires_grad_()
    lead = case.get("lead", (N,))
    kw = {k: case[k] for k in ("temperature", "softcap", "design", "compact") if k in case}
    wanted = {k: case.get(k, False) for k in ALL}
    recorder = AllocationRecorder()
    with recorder, CountCollectives() as collectives:
        out = linear_logprobs(
            h.view(*lead, D), w, targets.view(lead), bias=b, impl=case["impl"],
            **kw_group, **wanted, **kw,
        )  # fmt: skip
        forward_calls = list(collectives.calls)
        out = out if isinstance(out, tuple) else (out,)
        loss = (g1.view(lead) * out[0]).sum()
        if case.get("return_entropy"):
            loss = loss + (g2.view(lead) * out[1]).sum()
        loss.backward()
    return dict(
        outputs=[o.detach().reshape(N) for o in out],
        grads=[h.grad, w.grad, None if b is None else b.grad],
        shapes=recorder.shapes,
        collectives=(forward_calls, collectives.calls[len(forward_calls) :]),
    )


def oracle(name: str) -> dict:
    """run_case's outputs and gradients from the float64 oracle on the full head."""
    case = CASES[name]
    hidden, weight, targets, bias, g1, g2 = case_inputs(case)
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_(case.get("weight_grad", True))
    b = None if bias is None else bias.double().requires_grad_()
    wanted = {k: case.get(k, False) for k in ALL}
    kw = {k: case[k] for k in ("temperature", "softcap") if k in case}
    out = naive_linear_logprobs(h, w, targets, bias=b, **wanted, **kw)
    out = out if isinstance(out, tuple) else (out,)
    loss = (g1.double() * out[0]).sum()
    if case.get("return_entropy"):
        loss = loss + (g2.double() * out[1]).sum()
    loss.backward()
    grads = [h.grad, w.grad, None if b is None else b.grad]
    return dict(outputs=[o.detach() for o in out], grads=grads)


def head_inputs(kind: str):
    """hidden [R, T, d], ref_hidden, weight [V, d], targets, mask [R, T] (R = 4 rows: 2
    preference pairs, or 4 completions), advantages [R], old_logps [R, T]."""
    R, T = 4, 9
    g = torch.Generator().manual_seed(5 if kind == "policy" else 6)
    hidden = torch.randn(R, T, D, generator=g)
    ref_hidden = hidden + 0.3 * torch.randn(R, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2
    targets = torch.randint(0, V, (R, T), generator=g)
    mask = torch.ones(R, T, dtype=torch.long)
    mask[0, 6:], mask[3, 2:] = 0, 0
    advantages = torch.randn(R, generator=g)
    old = torch.log_softmax(torch.randn(R, T, V, generator=g), -1)[..., 0]
    return hidden, ref_hidden, weight, targets, mask, advantages, old


def run_head(name: str, rank: int | None = None, group=None) -> dict:
    """A fused head on rank `rank`'s shard (None: the full head): loss, metrics and the
    gradients of the loss (hidden, weight)."""
    kind, impl = HEADS[name]
    hidden, ref_hidden, weight, targets, mask, adv, old = head_inputs(kind)
    h = hidden.clone().requires_grad_()
    w = weight[shard_rows(rank)].clone().requires_grad_()
    common = dict(ref_hidden=ref_hidden, temperature=0.9, impl=impl, process_group=group)
    if kind == "policy":
        loss, metrics = fused_policy_loss(
            h, w, targets, mask, adv, old_logps=old, loss_type="dapo", beta=0.04,
            num_items_in_batch=30, **common,
        )  # fmt: skip
    else:  # WPO's weights: log sum p^2 over the shards
        loss, metrics = fused_preference_loss(
            h, w, targets, mask, loss_type="sigmoid", beta=0.1, use_weighting=True, **common
        )
    loss.backward()
    return dict(loss=loss.detach(), metrics=metrics, grads=[h.grad, w.grad])


def run_error(name: str, rank: int, group) -> str:
    """The error message every rank gets for a bad vocab-parallel call."""
    hidden, weight, targets, _, _, _ = case_inputs({})
    w = weight[shard_rows(rank)]
    if name == "targets-out-of-range":
        targets[5] = V
    else:  # rank 1 holds one row fewer
        w, targets = w[: V_LOCAL - rank], targets.clamp(max=100)
    try:
        linear_logprobs(hidden, w, targets, impl="torch", process_group=group)
    except ValueError as e:
        return str(e)
    return "no error"


# --------------------------------------------------------------------------- the 2-rank job


def _worker(rank: int, port: int, out: str) -> None:
    from fastrl.ops.logprobs import chunked

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    # several vocab chunks per shard in the PyTorch path and the cuBLAS design
    chunked.CHUNK_VOCAB, chunked.CHUNK_TOKENS = 32, 16
    os.environ["FASTRL_CUBLAS_CHUNK_VOCAB"] = "32"
    group = dist.group.WORLD
    results = {}
    jobs = [(n, run_case) for n in [*CASES, *LOCAL_GRAD_CASES]] + [(n, run_head) for n in HEADS]
    jobs += [(n, run_error) for n in ERRORS]
    for name, run in jobs:
        try:
            results[name] = run(name, rank, group)
        except Exception as e:  # reported by the test of the case
            results[name] = f"{type(e).__name__}: {e}"
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    # Leave without interpreter teardown (gloo's threads can abort it; see tests/support/ranks.py)
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results: [{case name: results}] for ranks 0 and 1."""
    out = tmp_path_factory.mktemp("vocab_parallel")
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    join_processes(ctx, timeout=600)  # a hung rank fails the tests, never blocks CI
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_a_hung_rank_is_terminated_and_fails_the_test():
    """`join_processes` (the fixture above's wait) bounds a hang: the workers are
    terminated and the test fails, instead of waiting forever."""
    ctx = mp.start_processes(sleep_forever, nprocs=WORLD, join=False, start_method="spawn")
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="still running after 2 s: terminated"):
        join_processes(ctx, timeout=2)
    assert time.monotonic() - start < 60
    assert not any(p.is_alive() for p in ctx.processes)


def _result(ranks, rank: int, name: str):
    got = ranks[rank][name]
    assert not isinstance(got, str), got  # the case raised on that rank
    return got


# --------------------------------------------------------------------------- the tests

# float32 vs float32: the shards merge in another order than the single-rank splits
TOL_SINGLE = dict(rtol=1e-5, atol=1e-5)
# float32 vs the float64 oracle (tests/ops/test_linear_logprobs.py's fp32 tolerance)
TOL_ORACLE = dict(rtol=0, atol=2e-5)


def _assert_grads_close(got, ref, rows, tol):
    """hidden's gradient in full, the weight's and bias's as this rank's rows of the full
    head's; relative to each gradient's largest entry (sums of many tokens' terms)."""
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        if r is None:
            assert g is None, i
            continue
        r = r if i == 0 else r[rows]
        scale = r.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(g.double() / scale, r.double() / scale, **tol)


@pytest.mark.parametrize("name", CASES)
def test_vocab_parallel_matches_single_rank(ranks, name):
    """Each rank's outputs equal the full head's (is_top1 exactly), its hidden gradient
    the full one, its weight/bias gradients the full head's rows of its shard."""
    ref = run_case(name)
    for rank in range(WORLD):
        got = _result(ranks, rank, name)
        for o, r in zip(got["outputs"], ref["outputs"], strict=True):
            if o.dtype == torch.bool:
                assert torch.equal(o, r)
            else:
                torch.testing.assert_close(o, r, **TOL_SINGLE)
        _assert_grads_close(got["grads"], ref["grads"], shard_rows(rank), TOL_SINGLE)


@pytest.mark.parametrize("name", CASES)
def test_vocab_parallel_matches_float64_oracle(ranks, name):
    ref = oracle(name)
    for rank in range(WORLD):
        got = _result(ranks, rank, name)
        for o, r in zip(got["outputs"], ref["outputs"], strict=True):
            if o.dtype == torch.bool:
                assert torch.equal(o, r)
            else:
                torch.testing.assert_close(o.double(), r, **TOL_ORACLE)
        _assert_grads_close(got["grads"], ref["grads"], shard_rows(rank), TOL_ORACLE)


def test_vocab_parallel_ranks_agree_bit_for_bit(ranks):
    """The merge runs on the same gathered statistics in the same order on every rank,
    and the hidden gradient is all-reduced: identical outputs and d_hidden."""
    for name in CASES:
        a, b = _result(ranks, 0, name), _result(ranks, 1, name)
        for x, y in zip(a["outputs"] + a["grads"][:1], b["outputs"] + b["grads"][:1], strict=True):
            assert torch.equal(x, y), name


def test_vocab_parallel_covers_both_shards_and_both_top1_answers(ranks):
    """The inputs do what the cases claim: targets in either shard, ignored rows, is_top1
    both True and False, and all-ignored cases give zeros and zero gradients."""
    _, _, targets, _, _, _ = case_inputs({})
    assert (targets >= V_LOCAL).any() and ((targets >= 0) & (targets < V_LOCAL)).any()
    assert (targets == -100).sum() == 2
    top1 = _result(ranks, 0, "torch-bias-softcap-T")["outputs"][2]
    assert top1.any() and not top1.all()
    for name in ("tiles-all-ignored", "torch-all-ignored-no-compact"):
        for rank in range(WORLD):
            got = _result(ranks, rank, name)
            assert all(not o.any() for o in got["outputs"]), name
            assert all(not g.any() for g in got["grads"] if g is not None), name


def test_vocab_parallel_runs_one_collective_each_way(ranks):
    """Forward: one all-gather of the shards' statistics; backward: one all-reduce of the
    hidden-state gradient; nothing else."""
    for name in CASES:
        for rank in range(WORLD):
            got = _result(ranks, rank, name)["collectives"]
            assert got == (["all_gather"], ["all_reduce"]), (name, got)


@pytest.mark.parametrize("name", LOCAL_GRAD_CASES)
def test_vocab_parallel_local_hidden_grad_sums_to_the_full_one(ranks, name):
    """reduce_hidden_grad=False: the same outputs and weight/bias gradients, no backward
    collective, and each rank's hidden gradient is its shard's part (the parts sum to the
    full head's; neither part is the whole)."""
    ref = run_case(name)
    got = [_result(ranks, rank, name) for rank in range(WORLD)]
    for rank, g in enumerate(got):
        assert g["collectives"] == (["all_gather"], []), g["collectives"]
        for o, r in zip(g["outputs"], ref["outputs"], strict=True):
            if o.dtype == torch.bool:
                assert torch.equal(o, r)
            else:
                torch.testing.assert_close(o, r, **TOL_SINGLE)
        _assert_grads_close([None, *g["grads"][1:]], [None, *ref["grads"][1:]],
                            shard_rows(rank), TOL_SINGLE)  # fmt: skip
        assert not torch.allclose(g["grads"][0], ref["grads"][0], rtol=1e-3, atol=1e-3)
    summed = got[0]["grads"][0] + got[1]["grads"][0]
    _assert_grads_close([summed], ref["grads"][:1], shard_rows(None), TOL_SINGLE)


def test_reduce_hidden_grad_needs_a_process_group():
    hidden, weight, targets, _, _, _ = case_inputs({})
    with pytest.raises(ValueError, match="reduce_hidden_grad=False applies to a vocab-parallel"):
        linear_logprobs(hidden, weight, targets, impl="torch", reduce_hidden_grad=False)


@pytest.mark.parametrize("name", ["frozen-frozen-head", "torch-frozen-head-3d"])
def test_vocab_parallel_frozen_head_allocates_no_weight_gradient(ranks, name):
    for rank in range(WORLD):
        got = _result(ranks, rank, name)
        assert got["grads"][1] is None
        assert (V_LOCAL, D) not in got["shapes"] and (V, D) not in got["shapes"]
        assert (N, D) in got["shapes"]  # the recorder saw the backward


@pytest.mark.parametrize("name", HEADS)
def test_fused_heads_with_a_vocab_parallel_head(ranks, name):
    """fused_policy_loss / fused_preference_loss over the shards (reference log-probs from
    ref_hidden over the shards too; WPO's log sum p^2) against the full head."""
    ref = run_head(name)
    for rank in range(WORLD):
        got = _result(ranks, rank, name)
        torch.testing.assert_close(got["loss"], ref["loss"], **TOL_SINGLE)
        assert got["metrics"].keys() == ref["metrics"].keys()
        for k in ref["metrics"]:
            torch.testing.assert_close(got["metrics"][k], ref["metrics"][k], **TOL_SINGLE)
        _assert_grads_close(got["grads"], ref["grads"], shard_rows(rank), TOL_SINGLE)


@pytest.mark.parametrize("name", ERRORS)
def test_vocab_parallel_errors_raise_on_every_rank(ranks, name):
    for rank in range(WORLD):
        assert re.search(ERRORS[name], ranks[rank][name]), ranks[rank][name]


@pytest.mark.parametrize("group", ["tp", 2, object()])
def test_process_group_must_be_a_process_group(group):
    hidden, weight, targets, _, _, _ = case_inputs({})
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        linear_logprobs(hidden, weight, targets, impl="torch", process_group=group)


@pytest.mark.parametrize("backend", ["torch", "tiles", "cublas"])
def test_shard_statistics_op_passes_opcheck(backend):
    """The shard op's schema and fake implementation agree with its eager outputs (what
    torch.compile and fake-tensor tracing rely on); its ids: shard-local, -2 another
    shard's token, -1 ignored."""
    hidden, weight = torch.randn(7, D), torch.randn(50, D)
    targets = torch.tensor([3, -1, 0, 49, -2, -1, 11])
    params = LogprobsParams(1.3, None, -1, True, False, True, backend)
    torch.library.opcheck(
        custom_ops._shard_fwd_op, (hidden, weight, torch.randn(50), targets), params.op_kwargs()
    )
    lse, ent, row_max, target_logit, sq = custom_ops.shard_statistics(
        hidden, weight, None, targets, params
    )
    z = hidden.double() @ weight.double().T / 1.3
    torch.testing.assert_close(row_max.double(), z.amax(1), rtol=0, atol=1e-5)
    picked = z.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    expected = torch.where(targets >= 0, picked, 0.0)
    torch.testing.assert_close(target_logit.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, 1), rtol=0, atol=1e-5)
