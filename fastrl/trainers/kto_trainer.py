"""KTO (TRL 1.16's ``KTOTrainer``) with LoRA, without logits.

`KTOTrainer` is a thin `transformers.Trainer` on `ReferenceTrainer`, as `DPOTrainer`:

- the data: ``prompt`` / ``completion`` / ``label`` columns (strings or chat messages; a
  ``prompt`` / ``chosen`` / ``rejected`` dataset is unpaired first with
  `unpair_preference_dataset`, as TRL does), tokenized as TRL 1.16 tokenizes them (prompt
  and prompt + completion together, split where they diverge; EOS appended to plain-text
  completions), truncated as `DPOTrainer` truncates;
- a collator whose rows are ``[completions; KL pairs]``: row ``B + i`` is prompt ``i``
  with the completion of row ``i - 1`` (cyclically), the mismatched pairs TRL's KL
  estimate is made of;
- `compute_loss`: the backbone only (no ``[tokens, vocab]`` logits); the completion rows'
  hidden states and the frozen lm_head weight into `fastrl.linear_logprobs` with
  gradient, the KL rows' without; the reference (adapters off, per batch or once over the
  dataset with ``precompute_ref_log_probs``) over both; then `fastrl.kto_loss`, with
  TRL's KL reference point ``max(0, mean over processes of mean(kl_logps - ref_kl_logps))``;
- the metrics TRL logs (``kl``, ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``entropy``, ``logits/chosen``,
  ``logits/rejected`` (from ``h . mean_v W``: no logits), ``num_tokens``)
  through `BaseTrainer`'s windows; a batch without desirable (or undesirable) rows logs
  nothing for that kind.
"""

from __future__ import annotations

import warnings

import torch

from fastrl import kto_loss, linear_logprobs
from fastrl.checks import IGNORE_INDEX
from fastrl.integrations.logit_sums import vocab_sums
from fastrl.trainers.data import load_data, require_columns
from fastrl.trainers.dpo_trainer import (
    _check_prompt_ids,
    _drop_full_prompts,
    _prompt_completion_rows,
    _scored_targets,
    _sequence_logps,
    _tokenize_example,
)
from fastrl.trainers.kto_config import KTOConfig
from fastrl.trainers.offline import ReferenceTrainer, completion_hidden

__all__ = [
    "KTOCollator",
    "KTOTrainer",
    "tokenize_unpaired_dataset",
    "unpair_preference_dataset",
]

UNPAIRED_COLUMNS = ("prompt", "completion", "label")
UNPAIRED_TOKEN_COLUMNS = ("prompt_ids", "completion_ids", "label")
KTO_REFERENCE_COLUMNS = ("ref_logps", "ref_KL_logps")  # TRL's names


def unpair_preference_dataset(dataset, num_proc: int | None = None):
    """A paired preference dataset (``prompt``, ``chosen``, ``rejected``) as KTO's unpaired
    one, as TRL's ``unpair_preference_dataset``: each block of rows (datasets' batched map,
    1000 rows) becomes its chosen completions (``label`` True) then its rejected ones
    (False), each with its prompt; other columns are duplicated with them.

    ``dataset`` is anything `load_data` takes.
    """
    dataset = load_data(dataset)
    require_columns(dataset, ("chosen", "rejected"), "unpair_preference_dataset")

    def unpair(batch):
        n = len(batch["chosen"])
        out = {"completion": batch["chosen"] + batch["rejected"], "label": [True] * n + [False] * n}
        for k, v in batch.items():
            if k not in ("chosen", "rejected"):
                out[k] = v + v
        return out

    return dataset.map(
        unpair, batched=True, remove_columns=["chosen", "rejected"], num_proc=num_proc
    )


def _check_label(label) -> bool:
    if isinstance(label, bool) or label in (0, 1):  # 0/1 ints as well (True == 1)
        return bool(label)
    raise ValueError(f"the label column must hold booleans (True: desirable) or 0/1, got {label!r}")


def tokenize_unpaired_dataset(
    dataset,
    tokenizer,
    *,
    use_chat_template: bool = True,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    max_length: int | None = KTOConfig.max_length,
    num_proc: int | None = None,
):
    """An unpaired dataset with ``prompt_ids`` / ``completion_ids`` / ``label`` columns.

    ``dataset`` is anything `load_data` takes, with ``prompt``, ``completion`` and ``label``
    columns (strings or chat messages; labels bool or 0/1), or paired ``prompt`` /
    ``chosen`` / ``rejected`` columns, unpaired first (`unpair_preference_dataset`). A
    dataset that already has the token columns is returned as is. Tokenization and
    truncation as `fastrl.trainers.dpo_trainer.tokenize_preference_dataset`; rows whose
    prompt alone fills ``max_length`` are dropped, with a warning.
    """
    dataset = load_data(dataset)
    if all(c in dataset.column_names for c in UNPAIRED_TOKEN_COLUMNS):
        return dataset
    columns = dataset.column_names
    if "completion" not in columns and {"chosen", "rejected"} <= set(columns):
        dataset = unpair_preference_dataset(dataset, num_proc=num_proc)
    require_columns(dataset, UNPAIRED_COLUMNS, "KTO (or prompt, chosen, rejected pairs)")
    options = dict(
        use_chat_template=use_chat_template,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        max_length=max_length,
    )

    def tokenize(row):
        label = _check_label(row["label"])
        # the pair tokenizer with the completion on both sides: its chosen side is ours
        out = _tokenize_example(
            tokenizer, row["prompt"], row["completion"], row["completion"], **options
        )
        _check_prompt_ids(out["prompt_ids"], row["prompt"])
        return dict(prompt_ids=out["prompt_ids"], completion_ids=out["chosen_ids"], label=label)

    dataset = dataset.map(tokenize, num_proc=num_proc, desc="Tokenizing KTO completions")
    return _drop_full_prompts(dataset, max_length, num_proc, "completions", "completion")


def _warn_on_unbalanced_weights(labels, args: KTOConfig) -> None:
    """TRL's warning: with unequal numbers of desirable (n_d) and undesirable (n_u)
    completions, the KTO paper's Eq. (8) asks for ``desirable_weight * n_d /
    (undesirable_weight * n_u)`` in [1, 4/3]; say which weights would do when neither is
    in range. With no completion on one side no weight balances them (TRL counts it as
    one): that is said instead."""
    n_d = sum(bool(x) for x in labels)
    n_u = len(labels) - n_d
    if n_d == n_u:
        return
    if not (n_d and n_u):
        side, label = ("undesirable", True) if n_u == 0 else ("desirable", False)
        warnings.warn(
            f"no {side} completions (every label is {label}) among {len(labels)}: only the "
            f"{'desirable' if n_u == 0 else 'undesirable'} side of the KTO loss trains, and "
            "--desirable_weight / --undesirable_weight cannot balance the two",
            stacklevel=3,
        )
        return
    d, u = args.desirable_weight, args.undesirable_weight
    d_range = (round(n_u * u / n_d, 2), round(n_u * u / n_d * 1.33, 2))
    u_range = (round(n_d * d / n_u / 1.33, 2), round(n_d * d / n_u, 2))
    if not (d_range[0] <= d <= d_range[1] or u_range[0] <= u <= u_range[1]):
        warnings.warn(
            f"{n_d} desirable and {n_u} undesirable completions: with these counts the KTO "
            f"paper recommends EITHER --desirable_weight in [{d_range[0]}, {d_range[1]}] OR "
            f"--undesirable_weight in [{u_range[0]}, {u_range[1]}] (now {d} and {u})",
            stacklevel=3,
        )


class KTOCollator:
    """Batches of unpaired completions, rows ``[completions; KL pairs]``.

    Each row is ``[prompt, left-padded to P | completion, right-padded to C]``. With
    ``kl`` (``loss_type="kto"``) row ``B + i`` pairs prompt ``i`` with the completion of
    example ``i - 1`` (example ``B - 1`` for ``i = 0``): TRL's rotation of the batch's
    completions by one.

    - ``input_ids`` / ``attention_mask`` ``[R, P + C]`` (``R = 2B`` with ``kl``, else ``B``);
    - ``completion_mask`` ``[R, C]``, the last ``C`` columns of ``input_ids``;
    - ``label`` ``[B]`` bool; ``ref_logps`` / ``ref_KL_logps`` ``[B]`` when the rows have them.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, kl: bool = True):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.kl = kl

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [list(e["prompt_ids"]) for e in examples]
        if not all(prompts):
            raise ValueError("an example has an empty prompt_ids: nothing predicts its first token")
        completions = [list(e["completion_ids"]) for e in examples]
        if self.kl:
            prompts = prompts * 2
            completions = completions + completions[-1:] + completions[:-1]
        batch = _prompt_completion_rows(
            prompts, completions, self.pad_token_id, self.pad_to_multiple_of
        )
        batch["label"] = torch.tensor(
            [_check_label(e["label"]) for e in examples], dtype=torch.bool
        )
        for name in KTO_REFERENCE_COLUMNS:
            if name in examples[0]:
                batch[name] = torch.tensor([e[name] for e in examples], dtype=torch.float32)
        return batch


@torch.no_grad()
def _mean_logits(hidden, weight, head_kwargs: dict) -> torch.Tensor | None:
    """``[B, T]`` float32 mean over the vocabulary of each position's logits (divided by
    the temperature), without the logits: ``(h . mean_v W + mean_v b) / temperature``;
    None under a softcap, which is not linear."""
    if head_kwargs.get("softcap") is not None:
        return None
    col_sum, bias_sum = vocab_sums(weight, head_kwargs.get("bias"))
    out = hidden.detach().float() @ col_sum
    if bias_sum is not None:
        out = out + bias_sum
    return out / (weight.shape[0] * head_kwargs.get("temperature", 1.0))


def _rows(batch: dict[str, torch.Tensor], part: slice) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "completion_mask")
    return {k: batch[k][part] for k in keys}


class KTOTrainer(ReferenceTrainer):
    """LoRA KTO (``loss_type`` ``"kto"`` or ``"apo_zero_unpaired"``) on `transformers.Trainer`.

    Args:
        model: a local checkpoint directory (or hub id where a network exists), a
            ``transformers`` causal LM (LoRA is added by `load_model`) or a peft model. The
            reference policy is the same model with its adapters disabled.
        args: a `KTOConfig` (default: ``KTOConfig("fastrl-kto")``).
        train_dataset, eval_dataset: anything `load_data` takes, with ``prompt``,
            ``completion`` and ``label`` columns (strings or chat messages; label True for a
            desirable completion), or paired ``prompt`` / ``chosen`` / ``rejected`` columns
            (unpaired as TRL does). Optional ``ref_logps`` / ``ref_KL_logps`` columns are
            used as the reference log-probs. ``eval_dataset`` may be a dict of datasets.
        processing_class: the tokenizer (loaded from ``model`` when that is a path).
        callbacks, optimizers, compute_metrics: as `transformers.Trainer`.
    """

    # the loss is a mean over the micro-batch's completions: Trainer divides it by the
    # number of gradient-accumulation steps
    loss_is_scaled_for_ga = False
    algorithm = "KTO"
    memory_options = ("per_device_train_batch_size", "max_length", "max_completion_length")
    non_finite_hint = "check the data for empty or degenerate completions"

    def __init__(
        self,
        model,
        args: KTOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        compute_metrics=None,
    ):
        args = self._config(args, KTOConfig, "fastrl-kto")
        args.check_loss_options()
        tokenizer, model = self._tokenizer_and_model(model, args, processing_class)
        collator = KTOCollator(tokenizer.pad_token_id, args.pad_to_multiple_of, args.uses_kl)
        super().__init__(
            model,
            args,
            data_collator=collator,
            train_dataset=self._tokenize(train_dataset, args, tokenizer),
            eval_dataset=self._tokenize(eval_dataset, args, tokenizer, split="test"),
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.loss_kwargs = args.kto_loss_kwargs()
        if self.train_dataset is not None:
            _warn_on_unbalanced_weights(self.train_dataset["label"], args)
        self.train_dataset = self._with_reference(self.train_dataset)
        self.eval_dataset = self._with_reference(self.eval_dataset, train=False)

    # ---------------------------------------------------------------------- data

    @staticmethod
    def _tokenize_split(dataset, args, tokenizer):
        return tokenize_unpaired_dataset(dataset, tokenizer, **args.tokenize_kwargs())

    def _reference_batch_size(self, train: bool) -> int:
        # the KL pairs' reference log-probs belong to the batches they are used in
        args = self.args
        return args.per_device_train_batch_size if train else args.per_device_eval_batch_size

    # ---------------------------------------------------------------- reference

    def reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B]`` reference log-probs of a collated batch's completions and, with the KL
        term, ``[B]`` of its KL pairs: one forward of the model with its adapters off."""
        model = self.accelerator.unwrap_model(self.model)
        seq, _ = _sequence_logps(
            model, batch, adapters=False, impl=self.args.kernel_impl,
            autocast=self.accelerator.autocast(),
        )  # fmt: skip
        seq = seq.float()
        B = batch["label"].shape[0]
        return seq[:B], (seq[B:] if self.args.uses_kl else None)

    @property
    def reference_columns(self) -> tuple[str, ...]:
        # the KL pairs' too with the KL term; with it the precomputation's batches must
        # be the training ones (KTOConfig refuses a precompute_ref_batch_size there)
        return KTO_REFERENCE_COLUMNS if self.args.uses_kl else KTO_REFERENCE_COLUMNS[:1]

    # ---------------------------------------------------------------------- loss

    def _kl_reference_point(self, kl_logps, ref_kl_logps):
        """`kto_loss`'s KL inputs: this batch's pairs on one process; with several, each
        process's mean gathered (TRL averages the processes' means, then clamps)."""
        if self.accelerator.num_processes == 1:
            return dict(kl_logps=kl_logps, ref_kl_logps=ref_kl_logps)
        local = (kl_logps.float() - ref_kl_logps.float()).mean().reshape(1)
        gathered = self.accelerator.gather(local)
        return dict(kl_logps=gathered, ref_kl_logps=torch.zeros_like(gathered))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets, mask, P = _scored_targets(inputs)
        labels = inputs["label"]
        B = labels.shape[0]
        uses_kl = self.args.uses_kl
        if uses_kl and targets.shape[0] != 2 * B:
            raise ValueError(
                f"loss_type='kto' needs batch rows [completions; KL pairs] (2 x {B}), got "
                f"{targets.shape[0]}: use KTOCollator(kl=True)"
            )
        unwrapped = self.accelerator.unwrap_model(model)
        # the reference: precomputed columns, or one forward of every row, adapters off
        if "ref_logps" in inputs and (not uses_kl or "ref_KL_logps" in inputs):
            ref, ref_kl = inputs["ref_logps"], inputs.get("ref_KL_logps")
        else:
            ref, ref_kl = self.reference_logps(inputs)
        kl = {}
        if uses_kl:  # the policy on the mismatched pairs: no gradient, as TRL
            kl_logps, _ = _sequence_logps(
                unwrapped, _rows(inputs, slice(B, None)), adapters=True,
                impl=self.args.kernel_impl, autocast=self.accelerator.autocast(),
            )  # fmt: skip
            kl = self._kl_reference_point(kl_logps, ref_kl)
        # the policy: adapters on, with grad, through the engine's wrapper (DDP included)
        ids, att = inputs["input_ids"][:B], inputs["attention_mask"][:B]
        h, head = completion_hidden(model, unwrapped, ids, att, P)
        completion = mask[:B].bool()
        scored = torch.where(completion, targets[:B], IGNORE_INDEX)
        with head.gathered() as (weight, head_kw):
            logps, entropy = linear_logprobs(
                h, weight, scored, impl=self.args.kernel_impl, return_entropy=True, **head_kw
            )
            mean_logits = _mean_logits(h, weight, head_kw)
        loss, metrics = kto_loss(logps.sum(1), ref, labels, **kl, **self.loss_kwargs)
        if mean_logits is not None:  # TRL's logits/chosen, logits/rejected; NaN if none
            for kind, rows in (("chosen", labels), ("rejected", ~labels)):
                scored_rows = completion & rows[:, None]
                total = torch.where(scored_rows, mean_logits, 0).sum()
                metrics[f"logits/{kind}"] = total / scored_rows.sum()
        # TRL's entropy: the mean over the completion tokens
        metrics["entropy"] = entropy.detach().sum() / completion.sum().clamp(min=1)
        self._record_step(loss, metrics, inputs, train=model.training, tokens=att.sum())
        return (loss, metrics) if return_outputs else loss

    def _batch_summary(self, inputs) -> str:
        if inputs is None or "label" not in inputs:
            return super()._batch_summary(inputs)
        B = inputs["label"].shape[0]
        lengths = inputs["completion_mask"][:B].sum(1).tolist()
        return f", completion lengths {lengths}, labels {inputs['label'].int().tolist()}"
