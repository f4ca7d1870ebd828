"""Smoke test of bench/bench_preference.py: one tiny CPU case, fastrl + eager only."""

import pytest
import torch

from bench.bench_preference import (
    LossConfig,
    PairShape,
    main,
    parse_shapes,
    run_case,
)
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
SHAPE = PairShape("smoke", 2, 9, 32, 500)
LOSS_TOL = 1e-4


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
        modes=LOSS_MODES,
        mask_kind=mask,
        timer=fast_timer,
    )
    # frozen: forward, recompute, dH; trainable: + dW
    n = check_loss_case(
        rec,
        SHAPE,
        {"uses_reference"},
        trainable=trainable,
        mask=mask,
        fwdbwd_matmuls=4 if trainable else 3,
        methods=METHODS,
        loss_tol=LOSS_TOL,
    )
    assert rec["shape"] == {"name": "smoke", "B": 2, "T": 9, "d": 32, "V": 500, "N": 36}
    assert rec["loss"] == {"loss_type": loss.loss_type, "beta": loss.beta}
    assert rec["uses_reference"] == (loss.loss_type == "sigmoid")
    assert rec["flops"]["fwd"] == 2 * n * 32 * 500


def test_cli_writes_json_and_plot(tmp_path):
    out = tmp_path / "preference-smoke.json"
    data = run_cli(main, out, METHODS, "--loss-type", "sigmoid", "--beta", "0.2")
    assert data["benchmark"] == "fused_preference_loss"
    assert data["config"]["losses"] == [{"loss_type": "sigmoid", "beta": 0.2}]
    [case] = data["cases"]
    for name in METHODS:
        check_loss_ok(case, name, LOSS_TOL)


def test_failing_methods_are_recorded_not_raised(monkeypatch):
    import bench.bench_preference as bp

    add_failing_methods(monkeypatch, bp.METHODS)
    rec = run_case(
        PairShape("smoke", 1, 4, 16, 100),
        LossConfig("hinge"),
        methods=FAILING_METHODS,
        modes=("fwd",),
        matmul=False,
        check=False,
        timer=fast_timer,
    )
    check_failures_recorded(rec)


def test_liger_unsupported_loss_type_is_skipped():
    rec = run_case(
        PairShape("smoke", 1, 4, 16, 100),
        LossConfig("ipo"),
        methods=("liger",),
        modes=("fwd",),
        matmul=False,
        check=False,
        timer=fast_timer,
    )
    liger = rec["methods"]["liger"]
    assert liger["status"] == "skipped"
    assert "ipo" in liger["reason"]


def test_parse_shapes():
    gpu = check_parse_shapes(parse_shapes, tokens=32768, gpu_count=6, gpu_lengths={2048, 4096})
    assert {(s.d, s.V) for s in gpu} == {(4096, 128256), (3584, 152064), (1536, 151936)}
