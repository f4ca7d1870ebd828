"""The tiny random Llama the parity and trainer tests train, and its in-code tokenizer:
word-level, `w<i>` is token i + 3 (0, 1, 2: pad, eos, unk)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

V = 64  # vocabulary


def tiny_tokenizer():
    """The word-level tokenizer of the module docstring (`V` tokens)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(V - 3)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_model():
    """A fresh float32 `LlamaForCausalLM` (2 layers, hidden 16), the same weights each call."""
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # livelier logits than the 0.02-std init: ratios far from 1
        model.lm_head.weight.mul_(40)
    return model.float()


# transformers' own causal LMs at a small random size (the integration and patch_model
# tests): d=32, an odd vocabulary (101, so vocabulary tails show), 2 layers, 4 query and
# 2 key/value heads
SMALL_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=101, head_dim=8,
)  # fmt: skip
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config"),
    "cohere": ("CohereForCausalLM", "CohereConfig"),
}


def small_causal_lm(architecture: str, **config):
    """A fresh ``architecture`` (``llama``, ``qwen2``, ``gemma2``, ``cohere``) causal LM
    of `SMALL_CONFIG` with ``config`` on top: random weights, float32."""
    model_cls, config_cls = (getattr(transformers, n) for n in _ARCHITECTURES[architecture])
    return model_cls(config_cls(**SMALL_CONFIG, **config))
