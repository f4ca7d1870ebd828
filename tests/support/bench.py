"""What the smoke tests of bench/'s microbenchmarks share: a quick CPU timer, the checks of
a method's record, of a loss benchmark's case and of a command-line run, and methods that
fail. tests/conftest.py registers tests.support for pytest's assertion rewriting, so that
a failing check here reports its values as one in a test file does."""

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.common import time_ms

LOSS_MODES = ("fwd", "fwdbwd")  # what the loss benchmarks measure
FAILING_METHODS = ("oom", "missing")


def fast_timer(fn: Callable[[], object]) -> float:
    """A CPU timer quick enough for tests (two repeats, 10 ms budget)."""
    return time_ms(fn, torch.device("cpu"), cpu_min_reps=2, cpu_budget_s=0.01)


def check_ok(rec: dict, name: str, modes: Sequence[str], keys: set[str]) -> dict:
    """Check that method `name` of a case ran: it has the figures every benchmark records
    and its own `keys`, positive times, TFLOP/s and matmul ratios for every mode, and no
    memory figure (not measured off CUDA). Returns its record."""
    m = rec["methods"][name]
    assert m["status"] == "ok", f"{name}: {m.get('reason')}"
    assert set(m) >= {"ms", "peak_mem_mib", "tflops", "x_matmul", "note"} | keys
    for mode in modes:
        assert m["ms"][mode] > 0
        assert m["tflops"][mode] > 0
        assert m["x_matmul"][mode] > 0
    assert m["peak_mem_mib"]["fwdbwd"] is None  # not measured off CUDA
    return m


def check_loss_ok(rec: dict, name: str, loss_tol: float) -> None:
    """check_ok for a loss benchmark's method, and its loss within `loss_tol` and its
    gradients within 1e-4 (relative) of the fp32 reference."""
    m = check_ok(rec, name, LOSS_MODES, {"extra_mem_mib", "loss", "loss_abs_err", "grad_rel_err"})
    assert m["extra_mem_mib"] is None
    assert m["loss_abs_err"] < loss_tol
    assert m["grad_rel_err"] < 1e-4


def check_loss_case(
    rec: dict,
    shape: Any,
    keys: set[str],
    *,
    trainable: bool,
    mask: str,
    fwdbwd_matmuls: int,
    methods: Sequence[str],
    loss_tol: float,
) -> int:
    """Check a loss benchmark's case record on `shape`: JSON-serialisable, with the fields
    both loss benchmarks record and its own `keys`; the head; the active tokens (all of
    them, or from half to all with a ragged mask); the forward+backward FLOPs
    (`fwdbwd_matmuls` matmuls of 2*n*d*V); the matmul floor on those tokens; `methods`,
    each ok (check_loss_ok). Returns the number of active tokens."""
    json.dumps(rec)  # JSON-serialisable as is
    assert (
        set(rec)
        >= {
            "shape",
            "label",
            "dtype",
            "head",
            "loss",
            "mask",
            "active_tokens",
            "modes",
            "flops",
            "matmul",
            "methods",
            "reference_loss",
        }
        | keys
    )
    assert rec["head"] == ("trainable" if trainable else "frozen")
    n = rec["active_tokens"]
    assert n == shape.N if mask == "full" else shape.N // 2 <= n <= shape.N
    assert rec["flops"]["fwdbwd"] == fwdbwd_matmuls * 2 * n * shape.d * shape.V
    assert rec["matmul"]["status"] == "ok"
    assert rec["matmul"]["N"] == n
    assert rec["matmul"]["ms"]["fwdbwd"] > rec["matmul"]["ms"]["fwd"] > 0
    assert ("mm_dweight" in rec["matmul"]["ms"]) == trainable
    assert list(rec["methods"]) == list(methods)
    for name in methods:
        check_loss_ok(rec, name, loss_tol)
    return n


def run_cli(
    main: Callable[[list[str]], int], out: Path, methods: Sequence[str], *argv: str
) -> dict:
    """Run a benchmark's main() on the smoke shapes with `methods` and `argv`, writing to
    `out`; check what every run writes (the environment, the plot) and return the results."""
    # --threads 0 leaves torch's thread count as it is for the tests that run after this one
    rc = main(
        ["--shapes", "smoke", "--methods", ",".join(methods), *argv]
        + ["--threads", "0", "--out", str(out)]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["env"]) >= {"device", "torch", "triton", "commit", "date"}
    assert data["env"]["device_slug"].endswith("-cpu")
    assert out.with_suffix(".png").stat().st_size > 0
    return data


def add_failing_methods(monkeypatch: pytest.MonkeyPatch, factories: dict) -> None:
    """Add FAILING_METHODS to a benchmark's METHODS: `oom` runs out of memory, `missing`
    is not installed."""

    def oom(*inputs: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setitem(factories, "oom", lambda ctx: (oom, "raises OOM"))
    monkeypatch.setitem(factories, "missing", lambda ctx: __import__("not_a_module_xyz"))


def check_failures_recorded(rec: dict) -> None:
    """The FAILING_METHODS are recorded with their status and reason, not raised."""
    assert rec["methods"]["oom"]["status"] == "OOM"
    assert rec["methods"]["missing"]["status"] == "skipped"
    assert "not_a_module_xyz" in rec["methods"]["missing"]["reason"]


def check_parse_shapes(
    parse_shapes: Callable[[str], list], tokens: int, gpu_count: int, gpu_lengths: set[int]
) -> list:
    """Check a loss benchmark's --shapes: a `BxTxdxV` shape of 8x2048 makes `tokens`
    tokens; `gpu` has `gpu_count` shapes, all with B = 8 and T in `gpu_lengths`; an unknown
    name is an error. Returns the `gpu` set."""
    [s] = parse_shapes("8x2048x4096x128256")
    assert (s.B, s.T, s.d, s.V, s.N) == (8, 2048, 4096, 128256, tokens)
    gpu = parse_shapes("gpu")
    assert len(gpu) == gpu_count and {s.T for s in gpu} == gpu_lengths
    assert all(s.B == 8 for s in gpu)
    with pytest.raises(Exception, match="unknown shape"):
        parse_shapes("nope")
    return gpu
