"""The `fastrl` command meets a user's mistakes: one message naming the flag, file or value,
exit code 2, no traceback, and quickly (before any model or data is loaded)."""

import json
import os
import re
import subprocess
import sys
import time
import types

import pytest

from fastrl import cli

TIMEOUT = 120  # seconds; a mistake should fail in a few, the bound only stops a hang


def fastrl(*args, cwd=None, env=None):
    """`python -m fastrl.cli ARGS` in a subprocess: (exit code, stderr, stdout, seconds)."""
    base = {k: v for k, v in os.environ.items() if k != "FASTRL_DEBUG"}
    env = {**base, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "fastrl.cli", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    return run.returncode, run.stderr, run.stdout, time.monotonic() - start


def assert_user_error(code, stderr, *named):
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, stderr
    assert lines[0].startswith("fastrl"), stderr
    for text in named:
        assert text in stderr, (text, stderr)


@pytest.fixture
def ckpt(tmp_path):
    """A directory the path checks take for a checkpoint (they do not load it)."""
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    return path


def test_missing_local_model_directory(tmp_path, data):
    code, err, _, _ = fastrl("grpo", "--model", "./nope", "--dataset", data, cwd=tmp_path)
    assert_user_error(code, err, "--model ./nope", "does not exist")


def test_missing_model_name_does_not_wait_for_the_hub(tmp_path, data):
    # used to wait ~51 s for the Hub before an OSError traceback
    code, err, _, seconds = fastrl("grpo", "--model", "my-checkpoint", "--dataset", data,
                                   cwd=tmp_path)  # fmt: skip
    assert_user_error(code, err, "--model my-checkpoint", "does not exist")
    assert seconds < 30


def test_hub_id_offline_not_in_cache(tmp_path, data):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code, err, _, seconds = fastrl("grpo", "--model", "no-org/no-model", "--dataset", data,
                                   cwd=tmp_path, env=env)  # fmt: skip
    assert_user_error(code, err, "--model no-org/no-model", "not in the cache")
    assert seconds < 30


def test_checkpoint_without_tokenizer_files(tmp_path, ckpt, data):
    (ckpt / "tokenizer.json").unlink()
    code, err, _, _ = fastrl("grpo", "--model", ckpt, "--dataset", data)
    assert_user_error(code, err, f"--model {ckpt}", "no tokenizer files")


def test_missing_dataset(tmp_path, ckpt):
    code, err, _, _ = fastrl("grpo", "--model", ckpt, "--dataset", "nothing.jsonl", cwd=tmp_path)
    assert_user_error(code, err, "--dataset nothing.jsonl", "does not exist")


def test_empty_dataset(tmp_path, ckpt):
    (tmp_path / "empty.jsonl").write_text("")
    code, err, _, _ = fastrl("grpo", "--model", ckpt, "--dataset", tmp_path / "empty.jsonl")
    assert_user_error(code, err, "empty.jsonl", "is empty")


def test_malformed_jsonl_names_the_line(tmp_path, ckpt):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", answer: 4}\n')
    code, err, _, _ = fastrl("grpo", "--model", ckpt, "--dataset", bad)
    assert_user_error(code, err, "bad.jsonl", "line 2", "not valid JSON")


def test_malformed_csv_names_the_line(tmp_path, ckpt):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,answer\n1+1=,2\n2+2=,4,extra\n")
    code, err, _, _ = fastrl("grpo", "--model", ckpt, "--dataset", bad)
    assert_user_error(code, err, "bad.csv", "line 3")


def test_default_reward_needs_the_answer_column(tmp_path, ckpt):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=", "solution": "2"}) + "\n")
    code, err, _, _ = fastrl("grpo", "--model", ckpt, "--dataset", rows)
    assert_user_error(code, err, "'answer'", "--answer_column", "rows.jsonl")


def test_dpo_pairs_need_their_columns(tmp_path, ckpt, data):
    code, err, _, _ = fastrl("dpo", "--model", ckpt, "--dataset", data)
    assert_user_error(code, err, "'chosen'", "train.jsonl")


def test_kto_needs_its_columns_and_loss_type(tmp_path, ckpt, data):
    code, err, _, _ = fastrl("kto", "--model", ckpt, "--dataset", data)
    assert_user_error(code, err, "'completion'", "train.jsonl")
    rows = tmp_path / "kto.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=", "completion": "2", "label": True}) + "\n")
    code, err, _, _ = fastrl("kto", "--model", ckpt, "--dataset", rows, "--loss_type", "sigmoid")
    assert_user_error(code, err, "loss_type must be one of", "sigmoid")
    code, err, _, _ = fastrl("kto", "--model", ckpt, "--dataset", rows, "--beta", "0")
    assert_user_error(code, err, "beta")


def test_malformed_yaml_config_names_the_line(tmp_path):
    (tmp_path / "run.yaml").write_text("model: ckpt\n  dataset: [oops\n")
    code, err, _, _ = fastrl("grpo", "--config", "run.yaml", cwd=tmp_path)
    assert_user_error(code, err, "--config run.yaml line 2", "not valid YAML")


def test_missing_yaml_config(tmp_path):
    code, err, _, _ = fastrl("dpo", "--config", "none.yaml", cwd=tmp_path)
    assert_user_error(code, err, "--config none.yaml", "not found")


def test_prefix_of_an_option_is_rejected(tmp_path, ckpt, data):
    # `--help` builds the full parser and caches its option table; later runs reject a
    # flag from the cache, before importing the trainers; without a cache, from the
    # configs' sources: either way the option it is closest to is named
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    code, _, out, _ = fastrl("grpo", "--help", env=env)
    assert code == 0 and "--num_generations" in out
    assert list((tmp_path / "cache" / "fastrl").glob("cli-grpo-*.json"))
    args = ("grpo", "--model", ckpt, "--dataset", data, "--num_generation", "4")
    code, err, _, _ = fastrl(*args, env=env)
    assert_user_error(code, err, "--num_generation 4", "did you mean --num_generations?")
    code, err, _, _ = fastrl(*args, env={"XDG_CACHE_HOME": str(tmp_path / "none")})
    assert_user_error(code, err, "--num_generation", "did you mean --num_generations?")
    # a bad choice: the same message with the table cached or not
    args = (*args[:-2], "--loss_type", "nope")
    code, cached, _, _ = fastrl(*args, env=env)
    assert_user_error(code, cached, "--loss_type", "'nope'", "'dapo'")
    assert fastrl(*args, env={"XDG_CACHE_HOME": str(tmp_path / "none")})[1] == cached


# a subprocess that runs the command and says which heavy modules it imported
_IMPORTS_PROBE = """
import sys
from fastrl import cli
try:
    cli.main(sys.argv[1:])
except SystemExit as e:
    print(e.code, "torch" in sys.modules, "transformers" in sys.modules)
"""


@pytest.mark.parametrize("command", ["grpo", "dpo"])
def test_first_run_rejects_a_mistyped_flag_without_importing_torch(tmp_path, ckpt, data, command):
    # no option table cached yet: the names come from the configs' and TrainingArguments'
    # sources, read without importing them
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "empty-cache")}
    flag = {"grpo": "--num_generation", "dpo": "--bta"}[command]
    run = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, command, "--model", str(ckpt),
         "--dataset", str(data), "--per-device-train-batch-size", "2", flag, "4"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.stdout.split() == ["2", "False", "False"], (run.stdout, run.stderr)
    right = {"grpo": "--num_generations", "dpo": "--beta"}[command]
    assert_user_error(2, run.stderr, f"unrecognized arguments: {flag}", f"did you mean {right}?")


def test_missing_required_options_fail_before_the_slow_imports(tmp_path, ckpt):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "empty-cache")}
    run = subprocess.run([sys.executable, "-c", _IMPORTS_PROBE, "grpo", "--model", str(ckpt)],
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert run.stdout.split() == ["2", "False", "False"], (run.stdout, run.stderr)
    assert_user_error(2, run.stderr, "required: --dataset")


def test_debug_shows_the_traceback(tmp_path, data):
    code, err, _, _ = fastrl("grpo", "--model", "./nope", "--dataset", data, "--debug",
                             cwd=tmp_path)  # fmt: skip
    assert code == 1 and "Traceback" in err and "UsageError" in err
    code, err, _, _ = fastrl("grpo", "--model", "./nope", "--dataset", data, cwd=tmp_path,
                             env={"FASTRL_DEBUG": "1"})  # fmt: skip
    assert "Traceback" in err


def test_unknown_command():
    code, err, _, _ = fastrl("gpro")
    assert_user_error(code, err, "'gpro'", "fastrl --help")


def test_version_and_help():
    code, _, out, _ = fastrl("--version")
    assert code == 0 and out.startswith("fastrl 0.")
    code, _, out, _ = fastrl("--help")
    assert code == 0
    for command in ("grpo", "dpo", "demo", "sample", "fastrl grpo --help"):
        assert command in out


# In-process: transformers is imported already, so the full parser costs no start-up.


@pytest.fixture(autouse=True)
def _option_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--loss_type", "nope", "got 'nope'"),  # the loss options' own check, flag-named
        ("--scale_rewards", "grou", "invalid choice: 'grou'"),
        ("--importance_sampling_level", "seq", "got 'seq'"),
        ("--num_generations", "four", "invalid int value: 'four'"),
        ("--beta", "-1", "beta"),  # the config's own check: a ValueError is a user error
    ],
)
def test_bad_option_values(capsys, ckpt, data, flag, value, named):
    code, err = run_main(capsys, "grpo", "--model", str(ckpt), "--dataset", str(data),
                         "--use_cpu", "true", flag, value)  # fmt: skip
    assert_user_error(code, err, named)
    assert flag.lstrip("-") in err


def test_grpo_help_shows_fastrls_options_first(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["grpo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastrl grpo")
    assert "--loss_type {grpo,bnpo," in out
    assert out.index("fastrl options") < out.index("transformers TrainingArguments")
    assert out.index("--num_generations") < out.index("--per_device_train_batch_size")


def test_says_where_it_writes_and_that_a_memory_cap_needs_cuda(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = types.SimpleNamespace(output_dir="trainer_output", max_memory_gb=24.0)
    cli._announce("grpo", {}, config)
    err = capsys.readouterr().err
    assert "no --output_dir given: writing to " + os.path.abspath("trainer_output") in err
    assert "--max_memory_gb 24.0 has no effect: no CUDA device" in err
    cli._announce(
        "grpo", {"output_dir": "x"}, types.SimpleNamespace(output_dir="x", max_memory_gb=None)
    )
    assert capsys.readouterr().err == ""


def test_sample_is_dispatched(capsys, monkeypatch):
    module = types.ModuleType("fastrl.sample")
    module.main = lambda argv: 7 if argv == ["--x"] else 0
    monkeypatch.setitem(sys.modules, "fastrl.sample", module)
    assert cli.main(["sample", "--x"]) == 7


def test_a_value_error_while_training_keeps_its_traceback(monkeypatch):
    """Only mistakes in what the user typed are one-line errors: a ValueError raised while
    the work runs (a bug, a reward function's own error) propagates with its traceback."""

    def command(argv):
        cli._Running.active = True
        raise ValueError("raised inside train()")

    monkeypatch.setattr(cli._Running, "active", False)
    monkeypatch.setitem(cli.COMMANDS, "grpo", command)
    with pytest.raises(ValueError, match="inside train"):
        cli.main(["grpo"])


def test_bare_hub_id_only_when_cached(monkeypatch):
    """`gpt2`-style ids have no org: taken as hub ids only if already downloaded, so a
    missing `my-checkpoint` still fails at once instead of waiting for the Hub."""
    monkeypatch.setattr(cli, "_in_hub_cache", lambda model: model == "gpt2")
    cli.check_model_path("gpt2")
    with pytest.raises(cli.UsageError, match="my-checkpoint.*does not exist"):
        cli.check_model_path("my-checkpoint")


def test_column_format_json_is_a_data_file(tmp_path):
    from fastrl.trainers.data import check_data_file

    path = tmp_path / "train.json"
    path.write_text(json.dumps({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]}, indent=1))
    assert check_data_file(path) == ["prompt", "answer"]


def test_hub_id_neither_here_nor_cached_is_one_request(tmp_path, data):
    # transformers retries for about a minute before it says the Hub is unreachable; the
    # precheck asks once: no such repo, or no network, is said at once
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    code, err, _, seconds = fastrl("grpo", "--model", "no-org/no-model", "--dataset", data,
                                   cwd=tmp_path, env=env)  # fmt: skip
    assert_user_error(code, err, "--model no-org/no-model", "no such directory")
    assert "on the Hub" in err or "cannot be reached" in err
    assert seconds < 30


@pytest.mark.parametrize("failure", ["missing", "unreachable", "gated"])
def test_hub_precheck_messages(monkeypatch, failure):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    class ConnectError(Exception):  # as the Hub's HTTP client names it
        pass

    response = types.SimpleNamespace(headers={}, status_code=404, request=None)
    errors = {"missing": RepositoryNotFoundError("404", response=response),
              "unreachable": ConnectError("Name or service not known"),
              "gated": GatedRepoError("403", response=response)}  # fmt: skip

    def model_info(self, repo_id, timeout=None):
        raise errors[failure]

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(cli, "_in_hub_cache", lambda model: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if failure == "gated":
        cli.check_model_path("org/gated")  # exists: from_pretrained says what access it needs
        return
    with pytest.raises(cli.UsageError) as e:
        cli.check_model_path("org/name")
    expected = {"missing": "no model 'org/name' on the Hub", "unreachable": "cannot be reached"}
    assert expected[failure] in str(e.value)
    assert str(e.value).startswith("--model org/name")


_VALUE_CASES = [
    ("grpo", []),
    ("grpo", ["--beta", "-1"]),
    ("grpo", ["--beta", "0.04", "--kl_estimator", "k2", "--use_bias_correction_kl", "false"]),
    ("grpo", ["--loss_type", "dr_grpo"]),  # the config's max_completion_length (512) serves
    ("grpo", ["--loss_type", "dr_grpo", "--max_completion_length", "0"]),
    ("grpo", ["--loss_type", "cispo", "--delta", "1.5"]),
    ("grpo", ["--loss_type", "cispo", "--epsilon_high", "5"]),
    ("grpo", ["--epsilon", "-0.1"]),
    ("grpo", ["--sapo_temperature_neg", "0", "--loss_type", "sapo"]),
    ("grpo", ["--top_entropy_quantile", "1.5"]),
    ("grpo", ["--loss_type", "vespo"]),
    ("grpo", ["--loss_type", "vespo", "--vespo_k_pos", "0.5", "--vespo_lambda_neg", "1"]),
    ("grpo", ["--loss_type", "vespo", "--vespo_k_neg", "-1"]),
    ("grpo", ["--loss_type", "vespo", "--delta", "1.5"]),
    ("grpo", ["--importance_sampling_level", "sequence", "--delta", "2"]),
    ("dpo", []),
    ("dpo", ["--beta", "-1"]),
    ("dpo", ["--loss_type", "sigmoid", "ipo", "--loss_weights", "1", "0.5"]),
    ("dpo", ["--loss_type", "ipo", "--label_smoothing", "0.1"]),
    ("dpo", ["--loss_type", "robust", "--label_smoothing", "0.6"]),
    ("dpo", ["--loss_type", "discopop", "--discopop_tau", "0"]),
    ("dpo", ["--loss_type", "simpo", "--simpo_gamma", "0.5", "--cpo_alpha", "0"]),
    ("dpo", ["--loss_type", "exo_pair"]),
    ("dpo", ["--f_divergence_type", "alpha_divergence", "--f_alpha_divergence_coef", "0.3"]),
    ("dpo", ["--ld_alpha", "1.5"]),
    ("dpo", ["--use_weighting", "--loss_type", "aot"]),
]


@pytest.mark.parametrize(
    ("command", "extra"), _VALUE_CASES, ids=[f"{c}:{' '.join(e) or '-'}" for c, e in _VALUE_CASES]
)
def test_value_prechecks_say_what_the_config_says(tmp_path, ckpt, data, command, extra):
    # before the slow imports the command line checks the loss options with the config's
    # own functions: it must refuse exactly what the config refuses, with its message
    from fastrl.trainers import DPOConfig, GRPOConfig

    script = {"grpo": cli.GRPOScriptArguments, "dpo": cli.DPOScriptArguments}[command]
    config = {"grpo": GRPOConfig, "dpo": DPOConfig}[command]
    argv = ["--model", str(ckpt), "--dataset", str(data), "--use_cpu", "true",
            "--output_dir", str(tmp_path / "out"), *extra]  # fmt: skip
    try:
        cli._check_loss_values(command, cli._prescan(command, script, argv))
        early = None
    except ValueError as e:
        early = str(e)
    try:
        cli._parse((script, config), argv, command)
        full = None
    except ValueError as e:
        full = str(e)
    # both accept, or both refuse naming the same flag first (the config may check a
    # setting it requires, such as max_completion_length, before the loss's own check)
    assert (early is None) == (full is None), (early, full)
    if early is not None:
        first_flag = re.compile(r"--\w+")
        assert first_flag.search(early)[0] == first_flag.search(full)[0], (early, full)


def test_a_bad_value_fails_without_importing_torch(tmp_path, ckpt, data):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "empty-cache")}
    run = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, "grpo", "--model", str(ckpt), "--dataset",
         str(data), "--loss_type", "cispo", "--delta", "1.5"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.stdout.split() == ["2", "False", "False"], (run.stdout, run.stderr)
    assert_user_error(2, run.stderr, "--delta 1.5", "--loss_type 'cispo'")


@pytest.mark.parametrize("advised", [True, False])
def test_out_of_memory_is_one_message_with_one_piece_of_advice(monkeypatch, capsys, advised):
    import torch

    def command(argv):
        cli._Running.active = True
        error = torch.OutOfMemoryError("out of memory in a GRPO step: lower, in this order, ...")
        if advised:  # as the trainers raise it: their first line says what to lower
            error.fastrl_advice = True
        raise error

    monkeypatch.setitem(cli.COMMANDS, "grpo", command)
    code, err = run_main(capsys, "grpo")
    assert code == 1 and "Traceback" not in err
    assert err.startswith("fastrl grpo: error: out of memory in a GRPO step")
    assert ("hint:" in err) is not advised


# The mistakes a new user's walk through `fastrl rm|kto|ppo` (and grpo/dpo) found: each one
# line, exit 2, naming the flag and the value, before any model loads.


def _walk_cases(tmp_path):
    """(name, argv tail, texts the message names) per mistake; paths under `tmp_path`."""
    causal = tmp_path / "causal-lm"
    causal.mkdir()
    (causal / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    policy = tmp_path / "kto-out"
    policy.mkdir()
    (policy / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    out = str(tmp_path / "out")
    return {
        "rm_causal_lm": ("ppo", ["--reward", f"reward_model:{causal}"],
                         ["--reward", "LlamaForCausalLM", "fastrl rm"]),
        "rm_policy_adapter": ("grpo", ["--reward", f"reward_model:{policy}"],
                              ["--reward", "task_type is 'CAUSAL_LM'", "fastrl rm"]),
        "rm_missing": ("ppo", ["--reward", f"reward_model:{tmp_path / 'none'}"],
                       ["--reward", "not found"]),
        "reward_file_missing": ("grpo", ["--reward", "nope.py:score"], ["nope.py", "not found"]),
        "resume_missing": ("rm", ["--output_dir", out, "--resume_from_checkpoint", "ckpt-3"],
                           ["--resume_from_checkpoint ckpt-3", "checkpoint-3"]),
        "output_dir_file": ("kto", ["--output_dir", str(tmp_path / "afile")],
                            ["--output_dir", "afile", "is a file"]),
        "lr_negative": ("rm", ["--learning_rate", "-1"], ["--learning_rate must be >= 0", "-1"]),
        "lr_negative_eq": ("dpo", ["--learning_rate=-0.5"], ["--learning_rate must be >= 0"]),
        "lr_dash_value": ("ppo", ["--learning_rate", "-1e-5"],
                          ["--learning_rate", "write --learning_rate=-1e-5"]),
        "label_smoothing_rm": ("rm", ["--label_smoothing_factor", "0.1"],
                               ["--label_smoothing_factor 0.1 is not supported"]),
        "label_smoothing_kto": ("kto", ["--label_smoothing_factor", "0.1"],
                                ["--label_smoothing_factor"]),
        "label_smoothing_ppo": ("ppo", ["--label_smoothing_factor", "0.2"],
                                ["--label_smoothing_factor 0.2"]),
        "label_smoothing_grpo": ("grpo", ["--label_smoothing_factor", "0.1"],
                                 ["--label_smoothing_factor"]),
        "label_smoothing_dpo": ("dpo", ["--label_smoothing_factor", "0.1"],
                                ["--label_smoothing_factor", "--label_smoothing"]),
        "ppo_num_generations": ("ppo", ["--num_generations", "4"],
                                ["--num_generations", "one completion per prompt"]),
        "ppo_beta": ("ppo", ["--beta", "0.1"], ["--beta", "--kl_coef"]),
        "ppo_missing_eos_penalty": ("ppo", ["--missing_eos_penalty", "-1"],
                                    ["--missing_eos_penalty must be >= 0", "-1"]),
    }  # fmt: skip


WALK = ["rm_causal_lm", "rm_policy_adapter", "rm_missing", "reward_file_missing",
        "resume_missing", "output_dir_file", "lr_negative", "lr_negative_eq", "lr_dash_value",
        "label_smoothing_rm", "label_smoothing_kto", "label_smoothing_ppo",
        "label_smoothing_grpo", "label_smoothing_dpo", "ppo_num_generations", "ppo_beta",
        "ppo_missing_eos_penalty"]  # fmt: skip


def _data_for(command, tmp_path):
    rows = {"grpo": {"prompt": "1+1=", "answer": "2"}, "ppo": {"prompt": "1+1=", "answer": "2"},
            "dpo": {"prompt": "a", "chosen": "b", "rejected": "c"},
            "rm": {"prompt": "a", "chosen": "b", "rejected": "c"},
            "kto": {"prompt": "a", "completion": "b", "label": True}}  # fmt: skip
    path = tmp_path / f"{command}.jsonl"
    path.write_text((json.dumps(rows[command]) + "\n") * 4)
    return path


@pytest.mark.parametrize("case", WALK)
def test_walk_mistakes_are_one_line(capsys, tmp_path, ckpt, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    command, extra, named = _walk_cases(tmp_path)[case]
    data = _data_for(command, tmp_path)
    code, err = run_main(capsys, command, "--model", str(ckpt), "--dataset", str(data),
                         "--use_cpu", "true", *extra)  # fmt: skip
    assert_user_error(code, err, *named)


def test_ppo_missing_prompts_names_the_command(capsys, tmp_path, ckpt):
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    code, err = run_main(capsys, "ppo", "--model", str(ckpt), "--dataset", str(rows))
    assert_user_error(code, err, "every PPO dataset needs the prompts")
    assert "GRPO" not in err


def test_no_flag_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        cli.main(["ppo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no_whiten_advantages, --no-whiten-advantages Set --whiten_advantages to False." in out


def test_fastrl_warnings_print_in_one_line(capsys, monkeypatch):
    import warnings

    from fastrl.trainers.kto_trainer import _warn_on_unbalanced_weights

    weights = types.SimpleNamespace(desirable_weight=1.0, undesirable_weight=1.0)

    def command(argv):
        _warn_on_unbalanced_weights([True] * 4, weights)  # a fastrl warning, as KTO's
        warnings.warn("from elsewhere", FutureWarning, stacklevel=1)  # not fastrl's

    monkeypatch.setitem(cli.COMMANDS, "kto", command)
    with pytest.warns(FutureWarning, match="from elsewhere"):  # passed on as it was
        assert cli.main(["kto"]) == 0
    err = capsys.readouterr().err
    assert err == (
        "fastrl kto: warning: no undesirable completions (every label is True) among 4: only "
        "the desirable side of the KTO loss trains, and --desirable_weight / "
        "--undesirable_weight cannot balance the two\n"
    )


_NUMBER_CASES = [
    ("ppo", []),
    ("ppo", ["--kl_coef", "-0.1"]),
    ("ppo", ["--gamma", "1.5"]),
    ("ppo", ["--lam", "2"]),
    ("ppo", ["--num_ppo_epochs", "0"]),
    ("ppo", ["--max_completion_length", "0"]),
    ("ppo", ["--missing_eos_penalty", "-1"]),
    ("ppo", ["--lora_r", "0"]),
    ("rm", []),
    ("rm", ["--max_length", "0"]),
    ("rm", ["--lora_dropout", "1.5"]),
    ("kto", ["--lora_r", "0"]),
]


@pytest.mark.parametrize(
    ("command", "extra"), _NUMBER_CASES, ids=[f"{c}:{' '.join(e) or '-'}" for c, e in _NUMBER_CASES]
)
def test_number_prechecks_say_what_the_config_says(tmp_path, ckpt, data, command, extra):
    # rm / ppo / LoRA ranges before the slow imports: the configs' own table and function
    from fastrl.trainers import KTOConfig, PPOConfig, RewardConfig

    script = {"ppo": cli.GRPOScriptArguments, "rm": cli.RMScriptArguments,
              "kto": cli.KTOScriptArguments}[command]  # fmt: skip
    config = {"ppo": PPOConfig, "rm": RewardConfig, "kto": KTOConfig}[command]
    argv = ["--model", str(ckpt), "--dataset", str(data), "--use_cpu", "true",
            "--output_dir", str(tmp_path / "out"), *extra]  # fmt: skip
    early = full = None
    try:
        cli._check_config_numbers(command, cli._prescan(command, script, argv))
    except ValueError as e:
        early = str(e)
    try:
        cli._parse((script, config), argv, command)
    except ValueError as e:
        full = str(e)
    assert early == full, (early, full)
    assert (early is None) == (not extra)


def test_a_bad_ppo_value_fails_without_importing_torch(tmp_path, ckpt, data):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "empty-cache")}
    run = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, "ppo", "--model", str(ckpt), "--dataset",
         str(data), "--kl_coef", "-0.1"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.stdout.split() == ["2", "False", "False"], (run.stdout, run.stderr)
    assert_user_error(2, run.stderr, "--kl_coef must be >= 0, got -0.1")


def test_deepspeeds_cpu_notice_is_dropped_on_a_cpu_machine(monkeypatch, caplog):
    # DeepSpeed (in the dev extra) logs it on import on every CPU command's stdout
    import logging
    import shutil

    from fastrl import cli

    monkeypatch.setattr(shutil, "which", lambda name: None)
    logger = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(logger, "filters", list(logger.filters))
    cli._quiet_deepspeed_on_cpu()
    cli._quiet_deepspeed_on_cpu()  # once per process, however often main() runs
    assert logger.filters.count(cli._cpu_accelerator_notice) == 1
    with caplog.at_level(logging.WARNING, logger="DeepSpeed"):
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
        logger.warning("ZeRO-3 is enabled")
    assert [r.getMessage() for r in caplog.records] == ["ZeRO-3 is enabled"]
