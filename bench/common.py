"""Shared benchmark plumbing: timers, peak memory, environment metadata, JSON output,
the model heads and random inputs, the baselines the benchmarks have in common, and the
command line and case loop of bench_logprobs.py, bench_policy.py and bench_preference.py.

On CUDA, times are the median of `triton.testing.do_bench` (which flushes L2 between
calls) and memory is the peak of `torch.cuda.max_memory_allocated` above what was
allocated before the call. On a CPU, times are the median of a few `time.perf_counter`
repeats and memory is not measured (reported as None).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

MIB = 2**20

# torch.OutOfMemoryError exists since torch 2.5; older ones only have the CUDA one.
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors, including the ones cuBLAS/Triton raise as text."""
    if isinstance(exc, OOM_ERRORS):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "cublas_status_alloc_failed" in msg


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def error_reason(e: BaseException) -> str:
    """One line for a results file: the exception type and the first line of its message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        # A full collection walks every tracked object: with torch, transformers and the
        # peers loaded, ~0.1 s, and a case calls this ~5 times a method (a minute of a GPU
        # run). What is alive now is taken out of later collections (gc.freeze); garbage
        # made from here on is still collected, and tensors are freed by refcount anyway.
        gc.freeze()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- timing


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cpu_min_reps: int = 3,
    cpu_max_reps: int = 20,
    cpu_budget_s: float = 0.25,
) -> float:
    """Median wall time of `fn()` in milliseconds.

    CUDA: `triton.testing.do_bench(..., return_mode="median")`. CPU: one warm-up call,
    then repeats until `cpu_budget_s` is spent (at least `cpu_min_reps`, at most
    `cpu_max_reps`), median of those.
    """
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        )
    fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < cpu_max_reps and (len(times) < cpu_min_reps or spent < cpu_budget_s):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times) * 1e3


_FLUSH: dict[torch.device, torch.Tensor] = {}


def quick_time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    rep_ms: float = 40.0,
    min_reps: int = 3,
    max_reps: int = 100,
) -> float:
    """Median time of `fn()` in ms, in fewer calls than do_bench: on CUDA one warm-up call
    (which also sizes the run), then max(min_reps, rep_ms / its time) calls (at most
    max_reps), each timed with CUDA events after flushing the L2 as do_bench does. A 90 ms
    call takes 4 calls instead of do_bench's 8 (whose median is then of one sample). On
    CPU: one warm-up and one timed call."""
    if device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    if device not in _FLUSH:  # 256 MiB: more than any L2
        _FLUSH[device] = torch.empty(2**26, dtype=torch.int32, device=device)
    flush = _FLUSH[device]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush.zero_()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    n = max(min_reps, min(max_reps, int(rep_ms / max(start.elapsed_time(end), 1e-3))))
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(n)
    ]
    for a, b in events:
        flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize(device)
    return statistics.median(a.elapsed_time(b) for a, b in events)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated while `fn()` runs (its result held until the end), above
    what was allocated before, in MiB. None off CUDA."""
    if device.type != "cuda":
        return None
    free_memory(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    free_memory(device)
    return (peak - base) / MIB


# ----------------------------------------------------------------------------- shapes

# the lm_heads the GPU shape sets are made of: key -> (model, hidden size d, vocabulary V)
HEADS = {
    "llama3-8b": ("Llama-3-8B", 4096, 128256),
    "qwen2.5-7b": ("Qwen2.5-7B", 3584, 152064),
    "qwen2.5-1.5b": ("Qwen2.5-1.5B", 1536, 151936),
}


def shape_label(name: str, d: int, V: int, size: str) -> str:
    """A case's name in logs and plots: a model's head goes by the model's name, any
    other head shows its d and V too."""
    if any(name == model for model, _, _ in HEADS.values()):
        return f"{name} {size}"
    return f"{name} d={d} V={V} {size}"


def model_of(d: int, V: int) -> str:
    """The model whose head is [V, d] (see HEADS), or "custom": so that a shape written as
    numbers (NxdxV, BxTxdxV) is labelled like the named sets' shapes."""
    return next((model for model, hd, hv in HEADS.values() if (hd, hv) == (d, V)), "custom")


def model_shape_sets(
    build: Callable[[str, int, int, int], Any], sizes: Sequence[int], quick_size: int
) -> dict[str, list]:
    """The shape sets of the HEADS: one per head (every size in `sizes`), `gpu` (all of
    those) and `gpu-quick` (every head at `quick_size` only). `build(model, d, V, size)`
    makes one shape."""
    per_head = {key: [build(model, d, V, n) for n in sizes] for key, (model, d, V) in HEADS.items()}
    return {
        "gpu": [s for shapes in per_head.values() for s in shapes],
        "gpu-quick": [build(model, d, V, quick_size) for model, d, V in HEADS.values()],
        **per_head,
    }


def random_head_inputs(
    rows: tuple[int, ...],
    d: int,
    V: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states [*rows, d], an lm_head weight [V, d] and targets [*rows], drawn from
    `gen` on the CPU (every CPU run gets the same numbers), or on CUDA from a device
    generator seeded from `gen` (every CUDA device gets the same numbers): drawing the
    0.2-0.6 G normals of a real head on the CPU took seconds per case, most of a GPU run's
    time at small N."""
    if device.type == "cuda":
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        dgen = torch.Generator(device=device).manual_seed(seed)
        hidden = torch.randn(*rows, d, generator=dgen, device=device).to(dtype)
        weight = torch.randn(V, d, generator=dgen, device=device) * (2.0 / math.sqrt(d))
        targets = torch.randint(0, V, rows, generator=dgen, device=device)
        return hidden, weight.to(dtype), targets
    # logits ~ N(0, 2^2): peaked enough to look like an LM head, no overflow in fp16
    hidden = torch.randn(*rows, d, generator=gen).to(device, dtype)
    weight = (torch.randn(V, d, generator=gen) * (2.0 / math.sqrt(d))).to(device, dtype)
    targets = torch.randint(0, V, rows, generator=gen).to(device)
    return hidden, weight, targets


def completion_mask(kind: str, rows: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """A [rows, T] 0/1 long mask on the CPU: `full` counts every token, `ragged` right-pads
    each row to a random length in [T/2, T]."""
    if kind == "full":
        return torch.ones(rows, T, dtype=torch.long)
    if kind == "ragged":
        lengths = torch.randint((T + 1) // 2, T + 1, (rows,), generator=gen)
        return (torch.arange(T)[None, :] < lengths[:, None]).long()
    raise ValueError(f"mask_kind must be 'full' or 'ragged', got {kind!r}")


# ----------------------------------------------------------------------------- methods


def measure_methods(
    names: Iterable[str],
    factories: dict[str, Callable],
    ctx: dict,
    measure: Callable[[Callable], dict],
    *,
    flops: dict[str, float],
    matmul_ms: dict[str, float],
    device: torch.device,
    verbose: bool = False,
) -> dict[str, dict]:
    """Run every method of one case; never raises for a method.

    For each name, `factories[name](ctx)` builds `(fn, note)`; if that raises (not
    installed, unsupported here, ...) the method is recorded as `skipped` with the reason.
    Otherwise `measure(fn)` returns its figures (`ms`, `peak_mem_mib`, ...), recorded with
    status `ok`; if it raises, the method is `OOM` (out of memory) or `failed`. Methods
    with times get `tflops[mode]` (`flops[mode]` / time) and `x_matmul[mode]` (time /
    `matmul_ms[mode]`). Memory is freed after each method. A factory made by env_variant
    (a design variant) is built and measured with its environment variables set, and its
    record keeps them (`env`). Returns {name: record}, in the order of `names`.
    """
    records: dict[str, dict] = {}
    for name in names:
        # a design variant (env_variant) runs with its environment variables set
        env = getattr(factories[name], "env", None) or {}
        with environ(env):
            records[name] = _measure_one(factories[name], ctx, measure, device, verbose)
        if env:
            records[name]["env"] = dict(env)
    for rec in records.values():
        if rec.get("ms"):
            rec["tflops"] = {
                m: flops[m] / (ms * 1e-3) / 1e12 for m, ms in rec["ms"].items() if ms > 0
            }
            rec["x_matmul"] = {
                m: ms / matmul_ms[m] for m, ms in rec["ms"].items() if matmul_ms.get(m, 0) > 0
            }
    return records


def _measure_one(
    factory: Callable, ctx: dict, measure: Callable[[Callable], dict], device, verbose: bool
) -> dict:
    """One method of measure_methods: its record (`ok`, `skipped` or `OOM`)."""
    try:
        fn, note = factory(ctx)
    except Exception as e:  # not installed, unsupported here, ...
        return {"status": "skipped", "reason": error_reason(e)}
    try:
        return {"status": "ok", "note": note, **measure(fn)}
    except Exception as e:
        # a method that was built but broke while running failed (a bug to look at, not a
        # missing package): the summary and the GPU report show it as such
        status = "OOM" if is_oom(e) else "failed"
        if verbose and status != "OOM":
            traceback.print_exc()
        return {"status": status, "note": note, "reason": error_reason(e)}
    finally:
        fn = None
        free_memory(device)


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def env_variant(factory: Callable, env: dict[str, str]) -> Callable:
    """A method factory that is `factory` with the environment variables `env` set while
    measure_methods builds and measures it (forward, backward, timing: the whole method,
    since a design may be read again in the backward). This is how a design that fastrl
    selects at run time (tools/gpu_plan.py lists them) is timed beside the default."""

    def variant(ctx: dict) -> tuple[Callable, str]:
        fn, note = factory(ctx)
        return fn, f"{note}, " + " ".join(f"{k}={v}" for k, v in env.items())

    variant.env = dict(env)  # type: ignore[attr-defined]
    return variant


def case_record(
    shape: dict,
    label: str,
    dtype: torch.dtype,
    trainable: bool,
    modes: Sequence[str],
    flops: dict[str, float],
    **details: Any,
) -> dict:
    """A case's record before anything is measured; the script's own `details` stand
    between the head and the modes in the JSON."""
    return {
        "shape": shape,
        "label": label,
        "dtype": dtype_name(dtype),
        "head": head_name(trainable),
        **details,
        "modes": list(modes),
        "flops": flops,
        "methods": {},
    }


# A method factory takes the case context `ctx` and returns the function to time and a
# note on how it is called. These are the ones the benchmarks have in common.


def fastrl_impl(ctx: dict) -> str:
    """fastrl's impl for a case: --fastrl-impl if given, else Triton on CUDA, torch elsewhere."""
    return ctx.get("fastrl_impl") or ("triton" if ctx["device"].type == "cuda" else "torch")


def trl_chunk_size() -> int:
    """The chunk size TRL's trainers give its chunked head (32768 where TRL does not say)."""
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768
    return chunk


def trl_fused_head(
    device: torch.device, outputs: tuple[str, ...], keep: int
) -> tuple[Callable[[dict], list[torch.Tensor]], str]:
    """TRL's chunked head as trl.trainer.utils.add_fused_lm_head's forward calls it.

    Returns `head(x)`: the first `keep` of its per-token outputs for a loss benchmark's
    inputs `x`, on the [rows, T] grid of x["mask"] with 0 at masked tokens; and a note.
    On Triton devices only the completion tokens go in (as in TRL), elsewhere every
    position."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

    chunk = trl_chunk_size()
    compact = _use_triton(device)

    def head(x: dict) -> list[torch.Tensor]:
        hidden, targets, mask = x["hidden"], x["targets"], x["mask"].bool()
        if compact:  # score only the completion tokens
            h, t = hidden[mask], targets[mask]
        else:  # every position (fixed tile shapes), masked ones with label 0
            h = hidden.reshape(-1, hidden.shape[-1])
            t = targets.masked_fill(~mask, 0).reshape(-1)
        # apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
        #       outputs) -> (logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)
        per_token = ChunkedLogProbFunction.apply(
            h, x["weight"], None, t, 1.0, chunk, None, 1.0, outputs
        )[:keep]
        if compact:
            return [o.new_zeros(mask.shape).masked_scatter(mask, o) for o in per_token]
        return [o.view(mask.shape).masked_fill(~mask, 0) for o in per_token]

    where = "completion tokens only" if compact else "every position"
    return head, f"ChunkedLogProbFunction chunk_size={chunk} ({where})"


def compile_afresh(fn: Callable) -> tuple[Callable, str]:
    """`torch.compile(fn)` for one case, and its note; earlier cases' graphs are dropped
    first (each case has its own shapes)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False), "torch.compile(eager), dynamic=False"


LossOn = Callable[[dict, dict], torch.Tensor]  # (inputs, the case's loss options) -> loss


def eager_loss_method(loss: LossOn, note: str) -> Callable:
    """The factory of a loss benchmark's eager baseline `loss`."""

    def factory(ctx: dict) -> tuple[Callable[[dict], torch.Tensor], str]:
        kw = ctx["loss_kw"]
        return (lambda x: loss(x, kw)), note

    return factory


def compiled_loss_method(loss: LossOn) -> Callable:
    """The factory of `torch.compile` of a loss benchmark's eager baseline `loss`."""

    def factory(ctx: dict) -> tuple[Callable[[dict], torch.Tensor], str]:
        fn, note = compile_afresh(loss)
        kw = ctx["loss_kw"]
        return (lambda x: fn(x, kw)), note

    return factory


# ----------------------------------------------------------------------------- metadata


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device: torch.device) -> str:
    """File-name friendly device name; CPU slugs end in "-cpu" (bench/results ignores
    `*-cpu-*` files: CPU numbers are for checking the harness, not for publishing)."""
    slug = _slug(re.sub(r"\((r|tm)\)", "", device_name(device), flags=re.I))
    if device.type != "cuda":
        slug = re.sub(r"-?cpu$", "", slug) + "-cpu"
    return slug


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            # read-only: never take the index lock or refresh the index
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict:
    """The checkout's commit and whether tracked files differ from it; where there is no
    git checkout (a copy of the tree on a GPU machine), FASTRL_GIT_COMMIT and
    FASTRL_GIT_DIRTY (0/1) as tools/gpu_check.sh read them before copying the tree."""
    commit = _git("rev-parse", "HEAD")
    if commit is None and os.environ.get("FASTRL_GIT_COMMIT"):
        dirty = os.environ.get("FASTRL_GIT_DIRTY")
        return {
            "commit": os.environ["FASTRL_GIT_COMMIT"],
            "dirty": None if not dirty else dirty == "1",
        }
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Everything needed to tell where and with what a result was measured."""
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "date": _dt.date.today().isoformat(),
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "versions": {
            d: package_version(d)
            for d in ("fastrl", "trl", "liger-kernel", "cut-cross-entropy", "transformers")
        },
        **git_commit(),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            cuda=torch.version.cuda,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            timer="triton.testing.do_bench median",
        )
    else:
        env.update(
            cpu_count=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            timer="time.perf_counter median",
        )
    return env


# ----------------------------------------------------------------------------- output


def default_results_path(device: torch.device, prefix: str = "") -> Path:
    date = _dt.date.today().isoformat()
    return RESULTS_DIR / f"{prefix}{device_slug(device)}-{date}.json"


def write_json(data: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def progress(iterable: Iterable, **kwargs):
    """tqdm over `iterable` (to stderr, only when it is a terminal), or the plain iterable
    if tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    kwargs.setdefault("disable", None)  # None: no bar when stderr is not a TTY (CI logs)
    return tqdm(iterable, **kwargs)


def parse_shape_spec(spec: str, sets: dict, build: Callable, form: str) -> list:
    """Comma-separated names of `sets` and/or custom shapes written as `form` (e.g.
    "NxdxV"): each custom one becomes `build(*its integers)`."""
    n = form.count("x") + 1
    shapes = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if item in sets:
            shapes += sets[item]
        elif item.count("x") == n - 1 and all(p.isdigit() for p in item.split("x")):
            shapes.append(build(*map(int, item.split("x"))))
        else:
            raise argparse.ArgumentTypeError(
                f"unknown shape {item!r}: use one of {sorted(sets)} or {form}"
            )
    return shapes


def finish_run(results: dict, out_path: Path, plot: bool) -> None:
    """List the skipped and failed methods with their reasons, and draw the plot next to
    the JSON."""
    not_run = {
        f"{m['status']} {name}: {m.get('reason', '')}"
        for c in results["cases"]
        for name, m in c["methods"].items()
        if m["status"] in ("skipped", "failed")
    }
    for line in sorted(not_run):
        print(line)
    print(f"wrote {out_path}")
    if plot:
        try:
            from bench.plot import plot as draw

            print(f"wrote {draw(out_path)}")
        except Exception as e:
            print(f"plot failed: {error_reason(e)}", file=sys.stderr)


def headline_ms(method: dict) -> float:
    """The time a summary line shows for a method: fwdbwd, else its first mode."""
    return method["ms"].get("fwdbwd", next(iter(method["ms"].values()), float("nan")))


def case_summary(rec: dict, figures: Callable[[dict], str], label: str | None = None) -> str:
    """One line for a case: `<label> <dtype> <head>: <method> <figures(record)>, ...`, a
    method that did not run with its status instead."""
    parts = [
        f"{name} {figures(m) if m['status'] == 'ok' else m['status']}"
        for name, m in rec["methods"].items()
    ]
    return f"{label or rec['label']} {rec['dtype']} {rec['head']}: " + ", ".join(parts)


def _loss_figures(method: dict) -> str:
    text = f"{headline_ms(method):.3g}ms"
    if "fwdbwd" in method.get("x_matmul", {}):
        text += f" ({method['x_matmul']['fwdbwd']:.2f}x mm)"
    if method.get("extra_mem_mib") is not None:
        text += f"/{method['extra_mem_mib']:.0f}MiB"
    return text


def loss_summary_line(rec: dict) -> str:
    """A loss benchmark's line for a case: time, x matmul and workspace per method."""
    label = rec["label"]
    if not label.endswith(rec["loss_label"]):
        label += f" {rec['loss_label']}"
    return case_summary(rec, _loss_figures, label)


# ----------------------------------------------------------------------------- command line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES.update(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)


def csv_list(text: str) -> list[str]:
    """The items of a comma list, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def head_name(trainable: bool) -> str:
    return "trainable" if trainable else "frozen"


@dataclass(frozen=True)
class BenchCLI:
    """What sets one benchmark's command line apart; the flags themselves are shared."""

    name: str  # the results' "benchmark", and the progress bar's label
    parse_shapes: Callable[[str], list]
    shapes_help: str  # what --shapes takes (the default, gpu on CUDA and cpu else, is shared)
    modes: tuple[str, ...]
    default_modes: str
    methods: dict[str, Callable]  # name -> method factory
    default_methods: Sequence[str]
    methods_help: str
    results_prefix: str  # of the default results file: bench/results/<prefix><device>-<date>
    out_help: str
    check: bool = False  # it checks against an fp32 reference, which --no-check skips


def bench_parser(
    doc: str,
    cli: BenchCLI,
    add_own_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """A benchmark's command line: --shapes, the script's own flags (`add_own_args`), then
    the shared ones (--help lists them in this order)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shapes",
        type=cli.parse_shapes,
        default=None,
        help=f"{cli.shapes_help} (default: gpu on CUDA, cpu else)",
    )
    if add_own_args is not None:
        add_own_args(p)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA")
    p.add_argument("--modes", default=cli.default_modes, help=f"comma list of {cli.modes}")
    p.add_argument("--methods", default=",".join(cli.default_methods), help=cli.methods_help)
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
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="also time fastrl as method fastrl:NAME with these environment variables set\n"
        "(a run-time design choice; repeatable; tools/gpu_plan.py lists the designs)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer timed calls (quick_time_ms): on CUDA a warm-up, then the median of\n"
        "max(3, 40 ms / its time) event-timed calls; on CPU one timed call",
    )
    if cli.check:
        p.add_argument("--no-check", action="store_true", help="skip the fp32 reference loss/grads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=cli.out_help)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    return p


@dataclass(frozen=True)
class RunArgs:
    """The shared flags, resolved: what to run, on what, and where the results go."""

    device: torch.device
    dtype: torch.dtype
    shapes: list
    modes: list[str]
    methods: list[str]
    heads: list[bool]  # trainable lm_head or not, in the order they run
    seed: int
    fastrl_impl: str | None
    verbose: bool
    out_path: Path
    plot: bool
    variants: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> env
    quick: bool = False

    def timer(self) -> Callable[[Callable[[], object]], float]:
        if not self.quick:
            return lambda fn: time_ms(fn, self.device)
        return lambda fn: quick_time_ms(fn, self.device)

    def case_options(self) -> dict:
        """The keyword arguments every benchmark's run_case takes from the shared flags."""
        return dict(
            dtype=self.dtype,
            device=self.device,
            methods=self.methods,
            modes=self.modes,
            seed=self.seed,
            fastrl_impl=self.fastrl_impl,
            timer=self.timer(),
            verbose=self.verbose,
        )


def resolve_run_args(
    p: argparse.ArgumentParser, args: argparse.Namespace, cli: BenchCLI
) -> RunArgs:
    """Resolve the shared flags (the defaults that depend on the device; sets torch's CPU
    threads). An unknown mode or method ends the program with a usage error."""
    device = resolve_device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    modes = csv_list(args.modes)
    methods = csv_list(args.methods)
    for m in modes:
        if m not in cli.modes:
            p.error(f"unknown mode {m!r}; choose from {cli.modes}")
    for m in methods:
        if m not in cli.methods:
            p.error(f"unknown method {m!r}; choose from {list(cli.methods)}")
    variants = _parse_variants(p, args.variant)
    names = [f"fastrl:{name}" for name in variants]
    for name, env in zip(names, variants.values(), strict=True):
        cli.methods[name] = env_variant(cli.methods["fastrl"], env)
    # the variants run right after the default fastrl, or first without it
    at = methods.index("fastrl") + 1 if "fastrl" in methods else 0
    methods[at:at] = [n for n in names if n not in methods]
    auto_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return RunArgs(
        device=device,
        dtype=auto_dtype if args.dtype == "auto" else DTYPES[args.dtype],
        shapes=args.shapes or cli.parse_shapes("gpu" if device.type == "cuda" else "cpu"),
        modes=modes,
        methods=methods,
        heads=[False, True] if args.head == "both" else [args.head == "trainable"],
        seed=args.seed,
        fastrl_impl=args.fastrl_impl,
        verbose=args.verbose,
        out_path=Path(args.out) if args.out else default_results_path(device, cli.results_prefix),
        plot=not args.no_plot,
        variants=variants,
        quick=args.quick,
    )


def _parse_variants(p: argparse.ArgumentParser, specs: Sequence[str]) -> dict[str, dict]:
    """--variant's `NAME:VAR=VALUE[,VAR=VALUE]` items as {NAME: {VAR: VALUE}}; a malformed
    one ends the program with a usage error."""
    variants: dict[str, dict] = {}
    for spec in specs:
        name, _, assignments = spec.partition(":")
        env = dict(a.split("=", 1) for a in csv_list(assignments) if "=" in a)
        if not re.fullmatch(r"[\w.+-]+", name) or not env or len(env) != len(csv_list(assignments)):
            p.error(f"--variant {spec!r}: use NAME:VAR=VALUE[,VAR=VALUE]")
        if name in variants:
            p.error(f"--variant {name!r} given twice")
        variants[name] = env
    return variants


def new_results(name: str, run: RunArgs, title: str | None = None, **config: Any) -> dict:
    """A results file before its first case: the benchmark, where it runs and its settings
    (the script's own `config` between the methods and the seed)."""
    results: dict = {"benchmark": name}
    if title is not None:
        results["title"] = title
    results["env"] = environment(run.device)
    results["config"] = {
        "dtype": dtype_name(run.dtype),
        "modes": run.modes,
        "methods": run.methods,
        **({"variants": run.variants} if run.variants else {}),
        **config,
        "seed": run.seed,
        **({"timer": "quick"} if run.quick else {}),
    }
    results["cases"] = []
    return results


def run_cases(
    results: dict,
    cases: Sequence[tuple],
    run_case: Callable[..., dict],
    describe: Callable[..., str],
    summary_line: Callable[[dict], str],
    run: RunArgs,
) -> None:
    """Run `run_case(*case)` for every case into `results`, with a progress bar that shows
    `describe(*case)` and a summary line per case; then list what was skipped and plot."""
    env = results["env"]
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} -> {run.out_path}")
    bar = progress(cases, desc=results["benchmark"], unit="case")
    for case in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(describe(*case))
        rec = run_case(*case)
        results["cases"].append(rec)
        write_json(results, run.out_path)  # after every case, so a crash keeps what was measured
        (bar.write if hasattr(bar, "write") else print)(summary_line(rec))
    finish_run(results, run.out_path, plot=run.plot)


# The loss benchmarks (bench_policy.py, bench_preference.py) run every (head, loss
# config, shape) case; a loss config has `label`, and is a dataclass.


def loss_case_record(
    shape: Any,
    loss: Any,
    n_active: int,
    dtype: torch.dtype,
    trainable: bool,
    modes: Sequence[str],
    matmul_count: Callable[[str, bool], int],
    mask_kind: str,
    **details: Any,
) -> dict:
    """A loss benchmark's case record before anything is measured: its FLOPs count the
    `n_active` (unmasked) tokens only, 2*n*V*d per matmul, `matmul_count(mode, trainable)`
    matmuls a mode; the script's own `details` follow the loss config."""
    flops_unit = 2.0 * n_active * shape.V * shape.d
    return case_record(
        {**asdict(shape), "N": shape.N},
        shape.label,
        dtype,
        trainable,
        modes,
        {m: matmul_count(m, trainable) * flops_unit for m in modes},
        loss=asdict(loss),
        loss_label=loss.label,
        **details,
        mask=mask_kind,
        active_tokens=n_active,
    )


def add_mask_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mask",
        choices=["full", "ragged"],
        default="full",
        help="full: every token counts; ragged: completions right-padded to lengths in [T/2, T]",
    )


def parse_betas(p: argparse.ArgumentParser, text: str) -> list[float]:
    """--beta's numbers; anything else ends the program with a usage error."""
    try:
        return [float(b) for b in csv_list(text)]
    except ValueError:
        p.error(f"--beta must be a comma list of numbers, got {text!r}")


def run_loss_benchmark(
    name: str,
    run: RunArgs,
    losses: Sequence[Any],
    run_case: Callable[..., dict],
    *,
    mask: str,
    check: bool,
    **config: Any,
) -> None:
    """Run a loss benchmark's cases and write its results (`config`: the script's own
    settings, after the losses and the mask)."""
    title = f"fastrl.{name}" + (f" ({losses[0].label})" if len(losses) == 1 else "")
    losses_config = [asdict(c) for c in losses]
    results = new_results(name, run, title, losses=losses_config, mask=mask, **config)

    def run_one(shape: Any, loss: Any, trainable: bool) -> dict:
        options = run.case_options()
        rec = run_case(shape, loss, trainable=trainable, mask_kind=mask, check=check, **options)
        if len(losses) > 1:  # tell the loss configs apart in the plot
            rec["label"] += f" {loss.label}"
        return rec

    def describe(shape: Any, loss: Any, trainable: bool) -> str:
        return f"{shape.label} {loss.label} {head_name(trainable)}"

    cases = [(s, c, tr) for tr in run.heads for c in losses for s in run.shapes]
    run_cases(results, cases, run_one, describe, loss_summary_line, run)
