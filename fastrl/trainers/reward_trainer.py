"""Reward models (Bradley-Terry) with LoRA on `transformers.Trainer`, TRL 1.16's semantics.

`RewardTrainer` adds to `transformers.Trainer` (through `BaseTrainer` and `OfflineTrainer`):

- the model through `load_reward_model`: a sequence classifier with one output, LoRA on
  every linear layer of the blocks, the ``[1, d]`` ``score`` head trained in full;
- the data: ``chosen`` / ``rejected`` columns (and optionally ``prompt``, prepended to
  both, and ``margin``), strings or chat messages, tokenized as TRL's `RewardTrainer`
  tokenizes them (plain text: EOS appended, the tokenizer's special tokens added; chat
  messages: the chat template); pairs longer than ``max_length`` are dropped;
- a collator whose rows are ``[chosen; rejected]``, right-padded (TRL's layout);
- `compute_loss`: the rewards ``r`` of each row (`sequence_rewards`: the score head on the
  last attended hidden state), `reward_loss` on them, TRL's metrics (``accuracy``,
  ``margin``, ``min_reward`` / ``mean_reward`` / ``max_reward``) plus ``rewards/chosen``
  and ``rewards/rejected``; evaluation logs them with ``eval_`` (held-out pairwise
  accuracy is ``eval_accuracy``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastrl.trainers.console import no_progress_bars
from fastrl.trainers.data import (
    REWARD_COLUMNS,
    REWARD_TOKEN_COLUMNS,
    load_data,
    require_columns,
)
from fastrl.trainers.offline import OfflineTrainer
from fastrl.trainers.reward_config import RewardConfig
from fastrl.trainers.reward_model import load_reward_model, sequence_rewards

__all__ = ["RewardCollator", "RewardTrainer", "reward_loss", "tokenize_reward_dataset"]


# ------------------------------------------------------------------------------ loss


def reward_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a batch of pairs, as TRL 1.16's `RewardTrainer`:
    ``mean(-logsigmoid(r_c - r_r - margin)) + coef * mean((r_c + r_r)^2)``.

    Args:
        rewards_chosen, rewards_rejected: ``[B]`` rewards (float32 recommended).
        margin: ``[B]`` required margins (TRL's ``margin`` column), or None (0).
        center_rewards_coefficient: weight of the centring term, or None (off).

    Returns:
        the 0-d loss and 0-d metrics named as TRL logs them (``accuracy``: share of pairs
        with ``r_c > r_r``, ties count 0; ``margin``: mean ``r_c - r_r``;
        ``min_reward`` / ``mean_reward`` / ``max_reward`` over both rows) plus
        ``rewards/chosen`` and ``rewards/rejected`` (means).
    """
    if rewards_chosen.shape != rewards_rejected.shape or rewards_chosen.dim() != 1:
        raise ValueError(
            f"rewards_chosen and rewards_rejected must be [B] tensors of one shape, got "
            f"{tuple(rewards_chosen.shape)} and {tuple(rewards_rejected.shape)}"
        )
    diff = rewards_chosen - rewards_rejected
    if margin is not None:
        if margin.shape != diff.shape:
            raise ValueError(f"margin must be [B]={tuple(diff.shape)}, got {tuple(margin.shape)}")
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((rewards_chosen + rewards_rejected) ** 2).mean()
    with torch.no_grad():
        both = torch.cat([rewards_chosen, rewards_rejected])
        metrics = {
            "accuracy": (rewards_chosen > rewards_rejected).float().mean(),
            "margin": (rewards_chosen - rewards_rejected).mean(),
            "min_reward": both.min(),
            "mean_reward": both.mean(),
            "max_reward": both.max(),
            "rewards/chosen": rewards_chosen.mean(),
            "rewards/rejected": rewards_rejected.mean(),
        }
    return loss, metrics


# ------------------------------------------------------------------------------ data


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) for m in x)


def _tokenize_pair(tokenizer, row: dict) -> dict[str, list[int]]:
    """``chosen_ids`` / ``rejected_ids`` of one row, as TRL 1.16's `RewardTrainer`."""
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")
    parts = [chosen, rejected] + ([] if prompt is None else [prompt])
    if all(_is_messages(x) for x in parts):
        if tokenizer.chat_template is None:
            raise ValueError("conversational pairs need a tokenizer with a chat_template")
        texts = [(prompt or []) + chosen, (prompt or []) + rejected]
        ids = [
            tokenizer.apply_chat_template(t, tokenize=True, return_dict=True)["input_ids"]
            for t in texts
        ]
    elif all(isinstance(x, str) for x in parts):
        eos = tokenizer.eos_token
        if eos is None:
            raise ValueError("plain-text pairs need a tokenizer with an eos_token")
        texts = [c if c.endswith(eos) else c + eos for c in (chosen, rejected)]
        texts = [(prompt or "") + t for t in texts]
        ids = [tokenizer(t)["input_ids"] for t in texts]
    else:
        kinds = {k: type(row[k]).__name__ for k in ("prompt", "chosen", "rejected") if k in row}
        raise ValueError(  # the data's, not a caller's argument: one line at the CLI
            "reward pairs: prompt, chosen and rejected must be all strings or all lists of "
            f"chat messages in a row, got {kinds}"
        )
    return dict(chosen_ids=ids[0], rejected_ids=ids[1])


def tokenize_reward_dataset(
    dataset, tokenizer, *, max_length: int | None = RewardConfig.max_length, num_proc=None
):
    """A dataset of pairs with ``chosen_ids`` / ``rejected_ids`` columns.

    ``dataset`` is anything `load_data` takes, with ``chosen`` and ``rejected`` columns
    (an optional ``prompt`` is prepended to both; an optional ``margin`` is kept); a
    dataset with the token columns already is only filtered. Pairs whose chosen or
    rejected sequence is longer than ``max_length`` are dropped, with a warning.
    """
    dataset = load_data(dataset)
    if not all(c in dataset.column_names for c in REWARD_TOKEN_COLUMNS):
        require_columns(dataset, REWARD_COLUMNS, "a reward model")
        dataset = dataset.map(
            lambda row: _tokenize_pair(tokenizer, row),
            num_proc=num_proc,
            desc="Tokenizing reward pairs",
        )
    if "margin" in dataset.column_names:
        bad = [m for m in dataset["margin"] if not isinstance(m, (int, float)) or m != m]
        if bad:
            raise ValueError(f"the margin column must hold numbers, got {bad[:3]}")
    if max_length is not None:
        n = len(dataset)
        with no_progress_bars():
            dataset = dataset.filter(
                lambda r: (
                    len(r["chosen_ids"]) <= max_length and len(r["rejected_ids"]) <= max_length
                ),
                num_proc=num_proc,
            )
        if len(dataset) < n:
            warnings.warn(
                f"dropped {n - len(dataset)} of {n} reward pairs longer than "
                f"max_length={max_length} (as TRL)",
                stacklevel=2,
            )
        if len(dataset) == 0:
            raise ValueError(f"every pair is longer than max_length={max_length}: raise it")
    return dataset


@dataclass
class RewardCollator:
    """Batches of pairs, rows ``[chosen; rejected]``, right-padded (TRL's
    ``DataCollatorForPreference``): ``input_ids`` / ``attention_mask`` ``[2B, L]`` and,
    when the rows have it, ``margin`` ``[B]`` float32."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [list(e["chosen_ids"]) for e in examples]
        seqs += [list(e["rejected_ids"]) for e in examples]
        if not all(seqs):
            raise ValueError("a pair has an empty chosen_ids or rejected_ids")
        width = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, : len(s)] = 1
        batch = dict(input_ids=input_ids, attention_mask=attention_mask)
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
        return batch


# --------------------------------------------------------------------------- trainer


class RewardTrainer(OfflineTrainer):
    """LoRA reward-model training (Bradley-Terry, TRL 1.16's loss) on `transformers.Trainer`.

    Args:
        model: a checkpoint directory of a causal LM (a fresh score head is added) or of a
            sequence classifier, a ``transformers`` sequence-classification model with
            ``num_labels=1`` (LoRA is added) or a peft model around one (used as is).
        args: a `RewardConfig` (default: ``RewardConfig("fastrl-reward")``).
        train_dataset, eval_dataset: anything `load_data` takes, with ``chosen`` and
            ``rejected`` columns (strings or chat messages), optionally ``prompt`` and
            ``margin``; or tokenized ``chosen_ids`` / ``rejected_ids``. ``eval_dataset``
            may be a dict of named datasets.
        processing_class: the tokenizer (loaded from ``model`` when that is a path); its
            pad token (else its EOS) pads the batches.
        callbacks, optimizers: as `transformers.Trainer`.

    The saved checkpoint (``save_model``) is the LoRA adapter with the score head, and the
    tokenizer: `fastrl.trainers.rewards.RewardModel` loads it as a GRPO reward function.
    """

    loss_is_scaled_for_ga = False  # the loss is a mean over the micro-batch's pairs
    algorithm = "reward-model"
    memory_options = ("per_device_train_batch_size", "max_length")
    non_finite_hint = "check the margin column and the data for empty pairs"

    def __init__(
        self,
        model,
        args: RewardConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = self._config(args, RewardConfig, "fastrl-reward")
        if train_dataset is None:
            raise ValueError("RewardTrainer needs a train_dataset")
        tokenizer, model = self._tokenizer_and_model(model, args, processing_class)
        model.config.pad_token_id = tokenizer.pad_token_id
        super().__init__(
            model,
            args,
            data_collator=RewardCollator(tokenizer.pad_token_id, args.pad_to_multiple_of),
            train_dataset=self._tokenize(train_dataset, args, tokenizer),
            eval_dataset=self._tokenize(eval_dataset, args, tokenizer, split="test"),
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
        )

    @staticmethod
    def _load_model(model, args: RewardConfig):
        from peft import PeftModel
        from transformers import set_seed

        from fastrl.trainers.model import cap_cuda_memory

        cap_cuda_memory(args.max_memory_gb)
        set_seed(args.seed)  # the score head and LoRA initialisations draw from it
        return load_reward_model(
            model,
            lora=None if isinstance(model, PeftModel) else args.lora_kwargs(),
            gradient_checkpointing=bool(args.activation_checkpointing),
            **args.load_model_kwargs(),
        )

    @staticmethod
    def _tokenize_split(dataset, args, tokenizer):
        return tokenize_reward_dataset(
            dataset,
            tokenizer,
            max_length=args.max_length,
            num_proc=args.dataset_num_proc,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, att = inputs["input_ids"], inputs["attention_mask"]
        unwrapped = self.accelerator.unwrap_model(model)
        # through the engine's wrapper (DDP / FSDP2 hooks fire), the score head on [B, d]
        rewards = sequence_rewards(model, ids, att, unwrapped=unwrapped)
        chosen, rejected = rewards.chunk(2)
        loss, metrics = reward_loss(
            chosen,
            rejected,
            margin=inputs.get("margin"),
            center_rewards_coefficient=self.args.center_rewards_coefficient,
        )
        self._record_step(loss, metrics, inputs, train=model.training, tokens=att.sum())
        return (loss, rewards) if return_outputs else loss
