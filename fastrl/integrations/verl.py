"""Drop-in fastrl inside verl's fused-kernel forwards.

verl (0.9.1) scores tokens without logits when an actor runs with `use_fused_kernels=True`.
Its `fused_kernels_backend` picks one of two functions:

- "triton": `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight,
  labels, temperature, reduction, dist_process_group) -> (logprobs, entropy)`, verl's
  Triton kernels (CUDA only, `hidden_size % 128 == 0`). The Hugging Face forwards
  (`verl.models.transformers.dense_common.forward_with_triton_backend` and the VL models'
  versions) import it inside the function on every call; the Megatron forwards
  (`verl.models.mcore.model_forward_fused`, `model_forward_1f1b_overlap`) bind it at import
  and pass the tensor-parallel group as `dist_process_group` (a vocab-parallel weight).
- "torch" / "liger": `verl.utils.experimental.torch_functional.FusedLinearForPPO`, a module
  whose `forward(hidden_states, vocab_weights, input_ids, temperature)` builds chunked
  logits in PyTorch (or calls Liger's kernel); `forward_with_torch_backend` makes one per
  call.

`patch_verl()` serves both from fastrl's `linear_logprobs`: it replaces
`linear_cross_entropy` in verl's module and in every loaded module that bound the name
(modules imported later bind the replacement), and `FusedLinearForPPO.forward` on the class
(instances made before the patch are served too). Outputs keep verl's shapes and dtypes:

- `linear_cross_entropy`: `logprobs` and `entropy` float32, flattened to `[N]` whatever the
  shape of `hidden` (`[..., d]`), `logprobs` a 0-d sum or mean with `reduction="sum"` /
  `"mean"`; computed in the inputs' dtype, autocast ignored (as verl's kernel does);
- `FusedLinearForPPO`: `[T]` or `[B, T]` (the shape of `input_ids`), `log_probs` float32,
  `entropy` in the dtype of `hidden_states`; computed in the autocast dtype when autocast
  is on, else in the hidden states' dtype (as its PyTorch backend's matmul does; an fp32
  weight under bf16 autocast is cast for the call by `gathered_weight`, whose graph keeps
  a handle that casts it again in the backward, not the `[V, d]` copy).

Labels are token ids in `[0, V)` as verl requires (it has no ignore index; its kernel
leaves an out-of-range label's log-prob undefined); a label of -100 gets log-prob and
entropy 0 and no gradient here. No `hidden_size` restriction, and it runs on a CPU (impl
"auto" takes the PyTorch path there). `FusedLinearForPPO`'s `chunk_size` is not used:
fastrl bounds its own memory.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from fastrl import linear_logprobs
from fastrl.checks import check_choice, check_impl
from fastrl.integrations.gather import gathered_weight

_LCE_MODULE = "verl.utils.kernel.linear_cross_entropy"
_LCE_NAME = "linear_cross_entropy"
_PPO_MODULE = "verl.utils.experimental.torch_functional"
_PPO_NAME = "FusedLinearForPPO"
#: what verl's `linear_cross_entropy` accepts (after `reduction.lower()`, as verl does)
REDUCTIONS = ("none", "sum", "mean")

_active: VerlPatch | None = None


def _verl_targets() -> tuple[Any, type]:
    """verl's `linear_cross_entropy` module and its `FusedLinearForPPO` class."""
    try:
        lce_module = importlib.import_module(_LCE_MODULE)
        ppo_module = importlib.import_module(_PPO_MODULE)
    except ImportError as err:
        raise ImportError(
            f"patch_verl needs verl importable (pip install 'fastrl[verl]', verl 0.9.1): {err}"
        ) from err
    missing = [
        f"{mod.__name__}.{name}"
        for mod, name in ((lce_module, _LCE_NAME), (ppo_module, _PPO_NAME))
        if not hasattr(mod, name)
    ]
    if missing:
        import verl

        raise ImportError(
            f"patch_verl needs a verl with {' and '.join(missing)} (verl 0.9.1); "
            f"verl {getattr(verl, '__version__', '?')} has none"
        )
    return lce_module, getattr(ppo_module, _PPO_NAME)


def _rebind(old: Any, new: Any) -> list[str]:
    """Point every loaded module's `linear_cross_entropy` that is `old` at `new`; the
    names of those modules. An identity test: a module's own function of that name (any
    other object) is left alone."""
    names = []
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get(_LCE_NAME) is old:
            setattr(module, _LCE_NAME, new)
            names.append(name)
    return names


class VerlPatch:
    """The active replacement of verl's fused heads (see `patch_verl`).

    `linear_cross_entropy` has the signature and outputs of verl's function of that name;
    `fused_linear_for_ppo` those of `FusedLinearForPPO.forward` (less its module)."""

    def __init__(self, impl: str, original_lce, ppo_class: type):
        self.impl = impl
        self.original_linear_cross_entropy = original_lce
        self.ppo_class = ppo_class
        self.original_forward = ppo_class.__dict__["forward"]
        self.linear_cross_entropy_calls = 0
        self.fused_linear_for_ppo_calls = 0
        # the one object every module is given, so that undo can find it by identity
        self._lce = self.linear_cross_entropy
        self._forward = _ppo_forward(self)

    def _apply(self) -> None:
        _rebind(self.original_linear_cross_entropy, self._lce)
        self.ppo_class.forward = self._forward

    def linear_cross_entropy(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        temperature: float = 1.0,
        reduction: str = "none",
        dist_process_group: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """verl's `linear_cross_entropy` on fastrl's head.

        Args:
            hidden: `[..., d]` last hidden states (viewed as `[N, d]`).
            weight: `[V, d]` lm_head weight (the local vocab shard with
                `dist_process_group`), the dtype of `hidden`.
            labels: `N` token ids in any shape (viewed as `[N]`).
            temperature: logits are divided by it, > 0.
            reduction: "none", "sum" or "mean" of the log-probs (any case, as verl).
            dist_process_group: verl's tensor-parallel group: the vocabulary is split
                across its ranks (rank r holds rows `[r*V, (r+1)*V)`), `labels` are
                global ids, both outputs are the whole vocabulary's on every rank. verl's
                backward returns each rank's own share of the hidden-state gradient (no
                all-reduce: Megatron's graph reduces it), and so does this one
                (`reduce_hidden_grad=False`).

        Returns:
            (logprobs, entropy): float32 `[N]` each, logprobs 0-d for "sum" / "mean".
        """
        if not isinstance(reduction, str):
            raise TypeError(f"reduction must be a str, got {reduction!r}")
        mode = reduction.lower()
        check_choice("reduction", mode, REDUCTIONS)
        if hidden.dim() < 1 or labels.numel() * hidden.shape[-1] != hidden.numel():
            raise ValueError(
                f"labels {tuple(labels.shape)} must hold one id per row of hidden "
                f"{tuple(hidden.shape)}"
            )
        kwargs = {}
        if dist_process_group is not None:
            # verl's backward leaves each rank its shard's part of d_hidden (Megatron's
            # graph sums it), so fastrl's all-reduce of it is off
            kwargs.update(process_group=dist_process_group, reduce_hidden_grad=False)
        self.linear_cross_entropy_calls += 1
        # verl's kernel ignores autocast: it computes in the inputs' dtype. compact=False:
        # verl's labels are all valid, and counting them would be a host read per call
        with torch.autocast(hidden.device.type, enabled=False):
            logps, entropy = linear_logprobs(
                hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                temperature=temperature, return_entropy=True, impl=self.impl,
                compact=False, **kwargs,
            )  # fmt: skip
        logps, entropy = logps.float(), entropy.float()
        if mode == "sum":
            logps = logps.sum()
        elif mode == "mean":  # over every token, as verl's kernel
            logps = logps.mean()
        return logps, entropy

    def fused_linear_for_ppo(
        self,
        hidden_states: torch.Tensor,
        vocab_weights: torch.Tensor,
        input_ids: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`FusedLinearForPPO.forward` on fastrl's head.

        Args:
            hidden_states: `[T, d]` or `[B, T, d]` last hidden states.
            vocab_weights: `[V, d]` lm_head weight.
            input_ids: `[T]` or `[B, T]` token ids (the targets).
            temperature: logits are divided by it, > 0.

        Returns:
            (log_probs, entropy) of `input_ids`' shape: float32 and `hidden_states.dtype`.
        """
        if hidden_states.dim() not in (2, 3):
            raise ValueError(
                f"hidden_states must be [T, d] or [B, T, d], got {tuple(hidden_states.shape)}"
            )
        device = hidden_states.device.type
        # verl's PyTorch backend computes the logits in the autocast dtype when it is on
        dtype = hidden_states.dtype
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        self.fused_linear_for_ppo_calls += 1
        # a weight of another dtype is cast for the call; the graph keeps a handle that
        # casts it again in the backward, not the [V, d] copy
        with gathered_weight(vocab_weights, dtype=dtype) as (weight, _):
            with torch.autocast(device, enabled=False):
                logps, entropy = linear_logprobs(
                    hidden_states.to(dtype), weight, input_ids.to(torch.int64),
                    temperature=temperature, return_entropy=True, impl=self.impl,
                    compact=False,
                )  # fmt: skip
        return logps.float(), entropy.to(hidden_states.dtype)

    def undo(self) -> None:
        """Put verl's own functions back (a no-op if another patch replaced this one)."""
        global _active
        _rebind(self._lce, self.original_linear_cross_entropy)
        if self.ppo_class.__dict__.get("forward") is self._forward:
            self.ppo_class.forward = self.original_forward
        if _active is self:
            _active = None

    def __enter__(self) -> VerlPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _ppo_forward(patch: VerlPatch):
    """A `FusedLinearForPPO.forward` that calls `patch` (any instance, any backend)."""

    def forward(module, hidden_states, vocab_weights, input_ids, temperature=1.0):
        return patch.fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature)

    forward.__doc__ = VerlPatch.fused_linear_for_ppo.__doc__
    return forward


def patch_verl(impl: str = "auto") -> VerlPatch:
    """Make verl's fused-kernel forwards (`use_fused_kernels=True`, any
    `fused_kernels_backend`) score tokens with fastrl's fused head.

    Call it before training, before or after verl builds its models. Undo with
    `patch.undo()`, or use it as a context manager: `with patch_verl(): trainer.fit()`.
    Patching twice replaces the first patch. It patches the process it runs in: with Ray
    workers, call it in each worker (e.g. in the worker's module setup).

    Args:
        impl: `linear_logprobs`'s implementation: "auto" (Triton on CUDA, else PyTorch),
            "triton" or "torch".

    Returns:
        The `VerlPatch`; `linear_cross_entropy_calls` / `fused_linear_for_ppo_calls` count
        the calls it served.
    """
    global _active
    check_impl(impl)
    lce_module, ppo_class = _verl_targets()
    if _active is not None:
        _active.undo()
    patch = VerlPatch(impl, getattr(lce_module, _LCE_NAME), ppo_class)
    patch._apply()
    _active = patch
    return patch
