"""`GRPOTrainer(use_vllm=True)` on a real vLLM engine (CPU), tiny untied Qwen2:

- the engine generates with the trainer's current adapter: its greedy completions equal
  HF `generate`'s before training and after training steps (the adapter sync);
- a run trains (LoRA weights change, finite loss, the importance-sampling metrics and
  the sync time logged), and the engine starts once;
- on the same completions the loss equals the HF-generation trainer's (exactly with
  the sampler correction off; within the correction's float noise with it on);
- a resumed run ends with the adapter of an uninterrupted one (per-request seeds, the
  checkpoint's adapter synced into the new engine); Ctrl-C saves and shuts the engine.
"""

import dataclasses

import pytest
import torch

from fastrl.trainers import GRPOConfig, GRPOTrainer
from tests.support.engine import KV_CACHE_BYTES, hf_greedy, randomize_lora, tiny_qwen2

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

PROMPTS = ["w5 w6 w7", "w9 w10", "w12 w13 w14 w15", "w20"]


def even_share(prompts, completions, completion_ids, **kwargs):
    """Varies across sampled completions, so groups have non-zero advantages."""
    return [sum(i % 2 == 0 for i in ids) / (1 + len(ids)) for ids in completion_ids]


def _args(tmp_path, **overrides):
    kw = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=1,
        max_completion_length=8,
        max_steps=2,
        learning_rate=5e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_chat_template=False,
        use_vllm=True,
        vllm_max_model_length=64,
        vllm_kv_cache_memory_bytes=KV_CACHE_BYTES,
        vllm_enforce_eager=True,
    )
    kw.update(overrides)
    return GRPOConfig(**kw)


def _trainer(tmp_path, tokenizer, model=None, **overrides):

    if model is None:
        model = _model()
    data = [{"prompt": p} for p in PROMPTS]
    args = _args(tmp_path, **overrides)
    return GRPOTrainer(model, even_share, args=args, train_dataset=data, processing_class=tokenizer)


def _model():
    """The tiny Qwen2 with the same LoRA weights each call (A drawn from the seeded global
    RNG by peft, B random and non-zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        tiny_qwen2(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    randomize_lora(model, 1, std=0.1)
    return model


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _greedy_through_the_trainer(trainer, tokenizer):
    """The trainer's own vLLM path (its sync rule included), greedy, on PROMPTS."""
    trainer._vllm_sampling = dataclasses.replace(trainer._vllm_sampling, do_sample=False)
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ids = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(e) for e in encoded], batch_first=True, padding_side="left"
    )
    mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones(len(e), dtype=torch.long) for e in encoded],
        batch_first=True,
        padding_side="left",
    )
    completions, logps = trainer._generate_vllm(ids, mask)
    out = []
    for row, lp in zip(completions.tolist(), logps, strict=True):
        n = row.index(1) + 1 if 1 in row else len(row)
        out.append(row[:n])
        assert torch.isfinite(lp[:n]).all()
    return encoded, out


def test_engine_follows_the_adapter_through_training(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=3)
    model = trainer.model
    encoded, before = _greedy_through_the_trainer(trainer, tokenizer)
    assert before == [hf_greedy(model, p, 8) for p in encoded]
    engine = trainer._vllm
    trainer._vllm_sampling = dataclasses.replace(trainer._vllm_sampling, do_sample=True)

    lora_before = _lora_state(model)
    trainer.train()
    assert trainer._vllm is engine  # started once, kept across train()
    assert any(not torch.equal(p, lora_before[n]) for n, p in _lora_state(model).items())
    _, after = _greedy_through_the_trainer(trainer, tokenizer)
    assert trainer._synced_step == trainer.state.global_step == 3
    assert after == [hf_greedy(model, p, 8) for p in encoded]
    assert after != before  # the adapter moved, and the engine has the new one

    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    for key in ("loss", "reward", "vllm/sync_seconds", "vllm/generate_seconds",
                "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                "sampling/importance_sampling_ratio/max"):  # fmt: skip
        assert key in logs, key
    assert all(
        torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e
    )
    # the sampler is the policy (float32 both sides): the ratio is 1 to float noise
    assert logs["sampling/sampling_logp_difference/max"] < 1e-3
    assert abs(logs["sampling/importance_sampling_ratio/mean"] - 1) < 1e-3
    trainer.close_vllm()
    assert trainer._vllm is None


@pytest.mark.parametrize("correction", [False, True])
def test_loss_equals_the_hf_generation_trainers_on_the_same_completions(
    tmp_path, tokenizer, correction
):
    """One generation batch from the engine; the HF-generation trainer (same model, same
    adapter) handed the same completions gives the same loss."""
    from peft import LoraConfig, get_peft_model

    def model():
        m = get_peft_model(
            tiny_qwen2(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
        )
        randomize_lora(m, 1, std=0.1)
        return m

    kw = dict(vllm_importance_sampling_correction=correction, beta=0.05, loss_type="grpo")
    ours = _trainer(tmp_path / "vllm", tokenizer, model=model(), **kw)
    hf = _trainer(tmp_path / "hf", tokenizer, model=model(), **{**kw, "use_vllm": False})
    rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(4)]
    ours.model.train()
    hf.model.train()
    batch = ours._generate_and_score(rows)[0]
    assert ("sampling_logps" in batch) is correction
    hf._generate = lambda ids, mask: batch["completion_ids"]  # the engine's completions
    hf_batch = hf._generate_and_score(rows)[0]
    torch.testing.assert_close(hf_batch["completion_ids"], batch["completion_ids"], rtol=0, atol=0)
    torch.testing.assert_close(hf_batch["advantages"], batch["advantages"])
    loss = ours.compute_loss(ours.model, batch)
    hf_loss = hf.compute_loss(hf.model, hf_batch)
    loss.backward()
    hf_loss.backward()
    assert torch.isfinite(loss) and loss.abs() > 1e-4  # the KL term: not a zero loss
    # with the correction, its ratio exp(old - sampler) is 1 to ~1e-5 here (float32 both)
    tol = dict(rtol=1e-4, atol=1e-6) if correction else dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(loss, hf_loss, **tol)
    grads = {n: p.grad for n, p in ours.model.named_parameters() if p.grad is not None}
    hf_grads = {n: p.grad for n, p in hf.model.named_parameters() if p.grad is not None}
    assert grads.keys() == hf_grads.keys() and len(grads) > 0
    assert any(g.abs().max() > 1e-3 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, hf_grads[name], **tol)
    ours.close_vllm()


def test_resume_ends_with_the_uninterrupted_adapter(tmp_path, tokenizer):
    full = _trainer(tmp_path / "full", tokenizer, max_steps=3)
    full.train()
    expected = _lora_state(full.model)
    full.close_vllm()

    first = _trainer(tmp_path / "run", tokenizer, max_steps=3, save_strategy="steps", save_steps=2)
    first.train()
    first.close_vllm()
    resumed = _trainer(tmp_path / "run", tokenizer, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed._synced_step == 2  # the checkpoint's adapter went into the new engine
    for name, value in _lora_state(resumed.model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    resumed.close_vllm()


def test_ctrl_c_saves_a_checkpoint_and_shuts_the_engine(tmp_path, tokenizer):
    calls = []

    def interrupting(prompts, completions, completion_ids, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return even_share(prompts, completions, completion_ids)

    trainer = _trainer(tmp_path, tokenizer, max_steps=3)
    trainer.reward_funcs = [interrupting]
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "checkpoint-1").is_dir()
    assert trainer._vllm is None
