"""The heads in real training loops: torch.compile(fullgraph=True), fake tensors, CUDA
graphs, value checks that do not wait on the GPU, launches on the tensors' device."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastrl import linear_logprobs
from fastrl.checks import check_target_ids
from fastrl.ops.logprobs import custom_ops
from fastrl.ops.logprobs.params import LogprobsParams
from tests.support import DEVICE

N, D, V = 37, 48, 300


def make(device=DEVICE, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(device, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    targets[::4] = -100
    return hidden, weight, targets


def head(hidden, weight, targets, impl):
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
    return logp.sum() + 0.1 * ent.sum()


def test_linear_logprobs_under_torch_compile_fullgraph():
    """The ops are opaque custom ops to dynamo: no graph break, the eager numbers."""
    hidden, weight, targets = make("cpu")
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    loss = compiled(hidden, weight, targets, "torch")
    (grad,) = torch.autograd.grad(loss, hidden)
    ref = head(hidden, weight, targets, "torch")
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_logprobs_fake_tensors(impl):
    """Shape propagation (meta/fake tensors, as torch.compile and FSDP tracing do it)."""
    with FakeTensorMode():
        hidden = torch.randn(3, 5, D, requires_grad=True)
        weight, targets = torch.randn(V, D), torch.randint(0, V, (3, 5))
        out = linear_logprobs(
            hidden, weight, targets, return_entropy=True, return_is_top1=True,
            return_log_sum_sq_probs=True, impl=impl,
        )  # fmt: skip
        assert [(o.shape, o.dtype) for o in out] == [((3, 5), torch.float32)] * 2 + [
            ((3, 5), torch.bool),
            ((3, 5), torch.float32),
        ]
        out[0].sum().backward()
        assert hidden.grad.shape == hidden.shape


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "tiles", "cublas", "frozen"])
def test_custom_ops_pass_opcheck(backend):
    """Schema, fake implementation and autograd registration of each op agree (what
    torch.compile and AOTAutograd rely on), with its LogprobsParams as keyword arguments."""
    hidden, weight = torch.randn(7, D, requires_grad=True), torch.randn(50, D)
    targets = torch.tensor([3, -100, 0, 49, 7, -100, 11])
    bias = None if backend == "frozen" else torch.randn(50, requires_grad=True)
    params = LogprobsParams(1.3, None, -100, backend != "frozen", True, True, backend)
    op = custom_ops._frozen_fwd_op if backend == "frozen" else custom_ops._fwd_op
    torch.library.opcheck(op, (hidden, weight, bias, targets), params.op_kwargs())


def test_value_checks_do_not_read_values_off_the_cpu():
    """Off the CPU the target check is a device-side assert: nothing reads the values back
    (on a meta tensor, whose values cannot be read, it must not raise)."""
    targets = torch.full((N,), V + 5, device="meta")
    check_target_ids(targets, V, -100)
    with pytest.raises(ValueError, match=f"targets holds id {V + 5} outside"):
        check_target_ids(torch.full((N,), V + 5), V, -100)


@pytest.mark.gpu
def test_linear_logprobs_triton_compile_and_cuda_graph():
    hidden, weight, targets = make("cuda", torch.bfloat16)
    compiled = torch.compile(head, fullgraph=True)
    torch.testing.assert_close(
        compiled(hidden, weight, targets, "triton"), head(hidden, weight, targets, "triton")
    )
    static = hidden.detach().clone()
    with torch.no_grad():
        linear_logprobs(static, weight, targets, impl="triton")  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = linear_logprobs(static, weight, targets, impl="triton")
        static.copy_(hidden.detach() * 0.5)
        graph.replay()
        expected = linear_logprobs(static, weight, targets, impl="triton")
    torch.testing.assert_close(out, expected)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_linear_logprobs_on_the_second_gpu():
    """device_map="auto" puts the lm_head on the last GPU: launches follow the tensors."""
    hidden, weight, targets = make("cuda:1", torch.bfloat16)
    with torch.cuda.device(0):
        got = linear_logprobs(hidden, weight, targets, impl="triton")
    ref = linear_logprobs(hidden.float(), weight.float(), targets, impl="torch")
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=0)
