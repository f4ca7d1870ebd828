"""Smoke test of bench/bench_preference.py: one tiny CPU case, fastrl + eager only."""

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
    from bench.bench_preference import LossConfig, PairShape, main, parse_shapes, run_case
    from bench.common import time_ms
finally:
    sys.path.remove(_ROOT)

METHODS = ("fastrl", "eager")
MODES = ("fwd", "fwdbwd")
SHAPE = PairShape("smoke", 2, 9, 32, 500)


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
    assert m["loss_abs_err"] < 1e-4
    assert m["grad_rel_err"] < 1e-4


def _fast_timer(fn):
    return time_ms(fn, torch.device("cpu"), cpu_min_reps=2, cpu_budget_s=0.01)


@pytest.mark.parametrize(
    "loss, trainable, mask",
    [(LossConfig("sigmoid"), False, "full"), (LossConfig("orpo", 0.2), True, "ragged")],
    ids=["sigmoid-frozen-full", "orpo-trainable-ragged"],
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
        "uses_reference",
        "mask",
        "active_tokens",
        "modes",
        "flops",
        "matmul",
        "methods",
        "reference_loss",
    }
    assert rec["shape"] == {"name": "smoke", "B": 2, "T": 9, "d": 32, "V": 500, "N": 36}
    assert rec["head"] == ("trainable" if trainable else "frozen")
    assert rec["loss"] == {"loss_type": loss.loss_type, "beta": loss.beta}
    assert rec["uses_reference"] == (loss.loss_type == "sigmoid")
    n = rec["active_tokens"]
    assert n == 36 if mask == "full" else 18 <= n <= 36
    # frozen: forward, recompute, dH; trainable: + dW
    assert rec["flops"]["fwdbwd"] == (4 if trainable else 3) * 2 * n * 32 * 500
    assert rec["flops"]["fwd"] == 2 * n * 32 * 500
    assert rec["matmul"]["status"] == "ok"
    assert rec["matmul"]["N"] == n
    assert rec["matmul"]["ms"]["fwdbwd"] > rec["matmul"]["ms"]["fwd"] > 0
    assert ("mm_dweight" in rec["matmul"]["ms"]) == trainable
    assert list(rec["methods"]) == list(METHODS)
    for name in METHODS:
        _check_ok(rec, name)


def test_cli_writes_json_and_plot(tmp_path):
    out = tmp_path / "preference-smoke.json"
    argv = ["--shapes", "smoke", "--methods", ",".join(METHODS), "--loss-type", "sigmoid"]
    rc = main([*argv, "--beta", "0.2", "--threads", "0", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "fused_preference_loss"
    assert set(data["env"]) >= {"device", "torch", "triton", "commit", "date"}
    assert data["env"]["device_slug"].endswith("-cpu")
    assert data["config"]["losses"] == [{"loss_type": "sigmoid", "beta": 0.2}]
    [case] = data["cases"]
    for name in METHODS:
        _check_ok(case, name)
    assert out.with_suffix(".png").stat().st_size > 0


def test_failing_methods_are_recorded_not_raised(monkeypatch):
    import bench.bench_preference as bp

    def oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setitem(bp.METHODS, "oom", lambda ctx: (oom, "raises OOM"))
    monkeypatch.setitem(bp.METHODS, "missing", lambda ctx: __import__("not_a_module_xyz"))
    rec = run_case(
        PairShape("smoke", 1, 4, 16, 100),
        LossConfig("hinge"),
        methods=("oom", "missing"),
        modes=("fwd",),
        matmul=False,
        check=False,
        timer=_fast_timer,
    )
    assert rec["methods"]["oom"]["status"] == "OOM"
    assert rec["methods"]["missing"]["status"] == "skipped"
    assert "not_a_module_xyz" in rec["methods"]["missing"]["reason"]


def test_liger_unsupported_loss_type_is_skipped():
    rec = run_case(
        PairShape("smoke", 1, 4, 16, 100),
        LossConfig("ipo"),
        methods=("liger",),
        modes=("fwd",),
        matmul=False,
        check=False,
        timer=_fast_timer,
    )
    liger = rec["methods"]["liger"]
    assert liger["status"] == "skipped"
    assert "ipo" in liger["reason"]


def test_parse_shapes():
    [s] = parse_shapes("8x2048x4096x128256")
    assert (s.B, s.T, s.d, s.V, s.N) == (8, 2048, 4096, 128256, 32768)
    gpu = parse_shapes("gpu")
    assert len(gpu) == 6 and {s.T for s in gpu} == {2048, 4096}
    assert all(s.B == 8 for s in gpu)
    assert {(s.d, s.V) for s in gpu} == {(4096, 128256), (3584, 152064), (1536, 151936)}
    with pytest.raises(Exception, match="unknown shape"):
        parse_shapes("nope")
