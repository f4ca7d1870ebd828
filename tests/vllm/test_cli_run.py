"""`fastrl grpo --use_vllm` end to end on a real engine (CPU): a saved tiny checkpoint
(untied Qwen2, the demo's character tokenizer), two steps, the adapter saved and the
importance-sampling metrics in the trainer state."""

import json
import os
import subprocess
import sys

from fastrl.demo.task import build_tiny_tokenizer
from tests.support.engine import KV_CACHE_BYTES, tiny_qwen2

TIMEOUT = 300


def test_fastrl_grpo_use_vllm(tmp_path):
    tok = build_tiny_tokenizer()
    model = tiny_qwen2(vocab_size=len(tok))
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1)} for i in range(4, 12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    args = ["--model", ckpt, "--dataset", data, "--reward", "exact_match", "--use_vllm",
            "--vllm_kv_cache_memory_bytes", KV_CACHE_BYTES, "--vllm_enforce_eager",
            "--max_steps", 2, "--num_generations", 4, "--per_device_train_batch_size", 4,
            "--max_completion_length", 6, "--use_cpu", "--output_dir", out,
            "--report_to", "none", "--use_chat_template", "false",
            "--logging_steps", 1]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "fastrl.cli", "grpo", *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    keys = {k for entry in logs for k in entry}
    assert "sampling/importance_sampling_ratio/mean" in keys and "vllm/sync_seconds" in keys
