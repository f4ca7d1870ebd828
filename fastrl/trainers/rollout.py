"""What the trainers that sample completions share (GRPO, PPO): prompt encoding, HF
`generate` sampling, completion masks up to the first EOS, and the reward functions' call.

`RolloutMixin` goes before `BaseTrainer` in a trainer's bases. It reads from `self.args`
the generation options of `GRPOConfig` / `PPOConfig` (`use_chat_template`,
`max_prompt_length`, `max_completion_length`, the sampling options, `generation_kwargs`)
and from `self` `generation_config` (set with `_generation_config`), `reward_funcs`,
`reward_func_names` (set by `_set_reward_funcs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import GenerationConfig

from fastrl.trainers.data import render_prompt
from fastrl.trainers.model import init_fsdp_root
from fastrl.trainers.rewards import call_reward, reward_name

__all__ = ["RolloutMixin"]


def _token_ids(ids) -> list[int]:
    """An EOS setting (None, one id or several) as a list of ids."""
    return [ids] if isinstance(ids, int) else list(ids or [])


def _is_conversational(prompt) -> bool:
    return isinstance(prompt, list)


def _generation_config(args, tok, model) -> tuple[GenerationConfig, list[int]]:
    """`model.generate`'s settings (TRL's sampling options; `generation_kwargs` override
    the fields set here, as in TRL) and the EOS ids a completion ends at: the tokenizer's
    and the model's, unless `generation_kwargs` replace them."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    model_eos = _token_ids(getattr(model.generation_config, "eos_token_id", None))
    default_eos = list(dict.fromkeys(eos + model_eos))
    gen = dict(
        max_new_tokens=args.max_completion_length,
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=default_eos or None,
        use_cache=True,
    )
    config = GenerationConfig(**{**gen, **(args.generation_kwargs or {})})
    if config.stop_strings is not None:
        raise ValueError(
            f"generation_kwargs stop_strings={config.stop_strings!r} is not supported: a "
            "completion ends at its first EOS token (set eos_token_id instead)"
        )
    eos_token_ids = _token_ids(config.eos_token_id)
    if not eos_token_ids:
        raise ValueError(
            "no EOS token id: neither the tokenizer, the model's generation_config nor "
            "generation_kwargs has one, and a completion ends at its first EOS"
        )
    return config, eos_token_ids


def _left_padded(encoded: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, P]` prompt ids, left-padded to the longest, and their attention mask."""
    P = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), P), dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, P - len(row) :] = torch.tensor(row)
        mask[i, P - len(row) :] = 1
    return ids, mask


def _completion_mask(
    completion_ids: torch.Tensor, eos_token_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T]` mask of the completion tokens up to and including the first EOS, and
    `[B]` whether a completion has no EOS (truncated)."""
    T = completion_ids.shape[1]
    eos = torch.tensor(eos_token_ids, device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos)
    has_eos = is_eos.any(1)
    first = torch.where(
        has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, T, dtype=torch.long)
    )
    mask = (torch.arange(T, device=completion_ids.device)[None] <= first[:, None]).long()
    return mask, ~has_eos


class RolloutMixin:
    """Prompt encoding, sampling with `generate` and the reward call (module docstring)."""

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _encode_prompts(self, prompts) -> list[list[int]]:
        tok, args = self.processing_class, self.args
        out = []
        for prompt in prompts:
            text = render_prompt(tok, prompt, use_chat_template=args.use_chat_template)
            templated = _is_conversational(prompt) or (
                args.use_chat_template and tok.chat_template is not None
            )
            ids = tok(text, add_special_tokens=not templated)["input_ids"]
            if args.max_prompt_length is not None:
                ids = ids[-args.max_prompt_length :]
            if not ids:
                raise ValueError(f"prompt {prompt!r} has no tokens")
            out.append(ids)
        return out

    @torch.no_grad()
    def _generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """`[B, T]` sampled completion ids (adapters on, KV cache, eval mode, no grad)."""
        model = self._unwrapped()
        init_fsdp_root(model)  # generate calls the inner model: FSDP2 must know its root
        was_training = model.training
        model.eval()  # dropout off and the KV cache on (checkpointing disables it in train)
        try:
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=self.generation_config,
            )
        finally:
            model.train(was_training)
        return out[:, prompt_ids.shape[1] :]

    def _rewards(self, prompts, completions, rows, completion_ids) -> torch.Tensor:
        """`[B, K]` rewards (NaN where a function returned None)."""
        columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
        columns["completion_ids"] = completion_ids
        columns["trainer_state"] = self.state
        out = []
        for fn, name in zip(self.reward_funcs, self.reward_func_names, strict=True):
            values = call_reward(fn, prompts, completions, columns)
            for i, v in enumerate(values):
                if math.isinf(v):
                    raise ValueError(
                        f"reward function {name!r} returned {v} for sample {i} (prompt "
                        f"{prompts[i]!r}, completion {completions[i]!r}); return a finite "
                        "number, or None for no reward"
                    )
            out.append(values)
        device = self.accelerator.device
        return torch.tensor(out, dtype=torch.float32, device=device).T.contiguous()

    def _set_reward_funcs(self, reward_funcs, reward_weights) -> list[Callable]:
        """`reward_funcs` as a list, their logged names and their weights (default 1)."""
        funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if not funcs or not all(callable(f) for f in funcs):
            raise TypeError("reward_funcs must be a callable or a non-empty list of callables")
        weights = reward_weights if reward_weights is not None else [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} values for {len(funcs)} reward functions"
            )
        self.reward_funcs = funcs
        self.reward_func_names = [reward_name(f) for f in funcs]
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        return funcs
