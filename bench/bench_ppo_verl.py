"""The `verl` row of bench/bench_ppo_step.py: verl 0.9.1's own PPO machinery, run in one
process without Ray (world size 1), on the same checkpoint, prompts and step definition as
the fastrl row. Imported by that benchmark's worker, in a python that has verl
(`--verl-python`, `.venv-verl` by default; `make venv-verl` builds it).

What is verl's:
- the workers: `ActorRolloutRefWorker` (role "actor") holding the actor's `TrainingWorker`
  (FSDP engine, LoRA through peft as verl configures it: `lora_rank`/`lora_alpha`,
  `target_modules="all-linear"`), and a second `TrainingWorker` with
  `model_type="value_model"` for the critic, a separate backbone
  (`AutoModelForTokenClassification(num_labels=1)`) with its own optimizer, as verl's
  trainer builds it. The critic trains all its weights (verl's default
  `critic.model.lora_rank=0`; with LoRA verl wraps it as peft's CAUSAL_LM task, and
  peft's causal-LM model needs `prepare_inputs_for_generation`, which transformers 5's
  token-classification models, verl 0.9.1's requirement, do not have), so it holds fp32
  weights, gradients and AdamW state for a whole backbone. Called: the actor's
  `compute_log_prob` (old log-probs, with the entropy verl's trainer asks for) and again
  with its adapters disabled (`no_lora_adapter`: the reference, verl's `ref_in_actor`
  whenever LoRA is on), the critic's `infer_batch` (values) and `train_mini_batch` (its
  update, `value_loss`), the actor's `update_actor` (`ppo_loss`: vanilla clipped
  surrogate, `loss_agg_mode` "token-mean");
- the configuration: verl's own `_generated_ppo_trainer.yaml` defaults (AdamW, lr 1e-6
  actor / 1e-5 critic, grad clip 1.0, clip ratio 0.2, value clip 0.5, fp32 master weights,
  bf16 compute on CUDA, gradient checkpointing, torch.compile'd entropy on CUDA), with
  the bench's sizes and `use_kl_in_reward=True`, `kl_ctrl.kl_coef=--kl-coef` (fastrl's
  row has the KL penalty in its reward too);
- the batch layout (`DataProto` -> `left_right_2_no_padding` -> nested tensors) and the
  advantage math: `core_algos.kl_penalty` ("kl", k1) in the token rewards and
  `core_algos.compute_gae_advantage_return` (gamma = lambda = 1, whitened advantages), the
  lines of `ray_trainer.apply_kl_penalty` / `compute_advantage` (whose module imports
  verl's data-loading stack, so the harness does not import it).

What is the harness's:
- generation: Hugging Face `generate` on the actor's FSDP2 module (its shards gathered for
  the whole call), `--completion-length` tokens exactly. verl's real rollout is a vLLM /
  SGLang server fed the actor's weights; the fastrl row also generates with HF `generate`,
  and generation seconds are reported on their own;
- the rewards (`bench_grpo_step.varied_reward`, on the last response token, where verl's
  reward manager puts a sequence score);
- `strategy="fsdp2"` (verl's default is FSDP1, whose `sync_module_states` needs a GPU;
  with one process both shard nothing), `use_remove_padding=False` (verl's default packs
  sequences for flash-attn's varlen kernels; flash-attn is not installed, the bench uses
  `--attn-implementation`), the critic loaded with that attention implementation (verl's
  `load_valuehead_model` hard-codes flash_attention_2), and on a CPU a verl platform for
  the CPU (verl 0.9.1 knows CUDA, NPU and ROCm only) and fp32 compute;
- verl's `verl.utils.dataset` package is entered without running its `__init__`, which
  imports its RL datasets (datasets, pyarrow, pandas, Pillow) that nothing here uses.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import socket
import sys
import time
import types
from functools import partial
from pathlib import Path

import torch

from bench.bench_grpo_step import prepare_run, step_figures, varied_reward


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------ verl in one process


def _skip_verl_dataset_init() -> None:
    """Enter `verl.utils.dataset` as a bare package: its `__init__` imports the RL datasets
    (and with them datasets, pyarrow, pandas, Pillow); the losses need only
    `dataset_utils`. Nothing is skipped where those imports work."""
    import importlib.util

    if "verl.utils.dataset" in sys.modules:
        return
    if all(importlib.util.find_spec(m) is not None for m in ("datasets", "pandas", "PIL")):
        return
    import verl.utils

    package = types.ModuleType("verl.utils.dataset")
    package.__path__ = [str(Path(verl.utils.__file__).parent / "dataset")]
    sys.modules["verl.utils.dataset"] = package


def import_verl() -> None:
    """Import the verl modules the row runs (its workers, FSDP engine, PPO algorithms)."""
    _skip_verl_dataset_init()
    import verl.trainer.ppo.core_algos  # noqa: F401
    import verl.workers.engine.fsdp.transformer_impl  # noqa: F401
    import verl.workers.engine_workers  # noqa: F401


class _CpuDeviceModule:
    """What verl calls on `get_torch_device()`, for the CPU: torch.cpu's functions, and 0
    for the CUDA memory statistics (a CPU run reports the process's resident memory)."""

    def __getattr__(self, name: str):
        if name.startswith(("max_memory", "memory_", "reset_peak")):
            return lambda *args, **kwargs: 0
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        if name in ("empty_cache", "manual_seed_all"):
            return lambda *args, **kwargs: None
        if name == "get_device_name":
            return lambda *args, **kwargs: "cpu"
        return getattr(torch.cpu, name)


def _use_cpu_platform() -> None:
    """Register a verl platform for the CPU (gloo; devices are "cpu"), and have verl's
    engine registry pick its FSDP engines, registered for CUDA and NPU only."""
    from verl.plugin.platform import platform_manager
    from verl.plugin.platform.platform_cuda import PlatformCUDA

    class PlatformCPU(PlatformCUDA):
        device_name = property(lambda self: "cpu")
        vendor_name = property(lambda self: "cpu")
        device_module = property(lambda self: _CpuDeviceModule())

        def is_available(self) -> bool:
            return True

        def current_device(self) -> str:
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index) -> None:
            pass

        def synchronize(self, device_index=None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        manual_seed_all = manual_seed

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def communication_backend_name(self) -> str:
            return "gloo"

        def is_ipc_supported(self) -> bool:
            return False

    platform_manager.set_platform(PlatformCPU())
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"


def _init_process_group(cuda: bool) -> None:
    """World size 1, on a free local port (verl's workers read RANK, WORLD_SIZE, ...)."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    os.environ.update(env)
    if cuda:
        torch.cuda.set_device(0)  # verl's engines put their tensors on current_device()
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)


def _critic_loader(attn_implementation: str):
    """verl's `load_valuehead_model` (a token-classification head, num_labels=1) with the
    bench's attention implementation instead of its hard-coded flash_attention_2."""

    def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            local_path, torch_dtype=torch_dtype, config=model_config,
            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
        )  # fmt: skip

    return load_valuehead_model


def verl_config(opts: argparse.Namespace, path: Path, cuda: bool):
    """verl's PPO trainer defaults with the bench's model, sizes and KL coefficient."""
    from omegaconf import OmegaConf
    from verl.trainer import config as trainer_config

    defaults = Path(trainer_config.__file__).parent / "_generated_ppo_trainer.yaml"
    n = opts.rollout_size
    attn = {"attn_implementation": opts.attn_implementation}
    model = dict(path=str(path), tokenizer_path=str(path / "tokenizer"), lora_rank=16,
                 lora_alpha=32, use_remove_padding=False, override_config=attn)  # fmt: skip
    engine = dict(strategy="fsdp2", use_torch_compile=cuda)
    if not cuda:
        fp32 = dict(param_dtype="fp32", reduce_dtype="fp32", buffer_dtype="fp32")
        engine["mixed_precision"] = fp32
    override = {
        "actor_rollout_ref": {
            "model": model,
            "actor": dict(strategy="fsdp2", ppo_mini_batch_size=n, ppo_micro_batch_size_per_gpu=n,
                          ppo_epochs=1, use_torch_compile=cuda, fsdp_config=engine),
            "rollout": dict(name="hf", n=1, temperature=1.0, log_prob_micro_batch_size_per_gpu=n,
                            prompt_length=opts.prompt_length,
                            response_length=opts.completion_length),
        },
        # the critic trains all its weights (verl's default critic.model.lora_rank=0): verl
        # wraps a LoRA model as peft's CAUSAL_LM, which fails on a token-classification one
        "critic": dict(model={**model, "lora_rank": 0}, strategy="fsdp2", ppo_mini_batch_size=n,
                       ppo_micro_batch_size_per_gpu=n, forward_micro_batch_size_per_gpu=n,
                       ppo_epochs=1, fsdp=engine),
        "algorithm": {"use_kl_in_reward": True, "kl_ctrl": {"kl_coef": opts.kl_coef}},
    }  # fmt: skip
    return OmegaConf.merge(OmegaConf.load(defaults), OmegaConf.create(override))


def build_workers(cfg, attn_implementation: str) -> tuple[object, object]:
    """verl's actor worker (with its reference) and its critic worker, as its trainer builds
    them (`RayPPOTrainer.init_workers`), called in this process instead of through Ray."""
    import verl.utils.model
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine_workers import (
        ActorRolloutRefWorker,
        TrainingWorker,
        TrainingWorkerConfig,
    )
    from verl.workers.utils.losses import value_loss

    actor = ActorRolloutRefWorker(cfg.actor_rollout_ref, role="actor")
    actor.init_model()
    verl.utils.model.load_valuehead_model = _critic_loader(attn_implementation)
    critic_cfg = omega_conf_to_dataclass(cfg.critic)
    engine = critic_cfg.engine
    engine.infer_max_token_len_per_gpu = critic_cfg.ppo_infer_max_token_len_per_gpu
    engine.max_token_len_per_gpu = critic_cfg.ppo_max_token_len_per_gpu
    critic = TrainingWorker(
        TrainingWorkerConfig(
            model_type="value_model", model_config=critic_cfg.model, engine_config=engine,
            optimizer_config=critic_cfg.optim, checkpoint_config=critic_cfg.checkpoint,
        )
    )  # fmt: skip
    critic.reset()
    critic.set_loss_fn(partial(value_loss, config=critic_cfg))
    return actor, critic


# ------------------------------------------------------------------ one PPO step


def generate(actor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n_tokens: int,
             tokenizer, autocast: torch.dtype | None) -> torch.Tensor:  # fmt: skip
    """`n_tokens` sampled tokens after each prompt, from the actor's module: HF `generate`
    with its KV cache, every FSDP2 shard gathered once for the whole call (not per token).
    prompt_ids, prompt_mask: [B, P] long, left-padded. Returns [B, P + n_tokens] long."""
    from torch.distributed.fsdp import FSDPModule

    engine = actor.actor.engine
    module, reshard = engine.module, engine.engine_config.reshard_after_forward
    with engine.eval_mode(), torch.no_grad():
        if not getattr(module, "_bench_root_ready", False):
            # FSDP2 takes the first of its modules a forward runs through for its root:
            # one forward through the root itself, before `generate` calls the decoder
            module(input_ids=prompt_ids[:, :1], attention_mask=prompt_mask[:, :1], use_cache=False)
            module._bench_root_ready = True
        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            device_type = prompt_ids.device.type
            with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
                return module.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=n_tokens,
                    min_new_tokens=n_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )  # fmt: skip
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(reshard, recurse=False)


def rollout_batch(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sequences: torch.Tensor,
                  prompts: list[str], tokenizer) -> tuple[object, torch.Tensor]:  # fmt: skip
    """verl's rollout output from `generate`'s: prompt_ids, prompt_mask [B, P] long
    (left-padded), sequences [B, P + R] long. Returns the `DataProto` of prompts, responses,
    input_ids, attention_mask, position_ids and response_mask ([B, R]: up to and including
    the first EOS; meta_info temperature 1), and the scores ([B, R] float32: each
    completion's reward on its last token, verl's `token_level_scores`)."""
    from verl import DataProto

    responses = sequences[:, prompt_ids.shape[1] :]
    eos = responses.eq(tokenizer.eos_token_id).int()
    response_mask = (eos.cumsum(-1) - eos).eq(0).to(prompt_mask.dtype)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    completions = tokenizer.batch_decode(responses * response_mask, skip_special_tokens=True)
    rewards = torch.tensor(varied_reward(prompts, completions), dtype=torch.float32)
    scores = torch.zeros(responses.shape, dtype=torch.float32)
    last = response_mask.sum(-1).clamp(min=1) - 1
    scores[torch.arange(len(rewards)), last] = rewards
    tensors = dict(prompts=prompt_ids, responses=responses, input_ids=sequences,
                   attention_mask=attention_mask, position_ids=position_ids,
                   response_mask=response_mask)  # fmt: skip
    batch = DataProto.from_dict(tensors={k: v.cpu() for k, v in tensors.items()},
                                meta_info={"temperature": 1.0})  # fmt: skip
    return batch, scores


def _infer(worker_call, batch, key: str, out_key: str, **meta):
    """One of verl's trainer's `_compute_*` helpers: padded -> nested, the worker's forward,
    nested -> padded [B, R] float32."""
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, compute_loss=False, **meta)
    out = worker_call(td)
    values = no_padding_2_padding(tu.get(out, key), td).float()
    return DataProto.from_tensordict(tu.get_tensordict({out_key: values}))


def _train(worker_call, batch, role_cfg, **meta) -> dict:
    """verl's trainer's `_update_actor` / `_update_critic`: `role_cfg.ppo_epochs` epochs of
    mini-batches of `role_cfg.ppo_mini_batch_size` (rollout.n = 1), in its loader order."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = left_right_2_no_padding(batch.to_tensordict())
    n = role_cfg.ppo_mini_batch_size
    tu.assign_non_tensor(td, global_batch_size=n, mini_batch_size=n, epochs=role_cfg.ppo_epochs,
                         seed=role_cfg.data_loader_seed,
                         dataloader_kwargs={"shuffle": role_cfg.shuffle}, **meta)  # fmt: skip
    return tu.get(worker_call(td), "metrics")


def ppo_step(actor, critic, cfg, kl_ctrl, batch, scores: torch.Tensor) -> dict[str, float]:
    """verl's trainer's step after the rollout (`RayPPOTrainer.fit`'s order): old log-probs,
    reference log-probs, values, KL-penalised token rewards (`apply_kl_penalty`, with
    `kl_ctrl` = `core_algos.get_kl_controller(cfg.algorithm.kl_ctrl)`, kept across steps),
    GAE, the critic's update, the actor's update. Returns the step's metrics."""
    from verl.trainer.ppo import core_algos
    from verl.utils.torch_functional import masked_mean

    batch = batch.union(_infer(actor.compute_log_prob, batch, "log_probs", "old_log_probs",
                               calculate_entropy=True))  # fmt: skip
    batch = batch.union(_infer(actor.compute_log_prob, batch, "log_probs", "ref_log_prob",
                               calculate_entropy=False, no_lora_adapter=True))  # fmt: skip
    batch = batch.union(_infer(critic.infer_batch, batch, "values", "values"))
    mask = batch.batch["response_mask"]
    algo = cfg.algorithm
    kld = core_algos.kl_penalty(batch.batch["old_log_probs"], batch.batch["ref_log_prob"],
                                kl_penalty=algo.kl_penalty) * mask  # fmt: skip
    batch.batch["token_level_scores"] = scores
    batch.batch["token_level_rewards"] = scores - kl_ctrl.value * kld
    kl = torch.mean(masked_mean(kld, mask=mask, axis=-1)).item()
    kl_ctrl.update(current_kl=kl, n_steps=len(scores))
    advantages, returns = core_algos.compute_gae_advantage_return(
        token_level_rewards=batch.batch["token_level_rewards"], values=batch.batch["values"],
        response_mask=mask, gamma=algo.gamma, lam=algo.lam,
    )  # fmt: skip
    batch.batch["advantages"], batch.batch["returns"] = advantages, returns
    critic_metrics = _train(critic.train_mini_batch, batch, cfg.critic)
    actor_cfg = cfg.actor_rollout_ref.actor
    entropy = actor_cfg.calculate_entropy or actor_cfg.entropy_coeff != 0
    actor_metrics = _train(actor.update_actor, batch, actor_cfg, compute_loss=True,
                           calculate_entropy=entropy, distillation_use_topk=False,
                           distillation_only=False)  # fmt: skip
    return dict(
        loss=float(actor_metrics["loss"][-1]),
        **{"actor/pg_loss": float(actor_metrics["actor/pg_loss"][-1]),
           "critic/vf_loss": float(critic_metrics["critic/vf_loss"][-1]),
           "actor/reward_kl_penalty": kl},
    )  # fmt: skip


def run_verl(opts: argparse.Namespace) -> dict:
    """Train `opts.warmup + opts.steps` PPO steps with verl; the fastrl row's measurements.
    `last_log`: the actor's loss (`loss`, verl's "actor/loss"), its policy loss, the
    critic's value loss (its own optimizer: verl has no `vf_coef`) and the KL in the
    reward, of the last step."""
    cuda = torch.cuda.is_available()
    import_verl()
    if not cuda:
        _use_cpu_platform()
    _init_process_group(cuda)
    n_steps = opts.warmup + opts.steps
    path, tokenizer, prompts = prepare_run(opts, opts.rollout_size * n_steps)
    cfg = verl_config(opts, path, cuda)
    actor, critic = build_workers(cfg, opts.attn_implementation)
    from verl.trainer.ppo import core_algos

    kl_ctrl = core_algos.get_kl_controller(cfg.algorithm.kl_ctrl)
    tokenizer.padding_side = "left"
    device = torch.device("cuda" if cuda else "cpu")
    autocast = torch.bfloat16 if cuda else None
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps, last = [], {}
    for i in range(n_steps):
        chunk = prompts[i * opts.rollout_size : (i + 1) * opts.rollout_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        _sync()
        start = time.perf_counter()
        sequences = generate(actor, ids, mask, opts.completion_length, tokenizer, autocast)
        _sync()
        generated = time.perf_counter()
        batch, scores = rollout_batch(ids.cpu(), mask.cpu(), sequences.cpu(), chunk, tokenizer)
        last = ppo_step(actor, critic, cfg, kl_ctrl, batch, scores)
        _sync()
        end = time.perf_counter()
        steps.append(dict(seconds=end - start, generate_seconds=generated - start))
    tokens = opts.rollout_size * (opts.prompt_length + opts.completion_length)
    return dict(
        **step_figures(steps, opts.warmup, tokens),
        last_log=last,
        versions={d: importlib.metadata.version(d) for d in ("verl", "transformers", "peft")},
    )
