"""`patch_verl`: verl's fused-kernel forwards on fastrl's head give verl's numbers.

Model level: a tiny Qwen2 run through verl's own `patch_forward_with_backends`; its "triton"
backend (verl's `linear_cross_entropy`, which cannot run on a CPU nor at hidden size 64)
patched against its "torch" backend (verl's chunked PyTorch `FusedLinearForPPO`) unpatched:
log-probs, entropies and every parameter's gradient. Head level: both patched functions
against verl's PyTorch head and full float64 logits on odd sizes (a 301-token vocabulary), through
the PyTorch path and the Triton kernels (interpreter); dtypes, reductions, undo, errors.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch
import verl.utils.kernel.linear_cross_entropy as verl_lce
from transformers import Qwen2ForCausalLM
from verl.models.transformers.monkey_patch import patch_forward_with_backends
from verl.utils.experimental.torch_functional import FusedLinearForPPO

import fastrl.integrations.verl as fastrl_verl
from fastrl.integrations import VerlPatch, patch_verl
from tests.support import DEVICE
from tests.support.compare import _assert_grads_close
from tests.support.engine import V, tiny_qwen2
from tests.support.ranks import join_processes

VERL_LCE = verl_lce.linear_cross_entropy
VERL_FORWARD = FusedLinearForPPO.__dict__["forward"]
D, VOCAB = 48, 301  # neither a multiple of 128 (verl's kernel needs hidden_size % 128 == 0)
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 against float64, and float32 against float32


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with verl's own functions in place."""
    assert verl_lce.linear_cross_entropy is VERL_LCE
    assert FusedLinearForPPO.__dict__["forward"] is VERL_FORWARD
    yield
    fastrl_verl._active = None
    verl_lce.linear_cross_entropy = VERL_LCE
    FusedLinearForPPO.forward = VERL_FORWARD


# --------------------------------------------------------------------------- the model


def _model_run(model, ids, mask, temperature):
    """verl's forward's (log_probs, entropy) and the gradients of a loss of both."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, return_dict=True, temperature=temperature)
    g = torch.Generator().manual_seed(1)
    loss = (out.log_probs.reshape(-1) * torch.randn(ids.numel(), generator=g)).sum()
    loss = loss + (out.entropy.reshape(-1) * torch.randn(ids.numel(), generator=g)).sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.log_probs.detach(), out.entropy.detach(), grads


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_backend_on_fastrl_matches_verl_torch_backend(monkeypatch, temperature, tied):
    model = tiny_qwen2(seed=3, tied=tied)
    # verl's backends replace the model class's forward: put it back after the test
    monkeypatch.setattr(Qwen2ForCausalLM, "forward", Qwen2ForCausalLM.forward)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    their_logps, their_ent, their_grads = _model_run(model, ids, mask, temperature)
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="triton")
    # verl's own kernel: CUDA tensors only (and a CUDA build: NVTX ranges)
    with pytest.raises((AssertionError, RuntimeError)):
        _model_run(model, ids, mask, temperature)
    with patch_verl() as patch:
        logps, ent, grads = _model_run(model, ids, mask, temperature)
    assert (patch.linear_cross_entropy_calls, patch.fused_linear_for_ppo_calls) == (1, 0)
    # verl's two backends differ in shape: the triton one returns flat [B * T]
    assert their_logps.shape == their_ent.shape == ids.shape
    assert logps.shape == ent.shape == (ids.numel(),)
    assert logps.dtype == ent.dtype == their_logps.dtype == their_ent.dtype == torch.float32
    torch.testing.assert_close(logps, their_logps.reshape(-1), **TOL)
    torch.testing.assert_close(ent, their_ent.reshape(-1), **TOL)
    assert grads.keys() == their_grads.keys()
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads)
    _assert_grads_close(list(grads.values()), list(their_grads.values()), TOL)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_torch_backend_on_fastrl_matches_verl(monkeypatch, impl):
    """fused_kernels_backend="torch": verl's FusedLinearForPPO, replaced on its class."""
    model = tiny_qwen2(seed=4)
    monkeypatch.setattr(Qwen2ForCausalLM, "forward", Qwen2ForCausalLM.forward)
    ids = torch.randint(2, V, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    theirs = _model_run(model, ids, mask, 0.8)
    with patch_verl(impl=impl) as patch:
        ours = _model_run(model, ids, mask, 0.8)
    assert (patch.linear_cross_entropy_calls, patch.fused_linear_for_ppo_calls) == (0, 1)
    for a, b in zip(ours[:2], theirs[:2], strict=True):
        assert a.shape == b.shape == ids.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL)
    _assert_grads_close(list(ours[2].values()), list(theirs[2].values()), TOL)


# --------------------------------------------------------------------------- the heads


def _head_inputs(lead, frozen=False, seed=0, device=DEVICE, d=D, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, d, generator=g).to(device).requires_grad_()
    weight = (0.3 * torch.randn(vocab, d, generator=g)).to(device).requires_grad_(not frozen)
    labels = torch.randint(0, vocab, lead, generator=g, dtype=torch.int32)
    labels.view(-1)[-1] = vocab - 1  # the last vocabulary row
    return hidden, weight, labels.to(device)


def _oracle(hidden, weight, labels, temperature):
    """Full logits in float64: (log_probs, entropy) of `labels`' shape. (verl's PyTorch
    head casts its logits to float32 whatever the inputs: no float64 reference.)"""
    logp = torch.log_softmax((hidden.double() @ weight.double().T) / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1), entropy


def _grads_of(outputs, leaves, with_entropy=True):
    """Gradients of a random mix of the outputs (log-probs: any shape, 0-d included)."""
    logps, entropy = outputs
    g = torch.Generator().manual_seed(5)
    loss = (logps * torch.randn(logps.shape, generator=g).to(logps)).sum()
    if with_entropy:
        loss = loss + (entropy * torch.randn(entropy.shape, generator=g).to(entropy)).sum()
    return torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("lead", [(37,), (3, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_linear_for_ppo_matches_verl(impl, lead, temperature):
    hidden, weight, labels = _head_inputs(lead)
    head = FusedLinearForPPO(chunk_size=16)  # made before the patch: served all the same
    theirs = head(hidden, weight, labels, temperature)
    their_grads = _grads_of(theirs, (hidden, weight))
    oracle = _oracle(hidden, weight, labels, temperature)
    oracle_grads = _grads_of(oracle, (hidden, weight))
    with patch_verl(impl=impl) as patch:
        ours = head(hidden, weight, labels, temperature)
    assert patch.fused_linear_for_ppo_calls == 1
    grads = _grads_of(ours, (hidden, weight))
    for a, b, o in zip(ours, theirs, oracle, strict=True):
        assert a.shape == b.shape == lead and a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(a.double(), o, **TOL)
    _assert_grads_close(grads, their_grads, TOL)
    _assert_grads_close(grads, oracle_grads, TOL)  # float32: the leaves'


def test_fused_linear_for_ppo_frozen_head_and_log_probs_only():
    """A frozen lm_head (no weight gradient) and a loss of the log-probs alone (verl's
    backward gets no entropy gradient)."""
    hidden, weight, labels = _head_inputs((29,), frozen=True, seed=1)
    theirs = FusedLinearForPPO()(hidden, weight, labels, 1.3)
    (their_dh,) = _grads_of(theirs, (hidden, weight), with_entropy=False)
    with patch_verl():
        ours = FusedLinearForPPO()(hidden, weight, labels, 1.3)
    (dh,) = _grads_of(ours, (hidden, weight), with_entropy=False)
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    _assert_grads_close([dh], [their_dh], TOL)


# a dtype's rounding, relative: half its spacing 2^-7 (bf16) / 2^-10 (fp16), and twice that
HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("case", ["bf16-inputs", "fp16-inputs", "bf16-autocast"])
def test_fused_linear_for_ppo_dtypes_follow_verl(case):
    """log_probs float32, entropy in the hidden states' dtype; under autocast the inputs
    are the autocast dtype's. fastrl forms the logits in float32 from those inputs, verl
    rounds them to the dtype first: ours equal float64 logits of the rounded inputs (the
    entropy to its output rounding), verl's differ from ours by its logits' rounding."""
    hidden, weight, labels = _head_inputs((23,), seed=2, device="cpu")  # CPU autocast
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case[:4]]
    autocast = case.endswith("autocast")
    if not autocast:
        hidden = hidden.detach().to(dtype).requires_grad_()
        weight = weight.detach().to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        theirs = FusedLinearForPPO()(hidden, weight, labels, 1.0)
        with patch_verl():
            ours = FusedLinearForPPO()(hidden, weight, labels, 1.0)
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    assert ours[1].dtype == theirs[1].dtype == hidden.dtype
    h, w = hidden.detach().to(dtype).float(), weight.detach().to(dtype).float()
    exact = _oracle(h, w, labels, 1.0)
    torch.testing.assert_close(ours[0].double(), exact[0], **TOL)
    out_ulp = 2 * HALF_ULP[dtype] if ours[1].dtype == dtype else 1e-6
    torch.testing.assert_close(ours[1].double(), exact[1], rtol=out_ulp, atol=1e-6)
    # verl rounds each logit by up to |z| * HALF_ULP; a log-prob (the target's logit less
    # the logsumexp) and an entropy carry two such errors
    logit_err = float((h @ w.T).abs().max()) * HALF_ULP[dtype]
    tol = dict(rtol=out_ulp, atol=2 * logit_err)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_fused_linear_for_ppo_under_autocast_keeps_no_cast_weight_copy(monkeypatch):
    """An fp32 trainable head under bf16 autocast: the head gets the weight cast to bf16,
    and the graph keeps a handle that casts it again in the backward, not the [V, d] bf16
    copy (alive after the forward only if the graph saved it). Outputs and gradients equal
    those of the same head on a plain ``weight.to(bf16)``."""
    from fastrl import linear_logprobs

    hidden, weight, labels = _head_inputs((23,), seed=3, device="cpu")  # CPU autocast
    copies = []

    def recorded(h, w, *args, **kwargs):
        copies.append(weakref.ref(w))
        assert w.dtype == torch.bfloat16 and w.shape == weight.shape
        return linear_logprobs(h, w, *args, **kwargs)

    monkeypatch.setattr(fastrl_verl, "linear_logprobs", recorded)
    with torch.autocast("cpu", dtype=torch.bfloat16), patch_verl(impl="torch"):
        ours = FusedLinearForPPO()(hidden, weight, labels, 0.9)
    assert len(copies) == 1 and copies[0]() is None, "the graph kept the bf16 [V, d] copy"
    grads = _grads_of(ours, (hidden, weight))
    plain = linear_logprobs(
        hidden.bfloat16(), weight.bfloat16(), labels.long(), temperature=0.9,
        return_entropy=True, impl="torch", compact=False,
    )  # fmt: skip
    want = (plain[0], plain[1].to(hidden.dtype))
    for a, b in zip(ours, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grads[1].abs().sum() > 0
    _assert_grads_close(grads, _grads_of(want, (hidden, weight)), dict(rtol=0, atol=0))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "Mean"])
def test_linear_cross_entropy_matches_verl_reference(impl, reduction):
    """verl's function's contract: [N] float32 outputs from [..., d] hidden states (the
    log-probs summed or averaged by `reduction`), against verl's PyTorch head in float64."""
    hidden, weight, labels = _head_inputs((3, 7), seed=3)
    logps, entropy = _oracle(hidden, weight, labels, 0.8)
    if reduction != "none":
        logps = logps.sum() if reduction == "sum" else logps.mean()
    else:
        logps = logps.reshape(-1)
    oracle = (logps, entropy.reshape(-1))
    oracle_grads = _grads_of(oracle, (hidden, weight))
    with patch_verl(impl=impl) as patch:
        ours = verl_lce.linear_cross_entropy(hidden, weight, labels, 0.8, reduction)
    assert patch.linear_cross_entropy_calls == 1
    assert ours[0].shape == (() if reduction != "none" else (21,)) and ours[1].shape == (21,)
    assert ours[0].dtype == ours[1].dtype == torch.float32
    for a, o in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a.double(), o, **TOL)
    grads = _grads_of(ours, (hidden, weight))
    _assert_grads_close(grads, oracle_grads, TOL)  # float32: the leaves'


def test_linear_cross_entropy_under_torch_compile_fullgraph():
    """The patched function in a compiled model: no graph break, the eager numbers."""
    hidden, weight, labels = _head_inputs((2, 7), frozen=True, seed=7, device="cpu")

    def loss_of(hidden):
        logps, entropy = verl_lce.linear_cross_entropy(hidden, weight, labels, 0.8, "none")
        return logps.sum() + 0.1 * entropy.sum()

    with patch_verl(impl="torch") as patch:
        compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
        loss = compiled(hidden)
        (grad,) = torch.autograd.grad(loss, hidden)
        ref = loss_of(hidden)
        (ref_grad,) = torch.autograd.grad(ref, hidden)
    assert patch.linear_cross_entropy_calls == 2
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_linear_cross_entropy_passes_dist_process_group(monkeypatch):
    """verl's tensor-parallel group reaches linear_logprobs as `process_group`, with
    verl's backward convention (`reduce_hidden_grad=False`), and only when given."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        n = args[2].shape[0]
        return torch.zeros(n), torch.zeros(n)

    hidden, weight, labels = _head_inputs((5,), seed=4)
    group = object()
    with patch_verl():
        monkeypatch.setattr(fastrl_verl, "linear_logprobs", spy)
        verl_lce.linear_cross_entropy(hidden, weight, labels, 1.0, "none", group)
        verl_lce.linear_cross_entropy(hidden, weight, labels, 1.0, "none")
    assert seen[0]["process_group"] is group and seen[0]["reduce_hidden_grad"] is False
    assert "process_group" not in seen[1] and "reduce_hidden_grad" not in seen[1]


def _tp_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: verl's linear_cross_entropy (patched) on its half of the vocab."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    torch.save(_tp_run(rank, dist.group.WORLD), os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: gloo's threads can abort it (tests/support/ranks.py)


def _tp_run(rank, group) -> dict:
    """(logprobs, entropy, d_hidden, d_weight) on rank `rank`'s shard (None: the full head)."""
    hidden, weight, labels = _head_inputs((2, 11), seed=9, vocab=2 * 67)
    h = hidden.detach().clone().requires_grad_()
    w = (weight if rank is None else weight.chunk(2)[rank]).detach().clone().requires_grad_()
    with patch_verl():
        logps, ent = verl_lce.linear_cross_entropy(h, w, labels, 0.8, "none", group)
    g = torch.Generator().manual_seed(2)
    ((logps * torch.randn(logps.shape, generator=g)).sum() + (ent * 0.3).sum()).backward()
    return dict(logps=logps.detach(), ent=ent.detach(), dh=h.grad, dw=w.grad)


def test_dist_process_group_on_two_ranks_matches_one(tmp_path):
    """Two gloo ranks, the vocabulary split between them (verl's Megatron actor): every
    rank gets the full head's log-probs and entropies and its rows of the weight gradient;
    the hidden gradient is each rank's share, as verl's kernel leaves it (Megatron's graph
    sums them), so the two shares sum to the one-rank gradient."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_tp_worker, args=(port, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    join_processes(ctx, timeout=240)  # a hung rank fails the test, never blocks CI
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref = _tp_run(None, None)
    for r, g in enumerate(got):
        torch.testing.assert_close(g["logps"], ref["logps"], **TOL)
        torch.testing.assert_close(g["ent"], ref["ent"], **TOL)
        torch.testing.assert_close(g["dw"], ref["dw"].chunk(2)[r], **TOL)
    torch.testing.assert_close(got[0]["dh"] + got[1]["dh"], ref["dh"], **TOL)
    assert not torch.allclose(got[0]["dh"], ref["dh"], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- patching


MEGATRON_FORWARDS = (
    "verl.models.mcore.model_forward_fused",
    "verl.models.mcore.model_forward_1f1b_overlap",
)


# Megatron's import on a CPU warns of the missing Apex / Transformer Engine
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_patch_rebinds_modules_that_imported_the_function_and_undo_restores():
    """verl's Megatron forwards bind `linear_cross_entropy` at import (the HF forwards
    import it on each call, which the model tests cover); so does a module imported while
    the patch is on. A module's own function of that name is left alone."""
    megatron = [importlib.import_module(name) for name in MEGATRON_FORWARDS]
    own = types.ModuleType("verl_own_function")
    own.linear_cross_entropy = lambda *a: None
    sys.modules["verl_own_function"] = own
    try:
        with patch_verl() as patch:
            for module in (*megatron, verl_lce):
                assert module.linear_cross_entropy is patch._lce
            assert own.linear_cross_entropy is not patch._lce
            assert FusedLinearForPPO.__dict__["forward"] is patch._forward
            after = types.ModuleType("verl_binder_after")  # imported under the patch
            after.linear_cross_entropy = verl_lce.linear_cross_entropy
            sys.modules["verl_binder_after"] = after
        for module in (*megatron, after, verl_lce):
            assert module.linear_cross_entropy is VERL_LCE
        assert FusedLinearForPPO.__dict__["forward"] is VERL_FORWARD
    finally:
        for name in ("verl_own_function", "verl_binder_after"):
            sys.modules.pop(name, None)


def test_patch_twice_replaces_the_first_and_context_manager_undoes_on_error():
    first = patch_verl(impl="torch")
    second = patch_verl(impl="triton")
    assert isinstance(second, VerlPatch) and second.impl == "triton"
    assert second.original_linear_cross_entropy is VERL_LCE
    assert second.original_forward is VERL_FORWARD
    first.undo()  # not the active patch any more: no-op
    assert verl_lce.linear_cross_entropy is second._lce
    assert FusedLinearForPPO.__dict__["forward"] is second._forward
    second.undo()
    assert verl_lce.linear_cross_entropy is VERL_LCE
    with pytest.raises(RuntimeError), patch_verl():
        raise RuntimeError("the trainer failed")
    assert verl_lce.linear_cross_entropy is VERL_LCE
    assert FusedLinearForPPO.__dict__["forward"] is VERL_FORWARD


def test_unsupported_arguments_raise():
    with pytest.raises(ValueError, match="impl must be one of .* got 'cuda'"):
        patch_verl(impl="cuda")
    assert verl_lce.linear_cross_entropy is VERL_LCE
    hidden, weight, labels = _head_inputs((2, 5), seed=6)
    lce = verl_lce.linear_cross_entropy
    with patch_verl():
        lce = verl_lce.linear_cross_entropy
        with pytest.raises(ValueError, match="reduction must be one of .* got 'max'"):
            lce(hidden, weight, labels, 1.0, "max")
        with pytest.raises(TypeError, match="reduction must be a str, got None"):
            lce(hidden, weight, labels, 1.0, None)
        with pytest.raises(ValueError, match=r"labels \(9,\) must hold one id per row"):
            lce(hidden, weight, labels.reshape(-1)[:9], 1.0)
        with pytest.raises(ValueError, match="temperature must be finite and > 0.0, got 0.0"):
            lce(hidden, weight, labels, 0.0)
        with pytest.raises(TypeError, match="weight"):  # verl's kernel needs one dtype too
            lce(hidden, weight.double(), labels, 1.0)
        with pytest.raises(ValueError, match=r"hidden_states must be \[T, d\] or \[B, T, d\]"):
            FusedLinearForPPO()(hidden[None], weight, labels[None], 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_cross_entropy_matches_verl_kernel_on_cuda(dtype):
    """On a GPU, verl's own Triton kernel runs (hidden size a multiple of 128): fastrl's
    errors against float64 logits are at most verl's (plus float32 rounding)."""
    hidden, weight, labels = _head_inputs((2, 150), seed=8, device="cuda", d=256, vocab=3001)
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    exact = _oracle(hidden, weight, labels, 0.9)
    exact = (exact[0].reshape(-1), exact[1].reshape(-1))
    exact_grads = _grads_of(exact, (hidden, weight))
    theirs = VERL_LCE(hidden, weight, labels, 0.9, "none")
    their_grads = _grads_of(theirs, (hidden, weight))
    with patch_verl():
        ours = verl_lce.linear_cross_entropy(hidden, weight, labels, 0.9, "none")
    grads = _grads_of(ours, (hidden, weight))
    assert [t.shape for t in ours] == [t.shape for t in theirs] == [(300,), (300,)]
    assert [t.dtype for t in ours] == [t.dtype for t in theirs] == [torch.float32] * 2
    errors = zip([*ours, *grads], [*theirs, *their_grads], [*exact, *exact_grads], strict=True)
    for a, b, o in errors:
        scale = o.abs().max().double()
        ours_err = ((a.double() - o.double()).abs().max() / scale).item()
        their_err = ((b.double() - o.double()).abs().max() / scale).item()
        assert ours_err <= 2 * their_err + 1e-5, (ours_err, their_err)


def test_verl_pin_is_the_extra():
    """The verl this venv runs is the one pyproject's `verl` extra and the Makefile pin."""
    root = Path(__file__).resolve().parents[2]
    pin = f"verl=={importlib.metadata.version('verl')}"
    extra = re.search(r"^verl = \[(.*)\]$", (root / "pyproject.toml").read_text(), re.M)
    made = re.search(r"^VERL_PIN\s*:= (\S+)$", (root / "Makefile").read_text(), re.M)
    assert extra is not None and extra[1] == f'"{pin}"'
    assert made is not None and made[1] == pin


def test_patch_in_every_process_through_verl_external_modules(tmp_path):
    """verl imports the modules named in VERL_USE_EXTERNAL_MODULES in every process that
    imports verl (its Ray workers too): one that calls patch_verl patches each of them."""
    (tmp_path / "use_fastrl_head.py").write_text(
        "from fastrl.integrations import patch_verl\n\nPATCH = patch_verl()\n"
    )
    check = (
        "import sys\n"
        "import verl.utils.kernel.linear_cross_entropy as lce\n"
        "from verl.utils.experimental.torch_functional import FusedLinearForPPO\n"
        "m = sys.modules['use_fastrl_head']  # imported by `import verl`, not here\n"
        "assert lce.linear_cross_entropy is m.PATCH._lce\n"
        "assert FusedLinearForPPO.forward is m.PATCH._forward\n"
        "print('patched')\n"
    )
    env = {
        **os.environ,
        "VERL_USE_EXTERNAL_MODULES": "use_fastrl_head",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("patched"), run.stderr[-2000:]
