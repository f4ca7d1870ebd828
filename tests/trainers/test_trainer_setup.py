"""Trainer building blocks: model setup with LoRA, the adapters-off reference, data."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastrl.trainers import model as model_module
from fastrl.trainers.data import load_data, render_prompt, require_columns
from fastrl.trainers.model import (
    completion_positions,
    default_attn_implementation,
    last_hidden_states,
    load_model,
    reference_adapters_off,
)

CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=97, tie_word_embeddings=True)  # fmt: skip


def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG))


def test_load_model_lora_everywhere_but_the_head():
    model = load_model(tiny(), gradient_checkpointing=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not model.get_base_model().lm_head.weight.requires_grad


def test_load_model_from_local_checkpoint(tmp_path):
    tiny().save_pretrained(tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt", lora=dict(r=4), gradient_checkpointing=True)
    assert model.peft_config["default"].r == 4
    base = model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing


def test_reference_is_the_base_with_adapters_off():
    base = tiny()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = base.model(input_ids=ids).last_hidden_state.clone()
    model = load_model(base, gradient_checkpointing=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapters matter
    with reference_adapters_off(model):
        ref = last_hidden_states(model, ids)
    pol = last_hidden_states(model, ids)
    torch.testing.assert_close(ref, expected)
    assert (pol - expected).abs().max() > 1e-3 and pol.requires_grad and not ref.requires_grad
    with pytest.raises(ValueError, match="peft model"):
        with reference_adapters_off(base):
            pass


def test_completion_positions():
    h = torch.arange(10.0).view(1, 10, 1)  # prompt of 4, completion of 6
    assert completion_positions(h, 4)[0, :, 0].tolist() == [3, 4, 5, 6, 7, 8]


def test_load_model_bad_input():
    with pytest.raises(TypeError, match="model must be a path"):
        load_model(42)
    with pytest.raises(ValueError, match="load_in_4bit"):
        load_model(tiny(), load_in_4bit=True)


def _fake_cuda(monkeypatch, *, bf16=True, flash_attn=True):
    """A CUDA device (bf16-capable or not) and flash-attn installed or not, on any machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(model_module, "_has", lambda name: flash_attn or name != "flash_attn")


def test_default_attn_implementation_needs_half_precision(monkeypatch):
    _fake_cuda(monkeypatch)
    assert default_attn_implementation() == "flash_attention_2"  # default dtype: bf16
    assert default_attn_implementation(torch.bfloat16) == "flash_attention_2"
    assert default_attn_implementation(torch.float16) == "flash_attention_2"
    assert default_attn_implementation(torch.float32) == "sdpa"  # FA2 cannot load in fp32
    _fake_cuda(monkeypatch, bf16=False)  # a GPU without bf16: the default dtype is fp32
    assert default_attn_implementation() == "sdpa"
    _fake_cuda(monkeypatch, flash_attn=False)
    assert default_attn_implementation(torch.bfloat16) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_attn_implementation(torch.bfloat16) == "sdpa"


@pytest.mark.parametrize(
    "dtype, bf16_gpu, expected",
    [
        (None, True, (torch.bfloat16, "flash_attention_2")),
        (torch.float32, True, (torch.float32, "sdpa")),  # model_dtype="float32"
        (None, False, (torch.float32, "sdpa")),  # a GPU without bf16
        (torch.float16, False, (torch.float16, "flash_attention_2")),
    ],
)
def test_load_model_attn_follows_the_resolved_dtype(
    monkeypatch, tmp_path, dtype, bf16_gpu, expected
):
    import transformers

    _fake_cuda(monkeypatch, bf16=bf16_gpu)
    seen = {}

    class Loaded(Exception):
        pass

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(Loaded):
        load_model(tmp_path, dtype=dtype)
    assert (seen["dtype"], seen["attn_implementation"]) == expected


def test_load_data_sources(tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("prompt,answer\n1+1=,2\n2+2=,4\n")
    load_data(rows).to_parquet(str(tmp_path / "d.parquet"))
    for src in (rows, {"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]},
                tmp_path / "d.jsonl", tmp_path / "d.parquet"):  # fmt: skip
        ds = load_data(src)
        assert ds["prompt"] == ["1+1=", "2+2="] and ds["answer"] == ["2", "4"]
    assert load_data(str(tmp_path / "d.csv"))["prompt"] == ["1+1=", "2+2="]
    with pytest.raises(ValueError, match="unknown format '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        load_data(tmp_path / "d.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load_data(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"missing \['chosen'\]"):
        require_columns(load_data(rows), ("prompt", "chosen"), "DPO")


def test_render_prompt_chat_template():
    class Tok:
        chat_template = None

    assert render_prompt(Tok(), "2+2=") == "2+2="
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt(Tok(), [{"role": "user", "content": "hi"}])


def test_metric_windows_merge_over_processes():
    from fastrl.trainers.base import merge_metric_windows

    # per process: {name: (sum, count)} of its non-NaN values over the logging window
    rank0 = {"kl": (3.0, 2), "clip_ratio/low_min": (0.2, 2), "clip_ratio/high_max": (0.5, 1),
             "reward": (0.0, 0)}  # fmt: skip
    rank1 = {"kl": (1.0, 2), "clip_ratio/low_min": (0.6, 2), "clip_ratio/high_max": (0.3, 1)}
    assert merge_metric_windows([rank0, rank1]) == {
        "kl": 1.0,  # the mean of every value: (3 + 1) / (2 + 2)
        "clip_ratio/low_min": 0.1,  # the min of the processes' means, 0.1 and 0.3
        "clip_ratio/high_max": 0.5,  # the max of 0.5 and 0.3
    }  # "reward" has no value anywhere: left out
    # one process: every metric is its window mean
    assert merge_metric_windows([rank0]) == {
        "kl": 1.5, "clip_ratio/low_min": 0.1, "clip_ratio/high_max": 0.5,
    }  # fmt: skip
