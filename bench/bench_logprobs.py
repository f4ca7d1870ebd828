"""Benchmark `fastrl.linear_logprobs` against the ways people compute per-token log-probs.

    python bench/bench_logprobs.py                      # GPU shapes on CUDA, tiny ones on CPU
    python bench/bench_logprobs.py --shapes gpu --head both
    python bench/bench_logprobs.py --shapes 8192x4096x128256 --methods fastrl,eager

Every case (shape x head) runs every method on the same inputs in the same process:

  fastrl         fastrl.linear_logprobs (impl "triton" on CUDA, "torch" on CPU)
  eager          logits = (H @ W.T).float(); log_softmax; gather      (materialises [N, V])
  compile        torch.compile of `eager`
  trl_chunked    trl.kernels.chunked_logprob.ChunkedLogProbFunction (TRL's chunked head)
  trl_selective  logits = H @ W.T; trl.trainer.utils.selective_log_softmax
  liger          Liger-Kernel fused linear cross-entropy, reduction="none"  (logp = -loss)
  cce            Cut Cross-Entropy linear_cross_entropy, reduction="none"   (logp = -loss)

and the plain cuBLAS (torch.mm) matmuls the math needs, for the "x matmul" ratio. A
method that is not installed, fails or runs out of memory is recorded with its reason;
the run always finishes. Results go to bench/results/<device>-<date>.json plus a PNG.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script: import the `bench` package from the repo root, then take the root
    # off sys.path again so that its kernels/ cannot shadow Hugging Face's `kernels`.
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, _root)
    import bench.common  # noqa: F401

    sys.path.remove(_root)

from bench.common import (
    BenchCLI,
    bench_parser,
    case_record,
    case_summary,
    compile_afresh,
    fastrl_impl,
    free_memory,
    head_name,
    headline_ms,
    is_oom,
    measure_methods,
    model_of,
    model_shape_sets,
    new_results,
    parse_shape_spec,
    peak_memory_mib,
    random_head_inputs,
    resolve_run_args,
    run_cases,
    shape_label,
    synchronize,
    time_ms,
    trl_chunk_size,
)
from bench.common import error_reason as _reason

# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    name: str  # the model whose head this is, or a free label
    N: int  # tokens
    d: int  # hidden size
    V: int  # vocabulary

    @property
    def label(self) -> str:
        return shape_label(self.name, self.d, self.V, f"N={self.N}")


GPU_TOKENS = (4096, 16384, 65536)

SHAPE_SETS: dict[str, list[Shape]] = {
    # a few seconds per method on 2 CPU cores, odd sizes so tails get exercised
    "cpu": [Shape("cpu", 256, 64, 1000), Shape("cpu", 256, 128, 4000)],
    "smoke": [Shape("smoke", 64, 32, 500)],
    **model_shape_sets(lambda model, d, V, N: Shape(model, N, d, V), GPU_TOKENS, 4096),
}


def parse_shapes(spec: str) -> list[Shape]:
    """Comma-separated shape-set names (see SHAPE_SETS) and/or `NxdxV` triples."""
    return parse_shape_spec(
        spec, SHAPE_SETS, lambda N, d, V: Shape(model_of(d, V), N, d, V), "NxdxV"
    )


MODES = ("fwd", "bwd", "fwdbwd", "infer")
# matmuls of size 2*N*V*d each mode needs: forward; backward = recompute + dH (+ dW)
MATMULS = {"fwd": 1, "infer": 1, "bwd": 2, "fwdbwd": 3}


def matmul_count(mode: str, trainable: bool) -> int:
    return MATMULS[mode] + (trainable and mode in ("bwd", "fwdbwd"))


# ----------------------------------------------------------------------------- methods
# A method factory takes the case context and returns `f(hidden, weight, targets) -> logps`
# (any float dtype, shape [N]) and a note, or raises to be recorded as skipped.

MethodFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def eager_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _fastrl(ctx):
    import fastrl

    impl = fastrl_impl(ctx)

    def f(h, w, t):
        return fastrl.linear_logprobs(h, w, t, impl=impl)

    return f, f"impl={impl!r}"


def _eager(ctx):
    return eager_logprobs, "materialised fp32 logits"


def _compile(ctx):
    return compile_afresh(eager_logprobs)


def _trl_chunked(ctx):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    chunk = trl_chunk_size()

    def f(h, w, t):
        # apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
        #       outputs) -> (logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)
        return ChunkedLogProbFunction.apply(h, w, None, t, 1.0, chunk, None, 1.0, ())[0]

    return f, f"chunk_size={chunk}"


def _trl_selective(ctx):
    from trl.trainer.utils import selective_log_softmax

    def f(h, w, t):
        return selective_log_softmax(h @ w.T, t)

    return f, "logits in input dtype, then selective_log_softmax"


def _liger(ctx):
    if ctx["device"].type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("Triton kernels would run in the interpreter (TRITON_INTERPRET=1)")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def f(h, w, t):
        return -liger_fused_linear_cross_entropy(h, w, t, reduction="none")

    return f, "fused linear CE, reduction='none'"


def _cce(ctx):
    from cut_cross_entropy import linear_cross_entropy

    if ctx["device"].type == "cuda":
        impl, note = "cce", "impl='cce', filter_eps='high' (default, filters small grads)"
    else:
        impl, note = "torch_compile", "CCE kernels need CUDA: impl='torch_compile' (materialises)"
    if impl == "torch_compile":
        torch._dynamo.reset()

    def f(h, w, t):
        return -linear_cross_entropy(h, w, t, reduction="none", impl=impl)

    return f, note


METHODS: dict[str, Callable] = {
    "fastrl": _fastrl,
    "eager": _eager,
    "compile": _compile,
    "trl_chunked": _trl_chunked,
    "trl_selective": _trl_selective,
    "liger": _liger,
    "cce": _cce,
}


# ----------------------------------------------------------------------------- one case


def make_inputs(shape: Shape, dtype, device, trainable: bool, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden, weight, targets = random_head_inputs((shape.N,), shape.d, shape.V, dtype, device, gen)
    grad = torch.randn(shape.N, generator=gen).to(device)
    hidden.requires_grad_(True)
    weight.requires_grad_(trainable)
    return hidden, weight, targets, grad


@torch.no_grad()
def reference_logprobs(hidden, weight, targets, max_elems: int = 2**26) -> torch.Tensor:
    """fp32 log-probs computed in row chunks (never the whole [N, V] at once)."""
    N, V = hidden.shape[0], weight.shape[0]
    rows = max(1, max_elems // V)
    w = weight.float()
    out = torch.empty(N, device=hidden.device)
    for s in range(0, N, rows):
        z = hidden[s : s + rows].float() @ w.T
        out[s : s + rows] = z.gather(-1, targets[s : s + rows, None]).squeeze(-1) - z.logsumexp(-1)
    return out


def _time_matmuls(N, d, V, dtype, device, trainable, timer) -> dict:
    H = torch.randn(N, d, device=device, dtype=dtype)
    W = torch.randn(V, d, device=device, dtype=dtype)
    Z = torch.empty(N, V, device=device, dtype=dtype)  # output of H@W.T, reused as dz
    Z.normal_()
    out = {"mm_logits": timer(lambda: torch.mm(H, W.T, out=Z))}
    out["mm_dhidden"] = timer(lambda: torch.mm(Z, W))
    if trainable:
        out["mm_dweight"] = timer(lambda: torch.mm(Z.T, H))
    return out


def matmul_reference(shape: Shape, dtype, device, trainable: bool, timer) -> dict:
    """Time the plain torch.mm calls the math needs: H@W.T [N,V], dz@W [N,d], dz.T@H [V,d].

    If the [N, V] buffer does not fit, time N/2, N/4, ... rows and scale up linearly
    (recorded as `scaled_from_N`)."""
    N, d, V = shape.N, shape.d, shape.V
    rows = N
    while True:
        try:
            out = _time_matmuls(rows, d, V, dtype, device, trainable, timer)
            break
        except Exception as e:
            if not is_oom(e) or rows <= 1024:
                return {"status": "OOM" if is_oom(e) else "skipped", "reason": _reason(e)}
        finally:
            free_memory(device)
        rows //= 2
    if rows != N:
        out = {k: v * N / rows for k, v in out.items()}
    bwd = out["mm_logits"] + out["mm_dhidden"] + out.get("mm_dweight", 0.0)
    out.update(fwd=out["mm_logits"], infer=out["mm_logits"], bwd=bwd)
    out["fwdbwd"] = out["mm_logits"] + bwd
    rec = {"status": "ok", "ms": out}
    if rows != N:
        rec["scaled_from_N"] = rows
    return rec


def measure_method(fn: MethodFn, inputs, modes, device, timer, ref) -> dict:
    """Time and measure one method on one case. Raises on failure (caller records it)."""
    hidden, weight, targets, grad = inputs
    params = [hidden] + ([weight] if weight.requires_grad else [])
    rec: dict = {"ms": {}, "peak_mem_mib": {}}

    def fwd():
        return fn(hidden, weight, targets)

    def fwdbwd():
        out = fn(hidden, weight, targets)
        return torch.autograd.grad(out, params, grad.to(out.dtype))

    def infer():
        with torch.no_grad():
            return fn(hidden, weight, targets)

    # warm-up (compiles, autotunes) and a correctness check against the fp32 reference
    out = fwd()
    if out.shape != targets.shape:
        raise RuntimeError(f"returned shape {tuple(out.shape)}, expected {tuple(targets.shape)}")
    rec["max_abs_err"] = float((out.detach().float() - ref).abs().max())
    torch.autograd.grad(out, params, grad.to(out.dtype))
    del out
    if "infer" in modes:
        infer()
    synchronize(device)

    # memory: peak above the inputs, the method's outputs (logps, grads) included
    if "fwd" in modes or "bwd" in modes:
        rec["peak_mem_mib"]["fwd"] = peak_memory_mib(fwd, device)
    if "fwdbwd" in modes or "bwd" in modes:
        rec["peak_mem_mib"]["fwdbwd"] = peak_memory_mib(fwdbwd, device)
    if "infer" in modes:
        rec["peak_mem_mib"]["infer"] = peak_memory_mib(infer, device)

    if "fwd" in modes:
        rec["ms"]["fwd"] = timer(fwd)
    if "fwdbwd" in modes:
        rec["ms"]["fwdbwd"] = timer(fwdbwd)
    if "infer" in modes:
        rec["ms"]["infer"] = timer(infer)
    if "bwd" in modes:
        out = fwd()
        try:
            g = grad.to(out.dtype)
            rec["ms"]["bwd"] = timer(lambda: torch.autograd.grad(out, params, g, retain_graph=True))
        except Exception as e:
            if is_oom(e):
                raise
            # a backward that cannot be replayed: fall back to the difference
            fb = rec["ms"].get("fwdbwd") or timer(fwdbwd)
            fw = rec["ms"].get("fwd") or timer(fwd)
            rec["ms"]["bwd"] = max(fb - fw, 0.0)
            rec["bwd_note"] = f"bwd = fwdbwd - fwd (no retain_graph: {_reason(e)[:100]})"
        finally:
            del out
    return rec


def run_case(
    shape: Shape,
    *,
    dtype=torch.float32,
    device: torch.device | str = "cpu",
    trainable: bool = False,
    methods=tuple(METHODS),
    modes=("fwd", "bwd", "fwdbwd"),
    seed: int = 0,
    fastrl_impl: str | None = None,
    matmul: bool = True,
    timer=None,
    verbose: bool = False,
) -> dict:
    """Benchmark every method on one (shape, dtype, head) case; never raises for a method."""
    device = torch.device(device)
    timer = timer or (lambda fn: time_ms(fn, device))
    ctx = {"device": device, "dtype": dtype, "fastrl_impl": fastrl_impl}
    flops_unit = 2.0 * shape.N * shape.V * shape.d
    flops = {m: matmul_count(m, trainable) * flops_unit for m in modes}
    record = case_record(asdict(shape), shape.label, dtype, trainable, modes, flops)
    record["matmul"] = (
        matmul_reference(shape, dtype, device, trainable, timer)
        if matmul
        else {"status": "skipped", "reason": "disabled"}
    )
    mm_ms = record["matmul"].get("ms", {})

    inputs = make_inputs(shape, dtype, device, trainable, seed)
    ref = reference_logprobs(*inputs[:3])
    record["methods"] = measure_methods(
        methods,
        METHODS,
        ctx,
        partial(measure_method, inputs=inputs, modes=modes, device=device, timer=timer, ref=ref),
        flops=record["flops"],
        matmul_ms=mm_ms,
        device=device,
        verbose=verbose,
    )
    del inputs, ref
    free_memory(device)
    return record


# ----------------------------------------------------------------------------- CLI


def _figures(method: dict) -> str:
    mem = method["peak_mem_mib"].get("fwdbwd")
    return f"{headline_ms(method):.3g}ms" + (f"/{mem:.0f}MiB" if mem is not None else "")


def summary_line(rec: dict) -> str:
    return case_summary(rec, _figures)


CLI = BenchCLI(
    name="linear_logprobs",
    parse_shapes=parse_shapes,
    shapes_help=f"comma list of {sorted(SHAPE_SETS)} or NxdxV",
    modes=MODES,
    default_modes="fwd,bwd,fwdbwd",
    methods=METHODS,
    default_methods=tuple(METHODS),
    methods_help="comma list of methods",
    results_prefix="",
    out_help="JSON path (default bench/results/<dev>-<date>)",
)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__, CLI)
    run = resolve_run_args(p, p.parse_args(argv), CLI)
    results = new_results(CLI.name, run)

    def run_one(shape: Shape, trainable: bool) -> dict:
        return run_case(shape, trainable=trainable, **run.case_options())

    def describe(shape: Shape, trainable: bool) -> str:
        return f"{shape.label} {head_name(trainable)}"

    cases = [(s, tr) for tr in run.heads for s in run.shapes]
    run_cases(results, cases, run_one, describe, summary_line, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
