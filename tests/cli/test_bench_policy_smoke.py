"""Smoke test of bench/bench_policy.py: one tiny CPU case, fastrl + eager only."""

import pytest
import torch

from bench.bench_policy import LossConfig, PolicyShape, main, parse_shapes, run_case
from tests.support.bench import (
    FAILING_METHODS,
    LOSS_MODES,
    add_failing_methods,
    check_failures_recorded,
    check_loss_case,
    check_loss_ok,
    check_parse_shapes,
    fast_timer,
    run_cli,
)

METHODS = ("fastrl", "eager")
SHAPE = PolicyShape("smoke", 4, 9, 32, 500)
LOSS_TOL = 1e-5


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
        modes=LOSS_MODES,
        mask_kind=mask,
        timer=fast_timer,
    )
    # forward+backward: H @ W.T and dH (+ dW trainable); no recompute
    check_loss_case(
        rec,
        SHAPE,
        {"loss_only"},
        trainable=trainable,
        mask=mask,
        fwdbwd_matmuls=3 if trainable else 2,
        methods=METHODS,
        loss_tol=LOSS_TOL,
    )
    assert rec["shape"] == {"name": "smoke", "B": 4, "T": 9, "d": 32, "V": 500, "N": 36}
    assert rec["loss"]["loss_type"] == loss.loss_type
    assert rec["loss_only"]["policy_loss_ms"] > 0
    assert 0 < rec["loss_only"]["fraction_of_fastrl"]["policy_loss"]


def test_cli_writes_json_and_plot(tmp_path):
    out = tmp_path / "policy-smoke.json"
    data = run_cli(main, out, METHODS, "--loss-type", "dapo", "--beta", "0.04")
    assert data["benchmark"] == "fused_policy_loss"
    assert data["config"]["losses"][0]["beta"] == 0.04
    [case] = data["cases"]
    for name in METHODS:
        check_loss_ok(case, name, LOSS_TOL)


def test_failing_methods_are_recorded_not_raised(monkeypatch):
    import bench.bench_policy as bp

    add_failing_methods(monkeypatch, bp.METHODS)
    rec = run_case(
        PolicyShape("smoke", 2, 4, 16, 100),
        methods=FAILING_METHODS,
        modes=("fwd",),
        matmul=False,
        check=False,
        timer=fast_timer,
    )
    check_failures_recorded(rec)


def test_parse_shapes():
    check_parse_shapes(
        parse_shapes, tokens=16384, gpu_count=12, gpu_lengths={1024, 2048, 4096, 8192}
    )
