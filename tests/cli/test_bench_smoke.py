"""Smoke test of the benchmark harness (bench/): one tiny CPU case, eager + fastrl only."""

import json

import pytest
import torch

from bench.bench_logprobs import Shape, main, run_case
from tests.support.bench import (
    FAILING_METHODS,
    add_failing_methods,
    check_failures_recorded,
    check_ok,
    fast_timer,
    run_cli,
)

METHODS = ("eager", "fastrl")
MODES = ("fwd", "bwd", "fwdbwd")


def _check_ok(rec, name):
    m = check_ok(rec, name, MODES, {"max_abs_err"})
    assert m["max_abs_err"] < 1e-4


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_run_case_cpu(trainable):
    rec = run_case(
        Shape("smoke", 37, 32, 500),
        dtype=torch.float32,
        device=torch.device("cpu"),
        trainable=trainable,
        methods=METHODS,
        modes=MODES,
        timer=fast_timer,
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
    data = run_cli(main, tmp_path / "smoke.json", METHODS)
    [case] = data["cases"]
    for name in METHODS:
        _check_ok(case, name)


def test_failing_methods_are_recorded_not_raised(monkeypatch):
    import bench.bench_logprobs as bl

    add_failing_methods(monkeypatch, bl.METHODS)
    rec = run_case(
        Shape("smoke", 8, 16, 100),
        methods=FAILING_METHODS,
        modes=("fwd",),
        matmul=False,
    )
    check_failures_recorded(rec)
