"""PPO with LoRA and a value head on the policy's own backbone, on `transformers.Trainer`.

One backbone pass gives both heads: the last hidden states at the completion positions go
to the frozen lm_head through `fastrl.linear_logprobs` (no logits) and to the value head,
a trainable `nn.Linear(d, 1)`. The reference is the same model with its adapters
disabled. Per rollout (TRL's PPO / OpenRLHF's experience maker, in their formulas):

1. sample one completion per prompt with `generate` (the `RolloutMixin` GRPO uses);
2. scores from the reward functions (any callables `fn(prompts, completions, **columns)`,
   a reward model wrapped in one too), weighted, minus `missing_eos_penalty` where a
   completion has no EOS;
3. one no-grad pass with adapters on: old log-probs and old values; one with adapters off
   (skipped when `kl_coef == 0`): reference log-probs;
4. per-token rewards `fastrl.kl_shaped_rewards(scores, kl=k1|k3, kl_coef)`, optionally
   whitened (`whiten_rewards`, mean kept, as TRL); `fastrl.gae_advantages` -> advantages,
   returns; the advantages whitened over the rollout (`fastrl.masked_whiten`);
5. `num_ppo_epochs` x `num_mini_batches` optimizer steps, each over micro-batches of
   `per_device_train_batch_size`: loss = `fastrl.policy_loss(loss_type="bnpo")` +
   `vf_coef * fastrl.value_loss(value_clip=cliprange_value)`.

The loss type: `"bnpo"` is PPO's token-level clipped surrogate
``-min(r A, clip(r, 1 - eps, 1 + eps) A)`` averaged over the micro-batch's completion
tokens and divided by the accumulation steps, which is TRL's PPO (``masked_mean`` over
the micro-batch, `accelerator.accumulate`) and OpenRLHF's ``token_level_loss``. The value
loss is the same token mean, / accumulation steps.

The value head lives on the peft model as `model.value_head` (so the optimizer, gradient
clipping and `model.train()` see it) and runs inside the model's forward
(`hidden_and_values`): under DDP it is a parameter of the wrapped module used in its
forward, so its gradient is all-reduced with the adapters' (and held back by `no_sync`
during gradient accumulation). With several processes each samples, scores and trains on
its own rollout (the dataloader shards the prompts); the whitening statistics are those
of every process's rollout together (OpenRLHF's; TRL's PPOTrainer whitens each process's
batch alone), so N processes of B rows compute the advantages one process of N * B rows
computes, and the rollout metrics are means over all of them.

FSDP2 (`fsdp=True, fsdp_config={"version": 2}`) and DeepSpeed ZeRO-3 run as for GRPO:
generation, the old-policy and reference passes and the training forward run on the
sharded model, the lm_head is gathered per head call (`LMHead.gathered`). The value head
is a parameter of the peft model, so under FSDP2 it is sharded with the root module's
parameters (a `DTensor`; the root's forward all-gathers it, its gradient is
reduce-scattered with theirs) and under ZeRO-3 partitioned (its module's hooks gather it
around the call inside the forward); it runs in the dtype the engine gives it (ZeRO-3's
cast, FSDP2's `param_dtype`), its values float32. FSDP1 is refused, naming the option
(`refuse_sharded_parameters`); PPO has no vLLM generation.

peft's `save_pretrained` saves only the adapter: `save_model` and every checkpoint add
`value_head.safetensors` (`weight` [1, d], `bias` [1], float32) next to it, the whole
head gathered from the shards under FSDP2 / ZeRO-3 (every process gathers, the saving one
writes); resuming from a checkpoint loads it back (under FSDP2 into the shards; under
ZeRO-3 DeepSpeed's own checkpoint restores it with its optimizer state), and
`load_value_head(model, directory)` attaches it to a model loaded with peft. The rollout
being trained on and the micro-step counter are saved next to the RNG state
(`ppo_rollout.pt`; one `ppo_rollout_<process index>.pt` per process with several), so a
run resumed from a checkpoint in the middle of a rollout's epochs trains on the same
rollout and ends with the adapter and value head an uninterrupted run ends with.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastrl import gae_advantages, kl_shaped_rewards, linear_logprobs, masked_whiten, value_loss
from fastrl import policy_loss as ppo_policy_loss
from fastrl.checks import IGNORE_INDEX
from fastrl.integrations import gathered_weight, is_sharded, lm_head
from fastrl.trainers.base import BaseTrainer
from fastrl.trainers.data import check_chat_template, prompt_dataset
from fastrl.trainers.grpo_trainer import GroupRepeatSampler
from fastrl.trainers.model import (
    completion_positions,
    forward_returns_hidden_states,
    position_ids_from_mask,
    reference_adapters_off,
)
from fastrl.trainers.ppo_config import PPOConfig
from fastrl.trainers.rollout import (
    RolloutMixin,
    _completion_mask,
    _generation_config,
    _is_conversational,
    _left_padded,
)

__all__ = ["VALUE_HEAD_NAME", "PPOTrainer", "add_value_head", "load_value_head"]

#: the value head's file next to the adapter
VALUE_HEAD_NAME = "value_head.safetensors"
#: the rollout and micro-step counter saved next to the RNG state (one process; with
#: several, one `ppo_rollout_<process index>.pt` each)
ROLLOUT_NAME = "ppo_rollout.pt"
#: PPO's clipped surrogate with its token-mean aggregation (see the module docstring)
LOSS_TYPE = "bnpo"


def add_value_head(model: torch.nn.Module, std: float | None = None) -> torch.nn.Linear:
    """A float32 `nn.Linear(d, 1)` as `model.value_head` (weight ~ N(0, std), default
    std 1 / (d + 1) as OpenRLHF's critic head; bias 0), on the model's device. `d` is the
    embedding's width, also when ZeRO-3 partitioned it at load time (`zero.Init`: an empty
    partition, the whole shape in `ds_shape`); DeepSpeed partitions the head with the rest
    when the engine is built."""
    embedding = model.get_input_embeddings().weight
    d = (tuple(embedding.ds_shape) if hasattr(embedding, "ds_shape") else embedding.shape)[-1]
    device = embedding.device
    head = torch.nn.Linear(d, 1, dtype=torch.float32, device=device)
    with torch.no_grad():
        head.weight.normal_(0.0, std if std is not None else 1.0 / (d + 1))
        head.bias.zero_()
    model.value_head = head
    return head


def value_head_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.value_head`'s whole `weight` [1, d] and `bias` [1], float32 on the CPU, from
    a whole head or from FSDP2 / DeepSpeed ZeRO-3 shards (gathered with `gathered_weight`:
    a collective there, which every process of the group must call)."""
    head = model.value_head
    with torch.no_grad(), gathered_weight(head.weight, head.bias) as (weight, bias):
        return {
            "weight": weight.detach().float().cpu().clone().contiguous(),
            "bias": bias.detach().float().cpu().clone().contiguous(),
        }


def save_value_head(
    model: torch.nn.Module, directory: str | os.PathLike, *, write: bool = True
) -> None:
    """Write the whole value head (`value_head_state`) to `directory/value_head.safetensors`
    when `write`; every process calls it under sharding (the gather is a collective), the
    one that saves with `write=True`."""
    from safetensors.torch import save_file

    tensors = value_head_state(model)
    if write:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, VALUE_HEAD_NAME)
        save_file(tensors, path, metadata={"format": "pt"})


def _copy_whole(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Copy the whole `value` into `param` in place (the optimizer keeps the same
    parameter); into an FSDP2 `DTensor`, this process's shard of it."""
    if is_sharded(param):  # an FSDP2 DTensor (ZeRO-3 is refused by the caller)
        from torch.distributed.tensor import distribute_tensor

        whole = value.to(param.device, param.dtype)
        param.copy_(distribute_tensor(whole, param.device_mesh, param.placements))
    else:
        param.copy_(value.to(param.device, param.dtype))


def load_value_head(model: torch.nn.Module, directory: str | os.PathLike) -> torch.nn.Linear:
    """Attach (or overwrite, in place) `model.value_head` from
    `directory/value_head.safetensors`; a head sharded by FSDP2 gets its shards of the
    whole saved one (every process calls it then). A ZeRO-3 partitioned head is refused
    (DeepSpeed's own checkpoint restores it on resume)."""
    from safetensors.torch import load_file

    head = getattr(model, "value_head", None)
    if head is not None and hasattr(head.weight, "ds_id"):
        # its optimizer steps fp32 copies of the partitions, which a copy into the module
        # would not reach; resume_from_checkpoint restores both from DeepSpeed's checkpoint
        raise ValueError(
            "load_value_head does not load into a DeepSpeed ZeRO-3 partitioned value head: "
            "resume with resume_from_checkpoint (DeepSpeed's checkpoint holds it), or load "
            "it before the engine is built"
        )
    path = os.path.join(directory, VALUE_HEAD_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no value head in {directory}: {VALUE_HEAD_NAME} is missing")
    state = load_file(path)
    shape = tuple(state["weight"].shape)
    if head is None or tuple(head.weight.shape) != shape:  # a DTensor's shape is the whole's
        if head is not None and is_sharded(head.weight):  # it cannot be replaced
            raise ValueError(
                f"{path} holds a value head of shape {shape}; the sharded model's is "
                f"{tuple(head.weight.shape)}"
            )
        head = add_value_head(model)
    with torch.no_grad():
        for name, param in head.named_parameters():
            _copy_whole(param, state[name])
    return head


def _check_rollout_size(dataset, args: PPOConfig, processes: int | None = None) -> None:
    """One rollout takes `args.rollout_batch_size` prompts on each of the `processes`
    (default `args.world_size`): a smaller dataset is refused, naming the flags."""
    world = args.world_size if processes is None else processes
    need = args.rollout_batch_size * world
    if len(dataset) < need:
        procs = f" x {world} processes" if world > 1 else ""
        raise ValueError(
            f"the dataset (--dataset) has {len(dataset)} prompts, fewer than one PPO rollout "
            f"takes: --per_device_train_batch_size {args.per_device_train_batch_size} x "
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} x "
            f"--num_mini_batches {args.num_mini_batches}{procs} = {need}; lower these or "
            "give more prompts"
        )


def _rows(batch):
    return batch


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / m.sum().clamp(min=1.0)


def _k_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """TRL PPO's per-token KL estimate: k1 = -log r, k3 = (r - 1) - log r, with
    r = pi_ref / pi."""
    logr = ref_logps - logps
    return -logr if estimator == "k1" else torch.expm1(logr) - logr


def hidden_and_values(
    model: torch.nn.Module,
    unwrapped: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    *,
    values: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One call of `model` (the engine's wrapper of the peft model `unwrapped`, or
    `unwrapped` itself) on `[B, L]` ids laid out `[prompt | completion]`: the backbone's
    `[B, T, d]` hidden states at the completion positions (T = L - `prompt_length`) and,
    with `values`, the value head's `[B, T]` float32 values on them; no logits.

    The value head runs inside the wrapped call (the backbone's forward swapped for one
    that applies it), so under DDP it is a parameter used in the wrapper's forward like
    the LoRA weights: its gradient is all-reduced with theirs, `no_sync` (gradient
    accumulation) holds it back the same way, and `find_unused_parameters=True` finds it
    in the forward's graph (run after the call, it would be marked unused and reduced
    before its gradient exists). Under FSDP2 it is a parameter of the root module (the
    peft model), so the root's forward all-gathers it with the embeddings and its
    gradient is reduce-scattered with theirs; under ZeRO-3 its module's hooks gather it
    around the call. Autocast is off around it: the head runs in its own dtype (float32
    as built, also under accelerate's mixed precision; what ZeRO-3's cast or FSDP2's
    `param_dtype` makes it), its `[B, T]` values float32.
    """
    base = unwrapped.get_base_model()
    head = unwrapped.value_head
    with forward_returns_hidden_states(unwrapped):
        hidden_forward = base.forward

        def forward(**kwargs):
            hidden = completion_positions(hidden_forward(**kwargs), prompt_length)
            if not values:
                return hidden
            with torch.autocast(hidden.device.type, enabled=False):
                # the head's own dtype: float32 as built, or what an engine made it (ZeRO-3
                # casts the module, FSDP2 gathers it in its `param_dtype`); float32 out
                v = head(hidden.to(head.weight.dtype)).float().squeeze(-1)
            return hidden, v

        base.forward = forward
        try:
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
            )
        finally:
            base.forward = hidden_forward
    return out if values else (out, None)


class PPOTrainer(RolloutMixin, BaseTrainer):
    """PPO with LoRA and a shared-backbone value head, without logits (module docstring).

    Args:
        model: a checkpoint directory (or hub id), a causal LM, or a peft model.
        reward_funcs: a callable `fn(prompts, completions, **columns) -> list[float]` or a
            list of them (weighted by `args.reward_weights`), as `GRPOTrainer` takes them;
            a reward model is a callable that scores the texts. Every completion needs a
            reward (None is an error in PPO).
        args: a `PPOConfig`.
        train_dataset: rows with a `prompt` column.
        processing_class, callbacks, optimizers: as `GRPOTrainer`.

    Logs (TRL's PPO names): `objective/kl`, `objective/entropy`,
    `objective/non_score_reward`, `objective/rlhf_reward`, `objective/scores`,
    `policy/approxkl_avg`, `policy/clipfrac_avg`, `policy/entropy_avg`,
    `loss/policy_avg`, `loss/value_avg`, `val/clipfrac_avg`, `val/ratio`,
    `val/num_eos_tokens`, plus `rewards/<name>/mean`, `completions/mean_length`,
    `num_tokens`, `tokens_per_second`.
    """

    loss_is_scaled_for_ga = True
    algorithm = "PPO"
    memory_options = ("per_device_train_batch_size", "max_completion_length")
    non_finite_hint = "check the reward functions' values and lower --vf_coef"

    def __init__(
        self,
        model,
        reward_funcs: Callable | Sequence[Callable],
        args: PPOConfig | None = None,
        train_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = args if args is not None else PPOConfig(output_dir="fastrl-ppo")
        if not isinstance(args, PPOConfig):
            raise TypeError(f"args must be a PPOConfig, got {type(args).__name__}")
        train_dataset = prompt_dataset(train_dataset, "PPOTrainer")
        _check_rollout_size(train_dataset, args)
        tok = self._load_tokenizer(model, processing_class)
        check_chat_template(train_dataset, tok, "PPOTrainer")
        model = self._load_model(model, args)
        add_value_head(model, args.value_head_std)  # before the optimizer is built
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
        if args.stop_token_id is not None and args.stop_token_id not in self.eos_token_ids:
            self.eos_token_ids = [*self.eos_token_ids, args.stop_token_id]
            self.generation_config.eos_token_id = list(self.eos_token_ids)
        self._rollout: dict[str, Any] | None = None
        self._step = 0
        if not hasattr(self, "current_gradient_accumulation_steps"):
            self.current_gradient_accumulation_steps = args.gradient_accumulation_steps

    # ------------------------------------------------------------------ data

    @property
    def _cycle(self) -> int:
        """Micro-steps trained on one rollout."""
        a = self.args
        return a.gradient_accumulation_steps * a.num_mini_batches * a.num_ppo_epochs

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def _get_train_sampler(self, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        a = self.args
        # a chunk holds every process's rollout: the dataloader gives process i the i-th
        # `rollout_batch_size` rows of it (accelerate's batch sharding), as GRPO's
        return GroupRepeatSampler(
            len(dataset),
            group_size=1,
            prompts_per_batch=a.rollout_batch_size * self.accelerator.num_processes,
            repeat=self._cycle,
            shuffle=a.shuffle_dataset,
            seed=a.data_seed if a.data_seed is not None else a.seed,
        )

    def get_train_dataloader(self):
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            raise ValueError("PPOTrainer needs a map-style dataset (datasets.Dataset)")
        _check_rollout_size(self.train_dataset, self.args, self.accelerator.num_processes)
        n = self.args.rollout_batch_size
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=n,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def floating_point_ops(self, inputs) -> int:
        return 0

    # ------------------------------------------------------------------ steps

    def train(self, *args, **kwargs):
        self._rollout, self._step = None, 0
        return super().train(*args, **kwargs)

    def _rewind_to_last_step(self) -> None:
        self._step = self.state.global_step * self.args.gradient_accumulation_steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return loss

    def _prepare_inputs(self, rows):
        if not self.model.training:
            raise ValueError("PPOTrainer has no evaluation loop")
        if self._step % self._cycle == 0 or self._rollout is None:
            self._rollout = self.make_experience(rows)
        return self._micro_batch(self._rollout, self._step % self._cycle)

    def _micro_batch(self, rollout: dict[str, Any], s: int) -> dict[str, torch.Tensor]:
        """Micro-step `s` of the cycle: epoch `s // per_epoch` shuffles the rollout (its
        own permutation), then takes rows `[j * bs, (j + 1) * bs)` of it, the completion
        columns trimmed to its longest completion."""
        a = self.args
        per_epoch = a.gradient_accumulation_steps * a.num_mini_batches
        epoch, j = divmod(s, per_epoch)
        bs = a.per_device_train_batch_size
        idx = rollout["permutations"][epoch][j * bs : (j + 1) * bs]
        width = rollout["widths"][s]
        mb = {k: v[idx] for k, v in rollout["tensors"].items()}
        for k, v in mb.items():
            if k not in ("prompt_ids", "prompt_mask") and v.dim() == 2:
                mb[k] = v[:, :width]
        return mb

    def _widths(self, mask: torch.Tensor, perms: list[torch.Tensor]) -> list[int]:
        """The longest completion of every micro-batch of the cycle, in one host sync."""
        bs = self.args.per_device_train_batch_size
        used = torch.stack([mask[p].view(-1, bs, mask.shape[1]).any(1) for p in perms])
        columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)
        return (used * columns).amax(-1).clamp(min=1).flatten().tolist()

    def _unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    @torch.no_grad()
    def _heads(
        self, batch: dict[str, torch.Tensor], *, reference: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[B, T]` completion log-probs at the sampling temperature and, with adapters on,
        the value head's `[B, T]` values, from one backbone pass per micro-batch."""
        model = self._unwrapped_model()
        head = lm_head(model)
        P = batch["prompt_ids"].shape[1]
        bs = self.args.per_device_train_batch_size
        logps, values = [], []
        ctx = reference_adapters_off(model) if reference else contextlib.nullcontext()
        with ctx, self.compute_loss_context_manager():
            for s in range(0, batch["prompt_ids"].shape[0], bs):
                part = {k: v[s : s + bs] for k, v in batch.items()}
                lp, v = self._forward_heads(
                    model, model, part, P, head, values=not reference, entropy=False
                )
                logps.append(lp)
                values.append(v)
        return torch.cat(logps), (None if reference else torch.cat(values))

    def _forward_heads(self, model, unwrapped, part, P, head, *, values: bool, entropy: bool):
        """One backbone pass (the value head inside it: `hidden_and_values`) -> (log-probs,
        or (log-probs, entropies) with `entropy`; the values or None)."""
        ids = torch.cat([part["prompt_ids"], part["completion_ids"]], 1)
        att = torch.cat([part["prompt_mask"], part["completion_mask"]], 1)
        hidden, v = hidden_and_values(model, unwrapped, ids, att, P, values=values)
        # under accelerate's mixed precision the wrapper returns fp32: the head's dtype
        hidden = hidden.to(head.weight.dtype)
        mask = part["completion_mask"].bool()
        targets = torch.where(mask, part["completion_ids"], IGNORE_INDEX)
        with head.gathered(self.args.temperature) as (weight, head_kw):
            out = linear_logprobs(
                hidden, weight, targets, impl=self.args.kernel_impl, return_entropy=entropy,
                **head_kw,
            )  # fmt: skip
        return out, v

    def make_experience(self, rows: list[dict]) -> dict[str, Any]:
        """Generate, score and prepare one rollout (steps 1-4 of the module docstring):
        `{"tensors": {name: [B, ...]}, "permutations": [one per epoch]}` with
        `completion_ids`, `completion_mask`, `old_logps`, `old_values`, `ref_logps`,
        `scores`, `token_rewards`, `advantages` (whitened when asked), `returns`."""
        a, tok, device = self.args, self.processing_class, self.accelerator.device
        prompts = [row["prompt"] for row in rows]
        prompt_ids, prompt_mask = _left_padded(self._encode_prompts(prompts), tok.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        completion_ids = self._generate(prompt_ids, prompt_mask)
        completion_mask, truncated = _completion_mask(completion_ids, self.eos_token_ids)
        completion_ids = torch.where(completion_mask.bool(), completion_ids, tok.pad_token_id)
        lengths = completion_mask.sum(1)
        ids_list = [
            c[:n].tolist() for c, n in zip(completion_ids.cpu(), lengths.tolist(), strict=True)
        ]
        texts = tok.batch_decode(ids_list, skip_special_tokens=True)
        completions = [
            [{"role": "assistant", "content": t}] if _is_conversational(p) else t
            for p, t in zip(prompts, texts, strict=True)
        ]
        rewards = self._rewards(prompts, completions, rows, ids_list)  # [B, K]
        if torch.isnan(rewards).any():
            bad = int(torch.isnan(rewards).any(1).nonzero()[0])
            raise ValueError(
                f"a reward function returned None for completion {bad} ({completions[bad]!r}):"
                " PPO needs a score for every completion"
            )
        scores = (rewards * self.reward_weights.to(device)).sum(1)
        if a.missing_eos_penalty is not None:
            scores = scores - a.missing_eos_penalty * truncated.float()
        batch = dict(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
        )
        return self._experience(batch, scores, rewards, truncated)

    @torch.no_grad()
    def _experience(self, batch, scores, rewards, truncated) -> dict[str, Any]:
        """Steps 3-4 on a sampled, scored batch (split out so a test can fix the batch)."""
        a = self.args
        mask = batch["completion_mask"]
        m = mask.float()
        old_logps, old_values = self._heads(batch, reference=False)
        old_values = old_values * m
        if a.kl_coef != 0:
            ref_logps, _ = self._heads(batch, reference=True)
            kl = _k_estimate(old_logps, ref_logps, a.kl_estimator) * m
        else:
            ref_logps, kl = old_logps, torch.zeros_like(old_logps)
        token_rewards = kl_shaped_rewards(scores, mask, kl=kl, kl_coef=a.kl_coef)
        if a.whiten_rewards:  # TRL: whitened, the mean kept (shift_mean=False)
            token_rewards = self._whiten(token_rewards, mask, keep_mean=True)
        advantages, returns = gae_advantages(
            token_rewards, old_values, mask, gamma=a.gamma, lam=a.lam, impl=a.kernel_impl
        )
        raw_advantages = advantages
        if a.whiten_advantages:
            advantages = self._whiten(advantages, mask)
        tensors = dict(
            **batch,
            old_logps=old_logps,
            old_values=old_values,
            ref_logps=ref_logps,
            scores=scores,
            token_rewards=token_rewards,
            raw_advantages=raw_advantages,
            advantages=advantages,
            returns=returns,
        )
        self._record_rollout(tensors, rewards, kl, truncated)
        B = scores.shape[0]
        seed = (a.seed, self.state.global_step)
        g = torch.Generator().manual_seed(hash(seed) % 2**63)
        perms = [torch.randperm(B, generator=g).to(scores.device) for _ in range(a.num_ppo_epochs)]
        widths = self._widths(batch["completion_mask"], perms)
        return {"tensors": tensors, "permutations": perms, "widths": widths}

    def _whiten(
        self, x: torch.Tensor, mask: torch.Tensor, *, keep_mean: bool = False
    ) -> torch.Tensor:
        """`masked_whiten` of `[B, T]` `x` over the whole rollout, every process's rows
        together (OpenRLHF's statistics over all data-parallel ranks; TRL's PPOTrainer
        whitens each process's batch alone): the rows are gathered (padded to the longest
        completion), whitened as one batch and this process's returned, so N processes x
        B rows whiten as one process with N * B rows does. `keep_mean` adds the masked
        mean back (TRL's `whiten_rewards`, `shift_mean=False`). Four small collectives per
        call (the width and the rows of `x`, then of `mask`), once per rollout; none on one
        process."""
        acc = self.accelerator
        rows = slice(None)
        if acc.num_processes > 1:
            B, T = x.shape
            x, mask = (acc.gather(acc.pad_across_processes(t, dim=1)) for t in (x, mask))
            rows = (slice(acc.process_index * B, (acc.process_index + 1) * B), slice(0, T))
        out = masked_whiten(x, mask)
        if keep_mean:
            out = out + _masked_mean(x, mask.float()) * mask
        return out[rows]

    def _record_rollout(self, t, rewards, kl, truncated) -> None:
        """The rollout's metrics (TRL's PPO names) and its prompt + completion tokens; with
        several processes `val/num_eos_tokens` and the token count are their sums."""
        a = self.args
        m = t["completion_mask"].float()
        non_score = (-a.kl_coef * kl * m).sum(1)
        metrics = {
            "objective/scores": t["scores"].mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (t["scores"] + non_score).mean(),
            # TRL's: the sampled tokens' negative log-probs, summed per completion
            "objective/entropy": (-t["old_logps"] * m).sum(1).mean(),
            "completions/mean_length": m.sum(1).mean(),
            "completions/clipped_ratio": truncated.float().mean(),
        }
        if a.kl_coef != 0:
            metrics["objective/kl"] = (kl * m).sum(1).mean()
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"] = rewards[:, i].mean()
        # every process's rollout has the same number of rows, so the window's mean over
        # processes of these means is the whole rollout's; the counts are summed over them
        counts = torch.stack([(~truncated).sum(), t["prompt_mask"].sum() + m.sum()]).double()
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, "sum")
        metrics["val/num_eos_tokens"] = counts[0]
        self._record_metrics(metrics)
        self.state.num_input_tokens_seen += int(counts[1])  # once per rollout

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("PPOTrainer.compute_loss does not return outputs (no logits)")
        a = self.args
        unwrapped = self._unwrapped_model()
        head = lm_head(unwrapped)
        P = inputs["prompt_ids"].shape[1]
        training = model.training
        (logps, entropy), values = self._forward_heads(
            model, unwrapped, inputs, P, head, values=True,
            entropy=True,
        )  # fmt: skip
        mask = inputs["completion_mask"]
        ga = self.current_gradient_accumulation_steps if training else 1
        pg_loss, _ = ppo_policy_loss(
            logps,
            inputs["old_logps"],
            inputs["advantages"],
            mask,
            loss_type=LOSS_TYPE,
            epsilon=a.cliprange,
            gradient_accumulation_steps=ga,
        )
        vf_loss, vf_metrics = value_loss(
            values, inputs["old_values"], inputs["returns"], mask, value_clip=a.cliprange_value
        )
        loss = pg_loss + a.vf_coef * vf_loss / ga
        self._record_step(
            loss,
            self._step_metrics(logps, entropy, inputs, mask, pg_loss * ga, vf_loss, vf_metrics),
            inputs,
            train=training,
            tokens=torch.cat([inputs["prompt_mask"], mask], 1).sum(),
        )
        return loss

    @torch.no_grad()
    def _step_metrics(self, logps, entropy, inputs, mask, pg_loss, vf_loss, vf_metrics):
        m = mask.float()
        logr = (logps - inputs["old_logps"]) * m
        ratio = torch.exp(logr)
        adv, eps = inputs["advantages"], self.args.cliprange
        clipped = (adv * ratio.clamp(1 - eps, 1 + eps)) < (adv * ratio)  # the clip binds
        return {
            "policy/approxkl_avg": _masked_mean(0.5 * logr**2, m),
            "policy/clipfrac_avg": _masked_mean(clipped.float(), m),
            "policy/entropy_avg": _masked_mean(entropy, m),
            "loss/policy_avg": pg_loss.detach(),
            "loss/value_avg": vf_loss.detach(),
            "val/clipfrac_avg": vf_metrics["vf_clipfrac"],
            "val/ratio": _masked_mean(ratio, m),
        }

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        raise ValueError("PPOTrainer has no evaluation loop")

    def _tokens_seen(self, trained: int) -> int:
        return self.state.num_input_tokens_seen  # counted at rollout, as GRPOTrainer

    # ------------------------------------------------------------------ save / load

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (the adapter), and the whole value head next to it: every
        process gathers it (FSDP2 / ZeRO-3 shards; a collective, called on each process as
        `save_model` is), the saving one writes it. Every checkpoint goes through here."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_value_head(self._unwrapped_model(), output_dir, write=self.args.should_save)

    def _rollout_file(self, directory: str) -> str:
        if self.args.world_size > 1:  # each process trains on its own rollout
            return os.path.join(directory, f"ppo_rollout_{self.args.process_index}.pt")
        return os.path.join(directory, ROLLOUT_NAME)

    def _save_rng_state(self, output_dir: str) -> None:
        # the rollout being trained on is sampling state, like the RNG (as GRPO's buffer)
        super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        torch.save({"step": self._step, "rollout": self._rollout},
                   self._rollout_file(output_dir))  # fmt: skip

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = self._rollout_file(checkpoint)
        if os.path.isfile(path):
            device = self.accelerator.device
            # torch.load knows "cpu", not "cpu:0" (accelerate's device of an FSDP CPU process)
            where = "cpu" if device.type == "cpu" else device
            state = torch.load(path, map_location=where, weights_only=True)
            self._step, self._rollout = state["step"], state["rollout"]
        else:  # a new rollout at the next step: exact only at a rollout boundary
            self._step = self.state.global_step * self.args.gradient_accumulation_steps
            self._rollout = None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_value_head(self._unwrapped_model(), resume_from_checkpoint)
