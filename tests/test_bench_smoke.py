"""Smoke test of the benchmark harness (bench/): one tiny CPU case, eager + fastrl only."""

import json
import sys
from pathlib import Path

import pytest
import torch

# bench/ is not installed: import it from the repo root, then take the root off sys.path
# again (its kernels/ directory must not shadow Hugging Face's `kernels` package).
_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, _ROOT)
try:
    from bench.bench_logprobs import Shape, main, run_case
    from bench.common import time_ms
finally:
    sys.path.remove(_ROOT)

METHODS = ("eager", "fastrl")
MODES = ("fwd", "bwd", "fwdbwd")


def _check_ok(rec, name, modes=MODES):
    m = rec["methods"][name]
    assert m["status"] == "ok", f"{name}: {m.get('reason')}"
    assert set(m) >= {"ms", "peak_mem_mib", "tflops", "x_matmul", "max_abs_err", "note"}
    for mode in modes:
        assert m["ms"][mode] > 0
        assert m["tflops"][mode] > 0
        assert m["x_matmul"][mode] > 0
    assert m["peak_mem_mib"]["fwdbwd"] is None  # not measured off CUDA
    assert m["max_abs_err"] < 1e-4


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_run_case_cpu(trainable):
    device = torch.device("cpu")
    rec = run_case(
        Shape("smoke", 37, 32, 500),
        dtype=torch.float32,
        device=device,
        trainable=trainable,
        methods=METHODS,
        modes=MODES,
        timer=lambda fn: time_ms(fn, device, cpu_min_reps=2, cpu_budget_s=0.01),
    )
    json.dumps(rec)  # JSON-serialisable as is
    assert set(rec) >= {"shape", "label", "dtype", "head", "modes", "flops", "matmul", "methods"}
    assert rec["shape"] == {"name": "smoke", "N": 37, "d": 32, "V": 500}
    assert rec["head"] == ("trainable" if trainable else "frozen")
    assert list(rec["methods"]) == list(METHODS)
    n_mm = 4 if trainable else 3
    assert rec["flops"]["fwdbwd"] == n_mm * 2 * 37 * 32 * 500
    assert rec["matmul"]["status"] == "ok"
    assert rec["matmul"]["ms"]["fwdbwd"] > 0
    assert ("mm_dweight" in rec["matmul"]["ms"]) == trainable
    for name in METHODS:
        _check_ok(rec, name)


def test_cli_writes_json_and_plot(tmp_path):
    out = tmp_path / "smoke.json"
    rc = main(
        ["--shapes", "smoke", "--methods", ",".join(METHODS), "--threads", "0", "--out", str(out)]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["env"]) >= {"device", "torch", "triton", "commit", "date"}
    assert data["env"]["device_slug"].endswith("-cpu")
    [case] = data["cases"]
    for name in METHODS:
        _check_ok(case, name)
    assert out.with_suffix(".png").stat().st_size > 0


def test_failing_methods_are_recorded_not_raised(monkeypatch):
    import bench.bench_logprobs as bl

    def oom(h, w, t):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setitem(bl.METHODS, "oom", lambda ctx: (oom, "raises OOM"))
    monkeypatch.setitem(bl.METHODS, "missing", lambda ctx: __import__("not_a_module_xyz"))
    rec = run_case(
        Shape("smoke", 8, 16, 100),
        methods=("oom", "missing"),
        modes=("fwd",),
        matmul=False,
    )
    assert rec["methods"]["oom"]["status"] == "OOM"
    assert rec["methods"]["missing"]["status"] == "skipped"
    assert "not_a_module_xyz" in rec["methods"]["missing"]["reason"]
