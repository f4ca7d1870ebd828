"""`fastrl ppo`: one run end to end on the shipped task, and a user's mistakes (one line,
exit 2, the flag named)."""

import json
from pathlib import Path

import pytest

from fastrl.cli import main
from fastrl.demo import task
from tests.cli.test_cli_errors import assert_user_error, fastrl
from tests.support.cli import save_tiny_checkpoint, write_jsonl

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_cli_ppo(checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", task.arithmetic_dataset(8, 0))
    out = tmp_path / "ppo"
    main(["ppo", "--model", str(checkpoint), "--dataset", str(data), "--output_dir", str(out),
          "--reward", "digit_match", "--reward", "format", "--per_device_train_batch_size", "4",
          "--num_ppo_epochs", "2", "--max_completion_length", "6", "--kl_coef", "0.1",
          "--cliprange_value", "0.5", "--max_steps", "2", "--report_to", "none",
          "--use_cpu", "true", "--activation_checkpointing", "false",
          "--save_strategy", "no"])  # fmt: skip
    assert (out / "adapter_model.safetensors").exists() and (
        out / "value_head.safetensors"
    ).exists()
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    keys = {k for entry in logs for k in entry}
    for name in ("objective/kl", "loss/value_avg", "rewards/digit_match_answer/mean"):
        assert name in keys, name


def test_cli_ppo_user_errors(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "tokenizer.json").write_text("{}")
    # this checkout's fastrl in the subprocess, whichever one is installed
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    common = ("ppo", "--model", ckpt, "--dataset", data, "--output_dir", tmp_path / "out")
    code, err, _, _ = fastrl(*common, "--num_ppo_epoch", "2", cwd=tmp_path, env=env)
    assert_user_error(code, err, "--num_ppo_epoch", "did you mean --num_ppo_epochs?")
    code, err, _, _ = fastrl(*common, "--lam", "1.5", "--use_cpu", "true", cwd=tmp_path, env=env)
    assert_user_error(code, err, "--lam must be in [0, 1], got 1.5")
