"""`LigerFusedLinearGRPOLoss`: Liger-Kernel 0.8's GRPO module on fastrl's fused head.

Same constructor, forward arguments (order and names), defaults, reductions and return
value as ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (0.8.5): ``(loss,
metrics)`` with ``metrics`` a tuple of 0-d tensors, the masked-mean KL first when ``beta
!= 0``, then the clip ratio. The loss is fastrl's `fused_policy_loss` (TRL's semantics,
which Liger follows), so Liger's options map onto fastrl's:

==========================  ===============================================
Liger                       fastrl
==========================  ===============================================
epsilon_low / epsilon_high  epsilon / epsilon_high
use_ref_model=False         no KL term (Liger's KL is then 0 with 0 gradient)
ref_input/ref_weight/bias   reference log-probs from the same head, no grad
vllm_is_ratio               folded into the advantages (exact: the ratio is a
                            non-negative factor on the policy term); vespo:
                            sampling_logps with sampling_correction=
                            "token_mask" and no bounds, whose ratios are
                            Liger's (below)
dapo/cispo/vespo normaliser num_items_in_batch, else the mask's token count
vespo_k_pos, ...            vespo_k_pos, ... (VESPO's Gamma weight)
==========================  ===============================================

VESPO (``loss_type="vespo"``): Liger, as TRL, does not multiply the loss by
``vllm_is_ratio`` but adds the clamped ``log(vllm_is_ratio)`` (summed over the row, once
for a ``[B]`` / ``[B, 1]`` ratio) to the sequence log-ratio inside the weight. fastrl's
weight folds its sampler correction in the same way, over the scored tokens, so the
drop-in hands fastrl sampler log-probs ``old - log(ratio)`` at the scored tokens (a
per-sequence ratio at each row's first scored token): the same weight. Liger's sum runs
over the padded positions of a ``[B, T]`` ratio too, which fastrl's does not see: a
``[B, T]`` ratio must be 1 there (TRL's always is: ``exp(0)``), else a ValueError (on a
CPU; a device-side assert on an accelerator, `fastrl.checks.check_values`). Its clip
metric is 0, as Liger's.

Refused with a ValueError: a non-default ``vespo_*`` with another loss type (Liger ignores
it), and ``"luspo"`` where Liger's formula is not TRL's (token-level terms: Liger divides by
``B * T`` and weighs padded positions).
"""

from __future__ import annotations

import math
import warnings

import torch

from fastrl import fused_policy_loss, linear_logprobs, policy_loss
from fastrl.checks import check_bool, check_choice, check_impl, check_number, check_values
from fastrl.integrations.liger._common import check_3d, check_perf_options, refuse_non_default

__all__ = ["LigerFusedLinearGRPOLoss"]

#: the loss types of Liger 0.8.5's GRPO (fastrl computes all of them)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
#: normalised by num_items_in_batch, else the mask's token count (Liger's dapo normaliser)
_TOKEN_COUNT = ("dapo", "cispo", "vespo")
_VESPO_DEFAULTS = dict(vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
#: Liger's (TRL's) clamp of each log(vllm_is_ratio) in VESPO's weight
_LOG_RATIO_MIN, _LOG_RATIO_MAX = math.log(1e-8), 20.0


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _token_count(mask: torch.Tensor) -> torch.Tensor:
    """Liger's dapo/cispo normaliser without ``num_items_in_batch``: the mask's token count,
    summed over the processes (divided by their number in the loss)."""
    count = mask.to(torch.float32).sum()
    if _world_size() > 1:
        count = count.clone()
        torch.distributed.all_reduce(count)
    return count


def _is_ratio(vllm_is_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Liger's accepted shapes ``[B]``, ``[B, 1]``, ``[B, T]`` -> ``[B, 1]`` or ``[B, T]``."""
    B, T = mask.shape
    if not isinstance(vllm_is_ratio, torch.Tensor) or not vllm_is_ratio.is_floating_point():
        raise TypeError(f"vllm_is_ratio must be a float tensor, got {type(vllm_is_ratio)}")
    ok = (vllm_is_ratio.dim() == 1 and vllm_is_ratio.shape[0] == B) or (
        vllm_is_ratio.dim() == 2
        and vllm_is_ratio.shape[0] == B
        and vllm_is_ratio.shape[1] in (1, T)
    )
    if not ok:
        raise ValueError(
            f"vllm_is_ratio must have shape ({B},), ({B}, 1) or ({B}, {T}), got "
            f"{tuple(vllm_is_ratio.shape)}"
        )
    ratio = vllm_is_ratio.detach().float()
    # a weight on the policy term; folding it into the advantages (or its log into VESPO's
    # weight) needs it >= 0: checked on the device, no host read
    message = "vllm_is_ratio must be >= 0 (an importance weight), got negative values"
    check_values(ratio < 0, message, lambda: f"{message}: {ratio[ratio < 0][0].item()}")
    return ratio.reshape(B, 1) if ratio.dim() == 1 else ratio


@torch.no_grad()
def _vespo_sampling_logps(ratio: torch.Tensor, mask: torch.Tensor, old: torch.Tensor):
    """``[B, T]`` sampler log-probs whose fastrl correction (``"token_mask"``, no bounds:
    the ratio ``exp(old - sampling)`` at the scored tokens, 1 elsewhere) adds to VESPO's
    sequence log-ratio what Liger adds from `ratio` ``[B, 1]`` or ``[B, T]``: the sum over
    the row of ``clamp(log ratio, log 1e-8, 20)``. A per-sequence ratio goes to the row's
    first scored token (a row with none scores nothing); a per-token ratio must be 1 at
    the masked positions, which Liger sums and fastrl does not see. `old` ``[B, T]``: the
    old log-probs fastrl's loss gets (the current ones, detached, when there are none)."""
    m = mask.bool()
    # clamped as Liger does; fastrl's clamp of the same values is then the identity
    log_r = ratio.log().clamp(_LOG_RATIO_MIN, _LOG_RATIO_MAX)
    if ratio.shape[1] == 1:
        first = torch.arange(m.shape[1], device=m.device) == m.int().argmax(1, keepdim=True)
        log_r = torch.where(first, log_r, 0.0)
    else:
        bad = ~m & (ratio != 1)
        message = (
            "with loss_type='vespo' a [B, T] vllm_is_ratio must be 1 at the masked-out "
            "positions: Liger sums log(ratio) over the whole row into VESPO's weight, fastrl "
            "(as TRL, whose ratio is 1 there) over the completion tokens"
        )
        check_values(bad, message, lambda: f"{message}; got {ratio[bad][0].item()}")
    return old.float() - log_r


@torch.no_grad()
def _clip_ratio(logps, old, advantages, mask, opts) -> torch.Tensor:
    """Liger's clip metric from the log-probs: the fraction of the masked tokens whose
    ratio is clipped in the direction of its advantage (at the sequence level every token
    of a clipped sequence counts)."""
    m = mask.to(torch.float32)
    log_ratio = logps.float() - (logps.float() if old is None else old.float())
    if opts["importance_sampling_level"] == "sequence":
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    coef = torch.exp(log_ratio)
    adv = advantages.float().reshape(-1, 1)
    eps_low, eps_high = float(opts["epsilon"]), float(opts["epsilon_high"])
    if opts["loss_type"] == "cispo":
        clipped = (coef > eps_high) & (adv > 0)
    elif opts["loss_type"] in ("sapo", "vespo"):  # no clipping: Liger's metric is 0
        clipped = torch.zeros_like(coef, dtype=torch.bool)
    else:
        low = (coef < 1 - eps_low) & (adv < 0)
        clipped = low | ((coef > 1 + eps_high) & (adv > 0))
    clipped = clipped.expand_as(m).to(torch.float32)
    return (clipped * m).sum() / m.sum().clamp(min=1.0)


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """Fused linear layer with GRPO loss (Liger-Kernel 0.8.5's module, fastrl's head).

    Args (as Liger's; see its docstring for the formulas):
        beta: KL weight. compiled, chunk_size: Liger's scheduling, no effect here.
        use_ref_model: whether ``ref_per_token_logps`` or ``ref_input`` is given and used.
        epsilon_low, epsilon_high: the clip range (``cispo``: ``epsilon_high`` caps the
            ratio itself).
        loss_type: "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo".
        max_completion_length: required by "dr_grpo".
        importance_sampling_level: "token" or "sequence" (GSPO).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures.
        temperature: logits are divided by it.
        delta: two-sided clipping cap (clipped-surrogate loss types only: fastrl refuses
            it where Liger ignores it).
        use_bias_correction_kl: KL times the importance ratio.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's Gamma weight
            (``loss_type="vespo"``; refused away from their defaults with another).
        impl: fastrl's head: "auto" (Triton on CUDA), "triton", "torch" (keyword only).
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        impl: str = "auto",
    ):
        super().__init__()
        check_choice("loss_type", loss_type, LOSS_TYPES)
        check_choice("importance_sampling_level", importance_sampling_level, ("token", "sequence"))
        vespo = dict(
            vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg,
        )  # fmt: skip
        if loss_type != "vespo":  # Liger ignores them there
            for name, default in _VESPO_DEFAULTS.items():
                refuse_non_default(
                    name, vespo[name], default, f"VESPO's, and loss_type={loss_type!r}"
                )
        # Liger's own checks, with its messages
        if sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_pos must be positive, got {sapo_temperature_pos}")
        if sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_neg must be positive, got {sapo_temperature_neg}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
            raise ValueError(
                f"Sequence-level importance sampling is not supported for loss_type="
                f"'{loss_type}'. Use importance_sampling_level='token' instead."
            )
        check_perf_options(compiled, chunk_size)
        check_bool("use_ref_model", use_ref_model)
        check_bool("use_bias_correction_kl", use_bias_correction_kl)
        check_number("beta", beta, low=0.0)
        check_number("temperature", temperature, low=0.0, strict_low=True)
        check_impl(impl)
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg
        self.impl = impl

    def _options(self, kl: bool) -> dict:
        """fastrl's `PolicyLossOptions` for these settings."""
        return dict(
            loss_type=self.loss_type,
            epsilon=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
            beta=self.beta if kl else 0.0,
            kl_estimator="k3",
            use_bias_correction_kl=self.use_bias_correction_kl,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos,
            vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
            num_processes=_world_size(),
        )

    def _reference(
        self, scored, bias, ref_per_token_logps, ref_input, ref_weight, ref_bias, weight
    ):
        """The reference log-probs ``[B, T]`` fastrl's loss gets (None: no KL term)."""
        if not self.use_ref_model:
            if ref_per_token_logps is not None or ref_input is not None:
                # Liger drops them silently (its KL is then 0); a caller passing them
                # almost certainly wants them used
                raise ValueError(
                    "ref_per_token_logps/ref_input were given with use_ref_model=False; set "
                    "use_ref_model=True to use them"
                )
            return None
        if ref_per_token_logps is None and ref_input is None:
            raise ValueError(
                "If use_ref_model is True, ref_per_token_logps or ref_input must be provided"
            )
        if ref_per_token_logps is not None:
            if ref_input is not None:
                warnings.warn(
                    "Both ref_per_token_logps and ref_input are provided. Using "
                    "ref_per_token_logps.",
                    stacklevel=3,
                )
            return ref_per_token_logps.detach().float()
        if self.beta == 0:  # Liger computes them and uses nothing of them
            return None
        if ref_weight is None:  # a shared (frozen) lm_head, as with LoRA
            ref_weight, ref_bias = weight, bias
        check_3d("ref_input", ref_input, scored, ref_weight)
        with torch.no_grad():
            return linear_logprobs(
                ref_input, ref_weight, scored, bias=ref_bias, temperature=self.temperature,
                impl=self.impl,
            )  # fmt: skip

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        selected_token_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        advantages: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_per_token_logps: torch.Tensor | None = None,
        old_per_token_logps: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        vllm_is_ratio: torch.Tensor | None = None,
        num_items_in_batch: int | float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """GRPO loss from the policy's hidden states.

        Args:
            _input: ``[B, T, d]`` hidden states predicting the completion tokens.
            lin_weight: ``[V, d]`` lm_head weight; bias: ``[V]``.
            selected_token_ids: ``[B, T]`` completion ids; attention_mask: ``[B, T]`` 0/1.
            advantages: ``[B]``.
            ref_per_token_logps, old_per_token_logps: ``[B, T]`` (constants).
            ref_input, ref_weight, ref_bias: the reference model's hidden states ``[B, T,
                d]`` and head (default: this head), scored without gradient.
            vllm_is_ratio: ``[B]``, ``[B, 1]`` or ``[B, T]`` sampler importance weights.
            num_items_in_batch: the generation batch's token count over all processes
                (dapo, cispo and vespo; the others do not read it, in Liger or TRL).

        Returns:
            ``(loss, metrics)``: ``loss`` 0-d fp32; ``metrics`` ``(kl, clip_ratio)`` when
            ``beta != 0``, else ``(clip_ratio,)``, 0-d fp32 without gradient.
        """
        check_3d("_input", _input, selected_token_ids, lin_weight)
        B = _input.shape[0]
        if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != (B,):
            got = getattr(advantages, "shape", advantages)
            raise ValueError(f"advantages must have shape [B]=({B},) as Liger's, got {got}")
        mask = attention_mask
        scored = torch.where(mask.bool(), selected_token_ids, -100)
        ref = self._reference(
            scored, bias, ref_per_token_logps, ref_input, ref_weight, ref_bias, lin_weight
        )
        opts = self._options(kl=ref is not None)
        if self.loss_type == "luspo" and (
            self.importance_sampling_level == "token"
            or opts["beta"] != 0
            or (
                vllm_is_ratio is not None
                and vllm_is_ratio.dim() == 2
                and vllm_is_ratio.shape[1] > 1
            )
        ):
            raise ValueError(
                "loss_type='luspo' is supported only with importance_sampling_level='sequence', "
                "no KL term and no per-token vllm_is_ratio: with per-token terms Liger 0.8's "
                "luspo divides by B * T and weighs padded positions, unlike TRL's (fastrl's)"
            )
        if self.loss_type in _TOKEN_COUNT and num_items_in_batch is None:
            num_items_in_batch = _token_count(mask)
        loss_kw = dict(ref_logps=ref, **opts)
        if self.loss_type in _TOKEN_COUNT:
            loss_kw["num_items_in_batch"] = num_items_in_batch
        adv = advantages
        vespo_ratio = None
        if vllm_is_ratio is not None and self.loss_type == "vespo":  # into VESPO's weight
            vespo_ratio = _is_ratio(vllm_is_ratio, mask)
        elif vllm_is_ratio is not None:  # a non-negative factor on the policy term
            adv = advantages.detach().float().reshape(-1, 1) * _is_ratio(vllm_is_ratio, mask)
            adv = adv.expand(mask.shape)

        if self.importance_sampling_level == "token" and vllm_is_ratio is None:
            loss, metrics = fused_policy_loss(
                _input, lin_weight, selected_token_ids, mask, adv, old_logps=old_per_token_logps,
                bias=bias, temperature=self.temperature, impl=self.impl, **loss_kw,
            )  # fmt: skip
            clip = self._clip_metric(metrics, mask)
        else:  # log-probs first, for Liger's clip metric on the unweighted advantages
            logps = linear_logprobs(
                _input, lin_weight, scored, bias=bias, temperature=self.temperature,
                impl=self.impl,
            )  # fmt: skip
            if vespo_ratio is not None:
                old = logps if old_per_token_logps is None else old_per_token_logps
                loss_kw.update(
                    sampling_logps=_vespo_sampling_logps(vespo_ratio, mask, old.detach()),
                    sampling_correction="token_mask", sampling_clip_min=None,
                    sampling_clip_max=None,
                )  # fmt: skip
            loss, metrics = policy_loss(logps, old_per_token_logps, adv, mask, **loss_kw)
            clip = _clip_ratio(logps, old_per_token_logps, advantages, mask, opts)
        out = []
        if self.beta != 0:
            kl = metrics.get("kl")
            out.append(torch.zeros((), device=loss.device) if kl is None else kl.float())
        out.append(clip.float())
        return loss.float(), tuple(out)

    def _clip_metric(self, metrics: dict, mask: torch.Tensor) -> torch.Tensor:
        """Liger's clip ratio from fastrl's token-level metrics (the same definition)."""
        if self.loss_type == "cispo":
            return metrics["cispo_clip_ratio"]
        if self.loss_type in ("sapo", "vespo"):  # no clipping: Liger's metric is 0
            return torch.zeros((), device=mask.device)
        return metrics["clip_ratio/region_mean"]
