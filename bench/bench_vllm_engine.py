"""The colocated vLLM engine's fixed costs on this machine: start, adapter sync, and
generation of 8 prompts x 8 samples x 64 tokens (with the trainer's per-request seeds and
without), on the tiny untied Qwen2 of tests/vllm.

    .venv-vllm/bin/python bench/bench_vllm_engine.py          # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    opts = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    from fastrl.trainers.vllm_engine import SamplingSettings, VLLMEngine, save_base_checkpoint
    from tests.support.engine import randomize_lora, tiny_qwen2

    torch.manual_seed(0)
    model = get_peft_model(
        tiny_qwen2(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    )
    randomize_lora(model, 1)
    base = save_base_checkpoint(model, tempfile.mkdtemp())
    start = time.perf_counter()
    engine = VLLMEngine(
        model=base, max_lora_rank=16, max_model_len=128, dtype="float32",
        kv_cache_memory_bytes=256 * 2**20, enforce_eager=True,
    )  # fmt: skip
    started = time.perf_counter() - start
    syncs, seeded, unseeded = [], [], []
    prompts = [
        [5 + i, 6 + i, 7 + i, 8 + i] for i in range(opts.prompts) for _ in range(opts.samples)
    ]
    settings = SamplingSettings(max_tokens=opts.tokens, stop_token_ids=(), min_tokens=opts.tokens)
    for r in range(opts.repeats + 1):  # the first round warms up
        engine.sync_adapter(model)
        t0 = time.perf_counter()
        engine.generate(prompts, settings, seeds=list(range(len(prompts))))
        t1 = time.perf_counter()
        engine.generate(prompts, settings)
        t2 = time.perf_counter()
        if r:
            syncs.append(engine.timings["sync_s"])
            seeded.append(t1 - t0)
            unseeded.append(t2 - t1)
    engine.close()
    print(json.dumps(dict(
        engine_start_s=round(started, 3), sync_s=round(min(syncs), 4),
        generate_seeded_s=round(min(seeded), 3), generate_unseeded_s=round(min(unseeded), 3),
        shape=f"{opts.prompts} prompts x {opts.samples} samples x {opts.tokens} tokens",
        torch_threads=torch.get_num_threads(),
    )))  # fmt: skip


if __name__ == "__main__":
    main()
