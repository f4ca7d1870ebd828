"""Drop-in fastrl inside TRL's own trainers.

TRL (1.16) scores tokens without logits through one function: `add_fused_lm_head` makes
`model(..., fused_lm_head=True)` call `trl.trainer.utils._ChunkedLogProbFunction`, a
chunked PyTorch head (cuBLAS tiles + a Triton fold). GRPOTrainer, RLOOTrainer,
DPOTrainer, KTOTrainer and SFTTrainer all go through it. `patch_trl()` puts
`linear_logprobs` in its place, so those trainers keep their own losses, logging and
semantics (the same numbers, to float rounding) and run fastrl's fused head.

fastrl serves every output TRL asks for from the same pass: `log_probs`, `entropy`,
`is_top1` (a target tied with an earlier token for the top logit counts as top-1 here,
not in TRL: only exact float ties differ), `log_sum_sq_probs` (WPO) and `mean_logits`
(exact without a softcap: the mean logit is linear in the hidden state, one GEMV with the
weight's column sums). What it cannot serve (`mean_logits` with a softcap, a logit scale
<= 0) goes to TRL's own function unchanged; `patch.fallback_calls` counts those calls.

Dtypes follow TRL: the head computes in the autocast dtype when autocast is on, else in
the hidden states' dtype. When the lm_head weight has another dtype (an fp32 model under
bf16 autocast, or GRPO's `cast_lm_head_to_fp32=True` with a bf16 model) it is cast for
the call, a `[V, d]` copy that lives for the forward only (TRL casts one vocabulary chunk
at a time): the graph keeps a handle that casts it again in the backward
(`gathered_weight`).

Sharded parameters: under DeepSpeed ZeRO-3 TRL hands over the lm_head parameter gathered
for the forward only; the patch keeps a handle in the graph and gathers it again for the
backward's recompute (TRL's own head re-enters `maybe_gather_lm_head_ctx` there). Under
FSDP2 TRL passes `weight.full_tensor()`, an ordinary tensor, used as it is.
"""

import importlib

import torch

from fastrl import linear_logprobs
from fastrl.checks import check_impl
from fastrl.integrations.gather import gathered_weight
from fastrl.integrations.logit_sums import vocab_sums

_TARGET_MODULE = "trl.trainer.utils"
_TARGET_NAME = "_ChunkedLogProbFunction"
_FASTRL_OUTPUTS = {"log_probs", "entropy", "is_top1", "log_sum_sq_probs", "mean_logits"}


def _trl_utils():
    try:
        utils = importlib.import_module(_TARGET_MODULE)
    except ImportError as err:
        raise ImportError("patch_trl needs TRL installed (pip install trl)") from err
    if not hasattr(utils, _TARGET_NAME):
        import trl

        raise ImportError(
            f"patch_trl needs a TRL whose fused lm head calls {_TARGET_MODULE}.{_TARGET_NAME} "
            f"(TRL 1.16); trl {trl.__version__} has none"
        )
    return utils


class TRLPatch:
    """The active replacement of TRL's chunked log-prob head (see `patch_trl`). Its
    `apply` has the signature and outputs of TRL's `ChunkedLogProbFunction.apply`."""

    def __init__(self, original, impl: str):
        self.original = original
        self.impl = impl
        self.calls = 0  # served by fastrl
        self.fallback_calls = 0  # passed to TRL's own head

    def apply(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
    ):
        """`[N, d]` hidden, `[V, d]` weight, `[V]` bias, `[N]` targets in `[0, V)` ->
        (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each `[N]` (float32,
        is_top1 bool) or None when not requested."""
        unserved = set(outputs) - _FASTRL_OUTPUTS
        if final_logit_softcapping is not None and "mean_logits" in outputs:
            unserved.add("mean_logits")
        if unserved or not logit_scale > 0:
            self.fallback_calls += 1
            return self.original.apply(
                hidden, weight, bias, targets, temperature, chunk_size,
                final_logit_softcapping, logit_scale, outputs,
            )  # fmt: skip
        self.calls += 1
        device = hidden.device.type
        # TRL computes in the autocast dtype when autocast is on, else in the hidden's
        dtype = hidden.dtype
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        hidden = hidden.to(dtype)
        # the (cast, ZeRO-3-gathered) weight is kept in the graph as a handle, not a copy
        with gathered_weight(weight, bias, dtype=dtype) as (weight, bias):
            if final_logit_softcapping is None:  # scale * z / T == z / (T / scale)
                temperature = temperature / logit_scale
            elif logit_scale != 1.0:  # TRL scales before the softcap
                hidden = hidden * logit_scale
                bias = None if bias is None else bias * logit_scale
            with torch.autocast(device, enabled=False):
                out = linear_logprobs(
                    hidden, weight, targets, bias=bias, temperature=temperature,
                    softcap=final_logit_softcapping, return_entropy="entropy" in outputs,
                    return_is_top1="is_top1" in outputs,
                    return_log_sum_sq_probs="log_sum_sq_probs" in outputs, impl=self.impl,
                )  # fmt: skip
            mean_logits = None
            if "mean_logits" in outputs:  # a metric: no gradient, as in TRL
                mean_logits = self._mean_logits(hidden, weight, bias, temperature)
        out = iter(out if isinstance(out, tuple) else (out,))
        logps = next(out)
        entropy = next(out) if "entropy" in outputs else None
        is_top1 = next(out) if "is_top1" in outputs else None
        log_sum_sq = next(out) if "log_sum_sq_probs" in outputs else None
        return logps, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    @torch.no_grad()
    def _mean_logits(hidden, weight, bias, temperature) -> torch.Tensor:
        """`[N]` mean logit over the vocabulary: one GEMV with the weight's column sums."""
        col_sum, bias_sum = vocab_sums(weight, bias)
        mean_logits = hidden.float() @ col_sum
        if bias_sum is not None:
            mean_logits += bias_sum
        return mean_logits / (weight.shape[0] * temperature)

    def undo(self) -> None:
        """Put TRL's own head back (a no-op if another patch replaced this one)."""
        utils = _trl_utils()
        if getattr(utils, _TARGET_NAME) is self:
            setattr(utils, _TARGET_NAME, self.original)

    def __enter__(self) -> "TRLPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_trl(impl: str = "auto") -> TRLPatch:
    """Make TRL's trainers score tokens with fastrl's fused head.

    Call it before `trainer.train()` (before or after building the trainer: TRL looks the
    function up on every forward). Undo with `patch.undo()`, or use it as a context
    manager: `with patch_trl(): trainer.train()`. Patching twice replaces the first patch.

    Args:
        impl: `linear_logprobs`'s implementation: "auto" (Triton on CUDA, else PyTorch),
            "triton" or "torch".

    Returns:
        The `TRLPatch`; `calls` / `fallback_calls` count the head calls fastrl served and
        those it passed to TRL (outputs fastrl does not compute).
    """
    check_impl(impl)
    utils = _trl_utils()
    current = getattr(utils, _TARGET_NAME)
    original = current.original if isinstance(current, TRLPatch) else current
    patch = TRLPatch(original, impl)
    setattr(utils, _TARGET_NAME, patch)
    return patch
