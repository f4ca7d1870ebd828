"""`fastrl rm` end to end (a reward model, then GRPO with it as `--reward
reward_model:DIR`) and its one-line user errors."""

import json
import os
import subprocess
import sys

import pytest

from fastrl.cli import main
from tests.support.cli import save_tiny_checkpoint, write_jsonl


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


PAIRS = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 0.5}] * 8
COMMON = ["--max_steps", "2", "--report_to", "none", "--use_cpu", "true",
          "--activation_checkpointing", "false", "--save_strategy", "no"]  # fmt: skip


def test_cli_rm_then_grpo_with_it(checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "rm"
    main(["rm", "--model", str(checkpoint), "--dataset", str(data), "--eval_dataset", str(data),
          "--output_dir", str(out), "--per_device_train_batch_size", "4",
          "--logging_steps", "1",
          "--center_rewards_coefficient", "0.01", *COMMON])  # fmt: skip
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("accuracy" in h for h in logs)
    # an eval set without --eval_strategy: evaluated once after training
    assert "eval_accuracy" in logs[-1] and logs[-1]["step"] == 2

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1="}] * 4)
    grpo = tmp_path / "grpo"
    main(["grpo", "--model", str(checkpoint), "--dataset", str(prompts), "--output_dir",
          str(grpo), "--reward", f"reward_model:{out}", "--per_device_train_batch_size", "4",
          "--num_generations", "4", "--max_completion_length", "4", *COMMON[2:],
          "--max_steps", "1"])  # fmt: skip
    logs = json.loads((grpo / "trainer_state.json").read_text())["log_history"]
    assert "rewards/rm/mean" in logs[0]


@pytest.mark.parametrize(
    "extra, rows, message",
    [
        ([], [{"prompt": "a", "chosen": "b"}], "--dataset"),
        (["--eval_dataset", "nope.jsonl"], PAIRS, "--eval_dataset nope.jsonl"),
        (["--center_rewards_coefficient", "-1"], PAIRS, "--center_rewards_coefficient"),
        (["--center_reward_coefficient", "1"], PAIRS, "did you mean --center_rewards_coefficient"),
    ],
)
def test_cli_rm_user_errors(checkpoint, tmp_path, capsys, extra, rows, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        main(["rm", "--model", str(checkpoint), "--dataset", str(data),
              "--output_dir", str(tmp_path / "o"), *COMMON, *extra])  # fmt: skip
    assert e.value.code == 2
    assert message in capsys.readouterr().err


_IMPORTS_PROBE = """
import sys
from fastrl import cli
try:
    cli.main(sys.argv[1:])
except SystemExit as e:
    print(e.code, "torch" in sys.modules, "transformers" in sys.modules)
"""


@pytest.mark.parametrize("rows, flag", [(PAIRS, "--center_reward_coefficient"),
                                        ([{"chosen": "a"}], "--seed")])  # fmt: skip
def test_cli_rm_errors_before_importing_torch(checkpoint, tmp_path, rows, flag):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "empty-cache")}
    run = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, "rm", "--model", str(checkpoint),
         "--dataset", str(data), flag, "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.stdout.split() == ["2", "False", "False"], (run.stdout, run.stderr)
