"""Run a `transformers` causal LM without its logits: the backbone's last hidden states
plus a description of its output head, ready for fastrl's fused heads.

Works for any `*ForCausalLM` that exposes `get_decoder()` and `get_output_embeddings()`
(and for a peft model wrapping one): tied embeddings come for free (the head's weight is
the embedding matrix), Gemma-2's `final_logit_softcapping` becomes `softcap`, Cohere's
`logit_scale` and Granite's `logits_scaling` fold into the temperature.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastrl.integrations.gather import gathered_weight


@dataclass(frozen=True)
class LMHead:
    """What `linear_logprobs` needs to reproduce a model's logits.

    `kwargs(temperature)` gives `bias`, `temperature` and `softcap` such that
    `linear_logprobs(hidden, head.weight, targets, **head.kwargs(T))` equals
    `log_softmax(model(...).logits / T)` at `targets`.
    """

    weight: torch.Tensor  # [V, d]
    bias: torch.Tensor | None  # [V]
    softcap: float | None
    logit_scale: float  # logits = scale * (hidden @ weight.T + bias), before the softcap

    def kwargs(self, temperature: float = 1.0) -> dict:
        if self.softcap is not None and self.logit_scale != 1.0:
            raise ValueError(
                f"a model with both logit_scale={self.logit_scale} and final-logit softcap "
                f"{self.softcap} is not supported"
            )
        return dict(
            bias=self.bias, softcap=self.softcap, temperature=temperature / self.logit_scale
        )

    @contextlib.contextmanager
    def gathered(
        self, temperature: float = 1.0, *, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """``with head.gathered(T) as (weight, kw): linear_logprobs(hidden, weight, targets,
        **kw)``: the whole ``[V, d]`` weight (gathered from FSDP2 / ZeRO-3 shards, cast to
        `dtype` when given) and `kwargs(temperature)` with the bias gathered (and cast) the
        same way, for the head calls inside the block (see `gathered_weight`: the graph
        keeps a handle, not the gathered or cast copy)."""
        kw = self.kwargs(temperature)
        with gathered_weight(self.weight, self.bias, dtype=dtype) as (weight, bias):
            yield weight, {**kw, "bias": bias}


def _base(model: torch.nn.Module) -> torch.nn.Module:
    # peft's PeftModel wraps the transformers model; LoRA layers live inside it either way
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head(model: torch.nn.Module) -> LMHead:
    """The output head of a causal LM (or a peft model around one)."""
    base = _base(model)
    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"expected the model's output embeddings to be an nn.Linear, got {type(head).__name__}"
        )
    config = base.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere: logits * scale
    scaling = getattr(config, "logits_scaling", None)  # Granite: logits / scaling
    if scaling:
        scale /= float(scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LMHead(head.weight, head.bias, float(softcap) if softcap else None, scale)


def causal_lm_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """`[B, L, d]` last hidden states of the backbone (after the final norm), no logits.

    `kwargs` go to the decoder (`position_ids`, `past_key_values`, ...).
    """
    decoder = _base(model).get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state
