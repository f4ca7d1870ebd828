"""GRPO with LoRA on `transformers.Trainer`: generation, rewards, group advantages, and the
loss through `fastrl.fused_policy_loss` from the backbone's hidden states (no logits).

Thin by design. `transformers.Trainer` runs the optimizer, the scheduler, gradient
accumulation, mixed precision, checkpointing (the adapter only, through peft), logging
and `report_to`, and accelerate/DDP. This module adds what GRPO needs on top:

- `GRPOConfig`: `TrainingArguments` plus TRL 1.16's GRPO options (same names and defaults
  where TRL has them) and fastrl's (LoRA, `max_memory_gb`, `dynamic_sampling`, ...).
- `GRPOTrainer`: a model through `load_model` (LoRA on every block linear, frozen
  lm_head), a generation buffer, rewards through `call_reward`, `group_advantages`, old
  and reference log-probs through `linear_logprobs`, the loss through `fused_policy_loss`.

Batches, gradient accumulation and generation (TRL's layout)
-----------------------------------------------------------
`per_device_train_batch_size` counts completions, as in TRL. A *generation batch* holds
`per_device_train_batch_size * steps_per_generation` completions per process (default
`steps_per_generation = gradient_accumulation_steps`), i.e. that many / `num_generations`
prompts, each repeated `num_generations` times in a row. The train sampler
(`GroupRepeatSampler`) yields every generation batch `steps_per_generation *
num_iterations` times in a row and the dataloader's batch *is* a generation batch, so every
micro-step the Trainer fetches one copy. The first micro-step of a cycle generates and
scores it, splits it into `steps_per_generation` micro-batches and keeps them in a buffer;
micro-step `s` trains on micro-batch `s % steps_per_generation`. With `num_iterations > 1`
the same buffer is trained on again (with the log-probs of the policy that sampled it as
`old_logps`); old log-probs are only computed when the policy can change between
generation and use (TRL's rule: `gradient_accumulation_steps % (steps_per_generation *
num_iterations) != 0`), otherwise the step is on-policy.

Resume
------
`trainer.train(resume_from_checkpoint=...)` goes through `Trainer`: the adapter, optimizer,
scheduler, RNG state and trainer state come from the checkpoint, and the Trainer skips the
dataloader batches already trained on. Two things make that exact here:

- the sampler's order depends only on `(seed, epoch)` (`set_epoch`), not on how many
  times it was iterated, so a fresh sampler after a restart yields the same batches;
- the generation buffer and the micro-step counter are saved next to the RNG state
  (`grpo_buffer.pt`, one per process) and restored with it. A checkpoint taken in the
  middle of a generation cycle (`num_iterations > 1`, or `steps_per_generation >
  gradient_accumulation_steps`) resumes on the very completions the uninterrupted run
  trains on; a checkpoint without the file (or `ignore_data_skip=True`) regenerates.

So a resumed run ends with the adapter an uninterrupted one ends with (tests pin it).
Ctrl-C (KeyboardInterrupt) in `train` saves `checkpoint-<last completed step>` before it
propagates: a partly accumulated step is dropped, and the RNG state and generation buffer
are those of the end of that step, so it resumes like a checkpoint saved there.

Checkpoints hold the adapter only (peft's `save_pretrained`), plus the optimizer,
scheduler, RNG and trainer state as `Trainer` writes them.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastrl import fused_policy_loss, group_advantages, linear_logprobs
from fastrl.checks import IGNORE_INDEX
from fastrl.integrations import lm_head

# TRL's nanstd, the standard deviation group_advantages scales by: the logged one is the same
from fastrl.ops.advantages.group import nanstd
from fastrl.trainers.base import BaseTrainer
from fastrl.trainers.data import check_chat_template, prompt_dataset
from fastrl.trainers.grpo_config import GRPOConfig
from fastrl.trainers.model import (
    backbone_hidden_states,
    completion_positions,
    last_hidden_states,
    reference_adapters_off,
)
from fastrl.trainers.rollout import (
    RolloutMixin,
    _completion_mask,
    _generation_config,
    _is_conversational,
    _left_padded,
)
from fastrl.trainers.vllm_engine import VLLMEngine, sampling_settings, start_engine

#: the generation buffer and micro-step counter saved next to the RNG state (per process)
BUFFER_NAME = "grpo_buffer.pt"

__all__ = [
    "GRPOTrainer",
    "GroupRepeatSampler",
]

# --------------------------------------------------------------------------- sampler


class GroupRepeatSampler(torch.utils.data.Sampler):
    """Prompt indices for GRPO generation batches (TRL's `RepeatSampler` layout).

    The prompts (shuffled by `(seed, epoch)` when `shuffle`) are cut into chunks of
    `prompts_per_batch` (an incomplete last chunk is dropped); each chunk is yielded
    `repeat` times in a row, every index `group_size` times in a row. The order depends
    on `(seed, epoch)` only, so a new sampler after a restart yields the same indices.
    """

    def __init__(self, num_prompts, group_size, prompts_per_batch, repeat=1, shuffle=True, seed=0):
        self.num_prompts = num_prompts
        self.group_size = group_size
        self.prompts_per_batch = prompts_per_batch
        self.repeat = repeat
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_prompts, generator=gen).tolist()
        else:
            order = list(range(self.num_prompts))
        n = self.prompts_per_batch
        for start in range(0, len(order) - n + 1, n):
            chunk = order[start : start + n]
            for _ in range(self.repeat):
                for index in chunk:
                    yield from [index] * self.group_size

    def __len__(self):
        chunks = self.num_prompts // self.prompts_per_batch
        return chunks * self.prompts_per_batch * self.group_size * self.repeat


def _rows(batch):
    """Collator: the dataset rows as they are (prompts and the columns reward functions use)."""
    return batch


# --------------------------------------------------------------------------- helpers


def _checked_args(args: GRPOConfig | None) -> GRPOConfig:
    args = args if args is not None else GRPOConfig(output_dir="fastrl-grpo")
    if not isinstance(args, GRPOConfig):
        raise TypeError(f"args must be a GRPOConfig, got {type(args).__name__}")
    if args.eval_strategy != "no" or args.do_eval:  # changed after GRPOConfig checked them
        raise ValueError(
            "GRPOTrainer has no evaluation loop; set eval_strategy='no' and evaluate with "
            "generation yourself (model.generate and your reward functions)"
        )
    return args


def _micro_batches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """`batch` cut into `n` micro-batches, each one's completion columns trimmed to its
    longest completion (at least one column)."""
    rows = torch.arange(batch["prompt_ids"].shape[0], device=batch["prompt_ids"].device)
    splits = torch.tensor_split(rows, n)
    mask = batch["completion_mask"]
    used = torch.stack([mask[idx].any(0) for idx in splits])  # [n, T]
    columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    widths = (used * columns).amax(1).clamp(min=1).tolist()  # one host sync for all
    micro = []
    for idx, width in zip(splits, widths, strict=True):
        mb = {k: v[idx] for k, v in batch.items()}
        for k in ("completion_ids", "completion_mask", "old_logps", "ref_logps", "sampling_logps"):
            if k in mb:
                mb[k] = mb[k][:, :width]
        micro.append(mb)
    return micro


# --------------------------------------------------------------------------- trainer


class GRPOTrainer(RolloutMixin, BaseTrainer):
    """GRPO with LoRA, on `transformers.Trainer`, without logits.

    Args:
        model: a local checkpoint directory (or hub id), a `transformers` causal LM, or a
            peft model (its adapters are trained as they are).
        reward_funcs: a callable `fn(prompts, completions, **columns) -> list[float]` or a
            list of them (weighted by `args.reward_weights`). `columns` are the dataset's
            other columns (one value per completion), `completion_ids` and
            `trainer_state`. `None` entries mean "no reward" (NaN).
        args: a `GRPOConfig`.
        train_dataset: rows with a `prompt` column (string or chat messages), as anything
            `fastrl.trainers.data.load_data` takes.
        processing_class: the tokenizer (loaded from `model` when it is a path).
        callbacks, optimizers: as `transformers.Trainer`.

    Per step: generation with `model.generate` (KV cache, adapters on, no grad, left
    padding) or, with `use_vllm`, on a colocated vLLM engine (`vllm_engine`: started at
    the first generation, the adapter synced after every optimizer step that precedes a
    generation, the sampler's log-probs kept for the loss's importance-sampling
    correction; `close_vllm` shuts it down, Ctrl-C too), completion masks up to and
    including the first EOS, rewards through `call_reward`, `group_advantages`, old
    log-probs (when the policy can change before the batch is used, or for the vLLM
    correction) and reference log-probs (adapters off; only when `beta != 0`)
    through `linear_logprobs`, then `fused_policy_loss` on the completion hidden states
    and the frozen lm_head weight. Logs (every `logging_steps`, through `Trainer.log`):
    `reward`, `reward_std`, `rewards/<name>/mean|std`, `frac_reward_zero_std`,
    `completions/mean_length|min_length|max_length|clipped_ratio`, `kl` (beta != 0),
    `entropy`, `clip_ratio/*`, `num_tokens` (prompt + completion tokens generated so far,
    as TRL), `tokens_per_second` (prompt + completion tokens trained on, by all processes,
    per second of wall time since the last log, generation included), with vLLM
    `vllm/sync_seconds`, `vllm/generate_seconds` and the `sampling/*` correction
    metrics, and, on CUDA,
    `peak_memory_gib` (`torch.cuda.max_memory_allocated`, since the start). Each metric is
    the mean over the logging window and every process (`clip_ratio/low_min` and
    `clip_ratio/high_max`: the min / max over processes); one without a value (e.g. every
    reward None) is left out.

    Errors: a reward function that raises is reported by `call_reward` with its name and
    the first failing sample; a non-finite loss on any process stops every process with a
    `FloatingPointError` naming the batch's metrics; a CUDA out-of-memory error is
    re-raised naming the settings to lower.
    """

    # fused_policy_loss already divides by the accumulation steps (TRL's normalisers)
    loss_is_scaled_for_ga = True
    algorithm = "GRPO"
    memory_options = ("num_generations", "max_completion_length", "per_device_train_batch_size")
    non_finite_hint = "check the reward functions' values"

    def __init__(
        self,
        model,
        reward_funcs: Callable | Sequence[Callable],
        args: GRPOConfig | None = None,
        train_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = _checked_args(args)
        model_path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        train_dataset = prompt_dataset(train_dataset, "GRPOTrainer")
        tok = self._load_tokenizer(model, processing_class)
        check_chat_template(train_dataset, tok, "GRPOTrainer")
        model = self._load_model(model, args)
        self._set_reward_funcs(reward_funcs, args.reward_weights)
        super().__init__(
            model,
            args,
            data_collator=_rows,
            train_dataset=train_dataset,
            processing_class=tok,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.generation_config, self.eos_token_ids = _generation_config(args, tok, self.model)
        if args.use_vllm:  # the engine's settings, checked now (it starts at the first step)
            self._vllm_sampling = sampling_settings(args, self.eos_token_ids)

        # ---- the loss options, validated (again: args may have changed since __post_init__)
        self._loss_kwargs = args.policy_loss_kwargs()

        generate_every = args.steps_per_generation * args.num_iterations
        # as TRL: with vLLM's sampler correction the old log-probs are always computed (the
        # correction compares them with the sampler's)
        self._needs_old_logps = args.gradient_accumulation_steps % generate_every != 0 or (
            args.use_vllm and args.vllm_importance_sampling_correction
        )
        self._vllm: VLLMEngine | None = None  # started at the first generation (`_engine`)
        self._vllm_base_dir: str | None = None  # a model object's base weights, saved once
        self._model_path = model_path
        self._reset_generation_state()
        if not hasattr(self, "current_gradient_accumulation_steps"):
            self.current_gradient_accumulation_steps = args.gradient_accumulation_steps

    # ------------------------------------------------------------------ data

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def _get_train_sampler(self, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        return GroupRepeatSampler(
            len(dataset),
            group_size=args.num_generations,
            prompts_per_batch=args.generation_batch_size // args.num_generations,
            repeat=args.steps_per_generation * args.num_iterations,
            shuffle=args.shuffle_dataset,
            seed=seed,
        )

    def get_train_dataloader(self):
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "GRPOTrainer needs a map-style dataset (datasets.Dataset), not iterable"
            )
        if len(self.train_dataset) < self.args.generation_batch_size // self.args.num_generations:
            raise ValueError(
                f"the dataset has {len(self.train_dataset)} prompts, fewer than one generation "
                f"batch needs ({self.args.generation_batch_size // self.args.num_generations})"
            )
        # The dataloader's batch is a whole generation batch (see the module docstring).
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def floating_point_ops(self, inputs) -> int:
        return 0  # the rows carry no token ids; throughput is logged as tokens_per_second

    # ------------------------------------------------------------------ train / resume

    def _reset_generation_state(self):
        self._buffer: list[dict[str, Any]] | None = None
        self._buffer_step = 0  # the micro-step that generated the buffer
        self._step = 0  # micro-steps trained since the start of the run
        self._synced_step = -1  # the optimizer step whose adapter the vLLM engine holds

    def train(self, *args, **kwargs):
        """`BaseTrainer.train` from an empty generation buffer (a checkpoint's comes back
        with its RNG state, `_load_rng_state`)."""
        self._reset_generation_state()
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            # after SaveOnInterrupt's checkpoint (Ctrl-C), or on any failure: the engine
            # and its temporary folders go; a later train() starts a new one
            self.close_vllm()
            raise

    def _rewind_to_last_step(self) -> None:
        # a partial accumulation is dropped, so is a buffer generated after the step's end
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        if self._buffer is not None and self._buffer_step > self._step:
            self._buffer = None

    def _buffer_file(self, directory: str) -> str:
        if self.args.world_size > 1:
            return os.path.join(directory, f"grpo_buffer_{self.args.process_index}.pt")
        return os.path.join(directory, BUFFER_NAME)

    def _save_rng_state(self, output_dir: str) -> None:
        # The generation buffer is sampling state, like the RNG: saved and restored with it.
        super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        state = {"step": self._step, "buffer": self._buffer, "buffer_step": self._buffer_step}
        torch.save(state, self._buffer_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = self._buffer_file(checkpoint)
        if os.path.isfile(path):
            state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
            self._step, self._buffer = state["step"], state["buffer"]
            self._buffer_step = state.get("buffer_step", 0)
        else:  # regenerate at the next step: exact only at a generation boundary
            self._step = self.state.global_step * self.args.gradient_accumulation_steps
            self._buffer = None

    # ------------------------------------------------------------------ steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return loss

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            raise ValueError("GRPOTrainer has no evaluation loop (see the class docstring)")
        cycle = self.args.steps_per_generation * self.args.num_iterations
        if self._step % cycle == 0 or self._buffer is None:
            self._buffer = self._generate_and_score(generation_batch)
            self._buffer_step = self._step
        return self._buffer[self._step % self.args.steps_per_generation]

    def _sample(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[B, T]` completion ids, and the sampler's `[B, T]` float32 log-probs of them
        (vLLM; None from `generate`, whose sampler is the policy)."""
        if self.args.use_vllm:
            return self._generate_vllm(prompt_ids, prompt_mask)
        return self._generate(prompt_ids, prompt_mask), None

    # ------------------------------------------------------------------ vLLM

    def _engine(self) -> VLLMEngine:
        """The colocated engine, started at the first generation of the trainer's life
        (once per run: kept across `train` calls, closed by `close_vllm` or Ctrl-C)."""
        if self._vllm is None:
            self._vllm = start_engine(self, self._model_path)
        return self._vllm

    def close_vllm(self) -> None:
        """Shut the vLLM engine down (a later generation starts a new one)."""
        if self._vllm is not None:
            self._vllm.close()
            self._vllm = None
        if self._vllm_base_dir is not None:
            shutil.rmtree(self._vllm_base_dir, ignore_errors=True)
            self._vllm_base_dir = None

    def _vllm_seeds(self, n: int) -> list[int]:
        """One sampling seed per completion of this generation: a function of the engine
        seed, the process, the micro-step and the row only, so a resumed run samples
        the completions the uninterrupted run sampled."""
        args = self.args
        base = args.vllm_seed if args.vllm_seed is not None else args.seed
        g = torch.Generator().manual_seed(hash((base, args.process_index, self._step)) % 2**63)
        return torch.randint(0, 2**31 - 1, (n,), generator=g).tolist()

    @torch.no_grad()
    def _generate_vllm(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_sample` on the engine: the adapter synced first when an optimizer step has
        changed it since the last sync (a checkpoint's, after a resume), then one
        completion per (repeated) prompt, right-padded with the pad token."""
        engine = self._engine()
        if self._synced_step != self.state.global_step:
            engine.sync_adapter(self._unwrapped())
            self._synced_step = self.state.global_step
            self._record_metrics({"vllm/sync_seconds": engine.timings["sync_s"]})
        pairs = zip(prompt_ids.cpu(), prompt_mask.cpu().bool(), strict=True)
        rows = [ids[m].tolist() for ids, m in pairs]
        seeds = self._vllm_seeds(len(rows))
        ids, logps = engine.generate(rows, self._vllm_sampling, seeds=seeds)
        self._record_metrics({"vllm/generate_seconds": engine.timings["generate_s"]})
        engine.sleep()  # the loss runs next: its memory back to training (sleep mode only)
        T = max(1, max(len(c) for c in ids))
        pad = self.processing_class.pad_token_id
        out = torch.full((len(ids), T), pad, dtype=torch.long)
        sampled = torch.zeros((len(ids), T), dtype=torch.float32)
        for i, (c, lp) in enumerate(zip(ids, logps, strict=True)):
            out[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            sampled[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        device = prompt_ids.device
        return out.to(device, non_blocking=True), sampled.to(device, non_blocking=True)

    @torch.no_grad()
    def _completion_logps(self, batch: dict, *, reference: bool) -> torch.Tensor:
        """`[B, T]` log-probs of the completion tokens under the policy (adapters on) or the
        reference (adapters off), at the sampling temperature; 0 at masked positions."""
        model = self._unwrapped()
        head = lm_head(model)
        P = batch["prompt_ids"].shape[1]
        bs = self.args.per_device_train_batch_size
        out = []
        ctx = reference_adapters_off(model) if reference else contextlib.nullcontext()
        with ctx, self.compute_loss_context_manager():
            for s in range(0, batch["prompt_ids"].shape[0], bs):
                ids = torch.cat(
                    [batch["prompt_ids"][s : s + bs], batch["completion_ids"][s : s + bs]], 1
                )
                att = torch.cat(
                    [batch["prompt_mask"][s : s + bs], batch["completion_mask"][s : s + bs]], 1
                )
                hidden = completion_positions(last_hidden_states(model, ids, att), P)
                mask = batch["completion_mask"][s : s + bs].bool()
                targets = torch.where(mask, batch["completion_ids"][s : s + bs], IGNORE_INDEX)
                hidden = hidden.to(head.weight.dtype)  # autocast may return another dtype
                # gathered per micro-batch, after its backbone forward: under ZeRO-3 a
                # tied embedding's own hooks must not run inside the gather, and holding
                # every micro-batch's hidden states instead ([B*G, T, d]: 256 x 4k x 3584
                # is 3.8G elements vs V*d = 0.55G for Qwen2.5-7B) costs more than the
                # gather, ~7% of the parameters each micro-batch's forward gathers anyway
                with head.gathered(self.args.temperature) as (weight, kw):  # shards
                    logps = linear_logprobs(
                        hidden, weight, targets, impl=self.args.kernel_impl, **kw
                    )
                out.append(logps)
        return (
            torch.cat(out) if out else batch["completion_ids"].new_zeros(0, 0, dtype=torch.float32)
        )

    def _generate_and_score(self, rows: list[dict]) -> list[dict[str, Any]]:
        """Generate, score and prepare one generation batch: `steps_per_generation`
        micro-batches of tensors, ready for `compute_loss`."""
        args, tok, device = self.args, self.processing_class, self.accelerator.device
        G = args.num_generations
        prompts = [row["prompt"] for row in rows]
        prompt_ids, prompt_mask = _left_padded(self._encode_prompts(prompts), tok.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

        # ---- completions, masked after the first EOS (which is kept)
        completion_ids, sampling_logps = self._sample(prompt_ids, prompt_mask)
        completion_mask, truncated = _completion_mask(completion_ids, self.eos_token_ids)
        completion_ids = torch.where(completion_mask.bool(), completion_ids, tok.pad_token_id)
        lengths = completion_mask.sum(1)
        if args.mask_truncated_completions:
            completion_mask = completion_mask * (~truncated).long()[:, None]
        ids_list = [
            c[:n].tolist() for c, n in zip(completion_ids.cpu(), lengths.tolist(), strict=True)
        ]
        texts = tok.batch_decode(ids_list, skip_special_tokens=True)
        completions = [
            [{"role": "assistant", "content": t}] if _is_conversational(p) else t
            for p, t in zip(prompts, texts, strict=True)
        ]

        # ---- rewards and advantages
        rewards = self._rewards(prompts, completions, rows, ids_list)
        weights = self.reward_weights.to(device)
        advantages = group_advantages(
            rewards, G, scale=args.scale_rewards, weights=weights,
            normalize=args.multi_objective_aggregation,
        )  # fmt: skip
        self._record_generation(rewards, weights, lengths, truncated, prompt_mask)

        batch = dict(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            advantages=advantages,
        )
        # the sampler's log-probs feed the correction, and the off-policy mask prefers them
        # to the old policy's (TRL's rule), with the correction on or off
        wanted = self._loss_kwargs.get("sampling_correction") or (
            args.off_policy_mask_threshold is not None
        )
        if sampling_logps is not None and wanted:
            batch["sampling_logps"] = sampling_logps
        if args.dynamic_sampling:
            keep = (advantages.view(-1, G) != 0).any(1).repeat_interleave(G)
            self._record_metrics({"dynamic_sampling/kept_fraction": keep.float().mean()})
            batch = {k: v[keep] for k, v in batch.items()}

        loss_mask_sum = batch["completion_mask"].sum()
        num_items = self.accelerator.gather(loss_mask_sum.reshape(1)).sum()
        if self._needs_old_logps:
            batch["old_logps"] = self._completion_logps(batch, reference=False)
        if args.beta != 0:
            batch["ref_logps"] = self._completion_logps(batch, reference=True)
        micro = _micro_batches(batch, args.steps_per_generation)
        for mb in micro:
            mb["num_items_in_batch"] = num_items
        return micro

    def _record_generation(self, rewards, weights, lengths, truncated, prompt_mask) -> None:
        """The generation metrics, over every process's completions (the same values on
        every process), and the prompt + completion tokens generated (`num_tokens`)."""
        gather = self.accelerator.gather
        rewards = gather(rewards)
        metrics = {}
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards[:, i])
            metrics[f"rewards/{name}/std"] = nanstd(rewards[:, i])
        total = (rewards * weights).nansum(1)
        total[torch.isnan(rewards).all(1)] = math.nan
        metrics["reward"] = torch.nanmean(total)
        metrics["reward_std"] = nanstd(total)
        # a NaN std (fewer than 2 scored completions) counts as flat
        group_std = nanstd(total.view(-1, self.args.num_generations), dim=1)
        metrics["frac_reward_zero_std"] = (~(group_std > 0)).float().mean()
        lengths, truncated = gather(lengths).float(), gather(truncated)
        metrics["completions/mean_length"] = lengths.mean()
        metrics["completions/min_length"] = lengths.min()
        metrics["completions/max_length"] = lengths.max()
        metrics["completions/clipped_ratio"] = truncated.float().mean()
        self._record_metrics(metrics)
        tokens = int(gather(prompt_mask.sum().reshape(1)).sum() + lengths.sum())
        self.state.num_input_tokens_seen += tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError(
                "GRPOTrainer.compute_loss does not return outputs (there are no logits)"
            )
        unwrapped = self._unwrapped()
        if inputs["completion_ids"].shape[0] == 0:  # every group dropped by dynamic sampling
            # A zero loss that still runs the wrapped model on one token: under DDP every
            # rank must join the gradient all-reduce, whether or not it kept any group.
            one = inputs["prompt_ids"].new_full((1, 1), self.processing_class.pad_token_id)
            hidden = backbone_hidden_states(model, one, torch.ones_like(one), unwrapped=unwrapped)
            loss = hidden.sum() * 0.0
            self._record_step(loss, {}, inputs, train=model.training)  # joins the check
            return loss
        P = inputs["prompt_ids"].shape[1]
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        hidden = backbone_hidden_states(model, ids, att, unwrapped=unwrapped)
        head = lm_head(unwrapped)
        # accelerate's mixed-precision wrapper returns fp32 outputs: back to the head's dtype
        hidden = completion_positions(hidden, P).to(head.weight.dtype)
        training = model.training
        # the whole [V, d] under FSDP2 / ZeRO-3
        with head.gathered(self.args.temperature) as (weight, head_kw):
            loss, metrics = self._policy_loss(hidden, weight, head_kw, inputs, training)
        self._record_step(loss, metrics, inputs, train=training, tokens=att.sum())
        return loss

    def _policy_loss(self, hidden, weight, head_kw, inputs, training):
        """`fused_policy_loss` on a micro-batch's completion hidden states `[B, T, d]` and
        the whole lm_head `weight` `[V, d]`; `head_kw`: its bias, temperature and softcap
        (`LMHead.gathered`)."""
        return fused_policy_loss(
            hidden,
            weight,
            inputs["completion_ids"],
            inputs["completion_mask"],
            inputs["advantages"],
            old_logps=inputs.get("old_logps"),
            ref_logps=inputs.get("ref_logps"),
            sampling_logps=inputs.get("sampling_logps"),
            num_items_in_batch=inputs["num_items_in_batch"],
            gradient_accumulation_steps=self.current_gradient_accumulation_steps if training else 1,
            steps_per_generation=self.args.steps_per_generation if training else 1,
            num_processes=self.accelerator.num_processes,
            impl=self.args.kernel_impl,
            **head_kw,
            **self._loss_kwargs,
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        raise ValueError("GRPOTrainer has no evaluation loop (see the class docstring)")

    # ------------------------------------------------------------------ logging

    def _tokens_seen(self, trained: int) -> int:
        # counted at generation (`_record_generation`), as TRL counts them
        return self.state.num_input_tokens_seen

    def _batch_summary(self, inputs) -> str:
        return f", micro-step {self._step}" + super()._batch_summary(inputs)
