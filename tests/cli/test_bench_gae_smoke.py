"""Smoke test of bench/bench_gae.py on the CPU (the Triton tiles through the interpreter)."""

import json
from pathlib import Path

import pytest
import torch

from bench import bench_gae

ROOT = Path(__file__).resolve().parents[2]


def test_bench_gae_cpu(tmp_path, capsys):
    out = tmp_path / "gae.json"
    assert bench_gae.main(["--device", "cpu", "--shapes", "3x21", "--blocks", "2x8,1x4c8",
                           "--dtype", "fp32", "--out", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    (case,) = data["rows"]
    assert (case["B"], case["T"], case["dtype"]) == (3, 21, "float32")
    assert case["bytes"] == 3 * 21 * (2 * 4 + 1 + 8)
    assert list(case["methods"]) == ["copy", "triton 2x8", "triton 1x4c8", "torch"]
    assert all(m["status"] == "ok" and m["ms"] > 0 for m in case["methods"].values())
    assert case["methods"]["triton 2x8"]["of_copy"] == pytest.approx(
        case["methods"]["copy"]["ms"] / case["methods"]["triton 2x8"]["ms"]
    )
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "3x21 float32: copy " in capsys.readouterr().out


def test_bench_gae_reports_a_tile_that_computes_something_else(tmp_path, monkeypatch):
    from fastrl.kernels import gae

    def wrong(r, v, m, gamma, lam, **tiles):
        return torch.zeros(r.shape), torch.zeros(r.shape)

    monkeypatch.setattr(gae, "gae_fwd", wrong)
    case = bench_gae.bench_shape(3, 10, torch.float32, [(1, 8, 0)], ["triton"], torch.device("cpu"))
    row = case["methods"]["triton 1x8"]
    assert row["status"] == "failed" and "ms" not in row, row


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--blocks", "3x8"], "powers of 2"),
        (["--blocks", "1x8c12"], "chunks their multiples"),
        (["--shapes", "4by8"], "--shapes: expected AxB"),
        (["--methods", "copy,cuda"], "unknown ['cuda']"),
    ],
    ids=["tile-not-pow2", "chunk-not-a-multiple", "bad-shape", "unknown-method"],
)
def test_bench_gae_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_gae.main(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


def test_torch_loop_is_skipped_past_its_token_limit_and_the_report_says_why(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import gpu_report

    monkeypatch.setattr(bench_gae, "TORCH_MAX_T", 8)
    case = bench_gae.bench_shape(2, 9, torch.float32, [], ["copy", "torch"], torch.device("cpu"))
    assert list(case["methods"]) == ["copy", "torch"]
    assert case["methods"]["torch"] == {"status": "skipped", "reason": "T > 8: seconds a call"}
    (line,) = gpu_report.gae_lines({"rows": [case], "config": {"target_of_copy": 0.7}})
    assert line.startswith("  2x9 float32: copy ") and "torch skipped (T > 8" in line
