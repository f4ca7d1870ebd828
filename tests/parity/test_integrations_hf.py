"""Hidden states + LMHead reproduce the models' own log-probs (tied, softcapped, scaled)."""

import pytest
import torch

from fastrl import linear_logprobs
from fastrl.integrations import causal_lm_hidden_states, lm_head
from tests.support.models import small_causal_lm

MODELS = {
    "llama-tied": lambda: small_causal_lm("llama", tie_word_embeddings=True),
    "llama-untied": lambda: small_causal_lm("llama", tie_word_embeddings=False),
    "gemma2-softcap": lambda: small_causal_lm(
        "gemma2", final_logit_softcapping=2.0, attn_logit_softcapping=None
    ),
    "cohere-logit-scale": lambda: small_causal_lm("cohere", logit_scale=0.25),
}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_hidden_states_and_head_match_model_logits(build, temperature):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # random init is tiny; make the logits spread like a real model's
        model.get_output_embeddings().weight.mul_(20.0)
    ids = torch.randint(0, 101, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    targets = torch.randint(0, 101, (3, 11))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double() / temperature
        expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        head = lm_head(model)
        hidden = causal_lm_hidden_states(model, ids, mask)
        got = linear_logprobs(
            hidden, head.weight, targets, impl="torch", **head.kwargs(temperature)
        )
    assert expected.std() > 0.5  # the head transforms matter at this scale
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)


def test_lm_head_under_peft_and_tied_weights():
    from peft import LoraConfig, get_peft_model

    model = MODELS["llama-tied"]()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    head = lm_head(peft_model)
    assert head.weight is model.model.embed_tokens.weight and not head.weight.requires_grad
    ids = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        h_adapted = causal_lm_hidden_states(peft_model, ids)
        with peft_model.disable_adapter():
            h_base = causal_lm_hidden_states(peft_model, ids)
        torch.testing.assert_close(h_base, model.model(input_ids=ids).last_hidden_state)
    assert h_adapted.shape == (2, 7, 32)
