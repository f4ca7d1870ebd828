"""patch_model: a patched transformers causal LM (tiny Llama, Qwen2, Gemma-2 with its
final-logit softcap; with and without peft LoRA) gives the original model's loss, the
log-probs and entropies of its logits at the shifted labels, and the same LoRA gradients,
without logits; undo restores the original forward.

Tolerance: the original computes the fp32 logits with one matmul and a full-row
log-softmax, fastrl's head in vocabulary blocks with an online logsumexp: ``rtol=1e-5``
and ``atol=2e-6 * max(1, max|original|)`` (fp32 rounding of the same sums).
"""

import weakref

import pytest
import torch

from fastrl.integrations import CausalLMLogProbsOutput, ModelPatch, patch_model
from tests.support.models import small_causal_lm

MODELS = {
    "llama-tied": lambda: small_causal_lm("llama", tie_word_embeddings=True),
    "qwen2": lambda: small_causal_lm("qwen2", tie_word_embeddings=False),
    "gemma2-softcap": lambda: small_causal_lm(
        "gemma2", final_logit_softcapping=3.0, attn_logit_softcapping=None
    ),
}


def _close(got, want, what=""):
    atol = 2e-6 * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _model(name, lora):
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():  # random init is tiny; spread the logits like a real model's
        model.get_output_embeddings().weight.mul_(20.0)
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        )
        model = get_peft_model(model, config)
    return model.train()


def _batch():
    ids = torch.randint(0, 101, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :4] = -100  # a prompt
    return ids, mask, labels


def _expected(logits, labels, temperature=1.0):
    """log-probs and entropies of the original logits at transformers' shifted labels."""
    z = logits.double()[:, :-1] / temperature
    target = labels[:, 1:]
    keep = target != -100
    lp = torch.log_softmax(z, -1)
    logp = lp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * keep
    ent = -(lp.exp() * lp).sum(-1) * keep
    pad = torch.zeros(logits.shape[0], 1, dtype=torch.float64)
    return torch.cat([logp, pad], 1), torch.cat([ent, pad], 1)


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", MODELS, ids=str)
def test_patched_model_matches_original(name, lora):
    model = _model(name, lora)
    ids, mask, labels = _batch()
    original = model(input_ids=ids, attention_mask=mask, labels=labels)
    original.loss.backward()
    want_grads = {n: p.grad.clone() for n, p in _trainable(model)}
    model.zero_grad()
    if lora:  # only the adapters train; the tied/untied heads are frozen
        assert all("lora_" in n for n in want_grads)
    want_logp, want_ent = _expected(original.logits.detach(), labels)
    assert want_logp.std() > 0.5  # the head's transforms (softcap) matter at this scale

    with patch_model(model, return_entropy=True, impl="torch") as patch:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert isinstance(out, CausalLMLogProbsOutput) and out.logits is None
        _close(out.loss, original.loss.detach(), "loss")
        _close(out.logprobs.double(), want_logp, "logprobs")
        _close(out.entropy.double(), want_ent, "entropy")
        out.loss.backward()
        for n, p in _trainable(model):
            _close(p.grad, want_grads[n], n)
        assert patch.calls == 1
    assert not patch.active
    again = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert again.logits is not None  # the original forward is back
    _close(again.loss.detach(), original.loss.detach(), "loss after undo")


def test_triton_head_and_temperature():
    model = _model("gemma2-softcap", lora=True)
    ids, mask, labels = _batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    want_logp, _ = _expected(logits, labels, temperature=0.7)
    patch = patch_model(model, temperature=0.7, impl="triton")
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.entropy is None
    _close(out.logprobs.double(), want_logp, "logprobs")
    with_entropy = model(input_ids=ids, attention_mask=mask, labels=labels, return_entropy=True)
    assert with_entropy.entropy is not None and with_entropy.entropy.abs().sum() > 0
    patch.undo()


def test_num_items_in_batch_and_shift_labels():
    model = _model("qwen2", lora=False)
    ids, mask, labels = _batch()
    n = torch.tensor(40)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    with torch.no_grad(), patch_model(model, impl="torch"):
        got = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        by_shift = model(input_ids=ids, attention_mask=mask, shift_labels=shifted)
        plain = model(input_ids=ids, attention_mask=mask, labels=labels)
    _close(got.loss, want.loss, "loss / num_items_in_batch")
    _close(by_shift.logprobs, got.logprobs, "shift_labels")
    _close(plain.loss * (labels[:, 1:] != -100).sum() / 40, got.loss, "mean vs sum")


def test_without_labels_the_original_forward_runs():
    model = _model("llama-tied", lora=True)
    ids, mask, _ = _batch()
    with patch_model(model) as patch:
        out = model(input_ids=ids, attention_mask=mask)
        assert out.logits is not None and out.logits.shape == (3, 11, 101)
        assert patch.fallback_calls == 1 and patch.calls == 0


def test_patch_twice_replaces_and_undo_restores_the_class_forward():
    model = _model("qwen2", lora=False)
    first = patch_model(model)
    second = patch_model(model, return_entropy=True)
    assert not first.active and second.active
    first.undo()  # a no-op: replaced
    assert second.active
    second.undo()
    assert "forward" not in vars(model)
    import inspect

    assert "labels" in inspect.signature(patch_model(model).model.forward).parameters


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logits_to_keep=1), ValueError, "logits_to_keep"),
        (dict(return_dict=False), ValueError, "return_dict"),
        (dict(return_entropy="yes"), TypeError, "return_entropy"),
        (dict(labels=torch.zeros(3, 4, dtype=torch.long)), ValueError, "labels must have shape"),
        (dict(shift_labels=torch.zeros(3, 11, dtype=torch.long)), ValueError, "not both"),
    ],
)
def test_bad_calls_are_refused(kwargs, error, match):
    model = _model("qwen2", lora=False)
    ids, mask, labels = _batch()
    call = dict(input_ids=ids, attention_mask=mask, labels=labels) | kwargs
    with patch_model(model), pytest.raises(error, match=match):
        model(**call)


def test_bad_patches_are_refused():
    model = _model("qwen2", lora=False)
    with pytest.raises(ValueError, match="temperature"):
        patch_model(model, temperature=0.0)
    with pytest.raises(ValueError, match="impl"):
        patch_model(model, impl="cuda")
    with pytest.raises(TypeError, match="get_decoder"):
        patch_model(torch.nn.Linear(3, 3))
    from peft import LoraConfig, get_peft_model

    on_head = get_peft_model(_model("qwen2", False), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(TypeError, match="nn.Linear"):
        patch_model(on_head)
    ids, mask, labels = _batch()
    with patch_model(model), pytest.raises(ValueError, match="by keyword"):
        model(ids, mask, None, labels=labels)
    assert isinstance(patch_model(model), ModelPatch)


def test_under_bf16_autocast_the_head_runs_in_bf16():
    """An fp32 model under bf16 autocast: the original lm_head runs in bf16, so the
    patched head casts the hidden states and the weight to bf16 too. Both then sit at bf16
    rounding from the fp32 log-probs; fastrl's (fp32 accumulation) is asserted no further
    from them than the original's (its bf16 logits) is, up to 2x."""
    model = _model("qwen2", lora=False)
    ids, mask, labels = _batch()
    with torch.no_grad():
        exact, _ = _expected(model(input_ids=ids, attention_mask=mask).logits, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            original = model(input_ids=ids, attention_mask=mask, labels=labels)
            with patch_model(model, impl="torch"):
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert original.logits.dtype == torch.bfloat16 and out.logprobs.dtype == torch.float32
    original_err = (_expected(original.logits.float(), labels)[0] - exact).abs().max()
    err = (out.logprobs.double() - exact).abs().max()
    assert 0 < err <= 2 * original_err, (err, original_err)


def test_under_bf16_autocast_the_graph_keeps_no_bf16_weight_copy(monkeypatch):
    """An fp32 model with a trainable lm_head under bf16 autocast: the head gets the weight
    cast to bf16, and the graph keeps a handle that casts it again in the backward, not
    the [V, d] bf16 copy (alive after the forward only if the graph saved it). Gradients
    equal those of the same head on a plain ``weight.to(bf16)`` (saved by the graph)."""
    import fastrl.integrations.model as model_module
    from fastrl import linear_logprobs

    model = _model("qwen2", lora=False)
    ids, mask, labels = _batch()
    weight = model.get_output_embeddings().weight
    copies = []

    def recorded(hidden, w, *args, **kwargs):
        copies.append(weakref.ref(w))
        assert w.dtype == torch.bfloat16 and w.shape == weight.shape
        return linear_logprobs(hidden, w, *args, **kwargs)

    monkeypatch.setattr(model_module, "linear_logprobs", recorded)
    with torch.autocast("cpu", dtype=torch.bfloat16), patch_model(model, impl="torch"):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert len(copies) == 1 and copies[0]() is None, "the graph kept the bf16 [V, d] copy"
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in _trainable(model)}
    model.zero_grad()

    # the same head on the plainly cast weight
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    logps = linear_logprobs(hidden.bfloat16(), weight.bfloat16(), targets, impl="torch")
    (-logps.sum() / (targets != -100).sum()).backward()
    assert got["lm_head.weight"].abs().sum() > 0
    for n, p in _trainable(model):
        torch.testing.assert_close(got[n], p.grad, rtol=0, atol=0, msg=n)
