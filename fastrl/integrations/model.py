"""`patch_model`: a plain `transformers` causal LM (peft-wrapped or not) that returns
per-token log-probs instead of logits, for people with their own training loops.

After ``patch = patch_model(model)``, ``model(input_ids, attention_mask=..., labels=...)``
runs the backbone, then fastrl's fused head (`linear_logprobs`) on its last hidden states:
no ``[B, L, V]`` logits in the forward or the backward (TRL's ``fused_lm_head`` forward and
verl's ``forward_with_triton_backend`` do the same). The output is a
`CausalLMLogProbsOutput` with ``logits=None``.

Labels follow transformers' causal-LM convention: ``labels`` are given unshifted (usually
``input_ids`` with ``-100`` where nothing is scored) and shifted inside, so position ``t``
scores ``labels[:, t + 1]``: ``logprobs[:, t] == log_softmax(logits[:, t])[labels[:, t +
1]]``; the last position and the ignored ones are 0. ``shift_labels=`` (already shifted,
``[B, L]``) may replace ``labels``, as in transformers' loss. ``loss`` is transformers'
``ForCausalLMLoss``: the mean NLL over the scored tokens, or their sum over
``num_items_in_batch`` when that is passed (as `transformers.Trainer` does); so the patched
model's loss equals the original's (at ``temperature=1``).

The head computes in the autocast dtype under autocast, else in the hidden states' dtype,
as the model's own ``lm_head`` would; a weight of another dtype (an fp32 model under bf16
autocast) or a sharded one (an FSDP2 ``DTensor``, a ZeRO-3 partition) is cast / gathered
for the call by `fastrl.integrations.gathered_weight`, whose graph keeps a handle that
casts / gathers it again in the backward, not a ``[V, d]`` copy.

Without ``labels`` (and ``shift_labels``) the call goes to the model's own forward:
`generate` and evaluation code that wants logits keep working.

Not supported (a ValueError at the call): ``logits_to_keep`` other than 0, ``return_dict=
False``, positional arguments after ``attention_mask``; at patch time (TypeError): an
output head that is not an ``nn.Linear`` (e.g. LoRA on ``lm_head``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from fastrl import linear_logprobs
from fastrl.checks import check_bool, check_impl, check_number
from fastrl.integrations.hf import _base, lm_head

__all__ = ["CausalLMLogProbsOutput", "ModelPatch", "patch_model"]

#: transformers' loss arguments: read by the head, not passed to the backbone
_LOSS_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index")


@dataclass
class CausalLMLogProbsOutput(ModelOutput):
    """The output of a patched model's forward with labels.

    Attributes:
        loss: 0-d fp32, transformers' causal-LM loss: the mean NLL of the scored tokens
            (``sum / num_items_in_batch`` when passed), at the patch's temperature.
        logprobs: ``[B, L]`` fp32, ``logprobs[:, t]`` the log-prob of ``labels[:, t + 1]``
            (of ``shift_labels[:, t]``); 0 where that label is ignored and at the last
            position. Differentiable.
        entropy: ``[B, L]`` fp32 entropy of each position's next-token distribution (0
            where the label is ignored), with ``return_entropy``; else None.
        logits: always None.
        cache: the backbone's cache (``use_cache``), as transformers returns it.
        hidden_states, attentions: the backbone's, when asked for
            (``output_hidden_states`` / ``output_attentions``).
    """

    loss: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _shifted(labels, shift_labels, ignore_index: int) -> torch.Tensor:
    if shift_labels is not None:
        if labels is not None:
            raise ValueError("pass labels or shift_labels, not both")
        return shift_labels
    # transformers' ForCausalLMLoss: tokens < n predict n
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


class ModelPatch:
    """The active patch of one model's forward (see `patch_model`); ``undo()`` or leave
    its ``with`` block to restore the original forward. ``calls`` / ``fallback_calls``
    count the forwards served by fastrl's head and those passed to the model's own
    forward (no labels)."""

    def __init__(self, model, temperature: float, return_entropy: bool, impl: str):
        self.model = model  # what was passed (a peft model, or the transformers model)
        self.target = _base(model)  # whose forward is replaced
        self.temperature, self.return_entropy, self.impl = temperature, return_entropy, impl
        self.calls = self.fallback_calls = 0
        current = self.target.__dict__.get("forward")
        previous = getattr(current, "__fastrl_patch__", None)
        # patching twice replaces the first patch; undo restores what was there before it
        self._saved = previous._saved if previous is not None else current
        self._original = previous._original if previous is not None else self.target.forward
        self._forward = self._make_forward()
        self.target.forward = self._forward

    def _make_forward(self):
        @functools.wraps(self._original)  # Trainer reads the signature to keep columns
        def forward(*args, **kwargs):
            if kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
                self.fallback_calls += 1
                return self._original(*args, **kwargs)
            return self._forward_logprobs(*args, **kwargs)

        forward.__fastrl_patch__ = self
        return forward

    def _forward_logprobs(self, input_ids=None, attention_mask=None, *args, **kwargs):
        if args:
            raise ValueError(
                "a patched model takes its arguments after attention_mask by keyword, got "
                f"{len(args)} more positional"
            )
        return_entropy = kwargs.pop("return_entropy", self.return_entropy)
        check_bool("return_entropy", return_entropy)
        if kwargs.pop("logits_to_keep", 0) not in (0, None):
            raise ValueError("logits_to_keep is not supported by a patched model (no logits)")
        if kwargs.get("return_dict", True) is False:
            raise ValueError("return_dict=False is not supported by a patched model")
        kwargs.pop("return_dict", None)
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        self.calls += 1
        out = self.target.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        )
        hidden = out.last_hidden_state
        targets = _shifted(labels, shift_labels, ignore_index).to(hidden.device)
        if targets.shape != hidden.shape[:2]:
            raise ValueError(
                f"labels must have shape [B, L]={tuple(hidden.shape[:2])}, got "
                f"{tuple(targets.shape)}"
            )
        head = lm_head(self.target)
        device = hidden.device.type
        # as the model's own lm_head would: the autocast dtype under autocast, else the
        # hidden states'
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        dtype = dtype or hidden.dtype
        # the whole weight under FSDP2 / ZeRO-3, cast to `dtype` if it has another: the
        # graph keeps a handle that gathers / casts it again in the backward, not the copy
        with head.gathered(self.temperature, dtype=dtype) as (weight, kw):
            with torch.autocast(device, enabled=False):
                result = linear_logprobs(
                    hidden.to(dtype), weight, targets, ignore_index=ignore_index,
                    return_entropy=return_entropy, impl=self.impl, **kw,
                )  # fmt: skip
        logps, entropy = result if return_entropy else (result, None)
        nll = -logps.float().sum()
        if num_items is None:  # transformers' mean over the scored tokens (0/0 if none)
            loss = nll / (targets != ignore_index).sum()
        else:
            loss = nll / torch.as_tensor(num_items, device=nll.device)
        return CausalLMLogProbsOutput(
            loss=loss,
            logprobs=logps,
            entropy=entropy,
            cache=getattr(out, "cache", None),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )

    @property
    def active(self) -> bool:
        return self.target.__dict__.get("forward") is self._forward

    def undo(self) -> None:
        """Restore the model's forward (a no-op if another patch replaced this one)."""
        if not self.active:
            return
        if self._saved is None:
            del self.target.forward
        else:  # a forward that was set on the instance before (e.g. an accelerate hook)
            self.target.forward = self._saved

    def __enter__(self) -> ModelPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_model(
    model: torch.nn.Module,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
) -> ModelPatch:
    """Make ``model(input_ids, attention_mask=..., labels=...)`` return per-token
    log-probs (and entropies) from fastrl's fused head, without logits.

    Args:
        model: a `transformers` causal LM (``get_decoder()``, an ``nn.Linear`` output
            embedding; tied embeddings, Gemma-2's softcap, Cohere/Granite logit scales
            are read from it, see `fastrl.integrations.hf`), or a peft model wrapping one
            (LoRA inside the backbone gets its gradients as through the original forward).
        temperature: logits are divided by it (> 0); the loss too is at this temperature.
        return_entropy: also return ``entropy`` (overridable per call with
            ``return_entropy=``).
        impl: `linear_logprobs`' implementation: "auto", "triton" or "torch".

    Returns:
        The `ModelPatch`: ``patch.undo()``, or ``with patch_model(model): ...``. Patching a
        patched model replaces its patch.
    """
    check_number("temperature", temperature, low=0.0, strict_low=True)
    check_bool("return_entropy", return_entropy)
    check_impl(impl)
    base = _base(model)
    if not hasattr(base, "get_decoder"):
        raise TypeError(f"patch_model needs a causal LM with get_decoder(), got {type(base)}")
    lm_head(model)  # an unsupported head fails here, not at the first forward
    return ModelPatch(model, float(temperature), return_entropy, impl)
