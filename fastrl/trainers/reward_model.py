"""Reward models: a sequence-classification LM with one output (``num_labels=1``), LoRA
on its blocks and its ``score`` head trainable, scored without ``[tokens, 1]`` outputs.

- `load_reward_model` takes a checkpoint directory (a causal-LM checkpoint gets a fresh
  ``score`` head, as TRL's `RewardTrainer` loads it), a sequence-classification model
  object with ``num_labels=1``, or a peft model around one (kept as is); it freezes the
  base and adds LoRA with peft's ``SEQ_CLS`` task type, which puts ``score`` in
  ``modules_to_save`` (a trainable ``[1, d]`` copy, saved with the adapter).
- `sequence_rewards` runs the backbone only and applies the score head to the hidden state
  of each row's last attended token: ``[B]`` float32 rewards. The row's last attended
  token is the one transformers' own head reads (the last token that is not the pad id)
  unless the pad token occurs inside the text (a pad token equal to EOS, the EOS appended
  to plain-text pairs): transformers then skips the EOS and reads the token before it;
  fastrl reads the EOS, as OpenRLHF does.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

from fastrl.integrations import causal_lm_hidden_states
from fastrl.trainers.model import (
    _transformers_model,
    add_lora,
    enable_checkpointing,
    is_fsdp2,
    model_object,
    position_ids_from_mask,
    pretrained_kwargs,
)

__all__ = [
    "last_token_index",
    "load_reward_model",
    "quiet_load_report",
    "score_head",
    "sequence_rewards",
]

#: the names transformers' sequence-classification models give their head
SCORE_HEADS = ("score", "classifier")


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """transformers' weight-loading reports off (warnings of its loggers: a missing score
    head, the "layers not sharded" of a model's tensor-parallel plan): the callers read
    the loading info themselves and say what is wrong, in one line."""
    from transformers.utils import logging as hf_logging

    loggers = [hf_logging.get_logger(f"transformers.{name}")
               for name in ("modeling_utils", "distributed.tensor_parallel")]  # fmt: skip
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(hf_logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _check_seq_cls(model) -> None:
    base = _transformers_model(model)
    if getattr(base, "score", None) is None:
        raise ValueError(
            f"a reward model needs a sequence-classification model (a `score` head), got "
            f"{type(base).__name__}: load it with AutoModelForSequenceClassification"
            "(..., num_labels=1) or pass its checkpoint directory"
        )
    labels = getattr(base.config, "num_labels", None)
    if labels != 1:
        raise ValueError(
            f"a reward model outputs one scalar per sequence: the model has num_labels="
            f"{labels}, needs num_labels=1"
        )


def load_reward_model(
    model,
    *,
    lora: dict | None = None,
    load_in_4bit: bool = False,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = True,
):
    """A sequence-classification LM (``num_labels=1``) ready for LoRA reward training.

    Args:
        model: a checkpoint directory (or hub id) of a causal LM or of a sequence
            classifier, a ``transformers`` sequence-classification model with
            ``num_labels=1``, or a peft model around one (returned with its adapters).
        lora: `peft.LoraConfig` keyword arguments over `DEFAULT_LORA`; the task type is
            ``SEQ_CLS``, so the ``score`` head is trained and saved with the adapter.
        load_in_4bit, dtype, attn_implementation, gradient_checkpointing: as `load_model`.

    Returns:
        a `peft.PeftModel` whose trainable parameters are the LoRA adapters and the score
        head's copy.
    """
    from transformers import AutoModelForSequenceClassification

    if isinstance(model, (str, os.PathLike)):
        kwargs = pretrained_kwargs(dtype, attn_implementation, load_in_4bit)
        local = os.path.isdir(model)
        # a causal LM's checkpoint has no score head: transformers' report of it missing
        # is what is meant here (a new head), so only other missing weights are said
        with quiet_load_report():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                model, local_files_only=local, num_labels=1, output_loading_info=True, **kwargs
            )
        missing = [k for k in info.get("missing_keys") or () if k.split(".")[0] not in SCORE_HEADS]
        if missing:
            warnings.warn(
                f"weights missing from the checkpoint, initialised at random: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}",
                stacklevel=2,
            )
    else:
        model = model_object(model, load_in_4bit=load_in_4bit, dtype=dtype)
    _check_seq_cls(model)
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None):
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos

    model = add_lora(model, "SEQ_CLS", lora)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def score_head(model) -> torch.nn.Module:
    """The ``score`` head (peft's wrapper: the trained copy while adapters are on)."""
    return _transformers_model(model).score


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of each row's last attended position (any padding side)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(1)


def _pooled_rewards(base, input_ids, attention_mask, position_ids) -> torch.Tensor:
    hidden = causal_lm_hidden_states(
        base, input_ids, attention_mask, position_ids=position_ids, use_cache=False
    )
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]  # [B, d]
    head = base.score
    return head(last.to(head.weight.dtype)).squeeze(-1).float()


@contextlib.contextmanager
def forward_returns_rewards(model) -> Iterator[None]:
    """Within the block, calling `model` (or a wrapper of it: peft, DDP, FSDP2, accelerate's
    autocast) returns ``[B]`` float32 rewards (`sequence_rewards`'s): the call goes
    through the outermost wrapper, so its hooks (gradient reduction, parameter gathering)
    fire, and the score head runs on ``[B, d]`` only."""
    base = _transformers_model(model)

    def forward(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        # peft passes its optional arguments explicitly: None, or return_dict
        unused = {k: v for k, v in kwargs.items() if v is not None and v is not False}
        for name in ("use_cache", "return_dict"):
            unused.pop(name, None)
        if unused:
            raise ValueError(f"unexpected forward arguments for a reward forward: {sorted(unused)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return _pooled_rewards(base, input_ids, attention_mask, position_ids)

    base.forward = forward
    try:
        yield
    finally:
        del base.forward


def sequence_rewards(model, input_ids, attention_mask, *, unwrapped=None) -> torch.Tensor:
    """``[B]`` float32 rewards: the score head on each row's last attended hidden state.

    Args:
        model: the reward model, or the engine's wrapper of `unwrapped` (the peft model).
        input_ids, attention_mask: ``[B, L]``, either padding side; positions are counted
            from each row's first attended token.
    """
    inner = model if unwrapped is None else unwrapped
    positions = position_ids_from_mask(attention_mask)
    if is_fsdp2(model) or unwrapped is not None:
        with forward_returns_rewards(inner):
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    return _pooled_rewards(_transformers_model(model), input_ids, attention_mask, positions)
