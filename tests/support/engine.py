"""The tiny model the vLLM tests (tests/vllm) run on an engine, and HF's greedy decoding
to compare with: a float32 untied Qwen2 (head_dim 32, which vLLM's CPU attention
supports), livelier logits than its 0.02-std init, the vocabulary of
`tests.support.models` (pad 0, eos 1)."""

import torch

V = 64
#: the engine's KV cache in the tests: 64 MiB (the CPU default is GiBs)
KV_CACHE_BYTES = 64 * 2**20


def tiny_qwen2(seed: int = 0, vocab_size: int = V, tied: bool = False):
    """A fresh float32 `Qwen2ForCausalLM` (2 layers, hidden 64, head_dim 32), untied unless
    `tied`."""
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(cfg).float()
        with torch.no_grad():
            model.lm_head.weight.mul_(20)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model


def randomize_lora(peft_model, seed: int, std: float = 0.3) -> None:
    """Non-zero LoRA B (peft initialises it at 0: the adapter would be the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF `generate`'s greedy completion of one prompt (up to and including EOS)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=1,
            pad_token_id=0,
        )
    model.train(was)
    return out[0, len(prompt) :].tolist()
