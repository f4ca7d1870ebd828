"""bench/bench_grpo_step.py on CPU with a tiny model: the harness runs the trainers in
their own processes and writes comparable rows (GPU figures come from GPU runs only)."""

import json

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

from bench.bench_grpo_step import checkpoint, main, synthetic_tokenizer  # noqa: E402


def test_synthetic_tokenizer_round_trips_any_id():
    tok = synthetic_tokenizer(50)
    ids = tok("w3 w17 w49")["input_ids"]
    assert ids == [3, 17, 49]
    assert tok.decode([5, 2, 40], skip_special_tokens=True) == "w5 w40"


def test_checkpoint_is_built_once(tmp_path):
    path = checkpoint("tiny", tmp_path)
    assert (path / "config.json").exists() and (path / "tokenizer" / "tokenizer.json").exists()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert checkpoint("tiny", tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_every_trainer_runs_a_step_and_is_compared(tmp_path):
    out = tmp_path / "grpo_step.json"
    main(["--models", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
          "--num-generations", "2", "--prompt-length", "6", "--completion-length", "5",
          "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])  # fmt: skip
    results = json.loads(out.read_text())
    rows = {r["trainer"]: r for r in results["results"]}
    assert set(rows) == {"fastrl", "trl", "trl-patched"}
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("stderr_tail"))
        assert len(row["steps"]) == 2 and row["tokens_per_second"] > 0
        assert 0 < row["generate_seconds_per_step"] < row["seconds_per_step"]
    assert rows["fastrl"]["speed_vs_trl"] > 0 and rows["trl-patched"]["speed_vs_trl"] > 0
    # the loss pass of each of the 2 steps (beta 0: no reference pass; one iteration: TRL
    # takes the old log-probs from the same pass), every one on fastrl's head
    assert rows["trl-patched"]["head_calls"]["fastrl"] == 2
    assert rows["trl-patched"]["head_calls"]["trl"] == 0 and rows["trl"]["head_calls"] is None
    assert out.with_suffix(".png").exists()
