"""The `fastrl` command end to end on the shipped task, a step or two of each trainer."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastrl.cli import GRPOScriptArguments, UsageError, _reward_functions, main
from fastrl.demo import task
from tests.support.cli import save_tiny_checkpoint, write_jsonl


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


COMMON = ["--max_steps", "1", "--report_to", "none", "--use_cpu", "true",
          "--activation_checkpointing", "false", "--save_strategy", "no"]  # fmt: skip


# LoRA's default: every linear layer of the (Llama) blocks, not the lm_head
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _adapted_modules(adapter_dir) -> set:
    names = json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"]
    return {name.rsplit(".", 1)[-1] for name in names}


def test_cli_grpo(checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", task.arithmetic_dataset(16, 0))
    out = tmp_path / "grpo"
    main(["grpo", "--model", str(checkpoint), "--dataset", str(data), "--output_dir", str(out),
          "--reward", "exact_match", "--reward", "digit_match", "--reward", "format",
          "--per_device_train_batch_size", "8",
          "--num_generations", "4", "--max_completion_length", "8", *COMMON])  # fmt: skip
    assert (out / "adapter_model.safetensors").exists()
    assert _adapted_modules(out) == ALL_LINEAR
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    for name in ("exact_match_answer", "digit_match_answer", "format_reward"):
        assert f"rewards/{name}/mean" in logs[0], name


def test_cli_grpo_vespo(checkpoint, tmp_path):
    # a loss type whose weight is a sequence statistic: the fused head's two-pass path,
    # its options from the command line to the loss and its metric in the logs
    data = write_jsonl(tmp_path / "train.jsonl", task.arithmetic_dataset(8, 0))
    out = tmp_path / "vespo"
    main(["grpo", "--model", str(checkpoint), "--dataset", str(data), "--output_dir", str(out),
          "--loss_type", "vespo", "--vespo_k_neg", "2.5", "--per_device_train_batch_size", "8",
          "--num_generations", "4", "--max_completion_length", "6", *COMMON])  # fmt: skip
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    # one generation, one step: on-policy, every sequence ratio w = 1 and phi(1) = 1
    assert logs[0]["vespo/phi_seq_mean"] == pytest.approx(1.0, abs=1e-4)


def test_cli_dpo_from_yaml(checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", task.preference_pairs(16, 0))
    out = tmp_path / "dpo"
    (tmp_path / "dpo.yaml").write_text(
        f"model: {checkpoint}\ndataset: {data}\nbeta: 0.2\nloss_type: ipo\n"
        "per_device_train_batch_size: 4\n"
    )
    main(["dpo", "--config", str(tmp_path / "dpo.yaml"), "--output_dir", str(out), *COMMON])
    assert (out / "adapter_model.safetensors").exists()
    assert _adapted_modules(out) == ALL_LINEAR
    main(["dpo", "--config", str(tmp_path / "dpo.yaml"), "--output_dir", str(tmp_path / "qv"),
          "--lora_target_modules", "q_proj", "v_proj", *COMMON])  # fmt: skip
    assert _adapted_modules(tmp_path / "qv") == {"q_proj", "v_proj"}


def test_cli_kto_on_pairs(checkpoint, tmp_path):
    """`fastrl kto` on a paired file: unpaired as TRL does, one step, the adapter saved."""
    data = write_jsonl(tmp_path / "pairs.jsonl", task.preference_pairs(8, 0))
    out = tmp_path / "kto"
    main(["kto", "--model", str(checkpoint), "--dataset", str(data), "--output_dir", str(out),
          "--per_device_train_batch_size", "4", "--beta", "0.2", "--logging_steps", "1",
          *COMMON])  # fmt: skip
    assert (out / "adapter_model.safetensors").exists()
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    # sequential batches of the unpaired rows (chosen first, as TRL unpairs them): the
    # first batch is all desirable, so nothing is logged for the undesirable kind
    assert {"kl", "rewards/chosen", "logps/chosen", "entropy"} <= set(logs[0])
    assert "rewards/rejected" not in logs[0]


def test_cli_errors(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    data = write_jsonl(tmp_path / "pairs.jsonl", task.preference_pairs(4, 0))
    (tmp_path / "bad.yaml").write_text(f"model: {checkpoint}\ndataset: {data}\nnot_an_option: 1\n")
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--config", str(tmp_path / "bad.yaml")])
    assert e.value.code == 2 and "unknown options ['not_an_option']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "nope"])
    assert e.value.code == 2 and "usage: fastrl bench" in capsys.readouterr().err


def test_repeated_list_options_keep_every_value():
    from fastrl.cli import _parse
    from fastrl.trainers import GRPOConfig

    base = ["--model", "m", "--dataset", "d", "--output_dir", "x", "--use_cpu", "true"]
    script, _ = _parse((GRPOScriptArguments, GRPOConfig), base)
    assert script.reward == ["exact_match"]  # the default
    script, config = _parse(
        (GRPOScriptArguments, GRPOConfig),
        [*base, "--reward", "exact_match", "--reward", "format", "length",
         "--lora_target_modules", "q_proj", "--lora_target_modules", "v_proj"],
    )  # fmt: skip
    assert script.reward == ["exact_match", "format", "length"]
    assert config.lora_target_modules == ["q_proj", "v_proj"]


REWARD_FILE = """
def score(completions, **kwargs):
    return [float(len(c)) for c in completions]

constant = 1.0
"""


@pytest.fixture
def console_script_path(tmp_path, monkeypatch):
    """The `fastrl` console script's situation: the current directory (a fresh one) is not
    on `sys.path`. Modules the test imports are dropped afterwards."""
    monkeypatch.chdir(tmp_path)
    path = [p for p in sys.path if p not in ("", ".", str(tmp_path))]
    monkeypatch.setattr(sys, "path", path)
    before = set(sys.modules)
    yield path
    for name in set(sys.modules) - before:
        if name.startswith(("cwd_reward", "_fastrl_reward_", "helper_for_reward")):
            del sys.modules[name]


def _rewards(*specs):
    return _reward_functions(GRPOScriptArguments(model="m", dataset="d", reward=list(specs)))


def test_reward_module_from_the_current_directory(console_script_path, tmp_path):
    (tmp_path / "cwd_reward.py").write_text(REWARD_FILE)
    builtin, func = _rewards("exact_match", "cwd_reward:score")
    assert builtin.__name__ == "exact_match_answer"
    assert func.__name__ == "score" and func(["ab", "c"]) == [2.0, 1.0]
    assert sys.path == console_script_path  # the directory was on it for the import only


def test_reward_from_a_file_path(console_script_path, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "helper_for_reward.py").write_text("BONUS = 10.0\n")
    (tmp_path / "sub" / "rew.py").write_text(
        "from helper_for_reward import BONUS\n\n"
        "def score(completions, **kwargs):\n    return [BONUS for _ in completions]\n"
    )
    (relative,) = _rewards("sub/rew.py:score")  # relative to the current directory
    (absolute,) = _rewards(f"{tmp_path / 'sub' / 'rew.py'}:score")
    assert relative is absolute and relative(["x"]) == [10.0]
    assert sys.path == console_script_path


def test_reward_spec_errors(console_script_path, tmp_path):
    (tmp_path / "cwd_reward.py").write_text(REWARD_FILE)
    cases = {
        "cwd_reward:nope": "module 'cwd_reward' has no function 'nope'",
        "cwd_reward:constant": "'constant' in module 'cwd_reward' is not callable",
        "no_such_module_xyz:f": "cannot import module 'no_such_module_xyz'",
        "missing/rew.py:score": "not found",
        "cwd_reward.py:nope": "has no function 'nope'",
        "cwd_reward:": "expected 'module:function'",
    }
    for spec, message in cases.items():
        pattern = re.escape(f"--reward {spec!r}") + ".*" + re.escape(message)
        with pytest.raises(ValueError, match=pattern):
            _rewards(spec)
    with pytest.raises(UsageError, match="use one of"):
        _rewards("no_such_builtin")
    assert sys.path == console_script_path


@pytest.mark.slow  # a subprocess: the imports alone take a few seconds
def test_cli_grpo_reward_from_cwd_through_the_console_script(checkpoint, tmp_path):
    script = Path(sys.executable).with_name("fastrl")
    if not script.exists():
        pytest.skip("the fastrl console script is not installed")
    (tmp_path / "myrew.py").write_text(
        "def myrew(completions, **kwargs):\n    return [0.5 for _ in completions]\n"
    )
    write_jsonl(tmp_path / "train.jsonl", task.arithmetic_dataset(16, 0))
    argv = [str(script), "grpo", "--model", str(checkpoint), "--dataset", "train.jsonl",
            "--output_dir", "out", "--reward", "myrew:myrew", "--per_device_train_batch_size",
            "8", "--num_generations", "4", "--max_completion_length", "8", *COMMON]  # fmt: skip
    run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert logs[0]["rewards/myrew/mean"] == 0.5


@pytest.mark.slow
def test_demo_quick_runs_every_stage(tmp_path, monkeypatch):
    from fastrl.demo import run

    returned = []
    real = run.run_demo
    monkeypatch.setattr(run, "run_demo", lambda *a, **kw: returned.append(real(*a, **kw)))
    main(["demo", "--quick", "--output_dir", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert returned == [summary]  # run_demo returns what it writes
    assert summary["quick"] is True and summary["device"] in ("cpu", "cuda")
    for stage in ("sft", "grpo"):
        assert 0.0 <= summary["accuracy"][stage] <= 1.0
        assert 0.0 <= summary["sampled_accuracy"][stage] <= 1.0
    # the fresh DPO adapter equals the reference: every margin is a tie, and ties count 1/2
    assert summary["preference_accuracy"]["before_dpo"] == 0.5
    assert 0.0 <= summary["preference_accuracy"]["after_dpo"] <= 1.0
    rm = summary["reward_model"]
    assert set(rm) == {"eval_accuracy_before", "eval_accuracy_after", "eval_margin_after",
                       "score_correct", "score_wrong", "reloaded_accuracy", "seconds"}  # fmt: skip
    for key in ("eval_accuracy_before", "eval_accuracy_after", "reloaded_accuracy"):
        assert 0.0 <= rm[key] <= 1.0, key
    if summary["device"] == "cpu":  # float32 throughout (on a GPU bf16 may flip a near tie)
        # the saved adapter, reloaded as RewardModel, ranks held-out pairs as the trainer did
        assert rm["reloaded_accuracy"] == rm["eval_accuracy_after"]
    assert 0 < rm["seconds"] < summary["seconds"]
    for name in ("reward_curve.png", "grpo_adapter/adapter_model.safetensors",
                 "dpo_adapter/adapter_model.safetensors", "reward_adapter/tokenizer.json",
                 "reward_adapter/adapter_model.safetensors"):  # fmt: skip
        assert (tmp_path / name).exists(), name
    config = json.loads((tmp_path / "reward_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base_model").resolve())
    assert config["task_type"] == "SEQ_CLS"
