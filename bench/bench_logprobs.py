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

import argparse
import math
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

from bench.common import error_reason as _reason
from bench.common import (
    finish_run,
    free_memory,
    is_oom,
    measure_methods,
    parse_shape_spec,
    peak_memory_mib,
    resolve_device,
    synchronize,
    time_ms,
)

# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    name: str  # the model whose head this is, or a free label
    N: int  # tokens
    d: int  # hidden size
    V: int  # vocabulary

    @property
    def label(self) -> str:
        if any(self.name == model for model, _, _ in HEADS.values()):
            return f"{self.name} N={self.N}"
        return f"{self.name} d={self.d} V={self.V} N={self.N}"


HEADS = {
    "llama3-8b": ("Llama-3-8B", 4096, 128256),
    "qwen2.5-7b": ("Qwen2.5-7B", 3584, 152064),
    "qwen2.5-1.5b": ("Qwen2.5-1.5B", 1536, 151936),
}
GPU_TOKENS = (4096, 16384, 65536)


def _model_shapes(key: str, tokens=GPU_TOKENS) -> list[Shape]:
    name, d, V = HEADS[key]
    return [Shape(name, N, d, V) for N in tokens]


SHAPE_SETS: dict[str, list[Shape]] = {
    # a few seconds per method on 2 CPU cores, odd sizes so tails get exercised
    "cpu": [Shape("cpu", 256, 64, 1000), Shape("cpu", 256, 128, 4000)],
    "smoke": [Shape("smoke", 64, 32, 500)],
    "gpu": [s for key in HEADS for s in _model_shapes(key)],
    "gpu-quick": [s for key in HEADS for s in _model_shapes(key, (4096,))],
    **{key: _model_shapes(key) for key in HEADS},
}


def parse_shapes(spec: str) -> list[Shape]:
    """Comma-separated shape-set names (see SHAPE_SETS) and/or `NxdxV` triples."""
    return parse_shape_spec(spec, SHAPE_SETS, lambda N, d, V: Shape("custom", N, d, V), "NxdxV")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES.update(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)
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

    impl = ctx.get("fastrl_impl") or ("triton" if ctx["device"].type == "cuda" else "torch")

    def f(h, w, t):
        return fastrl.linear_logprobs(h, w, t, impl=impl)

    return f, f"impl={impl!r}"


def _eager(ctx):
    return eager_logprobs, "materialised fp32 logits"


def _compile(ctx):
    torch._dynamo.reset()
    return torch.compile(eager_logprobs, dynamic=False), "torch.compile(eager), dynamic=False"


def _trl_chunked(ctx):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768

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
    # logits ~ N(0, 2^2): peaked enough to look like an LM head, no overflow in fp16
    hidden = torch.randn(shape.N, shape.d, generator=gen).to(device, dtype)
    weight = (torch.randn(shape.V, shape.d, generator=gen) * (2.0 / math.sqrt(shape.d))).to(
        device, dtype
    )
    targets = torch.randint(0, shape.V, (shape.N,), generator=gen).to(device)
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
    record: dict = {
        "shape": asdict(shape),
        "label": shape.label,
        "dtype": str(dtype).removeprefix("torch."),
        "head": "trainable" if trainable else "frozen",
        "modes": list(modes),
        "flops": {m: matmul_count(m, trainable) * flops_unit for m in modes},
        "methods": {},
    }
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


def summary_line(rec: dict) -> str:
    parts = []
    for name, m in rec["methods"].items():
        if m["status"] == "ok":
            ms = m["ms"].get("fwdbwd", next(iter(m["ms"].values()), float("nan")))
            mem = m["peak_mem_mib"].get("fwdbwd")
            parts.append(f"{name} {ms:.3g}ms" + (f"/{mem:.0f}MiB" if mem is not None else ""))
        else:
            parts.append(f"{name} {m['status']}")
    return f"{rec['label']} {rec['dtype']} {rec['head']}: " + ", ".join(parts)


def main(argv=None) -> int:
    from bench.common import default_results_path, environment, progress, write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help=f"comma list of {sorted(SHAPE_SETS)} or NxdxV (default: gpu on CUDA, cpu else)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA")
    p.add_argument("--modes", default="fwd,bwd,fwdbwd", help=f"comma list of {MODES}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    head = p.add_mutually_exclusive_group()
    head.add_argument("--head", choices=["frozen", "trainable", "both"], default="frozen")
    head.add_argument("--frozen", dest="head", action="store_const", const="frozen")
    head.add_argument("--trainable", dest="head", action="store_const", const="trainable")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU only: torch threads (default 1: stable numbers on a shared machine; 0 = torch's)",
    )
    p.add_argument("--fastrl-impl", default=None, help="override fastrl's impl (triton/torch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<dev>-<date>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or parse_shapes("gpu" if device.type == "cuda" else "cpu")
    dtype = (
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if args.dtype == "auto"
        else DTYPES[args.dtype]
    )
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {MODES}")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {list(METHODS)}")
    heads = [False, True] if args.head == "both" else [args.head == "trainable"]
    out_path = Path(args.out) if args.out else default_results_path(device)

    env = environment(device)
    results = {
        "benchmark": "linear_logprobs",
        "env": env,
        "config": {
            "dtype": str(dtype).removeprefix("torch."),
            "modes": modes,
            "methods": methods,
            "seed": args.seed,
        },
        "cases": [],
    }
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} -> {out_path}")
    cases = [(s, tr) for tr in heads for s in shapes]
    bar = progress(cases, desc="linear_logprobs", unit="case")
    for shape, trainable in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{shape.label} {'trainable' if trainable else 'frozen'}")
        rec = run_case(
            shape,
            dtype=dtype,
            device=device,
            trainable=trainable,
            methods=methods,
            modes=modes,
            seed=args.seed,
            fastrl_impl=args.fastrl_impl,
            verbose=args.verbose,
        )
        results["cases"].append(rec)
        write_json(results, out_path)  # after every case, so a crash keeps what was measured
        (bar.write if hasattr(bar, "write") else print)(summary_line(rec))

    finish_run(results, out_path, plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
