"""Shared benchmark plumbing: timers, peak memory, environment metadata, JSON output.

On CUDA, times are the median of `triton.testing.do_bench` (which flushes L2 between
calls) and memory is the peak of `torch.cuda.max_memory_allocated` above what was
allocated before the call. On a CPU, times are the median of a few `time.perf_counter`
repeats and memory is not measured (reported as None).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

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
    status `ok`; if it raises, the method is `OOM` (out of memory) or `skipped`. Methods
    with times get `tflops[mode]` (`flops[mode]` / time) and `x_matmul[mode]` (time /
    `matmul_ms[mode]`). Memory is freed after each method. Returns {name: record}, in the
    order of `names`.
    """
    records: dict[str, dict] = {}
    for name in names:
        try:
            fn, note = factories[name](ctx)
        except Exception as e:  # not installed, unsupported here, ...
            records[name] = {"status": "skipped", "reason": error_reason(e)}
            continue
        try:
            rec = measure(fn)
            rec = {"status": "ok", "note": note, **rec}
        except Exception as e:
            status = "OOM" if is_oom(e) else "skipped"
            rec = {"status": status, "note": note, "reason": error_reason(e)}
            if verbose and status != "OOM":
                traceback.print_exc()
        finally:
            fn = None
            free_memory(device)
        if rec.get("ms"):
            rec["tflops"] = {
                m: flops[m] / (ms * 1e-3) / 1e12 for m, ms in rec["ms"].items() if ms > 0
            }
            rec["x_matmul"] = {
                m: ms / matmul_ms[m] for m, ms in rec["ms"].items() if matmul_ms.get(m, 0) > 0
            }
        records[name] = rec
    return records


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
    commit = _git("rev-parse", "HEAD")
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
    """List the skipped methods with their reasons, and draw the plot next to the JSON."""
    skipped = {
        f"{name}: {m.get('reason', '')}"
        for c in results["cases"]
        for name, m in c["methods"].items()
        if m["status"] == "skipped"
    }
    for line in sorted(skipped):
        print(f"skipped {line}")
    print(f"wrote {out_path}")
    if plot:
        try:
            from bench.plot import plot as draw

            print(f"wrote {draw(out_path)}")
        except Exception as e:
            print(f"plot failed: {error_reason(e)}", file=sys.stderr)
