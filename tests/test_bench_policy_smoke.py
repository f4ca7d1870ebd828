"""Smoke test of bench/bench_policy.py: one tiny CPU case, fastrl + eager only."""

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
    from bench.bench_policy import LossConfig, PolicyShape, main, parse_shapes, run_case
    from bench.common import time_ms
finally:
    sys.path.remove(_ROOT)

METHODS = ("fastrl", "eager")
MODES = ("fwd", "fwdbwd")
SHAPE = PolicyShape("smoke", 4, 9, 32, 500)


def _check_ok(rec, name):
    m = rec["methods"][name]
    assert m["status"] == "ok", f"{name}: {m.get('reason')}"
    keys = {"ms", "peak_mem_mib", "extra_mem_mib", "tflops", "x_matmul", "note"}
    assert set(m) >= keys | {"loss", "loss_abs_err", "grad_rel_err"}
    for mode in MODES:
        assert m["ms"][mode] > 0
        assert m["tflops"][mode] > 0
        assert m["x_matmul"][mode] > 0
    assert m["peak_mem_mib"]["fwdbwd"] is None  # not measured off CUDA
    assert m["extra_mem_mib"] is None
    assert m["loss_abs_err"] < 1e-5
    assert m["grad_rel_err"] < 1e-4


def _fast_timer(fn):
    return time_ms(fn, torch.device("cpu"), cpu_min_reps=2, cpu_budget_s=0.01)


@pytest.mark.parametrize(
    "loss, trainable, mask",
    [
        (LossConfig("dapo"), False, "full"),
        (LossConfig("grpo", beta=0.04, importance_sampling_level="sequence"), True, "ragged"),
    ],
    ids=["dapo-frozen-full", "grpo-seq-beta-trainable-ragged"],
)
def test_run_case_cpu(loss, trainable, mask):
    rec = run_case(
        SHAPE,
        loss,
        dtype=torch.float32,
        device="cpu",
        trainable=trainable,
        methods=METHODS,
        modes=MODES,
        mask_kind=mask,
        timer=_fast_timer,
    )
    json.dumps(rec)  # JSON-serialisable as is
    assert set(rec) >= {
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
        "loss_only",
    }
    assert rec["shape"] == {"name": "smoke", "B": 4, "T": 9, "d": 32, "V": 500, "N": 36}
    assert rec["head"] == ("trainable" if trainable else "frozen")
    assert rec["loss"]["loss_type"] == loss.loss_type
    n = rec["active_tokens"]
    assert n == 36 if mask == "full" else 18 <= n <= 36
    assert rec["flops"]["fwdbwd"] == (3 if trainable else 2) * 2 * n * 32 * 500
    assert rec["matmul"]["status"] == "ok"
    assert rec["matmul"]["N"] == n
    assert rec["matmul"]["ms"]["fwdbwd"] > rec["matmul"]["ms"]["fwd"] > 0
    assert ("mm_dweight" in rec["matmul"]["ms"]) == trainable
    assert list(rec["methods"]) == list(METHODS)
    for name in METHODS:
        _check_ok(rec, name)
    assert rec["loss_only"]["policy_loss_ms"] > 0
    assert 0 < rec["loss_only"]["fraction_of_fastrl"]["policy_loss"]


def test_cli_writes_json_and_plot(tmp_path):
    out = tmp_path / "policy-smoke.json"
    argv = ["--shapes", "smoke", "--methods", ",".join(METHODS), "--loss-type", "dapo"]
    rc = main([*argv, "--beta", "0.04", "--threads", "0", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "fused_policy_loss"
    assert set(data["env"]) >= {"device", "torch", "triton", "commit", "date"}
    assert data["env"]["device_slug"].endswith("-cpu")
    assert data["config"]["losses"][0]["beta"] == 0.04
    [case] = data["cases"]
    for name in METHODS:
        _check_ok(case, name)
    assert out.with_suffix(".png").stat().st_size > 0


def test_failing_methods_are_recorded_not_raised(monkeypatch):
    import bench.bench_policy as bp

    def oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setitem(bp.METHODS, "oom", lambda ctx: (oom, "raises OOM"))
    monkeypatch.setitem(bp.METHODS, "missing", lambda ctx: __import__("not_a_module_xyz"))
    rec = run_case(
        PolicyShape("smoke", 2, 4, 16, 100),
        methods=("oom", "missing"),
        modes=("fwd",),
        matmul=False,
        check=False,
        timer=_fast_timer,
    )
    assert rec["methods"]["oom"]["status"] == "OOM"
    assert rec["methods"]["missing"]["status"] == "skipped"
    assert "not_a_module_xyz" in rec["methods"]["missing"]["reason"]


def test_parse_shapes():
    [s] = parse_shapes("8x2048x4096x128256")
    assert (s.B, s.T, s.d, s.V, s.N) == (8, 2048, 4096, 128256, 16384)
    gpu = parse_shapes("gpu")
    assert len(gpu) == 12 and {s.T for s in gpu} == {1024, 2048, 4096, 8192}
    assert all(s.B == 8 for s in gpu)
    with pytest.raises(Exception, match="unknown shape"):
        parse_shapes("nope")
