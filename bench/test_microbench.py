"""fastrl's kernel microbenchmarks as a pytest-benchmark suite.

    make bench-micro                   # -> bench/results/microbench-<device>-<date>.json
    .venv/bin/python -m pytest bench/test_microbench.py --benchmark-json out.json
    .venv/bin/python -m pytest bench/test_microbench.py -k "llama3-8b-N16384 and fwdbwd"
    .venv/bin/python -m pytest bench/test_microbench.py --benchmark-disable -m "not slow"
    .venv/bin/pytest-benchmark compare a.json b.json --group-by=group --columns=median,iqr

One benchmark per (op, mode, head, shape, method); its group is (op, mode, head, shape),
so a report or `compare` lists the methods of one case side by side:

- `linear_logprobs`: forward (frozen head), forward+backward (frozen and trainable head);
- `fused_policy_loss` (DAPO, TRL's default loss) and `fused_preference_loss` (DPO
  sigmoid, beta 0.1, reference log-probs precomputed): forward+backward, frozen head;
- `gae_advantages` (gamma 0.99, lambda 0.95) with impl "triton" and "torch" beside a copy of
  the bytes it moves (bench_gae.py's reference; `gb_per_s` in extra_info), on CUDA at
  256 x 4096 and 1024 x 2048 tokens.

Methods are the bench scripts' own baselines (bench_logprobs.METHODS,
bench_policy.METHODS, bench_preference.METHODS: same code, same calls): fastrl with
impl "triton" and "torch", eager PyTorch (materialised fp32 logits, log_softmax,
gather), TRL's `selective_log_softmax` and chunked head, Liger-Kernel, Cut Cross-Entropy,
and `torch.compile` of eager (CUDA only). One that is not installed or not runnable here
is skipped with the reason.

Shapes: on CUDA, bf16, the heads of Llama-3-8B, Qwen2.5-7B and Qwen2.5-1.5B at N = 4096
and 16384 tokens (ids like `llama3-8b-N16384-bf16`; the loss ops as 8 completions, or 8
preference pairs, of N/8 or N/16 tokens). Elsewhere, fp32, tiny odd shapes (d=96,
V=1000, N around 50 and 250) that check the harness in seconds; impl="triton" runs
through the Triton interpreter there, at the smallest shape only.

Timing: `benchmark.pedantic` after an untimed warm-up call (Triton compilation,
torch.compile) and one untimed call that sizes the rounds: as many as fit in
--micro-budget seconds (default 1 on CUDA, 0.5 on a CPU), 3 to 20, or exactly
--micro-rounds. On CUDA each timed call ends with a device synchronisation and an untimed
setup flushes the L2 cache before it (as `triton.testing.do_bench`). `extra_info` holds
the peak CUDA memory above the inputs (`peak_mem_mib`, outputs and gradients included;
None on a CPU), the FLOPs of the matmuls the math needs and the TFLOP/s of the median,
the shape and how the method was called. Nothing here asserts a target: these are
measurements. `slow` marks the methods whose first call per case runs torch.compile for
tens of seconds (`compile`, Liger's policy and preference losses); `-m "not slow"` leaves
them out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pytest
import torch

from bench import bench_gae, bench_logprobs, bench_policy, bench_preference
from bench.common import (
    HEADS,
    device_name,
    dtype_name,
    error_reason,
    free_memory,
    is_oom,
    peak_memory_mib,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
DTYPE_TAG = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[DTYPE]

GPU_TOKENS = (4096, 16384)
CPU_D, CPU_V = 96, 1000
L2_FLUSH_BYTES = 256 * 2**20  # what triton.testing.do_bench writes between calls


# ----------------------------------------------------------------------------- shapes


def shape_id(shape: Any) -> str:
    """A case's readable name: `llama3-8b-N16384-bf16` for a model's head, else
    `cpu-N37-d96-V1000-fp32` (N = tokens; the loss ops' B x T is in extra_info)."""
    key = next((k for k, (model, _, _) in HEADS.items() if model == shape.name), None)
    if key is not None:
        return f"{key}-N{shape.N}-{DTYPE_TAG}"
    return f"{shape.name}-N{shape.N}-d{shape.d}-V{shape.V}-{DTYPE_TAG}"


def _params(shapes: list[Any]) -> list[Any]:
    return [pytest.param(s, id=shape_id(s)) for s in shapes]


def _heads(build: Callable[[str, int, int, int], Any]) -> list[Any]:
    """`build(model, d, V, N)` for every real head and token count."""
    return [build(model, d, V, n) for model, d, V in HEADS.values() for n in GPU_TOKENS]


# on CUDA one GRPO group of G completions of N / G tokens, and 8 preference pairs of
# N / 16 tokens (rows [chosen; rejected]); on a CPU small odd B x T
G, PAIRS = bench_policy.G, bench_preference.PAIRS
if CUDA:
    LOGPROBS_SHAPES = _heads(lambda m, d, V, n: bench_logprobs.Shape(m, n, d, V))
    POLICY_SHAPES = _heads(lambda m, d, V, n: bench_policy.PolicyShape(m, G, n // G, d, V))
    PREFERENCE_SHAPES = _heads(
        lambda m, d, V, n: bench_preference.PairShape(m, PAIRS, n // (2 * PAIRS), d, V)
    )
else:
    LOGPROBS_SHAPES = [bench_logprobs.Shape("cpu", n, CPU_D, CPU_V) for n in (37, 256)]
    POLICY_SHAPES = [
        bench_policy.PolicyShape("cpu", B, T, CPU_D, CPU_V) for B, T in ((4, 13), (8, 31))
    ]
    PREFERENCE_SHAPES = [
        bench_preference.PairShape("cpu", B, T, CPU_D, CPU_V) for B, T in ((2, 13), (4, 31))
    ]


# ----------------------------------------------------------------------------- methods

# pytest id -> (the bench script's method name, fastrl impl)
FASTRL = {"fastrl-triton": ("fastrl", "triton"), "fastrl-torch": ("fastrl", "torch")}


def _methods(*names: str, compiled: tuple[str, ...] = ("compile",)) -> list[Any]:
    """pytest params of the methods `names`, marked `slow` where the first call of a case
    runs torch.compile (tens of seconds, most of a CPU run)."""
    return [pytest.param(n, id=n, marks=[pytest.mark.slow] if n in compiled else []) for n in names]


FASTRL_AND_EAGER = ("fastrl-triton", "fastrl-torch", "eager", "compile")
LOGPROBS_METHODS = _methods(*FASTRL_AND_EAGER, "trl_selective", "trl_chunked", "liger", "cce")
# Liger's chunked losses are torch.compile'd (compiled=True, their default): ~30 s a case
LIGER_COMPILES = ("compile", "liger")
POLICY_METHODS = _methods(*FASTRL_AND_EAGER, "trl_chunked", "liger", compiled=LIGER_COMPILES)
PREFERENCE_METHODS = _methods(
    *FASTRL_AND_EAGER, "trl_selective", "trl_chunked", "liger", compiled=LIGER_COMPILES
)


def _not_here(method: str, smallest: bool) -> str | None:
    """Why `method` does not run on this machine at this shape, or None."""
    if CUDA:
        return None
    if method == "compile":
        return "torch.compile of the eager baseline is benchmarked on CUDA only"
    if method == "cce":
        return "Cut Cross-Entropy's kernels need CUDA (its CPU path is torch.compile of eager)"
    if method == "fastrl-triton" and not smallest:
        return (
            "the Triton interpreter takes ~10 s a call here: impl='triton' runs at the "
            "smallest CPU shape only"
        )
    return None


def _build(factories: dict[str, Callable], method: str, ctx: dict, smallest: bool):
    """`(fn, note)` from the bench script's factory, or a skip with the reason."""
    reason = _not_here(method, smallest)
    if reason:
        pytest.skip(reason)
    name, impl = FASTRL.get(method, (method, None))
    try:
        return factories[name]({**ctx, "fastrl_impl": impl})
    except Exception as e:  # not installed, not supported here, ...
        pytest.skip(f"{method}: {error_reason(e)}")


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Rounds:
    """How many timed rounds a benchmark gets: `fixed` if given, else as many as fit in
    `budget_s` (one untimed call sizes it), at least `least` and at most `most`."""

    fixed: int | None
    budget_s: float
    least: int = 3
    most: int = 20

    def count(self, call_s: float) -> int:
        if self.fixed is not None:
            return self.fixed
        return max(self.least, min(self.most, int(self.budget_s / max(call_s, 1e-9))))


@pytest.fixture(scope="session")
def rounds(pytestconfig: pytest.Config) -> Rounds:
    budget = pytestconfig.getoption("--micro-budget")
    return Rounds(
        fixed=pytestconfig.getoption("--micro-rounds"),
        budget_s=budget if budget is not None else (1.0 if CUDA else 0.5),
    )


@pytest.fixture(scope="session")
def flush_l2() -> Callable[[], None] | None:
    """The untimed setup of every round on CUDA: overwrite L2 and wait for the device."""
    if not CUDA:
        return None
    buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=DEVICE)

    def setup() -> None:
        buf.zero_()
        torch.cuda.synchronize(DEVICE)

    return setup


def _synchronised(fn: Callable[[], object]) -> Callable[[], object]:
    """On CUDA `fn` followed by a device synchronisation: the timer stops when the GPU is
    done, not when the launches are queued."""
    if not CUDA:
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(DEVICE)
        return out

    return run


def run_benchmark(
    benchmark: Any,
    fn: Callable[[], object],
    rounds: Rounds,
    flush_l2: Callable[[], None] | None,
    *,
    group: str,
    flops: float,
    info: dict[str, Any],
) -> None:
    """Time `fn` with benchmark.pedantic and record the case in benchmark.extra_info."""
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(
        device=device_name(DEVICE), dtype=dtype_name(DTYPE), flops=flops, torch=torch.__version__
    )
    timed = _synchronised(fn)
    n_rounds = 1
    if benchmark.enabled:  # --benchmark-disable: one call of fn, nothing else
        try:
            fn()  # warm-up: Triton compilation, torch.compile, autotuning
            t0 = time.perf_counter()
            timed()  # sizes the rounds: a slow baseline gets fewer
            n_rounds = rounds.count(time.perf_counter() - t0)
            benchmark.extra_info["peak_mem_mib"] = peak_memory_mib(fn, DEVICE)
        except Exception as e:
            if is_oom(e):
                free_memory(DEVICE)
                pytest.skip(f"out of memory: {error_reason(e)}")
            raise
    benchmark.pedantic(timed, setup=flush_l2, rounds=n_rounds)
    stats = getattr(benchmark, "stats", None)
    if benchmark.enabled and stats is not None and stats.stats.median > 0:
        if flops:
            benchmark.extra_info["tflops"] = flops / stats.stats.median / 1e12
        if "bytes" in info:  # a memory-bound op: its bandwidth
            benchmark.extra_info["gb_per_s"] = info["bytes"] / stats.stats.median / 1e9


def _mm_flops(n: int, shape: Any) -> float:
    """FLOPs of one [n, d] x [d, V] matmul."""
    return 2.0 * n * shape.d * shape.V


# ----------------------------------------------------------------------------- linear_logprobs


@dataclass
class LogprobsInputs:
    shape: bench_logprobs.Shape
    smallest: bool
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    grad: torch.Tensor  # upstream gradient of the log-probs


@pytest.fixture(scope="module", params=_params(LOGPROBS_SHAPES))
def logprobs_inputs(request: pytest.FixtureRequest) -> Iterator[LogprobsInputs]:
    shape = request.param
    hidden, weight, targets, grad = bench_logprobs.make_inputs(shape, DTYPE, DEVICE, False)
    smallest = shape == LOGPROBS_SHAPES[0]
    yield LogprobsInputs(shape, smallest, hidden, weight, targets, grad)
    del hidden, weight, targets, grad
    free_memory(DEVICE)


@pytest.fixture(params=LOGPROBS_METHODS)
def logprobs_method(request: pytest.FixtureRequest, logprobs_inputs: LogprobsInputs):
    ctx = {"device": DEVICE, "dtype": DTYPE}
    fn, note = _build(bench_logprobs.METHODS, request.param, ctx, logprobs_inputs.smallest)
    yield request.param, fn, note
    fn = None
    free_memory(DEVICE)


@pytest.mark.parametrize(
    "mode,head", [("fwd", "frozen"), ("fwdbwd", "frozen"), ("fwdbwd", "trainable")]
)
def test_linear_logprobs(benchmark, rounds, flush_l2, logprobs_inputs, logprobs_method, mode, head):
    x = logprobs_inputs
    method, fn, note = logprobs_method
    trainable = head == "trainable"
    x.weight.requires_grad_(trainable)
    params = [x.hidden] + ([x.weight] if trainable else [])

    def call() -> object:
        out = fn(x.hidden, x.weight, x.targets)
        if mode == "fwd":
            return out
        return torch.autograd.grad(out, params, x.grad.to(out.dtype))

    s = x.shape
    run_benchmark(
        benchmark,
        call,
        rounds,
        flush_l2,
        group=f"linear_logprobs {mode} {head} {shape_id(s)}",
        flops=bench_logprobs.matmul_count(mode, trainable) * _mm_flops(s.N, s),
        info=dict(op="linear_logprobs", mode=mode, head=head, method=method, note=note)
        | dict(shape=asdict(s), tokens=s.N),
    )


# ----------------------------------------------------------------------------- the losses


@dataclass
class LossInputs:
    shape: Any
    smallest: bool
    x: dict  # the bench script's inputs: hidden, weight, targets, mask, ...
    ctx: dict  # the method factories' context: device, dtype, loss config and options


def _loss_inputs(shapes: list[Any], request: pytest.FixtureRequest, make) -> Iterator[LossInputs]:
    shape = request.param
    x, ctx = make(shape)
    yield LossInputs(shape, shape == shapes[0], x, ctx)
    x.clear()
    free_memory(DEVICE)


def _policy_case(shape: Any) -> tuple[dict, dict]:
    loss = bench_policy.LossConfig()  # dapo, beta 0: TRL's defaults
    x = bench_policy.make_inputs(shape, DTYPE, DEVICE, trainable=False)
    kw = bench_policy.loss_kwargs(loss, x)
    return x, {"device": DEVICE, "dtype": DTYPE, "loss": loss, "loss_kw": kw}


def _preference_case(shape: Any) -> tuple[dict, dict]:
    loss = bench_preference.LossConfig()  # DPO sigmoid, beta 0.1
    x = bench_preference.make_inputs(shape, DTYPE, DEVICE, trainable=False)
    x["uses_reference"] = loss.uses_reference  # as bench_preference.run_case sets it
    kw = bench_preference.loss_kwargs(loss)
    return x, {"device": DEVICE, "dtype": DTYPE, "loss": loss, "loss_kw": kw}


@pytest.fixture(scope="module", params=_params(POLICY_SHAPES))
def policy_inputs(request: pytest.FixtureRequest) -> Iterator[LossInputs]:
    yield from _loss_inputs(POLICY_SHAPES, request, _policy_case)


@pytest.fixture(scope="module", params=_params(PREFERENCE_SHAPES))
def preference_inputs(request: pytest.FixtureRequest) -> Iterator[LossInputs]:
    yield from _loss_inputs(PREFERENCE_SHAPES, request, _preference_case)


@pytest.fixture(params=POLICY_METHODS)
def policy_method(request: pytest.FixtureRequest, policy_inputs: LossInputs):
    fn, note = _build(
        bench_policy.METHODS, request.param, policy_inputs.ctx, policy_inputs.smallest
    )
    yield request.param, fn, note
    fn = None
    free_memory(DEVICE)


@pytest.fixture(params=PREFERENCE_METHODS)
def preference_method(request: pytest.FixtureRequest, preference_inputs: LossInputs):
    inputs = preference_inputs
    fn, note = _build(bench_preference.METHODS, request.param, inputs.ctx, inputs.smallest)
    yield request.param, fn, note
    fn = None
    free_memory(DEVICE)


def _loss_benchmark(benchmark, rounds, flush_l2, inputs: LossInputs, method, op: str, matmuls):
    name, fn, note = method
    x, s = inputs.x, inputs.shape
    x["weight"].requires_grad_(False)  # frozen lm_head: dH only, as in LoRA training
    params = [x["hidden"]]

    def call() -> object:
        return torch.autograd.grad(fn(x), params)

    n_active = x["num_items"]
    run_benchmark(
        benchmark,
        call,
        rounds,
        flush_l2,
        group=f"{op} fwdbwd frozen {shape_id(s)}",
        flops=matmuls("fwdbwd", False) * _mm_flops(n_active, s),
        info=dict(op=op, mode="fwdbwd", head="frozen", method=name, note=note)
        | dict(shape=asdict(s), tokens=s.N, active_tokens=n_active)
        | dict(loss=asdict(inputs.ctx["loss"])),
    )


def test_fused_policy_loss(benchmark, rounds, flush_l2, policy_inputs, policy_method):
    # a fused loss forms dz in its forward: 2 matmuls (H @ W.T, dz @ W) for a frozen head
    _loss_benchmark(
        benchmark,
        rounds,
        flush_l2,
        policy_inputs,
        policy_method,
        "fused_policy_loss",
        bench_policy.matmul_count,
    )


def test_fused_preference_loss(benchmark, rounds, flush_l2, preference_inputs, preference_method):
    # whole-sequence log-probs come before any per-token gradient: 3 matmuls (+ recompute)
    _loss_benchmark(
        benchmark,
        rounds,
        flush_l2,
        preference_inputs,
        preference_method,
        "fused_preference_loss",
        bench_logprobs.matmul_count,
    )


# ----------------------------------------------------------------------------- gae_advantages

GAE_SHAPES = [(256, 4096), (1024, 2048)] if CUDA else [(5, 37)]


@pytest.mark.parametrize("method", ["fastrl-triton", "fastrl-torch", "copy"])
@pytest.mark.parametrize("shape", GAE_SHAPES, ids=[f"B{b}-T{t}-{DTYPE_TAG}" for b, t in GAE_SHAPES])
def test_gae_advantages(benchmark, rounds, flush_l2, shape, method):
    # memory-bound: the figure is GB/s against the copy of the same bytes
    from fastrl import gae_advantages

    B, T = shape
    nbytes = bench_gae.op_bytes(B, T, DTYPE)
    if method == "copy":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)

        def fn():
            return dst.copy_(src)

    else:
        r, v, m = bench_gae.gae_inputs(B, T, DTYPE, DEVICE)
        impl = FASTRL[method][1]

        def fn():
            return gae_advantages(r, v, m, gamma=0.99, lam=0.95, impl=impl)

    run_benchmark(
        benchmark, fn, rounds, flush_l2, group=f"gae_advantages-B{B}-T{T}-{DTYPE_TAG}", flops=0.0,
        info=dict(op="gae_advantages", method=method, B=B, T=T, bytes=nbytes),
    )  # fmt: skip
