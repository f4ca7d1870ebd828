"""What the GRPO and DPO trainers share on top of `transformers.Trainer`.

`BaseTrainer` (a `Trainer` with `SaveOnInterrupt` before it) holds:

- the set-up both run around `Trainer.__init__`: the tokenizer (loaded from a model path;
  pad token = EOS where it has none, as TRL), the model through `load_model` (LoRA, the
  global seed set first because the adapters' initialisation draws from it, the CUDA
  memory cap), then the refusal of sharded parameters, Ctrl-C checkpoints and the console;
- the metrics: each process appends its own values per micro-batch (`_record_metrics`,
  `_record_step`) and `log` merges the logging window over the processes, then logs
  `num_tokens`, `tokens_per_second` and, on CUDA, `peak_memory_gib`;
- one non-finite-loss policy: every process checks every micro-batch's loss, and when the
  loss of any process is not finite, all of them stop at that micro-batch with a
  `FloatingPointError` naming the step, this process's loss, metrics and batch, and what
  to change;
- one out-of-memory message: the original error, then the settings to lower, in order,
  written as flags.

A subclass sets `algorithm` (how messages name it), `memory_options` (what to lower on
out-of-memory, the most effective first) and `non_finite_hint`, and calls `_record_step`
once per micro-batch on every process, with or without a batch (the check is a
collective).
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object
from transformers import Trainer, set_seed

from fastrl.trainers.console import use_console
from fastrl.trainers.interrupt import SaveOnInterrupt
from fastrl.trainers.model import (
    ModelArguments,
    cap_cuda_memory,
    load_model,
    refuse_sharded_parameters,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["BaseTrainer", "merge_metric_windows"]

# (sum, count) of one metric's non-NaN values over a logging window, on one process
SumCount = tuple[float, int]


def _sum_count(values: Iterable[float]) -> SumCount:
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid), len(valid)


def _reduction(name: str) -> str:
    """How a metric combines over processes: TRL logs `clip_ratio/low_min`,
    `.../high_max` and `sampling/.../min|max` as the min / max over processes."""
    if name.endswith(("_min", "/min")):
        return "min"
    if name.endswith(("_max", "/max")):
        return "max"
    return "mean"


def merge_metric_windows(windows: Iterable[Mapping[str, SumCount]]) -> dict[str, float]:
    """One value per metric from each process's `{name: (sum, count)}` over a logging window.

    A mean metric is the mean of all values, every process and micro-batch together
    (sums and counts added). A `*_min` / `*_max` metric is the min / max over processes of
    each process's window mean (on one process: the window mean, as TRL). Metrics without
    a value (every one NaN) are left out.
    """
    totals: dict[str, list[float]] = {}
    means: dict[str, list[float]] = defaultdict(list)
    for window in windows:
        for name, (total, count) in window.items():
            acc = totals.setdefault(name, [0.0, 0])
            acc[0] += total
            acc[1] += count
            if count:
                means[name].append(total / count)
    out = {}
    for name, (total, count) in totals.items():
        kind = _reduction(name)
        if count and kind == "mean":
            out[name] = total / count
        elif count:
            out[name] = (min if kind == "min" else max)(means[name])
    return out


def _stacked(values: Iterable, device: torch.device) -> torch.Tensor:
    """0-d tensors and numbers as one float64 vector on `device` (float64: float32 metrics
    and token counts come back exactly)."""
    return torch.stack(
        [torch.as_tensor(v, device=device).detach().to(torch.float64).reshape(()) for v in values]
    )


class BaseTrainer(SaveOnInterrupt, Trainer):
    """The shared part of `GRPOTrainer` and `DPOTrainer` (see the module docstring)."""

    #: how messages name the trainer ("GRPO", "DPO")
    algorithm: str = ""
    #: the options to lower after an out-of-memory error, the most effective first
    memory_options: tuple[str, ...] = ("per_device_train_batch_size",)
    #: what else to check when the loss is not finite
    non_finite_hint: str = ""

    def __init__(self, model, args, *, processing_class, **trainer_kwargs):
        """`Trainer.__init__` (`model` as `_load_model` returns it), then the refusal of
        sharded parameters, the metric windows, Ctrl-C checkpoints and the console."""
        super().__init__(
            model=model, args=args, processing_class=processing_class, **trainer_kwargs
        )
        refuse_sharded_parameters(self)
        # mode ("train" | "eval") -> metric name -> this process's values in the window
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._reset_log_window()
        self._track_rng_at_step_end()
        use_console(self)  # compact log lines on the console

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _load_tokenizer(
        model: str | os.PathLike | torch.nn.Module,
        processing_class: PreTrainedTokenizerBase | None,
    ) -> PreTrainedTokenizerBase:
        """`processing_class`, or the tokenizer of a model path; its pad token is its EOS
        where it has none (as TRL's trainers set it)."""
        tokenizer = processing_class
        if tokenizer is None:
            if not isinstance(model, (str, os.PathLike)):
                raise ValueError("processing_class (the tokenizer) is required with a model object")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=os.path.isdir(model))
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer needs a pad_token or an eos_token to pad batches")
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    @staticmethod
    def _load_model(
        model: str | os.PathLike | torch.nn.Module, args: ModelArguments
    ) -> torch.nn.Module:
        """`load_model` with the configuration's LoRA and loading options (a peft model
        keeps its adapters), after capping CUDA memory and seeding the global RNG, which
        the LoRA initialisation draws from (as TRL)."""
        from peft import PeftModel

        cap_cuda_memory(args.max_memory_gb)
        set_seed(args.seed)
        return load_model(
            model,
            lora=None if isinstance(model, PeftModel) else args.lora_kwargs(),
            gradient_checkpointing=bool(args.activation_checkpointing),
            **args.load_model_kwargs(),
        )

    # ------------------------------------------------------------------ metrics

    def _reset_log_window(self) -> None:
        for window in self._metrics.values():
            window.clear()
        self._window_tokens = 0.0  # tokens trained on by this process since the last log
        self._window_start: float | None = None  # set by the window's first training step

    def _record_metrics(self, metrics: Mapping[str, torch.Tensor | float], *, train=True) -> None:
        """Append this process's values (0-d tensors or numbers) to the logging window."""
        if not metrics:
            return
        window = self._metrics["train" if train else "eval"]
        values = _stacked(metrics.values(), self.accelerator.device).tolist()  # one sync
        for name, value in zip(metrics, values, strict=True):
            window[name].append(value)

    def _record_step(
        self,
        loss: torch.Tensor,
        metrics: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        *,
        train: bool,
        tokens: torch.Tensor | int = 0,
    ) -> None:
        """A micro-batch's loss metrics and trained `tokens` (counted in training only), with
        the non-finite-loss check of every process: one host synchronisation and, with
        several processes, one all-gather of a flag. Every process calls it once per
        micro-batch, an empty one included."""
        names = list(metrics)
        values = _stacked([loss, tokens, *(metrics[k] for k in names)], loss.device)
        bad = (~torch.isfinite(values[:1])).to(torch.float64)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.gather(bad).sum().reshape(1)
        bad_processes, loss_value, token_count, *rest = torch.cat([bad, values]).tolist()
        if bad_processes:
            shown = dict(zip(names, rest, strict=True))
            raise FloatingPointError(
                self._non_finite_loss_message(loss_value, shown, inputs, int(bad_processes))
            )
        window = self._metrics["train" if train else "eval"]
        for name, value in zip(names, rest, strict=True):
            window[name].append(value)
        if train:
            self._window_tokens += token_count

    def _batch_summary(self, inputs: Mapping[str, torch.Tensor]) -> str:
        """What the non-finite-loss message says about the micro-batch."""
        mask = inputs.get("completion_mask") if inputs is not None else None
        return "" if mask is None else f", completion lengths {mask.sum(1).tolist()}"

    def _non_finite_loss_message(
        self,
        loss: float,
        metrics: Mapping[str, float],
        inputs: Mapping[str, torch.Tensor] | None,
        bad_processes: int,
    ) -> str:
        a = self.args
        shown = {k: round(v, 4) for k, v in metrics.items()}
        n = self.accelerator.num_processes
        others = f"; {bad_processes} of {n} processes have a non-finite loss" if n > 1 else ""
        hint = f", {self.non_finite_hint}" if self.non_finite_hint else ""
        return (
            f"non-finite {self.algorithm} loss at step {self.state.global_step} (this process: "
            f"loss {loss}, metrics {shown}{self._batch_summary(inputs)}{others}). Training "
            f"stopped: lower --learning_rate (now {a.learning_rate:g}), clip gradients with "
            f"--max_grad_norm (now {a.max_grad_norm}), prefer --bf16 over --fp16 (fp16 "
            f"overflows){hint}; NaN weights from an earlier step give it too."
        )

    def _merged_window(self, mode: str) -> tuple[dict[str, float], float]:
        """The logging window's metrics merged over the processes (`merge_metric_windows`)
        and the tokens they trained on; both windows start again."""
        local = {k: _sum_count(v) for k, v in self._metrics[mode].items()}
        parts = [(local, self._window_tokens if mode == "train" else 0.0)]
        if self.accelerator.num_processes > 1:  # every process calls log(), as Trainer does
            parts = gather_object(parts)
        self._metrics[mode].clear()
        return merge_metric_windows(p[0] for p in parts), sum(p[1] for p in parts)

    def _tokens_seen(self, trained: int) -> int:
        """`num_tokens`: the tokens seen since the run started (trainer state, so a resumed
        run goes on counting); here the tokens trained on, `trained` since the last log."""
        self.state.num_input_tokens_seen += trained
        return self.state.num_input_tokens_seen

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log` with the window's metrics (prefixed `eval_` in evaluation); a
        training log adds `num_tokens`, `tokens_per_second` (all processes' tokens per
        second of wall time since the last log) and, on CUDA, `peak_memory_gib`."""
        train = self.model.training
        window, tokens = self._merged_window("train" if train else "eval")
        if not train:
            window = {f"eval_{k}": v for k, v in window.items()}
        else:
            now = time.perf_counter()
            if tokens:
                window["num_tokens"] = self._tokens_seen(int(tokens))
                if self._window_start is not None and now > self._window_start:
                    window["tokens_per_second"] = tokens / (now - self._window_start)
                if torch.cuda.is_available():
                    window["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self._window_tokens, self._window_start = 0.0, now
        logs.update(window)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ steps

    def train(self, *args, **kwargs):
        """`Trainer.train` on fresh logging windows; Ctrl-C (KeyboardInterrupt) saves a
        checkpoint of the last completed optimizer step before it propagates."""
        self._reset_log_window()
        return super().train(*args, **kwargs)

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if self._window_start is None:
            self._window_start = time.perf_counter()
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except torch.OutOfMemoryError as exc:
            advised = torch.OutOfMemoryError(self._out_of_memory_message(exc))
            advised.fastrl_advice = True  # the command line adds no hint of its own
            raise advised from exc

    def _memory_hint(self) -> str:
        """A trainer's own way out of an out-of-memory error, after the shared ones."""
        return ""

    def _out_of_memory_message(self, exc: BaseException) -> str:
        """The advice on the first line (the command line prints that one), then `exc`."""
        a = self.args
        cap = f" (capped by --max_memory_gb {a.max_memory_gb})" if a.max_memory_gb else ""
        lower = ", ".join(f"--{name} (now {getattr(a, name)})" for name in self.memory_options)
        return (
            f"out of memory in a {self.algorithm} step{cap}: lower, in this order, {lower} "
            f"(raise --gradient_accumulation_steps to keep the effective batch); keep "
            f"--activation_checkpointing on (now {a.activation_checkpointing}) and prefer "
            f"--bf16 (now {a.bf16}); --load_in_4bit shrinks the base "
            f"weights{self._memory_hint()}.\n{exc}"
        )
