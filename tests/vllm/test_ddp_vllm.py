"""`use_vllm=True` under DDP (two CPU processes, gloo): each rank runs its own colocated
engine (vLLM's `external_launcher`, as TRL's colocate mode), generates its own shard with
its own adapter copy, and both ranks end with the same LoRA weights (the gradients were
all-reduced)."""

from tests.support.ranks import assert_ranks_end_equal

SCRIPT = """
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
from fastrl.trainers import GRPOConfig, GRPOTrainer
from fastrl.demo.task import arithmetic_dataset, build_tiny_tokenizer
from tests.support.engine import tiny_qwen2

def letter_share(prompts, completions, **kwargs):
    return [sum(ch.isalpha() for ch in c) / (1 + len(c)) for c in completions]

tok = build_tiny_tokenizer()
model = tiny_qwen2(vocab_size=len(tok))
model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
args = GRPOConfig({out!r}, per_device_train_batch_size=4, num_generations=4, max_steps=3,
                  max_completion_length=6, learning_rate=5e-2, use_cpu=True,
                  save_strategy="no", disable_tqdm=True, ddp_backend="gloo", report_to="none",
                  activation_checkpointing=False, use_chat_template=False, use_vllm=True,
                  vllm_max_model_length=64, vllm_kv_cache_memory_bytes=64 * 2**20,
                  vllm_enforce_eager=True)
trainer = GRPOTrainer(model, letter_share, args=args,
                      train_dataset=arithmetic_dataset(32, 0), processing_class=tok)
trainer.train()
assert trainer._vllm is not None and trainer._synced_step == 2
logs = {{k for e in trainer.state.log_history for k in e}}
assert "sampling/importance_sampling_ratio/mean" in logs, logs
"""


def test_each_rank_its_own_engine_and_equal_weights(tmp_path):
    assert_ranks_end_equal(SCRIPT, tmp_path)
