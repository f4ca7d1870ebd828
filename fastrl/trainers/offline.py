"""What the trainers on a fixed dataset (`DPOTrainer`, `KTOTrainer`, `RewardTrainer`)
share on top of `BaseTrainer`:

- `OfflineTrainer`: the datasets tokenized at construction and by `evaluate` (a dict of
  named datasets too), and an evaluation step that is the loss alone;
- `ReferenceTrainer`: the reference policy is the model with its adapters off, its
  log-probs optionally precomputed once as dataset columns
  (``precompute_ref_log_probs``);
- `completion_hidden`: the policy's completion hidden states and its lm_head, the start
  of DPO's and KTO's `compute_loss`; `disable_dropout` (their ``disable_dropout`` option).
"""

from __future__ import annotations

import torch

from fastrl.integrations import lm_head
from fastrl.trainers.base import BaseTrainer
from fastrl.trainers.data import load_data
from fastrl.trainers.model import backbone_hidden_states, completion_positions

__all__ = ["OfflineTrainer", "ReferenceTrainer", "completion_hidden", "disable_dropout"]


def disable_dropout(model) -> None:
    """Every dropout probability of ``model`` set to 0 (TRL's ``disable_dropout``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _is_columns(d: dict) -> bool:
    """A dict of columns (lists), as opposed to a dict of named datasets."""
    return all(isinstance(v, list) for v in d.values())


class OfflineTrainer(BaseTrainer):
    """A `BaseTrainer` whose datasets are tokenized by `_tokenize_split` and whose
    evaluation is its loss (no predictions)."""

    @staticmethod
    def _config(args, config_class: type, output_dir: str):
        """``args``, or ``config_class(output_dir)`` where None; TypeError for another
        class's."""
        args = config_class(output_dir) if args is None else args
        if not isinstance(args, config_class):
            name, got = config_class.__name__, type(args).__name__
            raise TypeError(f"args must be a fastrl {name}, got {got}")
        return args

    def _tokenizer_and_model(self, model, args, processing_class):
        """``(tokenizer, model)`` for `__init__`: `BaseTrainer`'s loading, then dropout
        off with ``args.disable_dropout``."""
        tokenizer = self._load_tokenizer(model, processing_class)
        model = self._load_model(model, args)
        if args.disable_dropout:
            disable_dropout(model)
        return tokenizer, model

    @staticmethod
    def _tokenize_split(dataset, args, tokenizer):
        """The token columns of one loaded dataset (`load_data`'s); idempotent."""
        raise NotImplementedError

    @classmethod
    def _tokenize(cls, dataset, args, tokenizer, split="train"):
        """Token columns for a dataset (or a dict of named ones); idempotent."""
        if dataset is None:
            return None
        if isinstance(dataset, dict) and not _is_columns(dataset):
            return {k: cls._tokenize(v, args, tokenizer, split) for k, v in dataset.items()}
        return cls._tokenize_split(load_data(dataset, split=split), args, tokenizer)

    def _with_reference(self, dataset, train: bool = True):
        """`dataset` with whatever the trainer precomputes over it (here nothing)."""
        return dataset

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """`Trainer.evaluate`; a dataset passed here is tokenized (and gets its reference
        log-probs, where the trainer precomputes them) as the trainer's own."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            tokenizer = self.processing_class
            eval_dataset = self._tokenize(eval_dataset, self.args, tokenizer, split="test")
            eval_dataset = self._with_reference(eval_dataset, train=False)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class ReferenceTrainer(OfflineTrainer):
    """An `OfflineTrainer` whose reference is the model with its adapters off; with
    ``args.precompute_ref_log_probs`` its datasets get `precompute_reference_logps`'s
    columns once, at construction and in `evaluate`."""

    @property
    def uses_reference(self) -> bool:
        return True

    @property
    def reference_columns(self) -> tuple[str, ...]:
        """The names of the columns `precompute_reference_logps` adds, in the order of
        `reference_logps`'s outputs."""
        raise NotImplementedError

    def reference_logps(self, batch) -> tuple[torch.Tensor | None, ...]:
        """The ``[B]`` reference log-probs of a collated batch, one per
        `reference_columns` name (extra outputs, None, are not columns)."""
        raise NotImplementedError

    def precompute_reference_logps(self, dataset, batch_size: int | None = None):
        """``dataset`` with the `reference_columns`, computed once with the adapters off
        over sequential batches of ``precompute_ref_batch_size``, else ``batch_size``,
        else ``per_device_train_batch_size`` (every process computes the whole dataset);
        returned as is where it has them already."""
        names = self.reference_columns
        if all(c in dataset.column_names for c in names):
            return dataset
        from torch.utils.data import DataLoader

        args = self.args
        size = args.precompute_ref_batch_size or batch_size or args.per_device_train_batch_size
        loader = DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=self.data_collator)
        values: dict[str, list[float]] = {name: [] for name in names}
        for batch in loader:
            batch = {k: v.to(args.device) for k, v in batch.items()}
            for name, v in zip(names, self.reference_logps(batch), strict=False):
                values[name] += v.tolist()
        for name in names:
            dataset = dataset.add_column(name, values[name])
        return dataset

    def _reference_batch_size(self, train: bool) -> int | None:
        """The batch size `precompute_reference_logps` gets for the training (``train``)
        or evaluation datasets; None: its own default."""
        return None

    def _with_reference(self, dataset, train: bool = True):
        """Reference log-prob columns added when ``precompute_ref_log_probs``; idempotent."""
        if dataset is None or not self.args.precompute_ref_log_probs:
            return dataset
        size = self._reference_batch_size(train)
        if isinstance(dataset, dict):
            return {k: self.precompute_reference_logps(v, size) for k, v in dataset.items()}
        return self.precompute_reference_logps(dataset, size)

    def _memory_hint(self) -> str:
        if self.uses_reference and not self.args.precompute_ref_log_probs:
            return "; --precompute_ref_log_probs drops the reference forward from every step"
        return ""


def completion_hidden(model, unwrapped, ids, att, P: int):
    """``(h, head)``: the policy's hidden states at the positions that predict the
    completion tokens (those after the ``P`` prompt columns), ``[R, C, d]`` in the head
    weight's dtype, through ``model`` (the engine's wrapper: DDP hooks fire) with grad,
    and ``unwrapped``'s `lm_head` handle."""
    hidden = backbone_hidden_states(model, ids, att, unwrapped=unwrapped)
    head = lm_head(unwrapped)
    h = completion_positions(hidden, P)
    if h.dtype != head.weight.dtype:  # e.g. accelerate's autocast returns fp32 outputs
        h = h.to(head.weight.dtype)
    return h, head
