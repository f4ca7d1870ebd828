"""DPO (and the rest of the offline preference family) with LoRA, without logits.

`DPOTrainer` is a thin `transformers.Trainer`: the engine does the optimizer, scheduler,
gradient accumulation, checkpointing (the LoRA adapter only), logging, `report_to` and
accelerate / DDP; this module adds what DPO needs on top:

- the model through `load_model` (LoRA on every linear layer of the blocks, base and
  lm_head frozen, gradient checkpointing);
- the data: ``prompt`` / ``chosen`` / ``rejected`` columns, strings or chat messages,
  tokenized as TRL 1.16's ``DPOTrainer`` tokenizes them (prompt and prompt + completion
  tokenized together, split where they diverge; EOS appended to plain-text completions),
  truncated to ``max_prompt_length`` / ``max_completion_length`` / ``max_length``;
- a collator whose batch rows are ``[chosen; rejected]``, each laid out
  ``[left-padded prompt | right-padded completion]``;
- `compute_loss`: the backbone only (no ``[tokens, vocab]`` logits), its hidden states at
  the completion positions and the frozen lm_head weight into
  `fastrl.fused_preference_loss`; the reference is the same model with its adapters off
  (per batch, or once over the dataset with ``precompute_ref_log_probs``); reference-free
  losses (CPO, SimPO, AlphaPO, ORPO) skip it;
- the loss's metrics (``rewards/*``, ``logps/*``, ...) averaged over the logging window
  and the processes, ``num_tokens``, ``tokens_per_second`` and, on CUDA,
  ``peak_memory_gib``; a non-finite loss stops the run with a message, an out-of-memory
  error says what to lower; Ctrl-C saves a checkpoint of the last completed step
  (`resume_from_checkpoint` continues from it). These, the model and tokenizer set-up
  are `BaseTrainer`'s, shared with GRPO; the datasets' tokenization (in `evaluate` too),
  the loss-only evaluation and the precomputed reference are `ReferenceTrainer`'s
  (`fastrl.trainers.offline`), shared with KTO.

`evaluate_preference_accuracy` measures how often a policy prefers the chosen completion
of held-out pairs.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from fastrl import fused_preference_loss, ld_tail_logps, linear_logprobs
from fastrl.checks import IGNORE_INDEX
from fastrl.integrations import lm_head
from fastrl.trainers.console import no_progress_bars
from fastrl.trainers.data import (
    PREFERENCE_COLUMNS,
    PREFERENCE_TOKEN_COLUMNS,
    REFERENCE_LOGPS_COLUMNS,
    join_message_contents,
    load_data,
    render_prompt,
    require_columns,
)
from fastrl.trainers.dpo_config import (
    DPOConfig,
)
from fastrl.trainers.model import (
    completion_positions,
    last_hidden_states,
    reference_adapters_off,
)
from fastrl.trainers.offline import ReferenceTrainer, completion_hidden

__all__ = [
    "DPOTrainer",
    "PreferenceCollator",
    "evaluate_preference_accuracy",
    "tokenize_preference_dataset",
]


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _as_messages(x, role: str) -> list[dict]:
    return x if isinstance(x, list) else [{"role": role, "content": x}]


def _tokenize_example(
    tokenizer,
    prompt,
    chosen,
    rejected,
    *,
    use_chat_template: bool,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    max_length: int | None,
) -> dict[str, list[int]]:
    """Token ids of one pair as TRL 1.16's DPOTrainer makes them, then truncated.

    Conversational (chat-message prompt, or a string prompt with ``use_chat_template`` and
    a tokenizer that has a template; string completions become assistant turns): the
    prompt is rendered with the generation prompt, prompt + completion as the whole
    conversation, both tokenized without extra special tokens. Plain text: prompt and
    prompt + completion tokenized with the tokenizer's special tokens, EOS appended to the
    completion unless it ends with one. The completion starts where the tokenized prompt
    and prompt + completion diverge (usually the prompt's end).
    """
    conversational = isinstance(prompt, list) or (
        use_chat_template and isinstance(prompt, str) and tokenizer.chat_template is not None
    )
    if conversational:
        messages = _as_messages(prompt, "user")
        prompt_text = render_prompt(tokenizer, messages)
        full = [
            tokenizer.apply_chat_template(messages + _as_messages(c, "assistant"), tokenize=False)
            for c in (chosen, rejected)
        ]
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in full]
    else:
        prompt_text = render_prompt(tokenizer, prompt, use_chat_template=False)
        prompt_ids = tokenizer(prompt_text)["input_ids"]
        full_texts = [prompt_text + join_message_contents(c) for c in (chosen, rejected)]
        full_ids = [tokenizer(t)["input_ids"] for t in full_texts]
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("plain-text completions need a tokenizer with an eos_token")
        full_ids = [ids if ids and ids[-1] == eos else ids + [eos] for ids in full_ids]
    n = min(_common_prefix_length(prompt_ids, ids) for ids in full_ids)
    prompt_ids = prompt_ids[:n]
    chosen_ids, rejected_ids = (ids[n:] for ids in full_ids)
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if max_completion_length is not None:
        chosen_ids, rejected_ids = (
            chosen_ids[:max_completion_length],
            rejected_ids[:max_completion_length],
        )
    if max_length is not None:
        room = max(max_length - len(prompt_ids), 0)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return dict(prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids)


def tokenize_preference_dataset(
    dataset,
    tokenizer,
    *,
    use_chat_template: bool = True,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    max_length: int | None = DPOConfig.max_length,
    num_proc: int | None = None,
):
    """A preference dataset with ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` columns.

    ``dataset`` is anything `load_data` takes, with ``prompt``, ``chosen`` and ``rejected``
    columns (strings or chat messages); a dataset that already has the token columns is
    returned as is. Rows whose prompt alone fills ``max_length`` are dropped (no
    completion token would be left), with a warning; the other columns are kept.
    """
    dataset = load_data(dataset)
    if all(c in dataset.column_names for c in PREFERENCE_TOKEN_COLUMNS):
        return dataset
    require_columns(dataset, PREFERENCE_COLUMNS, "DPO")
    options = dict(
        use_chat_template=use_chat_template,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        max_length=max_length,
    )

    def tokenize(row):
        out = _tokenize_example(tokenizer, row["prompt"], row["chosen"], row["rejected"], **options)
        _check_prompt_ids(out["prompt_ids"], row["prompt"])
        return out

    dataset = dataset.map(tokenize, num_proc=num_proc, desc="Tokenizing preference pairs")
    return _drop_full_prompts(dataset, max_length, num_proc, "preference pairs", "pair")


def _check_prompt_ids(prompt_ids: list[int], prompt) -> None:
    if not prompt_ids:
        raise ValueError(
            f"prompt {prompt!r} has no tokens: the first completion token would have "
            "nothing to be predicted from (use a tokenizer with a BOS token or a non-empty "
            "prompt)"
        )


def _drop_full_prompts(dataset, max_length: int | None, num_proc, rows: str, row: str):
    """``dataset`` without the rows whose ``prompt_ids`` alone fill ``max_length`` (no
    completion token would be left), with a warning that counts the ``rows`` dropped;
    ValueError where that drops every ``row``."""
    if max_length is None:
        return dataset
    n = len(dataset)
    with no_progress_bars():
        dataset = dataset.filter(lambda r: len(r["prompt_ids"]) < max_length, num_proc=num_proc)
    if len(dataset) < n:
        warnings.warn(
            f"dropped {n - len(dataset)} of {n} {rows} whose prompt alone fills "
            f"max_length={max_length}",
            stacklevel=3,  # the caller of the tokenize_* function
        )
    if len(dataset) == 0:
        raise ValueError(f"every {row}'s prompt fills max_length={max_length}: raise it")
    return dataset


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _prompt_completion_rows(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    pad_to_multiple_of: int | None,
) -> dict[str, torch.Tensor]:
    """Rows ``[prompt, left-padded to P | completion, right-padded to C]`` (``P``, ``C``
    the longest, rounded up to ``pad_to_multiple_of``; ``C >= 1``): ``input_ids`` and
    ``attention_mask`` ``[R, P + C]``, ``completion_mask`` ``[R, C]`` (their last ``C``
    columns)."""
    P = _round_up(max(len(p) for p in prompts), pad_to_multiple_of)
    C = _round_up(max(1, max(len(c) for c in completions)), pad_to_multiple_of)
    rows = len(prompts)
    input_ids = torch.full((rows, P + C), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, P - len(p) : P + len(c)] = 1
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=attention_mask[:, P:].clone(),
    )


@dataclass
class PreferenceCollator:
    """Batches of preference pairs, rows ``[chosen; rejected]``.

    Each row is ``[prompt, left-padded to P | completion, right-padded to C]``:

    - ``input_ids`` ``[2B, P + C]``, ``attention_mask`` ``[2B, P + C]``;
    - ``completion_mask`` ``[2B, C]``: 1 on the completion tokens, the last ``C`` columns
      of ``input_ids`` (so ``P = input_ids.shape[1] - completion_mask.shape[1]`` and the
      hidden states predicting the completion are ``hidden[:, P - 1 : -1]``);
    - ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]`` when the rows have them.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [list(e["prompt_ids"]) for e in examples] * 2
        if not all(prompts):
            raise ValueError("a pair has an empty prompt_ids: nothing predicts its first token")
        completions = [list(e["chosen_ids"]) for e in examples]
        completions += [list(e["rejected_ids"]) for e in examples]
        batch = _prompt_completion_rows(
            prompts, completions, self.pad_token_id, self.pad_to_multiple_of
        )
        for name in REFERENCE_LOGPS_COLUMNS:
            if name in examples[0]:
                batch[name] = torch.tensor([e[name] for e in examples], dtype=torch.float32)
        return batch


# ---------------------------------------------------------------------- model plumbing


def _scored_targets(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    mask = batch["completion_mask"]
    P = batch["input_ids"].shape[1] - mask.shape[1]
    return batch["input_ids"][:, P:], mask, P


@torch.no_grad()
def _sequence_logps(model, batch, *, adapters: bool, impl: str, ld_alpha=None, autocast=None):
    """``[2B]`` summed completion log-probs of ``model`` (adapters on or off), in eval
    mode; with ``ld_alpha``, LD-DPO's weighted sums (shared part + ld_alpha * tail, the
    values TRL stores as precomputed reference log-probs). Also returns the lengths.
    ``autocast``: the mixed-precision context the backbone runs under (as the policy's
    forward does under accelerate); the head runs outside it, in the weight's dtype."""
    targets, mask, P = _scored_targets(batch)
    was_training = model.training
    model.eval()
    try:
        with reference_adapters_off(model) if not adapters else contextlib.nullcontext():
            with autocast if autocast is not None else contextlib.nullcontext():
                hidden = last_hidden_states(model, batch["input_ids"], batch["attention_mask"])
            head = lm_head(model)
            h = completion_positions(hidden, P).to(head.weight.dtype)
            scored = torch.where(mask.bool(), targets, IGNORE_INDEX)
            with head.gathered() as (weight, kw):  # shards
                logps = linear_logprobs(h, weight, scored, impl=impl, **kw)
    finally:
        model.train(was_training)
    seq = logps.sum(1)
    if ld_alpha is not None:
        tails = torch.cat(ld_tail_logps(logps, mask))
        seq = (seq - tails) + ld_alpha * tails
    return seq, mask.sum(1)


# --------------------------------------------------------------------------- trainer


class DPOTrainer(ReferenceTrainer):
    """LoRA DPO (and the rest of `fastrl.preference_loss`'s family) on `transformers.Trainer`.

    Args:
        model: a local checkpoint directory (or hub id where a network exists), a
            ``transformers`` causal LM (LoRA is added by `load_model`) or a peft model
            (used with its adapters). The reference policy is the same model with its
            adapters disabled: no second copy. (TRL 1.16, given a peft model, keeps a
            frozen copy of its adapter as the reference instead; to train against a
            LoRA-fine-tuned policy here, merge that adapter into the base first.)
        args: a `DPOConfig` (default: ``DPOConfig("fastrl-dpo")``).
        train_dataset, eval_dataset: anything `load_data` takes (rows, columns, a
            ``datasets.Dataset``, a local JSONL/CSV/parquet file), with ``prompt``,
            ``chosen`` and ``rejected`` columns, strings or chat messages. Optional
            ``ref_chosen_logps`` / ``ref_rejected_logps`` columns are used as the reference
            log-probs. ``eval_dataset`` may also be a dict of named datasets.
        processing_class: the tokenizer (loaded from ``model`` when that is a path). Its
            pad token (else its EOS) pads the batches.
        callbacks, optimizers, compute_metrics: as `transformers.Trainer`.
    """

    # the loss is a mean over the micro-batch's pairs: let Trainer divide it by the number
    # of gradient-accumulation steps
    loss_is_scaled_for_ga = False
    algorithm = "DPO"
    memory_options = ("per_device_train_batch_size", "max_length", "max_completion_length")
    non_finite_hint = "check the data for empty or degenerate pairs"

    def __init__(
        self,
        model,
        args: DPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        compute_metrics=None,
    ):
        args = self._config(args, DPOConfig, "fastrl-dpo")
        args.check_loss_options()
        tokenizer, model = self._tokenizer_and_model(model, args, processing_class)
        super().__init__(
            model,
            args,
            data_collator=PreferenceCollator(tokenizer.pad_token_id, args.pad_to_multiple_of),
            train_dataset=self._tokenize(train_dataset, args, tokenizer),
            eval_dataset=self._tokenize(eval_dataset, args, tokenizer, split="test"),
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.loss_kwargs = args.preference_loss_kwargs()
        self.train_dataset = self._with_reference(self.train_dataset)
        self.eval_dataset = self._with_reference(self.eval_dataset, train=False)

    # ---------------------------------------------------------------------- data

    @staticmethod
    def _tokenize_split(dataset, args, tokenizer):
        return tokenize_preference_dataset(dataset, tokenizer, **args.tokenize_kwargs())

    # ---------------------------------------------------------------- reference

    @property
    def uses_reference(self) -> bool:
        return not self.args.reference_free

    def reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B], [B])`` reference log-probs of a collated batch: the model with its
        adapters off (LD-DPO-weighted with ``ld_alpha``, as TRL stores them)."""
        model = self.accelerator.unwrap_model(self.model)
        seq, _ = _sequence_logps(
            model,
            batch,
            adapters=False,
            ld_alpha=self.args.ld_alpha,
            impl=self.args.kernel_impl,
            autocast=self.accelerator.autocast(),
        )
        return tuple(seq.float().chunk(2))

    @property
    def reference_columns(self) -> tuple[str, ...]:
        return REFERENCE_LOGPS_COLUMNS

    # ---------------------------------------------------------------------- loss

    def _reference_inputs(self, inputs) -> dict[str, torch.Tensor]:
        """The reference arguments of `fused_preference_loss` for a collated batch: none
        for a reference-free loss, else the precomputed columns or a forward with the
        adapters off."""
        if not self.uses_reference:
            return {}
        if all(c in inputs for c in REFERENCE_LOGPS_COLUMNS):
            rc, rr = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            rc, rr = self.reference_logps(inputs)
        ref = dict(ref_chosen_logps=rc, ref_rejected_logps=rr)
        if self.args.ld_alpha is not None:  # the reference sums are already LD-weighted
            ref.update(ref_chosen_tail_logps=torch.zeros_like(rc))
            ref.update(ref_rejected_tail_logps=torch.zeros_like(rr))
        return ref

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets, mask, P = _scored_targets(inputs)
        ref = self._reference_inputs(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        # the policy: adapters on, with grad, through the engine's wrapper (DDP included)
        ids, att = inputs["input_ids"], inputs["attention_mask"]
        h, head = completion_hidden(model, unwrapped, ids, att, P)
        # the whole [V, d] under FSDP2 / ZeRO-3, gathered again for the backward's recompute
        with head.gathered() as (weight, kw):
            loss, metrics = fused_preference_loss(
                h, weight, targets, mask, impl=self.args.kernel_impl, **kw, **ref,
                **self.loss_kwargs,
            )  # fmt: skip
        self._record_step(loss, metrics, inputs, train=model.training, tokens=att.sum())
        return (loss, metrics) if return_outputs else loss


# ------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_preference_accuracy(
    trainer_or_model,
    tokenizer=None,
    pairs_dataset=None,
    *,
    reference_free: bool | None = None,
    batch_size: int = 32,
    use_chat_template: bool | None = None,
    max_length: int | None = None,
) -> float:
    """Share of held-out pairs whose chosen completion the policy prefers.

    With a reference (DPO loss types; a peft model), the preference is DPO's implicit
    reward margin ``(logp_c - ref_logp_c) - (logp_r - ref_logp_r) > 0``, the reference
    being the same model with its adapters off. Reference-free (CPO/SimPO/ORPO loss types,
    a model without adapters, or ``reference_free=True``): ``logp_c > logp_r``, on
    length-averaged log-probs where the loss averages them. Ties count one half, so a
    policy equal to its reference scores 0.5.

    Args:
        trainer_or_model: a `DPOTrainer` (its model, tokenizer, loss type and data options)
            or a causal LM / peft model.
        tokenizer: default the trainer's.
        pairs_dataset: ``prompt`` / ``chosen`` / ``rejected`` pairs (anything `load_data`
            takes), tokenized as the trainer tokenizes them.
        reference_free: override the choice above.
        batch_size: pairs per forward.
        use_chat_template, max_length: tokenization options (default: the trainer's, or
            `tokenize_preference_dataset`'s).
    """
    if pairs_dataset is None:
        raise ValueError("evaluate_preference_accuracy needs pairs_dataset")
    if isinstance(trainer_or_model, DPOTrainer):
        trainer = trainer_or_model
        model = trainer.accelerator.unwrap_model(trainer.model)
        tokenizer = trainer.processing_class if tokenizer is None else tokenizer
        args = trainer.args
        options = dict(
            use_chat_template=args.use_chat_template,
            max_prompt_length=args.max_prompt_length,
            max_completion_length=args.max_completion_length,
            max_length=args.max_length,
        )
        free = args.reference_free if reference_free is None else reference_free
        average = args.preference_loss_options().averaged
        impl = args.kernel_impl
    else:
        model = trainer_or_model
        if tokenizer is None:
            raise ValueError("evaluate_preference_accuracy needs the tokenizer for a model")
        options = {}  # tokenize_preference_dataset's defaults
        free = not hasattr(model, "disable_adapter") if reference_free is None else reference_free
        average, impl = False, DPOConfig.kernel_impl
    given = dict(use_chat_template=use_chat_template, max_length=max_length)
    options.update({k: v for k, v in given.items() if v is not None})
    data = tokenize_preference_dataset(pairs_dataset, tokenizer, **options)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PreferenceCollator(pad)
    device = next(model.parameters()).device
    score = 0.0
    rows = [data[i] for i in range(len(data))]
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        logps, lengths = _sequence_logps(model, batch, adapters=True, impl=impl)
        if not free:
            ref, _ = _sequence_logps(model, batch, adapters=False, impl=impl)
            logps = logps - ref
        elif average:
            logps = logps / lengths.clamp(min=1)
        c, r = logps.chunk(2)
        score += float((c > r).sum()) + 0.5 * float((c == r).sum())
    return score / len(rows)
