"""`VLLMEngine` on a real vLLM engine (CPU): greedy completions equal HF `generate`'s with
the same adapter, before and after the adapter changes (the sync); the sampler's
log-probs equal `linear_logprobs` on its completions; an engine too small for its
context names the options to change."""

import dataclasses
import math
import time

import pytest
import torch

from fastrl import linear_logprobs
from fastrl.trainers.model import completion_positions, last_hidden_states
from fastrl.trainers.vllm_engine import SamplingSettings, VLLMEngine, save_base_checkpoint
from tests.support.engine import KV_CACHE_BYTES, hf_greedy, randomize_lora

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [20]]
GREEDY = SamplingSettings(max_tokens=24, stop_token_ids=(1,), do_sample=False)
#: fp32 on both sides; vLLM's CPU kernels sum in another order than torch's matmul
LOGP_ATOL = 1e-4  # measured: 1.1e-5


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    """One engine for the module (it starts in ~2-5 s) and the peft model it mirrors."""
    from peft import LoraConfig, get_peft_model

    from tests.support.engine import tiny_qwen2

    model = get_peft_model(
        tiny_qwen2(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    randomize_lora(model, 1)
    base = save_base_checkpoint(model, str(tmp_path_factory.mktemp("base")))
    engine = VLLMEngine(
        model=base, max_lora_rank=8, max_model_len=64, dtype="float32",
        kv_cache_memory_bytes=KV_CACHE_BYTES, enforce_eager=True, seed=0,
    )  # fmt: skip
    yield engine, model
    engine.close()


def test_greedy_equals_hf_generate_before_and_after_a_sync(engine_and_model):
    engine, model = engine_and_model
    engine.sync_adapter(model)
    first, _ = engine.generate(PROMPTS, GREEDY)
    assert first == [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    assert all(len(c) > 3 for c in first)  # a real completion, not an immediate EOS

    randomize_lora(model, 2)  # what an optimizer step does to the adapter
    stale, _ = engine.generate(PROMPTS, GREEDY)
    assert stale == first  # not synced yet: the engine still has the old adapter
    engine.sync_adapter(model)
    second, _ = engine.generate(PROMPTS, GREEDY)
    assert second == [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    assert second != first
    assert engine.timings["sync_s"] > 0  # timed (the figure itself is a benchmark's)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_linear_logprobs(engine_and_model, temperature):
    """vLLM's processed log-probs of its sampled tokens equal what the trainer computes on
    the same completions with the fused head at the sampling temperature, within
    LOGP_ATOL (float32)."""
    engine, model = engine_and_model
    engine.sync_adapter(model)
    settings = SamplingSettings(max_tokens=16, stop_token_ids=(1,), temperature=temperature)
    prompts = PROMPTS * 2
    ids, logps = engine.generate(prompts, settings, seeds=list(range(len(prompts))))
    model.eval()
    worst = 0.0
    for prompt, completion, sampled in zip(prompts, ids, logps, strict=True):
        assert len(sampled) == len(completion) and not any(map(math.isnan, sampled))
        full = torch.tensor([prompt + completion])
        with torch.no_grad():
            hidden = completion_positions(last_hidden_states(model, full), len(prompt))
            ours = linear_logprobs(
                hidden, model.get_output_embeddings().weight, torch.tensor([completion]),
                temperature=temperature, impl="torch",
            )[0]  # fmt: skip
        torch.testing.assert_close(torch.tensor(sampled), ours, atol=LOGP_ATOL, rtol=0)
        worst = max(worst, (torch.tensor(sampled) - ours).abs().max().item())
    print(f"max |vLLM logp - linear_logprobs| at T={temperature}: {worst:.2e}")


def test_seeds_make_sampling_reproducible(engine_and_model):
    engine, model = engine_and_model
    engine.sync_adapter(model)
    settings = SamplingSettings(max_tokens=16, stop_token_ids=(1,))
    a, _ = engine.generate(PROMPTS, settings, seeds=[1, 2, 3, 4])
    engine.generate(PROMPTS, settings)  # the engine's own stream moves on
    b, _ = engine.generate(PROMPTS, settings, seeds=[1, 2, 3, 4])
    c, _ = engine.generate(PROMPTS, settings, seeds=[5, 6, 7, 8])
    assert a == b and a != c
    with pytest.raises(ValueError, match="3 seeds for 4 prompts"):
        engine.generate(PROMPTS, settings, seeds=[1, 2, 3])


def test_stop_ids_and_max_tokens(engine_and_model):
    """A completion ends at its first stop id (kept) or at max_tokens."""
    engine, model = engine_and_model
    engine.sync_adapter(model)
    free, _ = engine.generate(PROMPTS, GREEDY)
    token = free[0][2]  # make the third greedy token a stop id
    stopped, _ = engine.generate(
        PROMPTS[:1], dataclasses.replace(GREEDY, stop_token_ids=(1, token))
    )
    assert stopped[0] == free[0][: free[0].index(token) + 1]
    short, _ = engine.generate(PROMPTS, dataclasses.replace(GREEDY, max_tokens=2))
    assert [len(c) for c in short] == [min(2, len(c)) for c in free]
    # min_tokens (generation_kwargs' min_new_tokens) holds the stop ids back
    held = dataclasses.replace(GREEDY, stop_token_ids=(1, token), min_tokens=GREEDY.max_tokens)
    full, _ = engine.generate(PROMPTS[:1], held)
    assert len(full[0]) == GREEDY.max_tokens and token not in full[0][:3]


def test_generate_before_sync_is_refused(tmp_path, peft_model):
    base = save_base_checkpoint(peft_model, str(tmp_path))
    start = time.perf_counter()
    engine = VLLMEngine(
        model=base, max_lora_rank=8, max_model_len=64, dtype="float32",
        kv_cache_memory_bytes=KV_CACHE_BYTES, enforce_eager=True,
    )  # fmt: skip
    print(f"engine start {time.perf_counter() - start:.2f} s ({engine.timings})")
    try:
        with pytest.raises(RuntimeError, match="sync_adapter"):
            engine.generate(PROMPTS, GREEDY)
    finally:
        engine.close()
        engine.close()  # idempotent


def test_an_engine_too_small_names_the_options(tmp_path, peft_model):
    base = save_base_checkpoint(peft_model, str(tmp_path))
    with pytest.raises(ValueError) as info:
        VLLMEngine(
            model=base, max_lora_rank=8, max_model_len=256, dtype="float32",
            kv_cache_memory_bytes=4096, enforce_eager=True,
        )  # fmt: skip
    message = str(info.value)
    assert "--vllm_max_model_length (now 256" in message
    assert "--vllm_kv_cache_memory_bytes (now 4096, which replaces" in message
    assert "--vllm_gpu_memory_utilization (now 0.3)" in message


def test_a_tied_model_object_reaches_the_engine_whole(tmp_path):
    """`save_base_checkpoint` of a tied model: the head is the embedding (one tensor on
    disk), and the engine's greedy completions equal HF's."""
    from peft import LoraConfig, get_peft_model

    from tests.support.engine import tiny_qwen2

    torch.manual_seed(0)
    model = get_peft_model(
        tiny_qwen2(tied=True), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    randomize_lora(model, 3)
    base = save_base_checkpoint(model, str(tmp_path))
    engine = VLLMEngine(
        model=base, max_lora_rank=8, max_model_len=64, dtype="float32",
        kv_cache_memory_bytes=KV_CACHE_BYTES, enforce_eager=True,
    )  # fmt: skip
    try:
        engine.sync_adapter(model)
        ids, _ = engine.generate(PROMPTS, GREEDY)
        assert ids == [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    finally:
        engine.close()
