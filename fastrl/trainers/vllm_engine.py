"""A colocated vLLM engine for `GRPOTrainer` (``use_vllm=True``): generation with the
sampler's per-token log-probs, and the LoRA adapter synced as an adapter (no merge).

One `VLLMEngine` per process, started once per run, in this process (vLLM's V1 engine core
in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``"uni"`` executor, or
``"external_launcher"`` under DDP so each rank's engine runs on its own device) and on the
training device. It loads the base checkpoint once, with LoRA enabled; the trainer's
adapter reaches it through `sync_adapter`: peft's `save_pretrained` of the current LoRA
weights into a temporary folder, then a new `LoRARequest` (a new id, so vLLM loads it
afresh) that the next `generate` uses. The base weights are never copied again, and a
4-bit base (``quantization="bitsandbytes"``) stays exact, since nothing is merged into it.

Log-probs come back as vLLM's ``processed_logprobs`` (after temperature and the
top-k/top-p/min-p filters, as TRL asks for them): what `policy_loss`'s
importance-sampling correction compares with the policy's log-probs.

Nothing here imports vllm at module level: `fastrl.trainers` imports this module in an
environment without vllm.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastrl.trainers.grpo_config import VLLM_EXTRA

__all__ = ["SamplingSettings", "VLLMEngine", "lora_rank_for_vllm", "sampling_settings"]

#: the `GenerationConfig` fields (the HF path's `generation_kwargs`) the engine honours
_SUPPORTED = (
    "do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id", "bos_token_id",
    "use_cache", "num_return_sequences",
)  # fmt: skip
_RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


@dataclass(frozen=True)
class SamplingSettings:
    """The trainer's sampling settings, as the HF path's `GenerationConfig` means them:
    ``top_k=0`` and ``min_p=None`` are off; ``do_sample=False`` is greedy."""

    max_tokens: int
    stop_token_ids: tuple[int, ...]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    do_sample: bool = True
    min_tokens: int = 0

    def vllm_kwargs(self) -> dict[str, Any]:
        """`vllm.SamplingParams` keyword arguments (one completion per prompt, the sampled
        token's log-prob at each position)."""
        return dict(
            n=1,
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens or 0,
            temperature=self.temperature if self.do_sample else 0.0,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k > 0 else -1,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=self.repetition_penalty,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=True,  # the stop ids are the EOS ids (the tokenizer is not loaded)
            logprobs=0,  # the sampled token's only
            detokenize=False,
            skip_special_tokens=False,
        )


def sampling_settings(args, eos_token_ids: Sequence[int]) -> SamplingSettings:
    """`SamplingSettings` from a `GRPOConfig`'s sampling options with its `generation_kwargs`
    over them (`GenerationConfig` field names, as on the HF path) and the EOS ids a
    completion ends at. A `generation_kwargs` field the engine cannot honour raises a
    ValueError naming it."""
    extra = dict(args.generation_kwargs or {})
    unsupported = sorted(set(extra) - set(_SUPPORTED))
    if unsupported:
        raise ValueError(
            f"--generation_kwargs {', '.join(f'{k}={extra[k]!r}' for k in unsupported)}: not "
            f"supported with --use_vllm, which takes {', '.join(_SUPPORTED)}"
        )
    values = dict(
        max_tokens=args.max_completion_length,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )
    for name, value in extra.items():
        if name in ("eos_token_id", "pad_token_id", "bos_token_id", "use_cache"):
            continue  # the EOS ids come resolved; the others do not change sampling
        values[_RENAMED.get(name, name)] = value
    if extra.get("num_return_sequences", 1) != 1:
        raise ValueError(
            f"--generation_kwargs num_return_sequences={extra['num_return_sequences']} is not "
            "supported: each prompt is repeated --num_generations times"
        )
    values.pop("num_return_sequences", None)
    return SamplingSettings(stop_token_ids=tuple(int(i) for i in eos_token_ids), **values)


def lora_rank_for_vllm(r: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds rank `r`."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    for rank in allowed:
        if rank >= r:
            return rank
    raise ValueError(f"--lora_r {r} is larger than vLLM's largest LoRA rank ({allowed[-1]})")


def _import_vllm():
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise ValueError(
            f"--use_vllm needs vllm, which cannot be imported ({e}): {VLLM_EXTRA}"
        ) from e
    return vllm, LoRARequest


def _is_out_of_memory(exc: BaseException) -> bool:
    """An engine start that failed for memory: CUDA OOM, or vLLM's refusals ("No available
    memory for the cache blocks", "... KV cache is needed, which is larger than the
    available KV cache memory", "Free memory on device ... is less than desired GPU
    memory utilization", "Cannot auto-fit max_model_len: not enough GPU memory")."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, (ValueError, RuntimeError)) and ("memory" in text or "kv cache" in text)
    )


@dataclass
class VLLMEngine:
    """One in-process vLLM engine with LoRA enabled (see the module docstring).

    Args:
        model: the base checkpoint (a local directory or a hub id): the policy's base
            weights, without the adapter.
        max_lora_rank: the adapter's rank (rounded up to one vLLM accepts).
        max_model_len: the engine's context (prompt + completion tokens).
        dtype: ``"auto"`` (the checkpoint's), ``"bfloat16"``, ``"float16"``, ``"float32"``.
        gpu_memory_utilization: the fraction of the GPU the engine may take (weights and
            KV cache); ignored when `kv_cache_memory_bytes` is set.
        kv_cache_memory_bytes: the KV cache size in bytes (the CPU backend's budget).
        enable_sleep_mode: allow `sleep` / `wake_up` (CUDA only).
        seed: the sampler's seed.
        enforce_eager: no CUDA graphs.
        quantization: ``"bitsandbytes"`` for a 4-bit base, else None.
        model_impl: ``"vllm"`` or ``"transformers"``.
        distributed_executor_backend: ``"uni"`` (one process) or ``"external_launcher"``
            (one engine per DDP rank, torch.distributed already initialised).
        max_num_seqs, max_num_batched_tokens: the scheduler's batch (TRL uses 4096 tokens).
    """

    model: str
    max_lora_rank: int
    max_model_len: int
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    enable_sleep_mode: bool = False
    seed: int = 0
    enforce_eager: bool = False
    quantization: str | None = None
    model_impl: str = "vllm"
    distributed_executor_backend: str = "uni"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    #: seconds the engine took to start, the last sync and the last generation
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vllm, self._LoRARequest = _import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in-process
        self._lora_dir = tempfile.mkdtemp(prefix="fastrl-vllm-lora-")
        self._lora: Any = None
        self._lora_id = 0
        self._sleeping = False
        kwargs = dict(
            model=self.model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enable_lora=True,
            max_loras=1,
            max_lora_rank=lora_rank_for_vllm(self.max_lora_rank),
            enable_sleep_mode=self.enable_sleep_mode,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            quantization=self.quantization,
            model_impl=self.model_impl,
            distributed_executor_backend=self.distributed_executor_backend,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max(self.max_num_batched_tokens, self.max_model_len),
            logprobs_mode="processed_logprobs",
            skip_tokenizer_init=True,
            enable_prefix_caching=True,
        )
        if self.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        else:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        start = time.perf_counter()
        try:
            self.llm = vllm.LLM(**kwargs)
        except BaseException as e:  # Ctrl-C during the start too: the folders go
            self.close()
            if _is_out_of_memory(e):
                budget = f"--vllm_gpu_memory_utilization (now {self.gpu_memory_utilization})"
                if self.kv_cache_memory_bytes is not None:  # it replaces the fraction
                    budget = (
                        f"--vllm_kv_cache_memory_bytes (now {self.kv_cache_memory_bytes}, "
                        f"which replaces {budget})"
                    )
                message = (
                    f"the vLLM engine did not fit at start: raise {budget} or lower "
                    f"--vllm_max_model_length (now {self.max_model_len}, the longest prompt + "
                    f"completion it must hold).\n{type(e).__name__}: {e}"
                )
                if isinstance(e, torch.OutOfMemoryError):
                    raise torch.OutOfMemoryError(message) from e
                raise ValueError(message) from e
            raise
        self.timings["start_s"] = time.perf_counter() - start

    # ------------------------------------------------------------------ adapter

    def sync_adapter(self, peft_model) -> None:
        """Make the next `generate` use `peft_model`'s current LoRA weights: its adapter
        (weights and config, no merge) saved into a fresh folder, under a new
        `LoRARequest` id; the previous adapter is removed from the engine."""
        start = time.perf_counter()
        self._lora_id += 1
        path = os.path.join(self._lora_dir, str(self._lora_id))
        peft_model.save_pretrained(path, safe_serialization=True)
        previous = self._lora
        self._lora = self._LoRARequest(f"fastrl-{self._lora_id}", self._lora_id, path)
        if previous is not None:
            with contextlib.suppress(Exception):  # evicted anyway (max_loras=1)
                self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.timings["sync_s"] = time.perf_counter() - start

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingSettings,
        seeds: Sequence[int] | None = None,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One completion per prompt (prompts given as token id lists, no padding).

        `seeds`: one sampling seed per prompt (the trainer derives them from its seed and
        step, so a resumed run samples what the uninterrupted one did, whatever the
        engine sampled before); None: the engine's own random stream.

        Returns:
            completion_ids: per prompt, the sampled token ids (the stop token included).
            logprobs: per prompt, the sampler's log-prob of each sampled token (float,
                as vLLM reports it; NaN where it gave none).
        """
        from vllm import SamplingParams

        if self._lora is None:
            raise RuntimeError("sync_adapter must be called before the first generate")
        self.wake_up()
        start = time.perf_counter()
        kwargs = sampling.vllm_kwargs()
        if seeds is None:
            params: Any = SamplingParams(**kwargs)
        else:
            if len(seeds) != len(prompt_ids):
                raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
            params = [SamplingParams(**kwargs, seed=int(s)) for s in seeds]
        prompts = [{"prompt_token_ids": list(map(int, ids))} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, lora_request=self._lora, use_tqdm=False)
        ids, logps = [], []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            ids.append(tokens)
            logps.append(_sampled_logprobs(completion.logprobs, tokens))
        self.timings["generate_s"] = time.perf_counter() - start
        return ids, logps

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """Offload the weights to host memory and drop the KV cache (level 1) until the
        next `generate`; a no-op without sleep mode."""
        if self.enable_sleep_mode and not self._sleeping:
            self.llm.sleep(level=1)
            self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    def close(self) -> None:
        """Shut the engine down and delete the adapter folders (idempotent)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            with contextlib.suppress(Exception):
                if core is not None and hasattr(core, "shutdown"):
                    core.shutdown()
            del llm, engine, core
        shutil.rmtree(self._lora_dir, ignore_errors=True)
        self._lora = None


def _sampled_logprobs(logprobs, tokens: list[int]) -> list[float]:
    """The sampled token's log-prob at each position, from vLLM's per-position
    ``{token_id: Logprob}`` (or its flat form); NaN where there is none."""
    if logprobs is None:
        return [float("nan")] * len(tokens)
    out = []
    for position, token in zip(logprobs, tokens, strict=False):
        entry = position.get(token) if hasattr(position, "get") else None
        out.append(float("nan") if entry is None else float(entry.logprob))
    out += [float("nan")] * (len(tokens) - len(out))
    return out


# --------------------------------------------------------------------------- the trainer's


def save_base_checkpoint(peft_model, directory: str) -> str:
    """Write `peft_model`'s base weights (the adapter left out, peft's ``base_layer``
    names restored) and config to `directory`, for an engine to load once: what a model
    object needs, which has no checkpoint of its own. Returns `directory`."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    state = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor.detach().contiguous()
    # tied weights share storage: safetensors refuses duplicates, the config re-ties them
    if getattr(base.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    # written here, not by `save_pretrained`, which writes on torch.distributed rank 0 only
    # (under DDP every rank's engine needs its own copy on its own disk)
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    base.config.save_pretrained(directory)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return directory


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def start_engine(trainer, model_path: str | None) -> VLLMEngine:
    """`trainer`'s engine (`GRPOTrainer` with ``use_vllm``): its base checkpoint (`model_path`,
    or a model object's base weights saved once into a temporary folder), the LoRA rank,
    dtype (``vllm_dtype="auto"``: the policy's), context, memory budget (a fraction of
    ``max_memory_gb`` when that caps the process), seed (default
    ``seed + process_index``) and, under DDP, one engine per rank (``external_launcher``,
    as TRL's colocate mode)."""
    args = trainer.args
    model = trainer._unwrapped()
    config = model.peft_config[model.active_adapter]
    if getattr(config, "modules_to_save", None):  # checked before anything is written
        raise ValueError(
            "--use_vllm syncs LoRA weights only: an adapter with modules_to_save "
            f"({config.modules_to_save}) cannot be loaded by vLLM"
        )
    if model_path is None:
        trainer._vllm_base_dir = tempfile.mkdtemp(prefix="fastrl-vllm-base-")
        model_path = save_base_checkpoint(model, trainer._vllm_base_dir)
    max_len = args.vllm_max_model_length
    if max_len is None and args.max_prompt_length is not None:
        max_len = args.max_prompt_length + args.max_completion_length
    if max_len is None:
        max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is None:
        raise ValueError(
            "--use_vllm needs the engine's context length: set --vllm_max_model_length (or "
            "--max_prompt_length); the model's config has no max_position_embeddings"
        )
    dtype = args.vllm_dtype
    if dtype == "auto":
        dtype = _dtype_name(lm_head_dtype(model))
    if args.world_size > 1:  # vLLM reads the rank's device from these
        os.environ.setdefault("RANK", str(args.process_index))
        os.environ.setdefault("LOCAL_RANK", str(args.local_process_index))
        os.environ.setdefault("WORLD_SIZE", str(args.world_size))
    utilization = args.vllm_gpu_memory_utilization
    if args.max_memory_gb is not None and torch.cuda.is_available():
        # a fraction of the capped memory: vLLM sizes itself from the whole device, which
        # the cap (the caching allocator's, which vLLM's tensors go through too) forbids
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        utilization *= min(1.0, args.max_memory_gb * 2**30 / total)
    return VLLMEngine(
        model=model_path,
        max_lora_rank=int(config.r),
        max_model_len=int(max_len),
        dtype=dtype,
        gpu_memory_utilization=utilization,
        kv_cache_memory_bytes=args.vllm_kv_cache_memory_bytes,
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        seed=args.vllm_seed if args.vllm_seed is not None else args.seed + args.process_index,
        enforce_eager=args.vllm_enforce_eager,
        quantization="bitsandbytes" if args.load_in_4bit else None,
        model_impl=args.vllm_model_impl,
        distributed_executor_backend="external_launcher" if args.world_size > 1 else "uni",
    )


def lm_head_dtype(model) -> torch.dtype:
    """The dtype of the policy's weights (its lm_head's)."""
    from fastrl.integrations import lm_head

    return lm_head(model).weight.dtype
