"""Benchmark `fastrl.fused_preference_loss`: DPO-family losses straight from hidden states.

    python bench/bench_preference.py                   # GPU shapes on CUDA, tiny ones on CPU
    python bench/bench_preference.py --shapes gpu-quick --loss-type sigmoid --beta 0.1
    python bench/bench_preference.py --shapes 8x2048x4096x128256 --methods fastrl,liger

Every case (shape x head x loss config) runs every method forward and forward+backward
on the same inputs (hidden [2B, T, d] with rows [chosen; rejected], lm_head weight
[V, d], targets and mask [2B, T], reference sequence log-probs [B] + [B], precomputed as
with TRL's `precompute_ref_log_probs`, for the loss types that use a reference) in the
same process:

  fastrl         fastrl.fused_preference_loss (impl "triton" on CUDA, "torch" on CPU)
  trl_chunked    TRL 1.16's current DPO path: per-token log-probs from TRL's chunked head
                 trl.kernels.chunked_logprob.ChunkedLogProbFunction, called as
                 DPOTrainer's fused LM head calls it (trl.trainer.utils.add_fused_lm_head
                 with DPOTrainer's outputs=("log_probs", "entropy", "mean_logits",
                 "is_top1"); only the completion tokens on Triton devices, every position
                 elsewhere), summed per completion, then the loss in PyTorch. That loss is
                 `fastrl.preference_loss`, which reproduces DPOTrainer._compute_loss (and
                 the CPO/ORPO trainers' losses; parity-tested against TRL itself in
                 tests/parity/test_trl_parity_dpo.py): same formula, same PyTorch ops' cost. For
                 the reference-free types (orpo, simpo, cpo...) this is TRL's DPO head with
                 the loss swapped: TRL's experimental CPO/ORPO trainers materialise the
                 logits instead (see trl_selective).
  trl_selective  logits in the input dtype, trl.trainer.utils.selective_log_softmax, sums,
                 preference_loss: how TRL's experimental ORPO/CPO trainers get their
                 log-probs (opt-in: not in the default --methods)
  liger          Liger-Kernel's fused preference losses with their defaults (chunk_size=1
                 pair, compiled=True; they compute the gradients inside their forward):
                 LigerFusedLinearDPOLoss for the DPO types it implements (sigmoid, hinge,
                 nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop, robust,
                 exo_pair), LigerFusedLinearORPOLoss for orpo, LigerFusedLinearSimPOLoss
                 for simpo (NLL term on, alpha=1 and gamma=0.5 as our CPO-family
                 defaults); skipped for other loss types. Liger's DPO cannot take
                 precomputed reference log-probs (only reference hidden states, which would
                 add a reference head forward that the other methods do not run), so it
                 runs with use_ref_model=False: the same work, the reference entering only
                 the [B] loss; its loss and gradients are checked against the fp32
                 reference computed with zero reference log-probs.
  eager          logits = (H @ W.T).float(); log_softmax; gather; masked sums;
                 `fastrl.preference_loss` (materialises [2B, T, V] logits)
  compile        torch.compile of `eager` (opt-in)

plus the plain cuBLAS (torch.mm) matmuls the math needs, for the "x matmul" ratio. A
preference loss needs whole-sequence log-probs before any per-token gradient is known,
so for a frozen lm_head forward+backward needs three N x V x d matmuls (H @ W.T, the
recompute in the backward, dz @ W), a trainable one four (+ dz.T @ H); N = the active
(completion) tokens. A method that is not installed, fails or runs out of memory is
recorded with its reason; the run always finishes. Results go to
bench/results/preference-<device>-<date>.json plus a PNG.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script: import the `bench` package from the repo root, then take the root
    # off sys.path again so that its kernels/ cannot shadow Hugging Face's `kernels`.
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, _root)
    import bench.common  # noqa: F401

    sys.path.remove(_root)

from bench.bench_logprobs import Shape, eager_logprobs, matmul_count, matmul_reference
from bench.bench_policy import _chunked_reference, chunked_reference_loss, measure_loss_methods
from bench.common import (
    BenchCLI,
    add_mask_arg,
    bench_parser,
    compiled_loss_method,
    completion_mask,
    csv_list,
    eager_loss_method,
    fastrl_impl,
    free_memory,
    loss_case_record,
    model_of,
    model_shape_sets,
    parse_betas,
    parse_shape_spec,
    random_head_inputs,
    resolve_run_args,
    run_loss_benchmark,
    shape_label,
    time_ms,
    trl_fused_head,
)
from fastrl.options.preference import PreferenceLossOptions

PREFERENCE = PreferenceLossOptions()  # the loss's defaults

# ----------------------------------------------------------------------------- shapes

PAIRS = 8  # preference pairs per batch: 2 x 8 = 16 completions
GPU_LENGTHS = (2048, 4096)  # completion lengths: N = 2 x PAIRS x length tokens


@dataclass(frozen=True)
class PairShape:
    name: str  # the model whose head this is, or a free label
    B: int  # preference pairs (2B completions, rows [chosen; rejected])
    T: int  # completion length (padded)
    d: int  # hidden size
    V: int  # vocabulary

    @property
    def N(self) -> int:
        return 2 * self.B * self.T

    @property
    def label(self) -> str:
        return shape_label(self.name, self.d, self.V, f"N=2x{self.B}x{self.T}")


SHAPE_SETS: dict[str, list[PairShape]] = {
    # tiny, odd sizes so tails get exercised; the whole default CPU run takes < 1 min
    "cpu": [PairShape("cpu", 2, 33, 64, 1000), PairShape("cpu", 2, 61, 96, 2500)],
    "smoke": [PairShape("smoke", 2, 9, 32, 500)],
    **model_shape_sets(lambda model, d, V, T: PairShape(model, PAIRS, T, d, V), GPU_LENGTHS, 2048),
}


def parse_shapes(spec: str) -> list[PairShape]:
    """Comma-separated shape-set names (see SHAPE_SETS) and/or `BxTxdxV` quadruples
    (B = pairs)."""
    return parse_shape_spec(
        spec, SHAPE_SETS, lambda B, T, d, V: PairShape(model_of(d, V), B, T, d, V), "BxTxdxV"
    )


MODES = ("fwd", "fwdbwd")

# ----------------------------------------------------------------------------- loss config


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = PREFERENCE.loss_type[0]
    beta: float = PREFERENCE.beta

    @property
    def label(self) -> str:
        return f"{self.loss_type} beta={self.beta:g}"

    @property
    def uses_reference(self) -> bool:
        from fastrl.options.preference import REFERENCE_FREE_LOSS_TYPES

        return self.loss_type not in REFERENCE_FREE_LOSS_TYPES


def loss_kwargs(cfg: LossConfig) -> dict:
    """`preference_loss` options for one case (everything else at its defaults)."""
    return {"loss_type": cfg.loss_type, "beta": cfg.beta}


# ----------------------------------------------------------------------------- methods
# A method factory takes the case context and returns `f(inputs) -> loss` (0-d tensor,
# differentiable w.r.t. inputs["hidden"] and, if trainable, inputs["weight"]) and a note,
# or raises to be recorded as skipped. `f.zero_reference = True` marks a method that runs
# a DPO loss with zero reference log-probs (checked against that reference).

LossFn = Callable[[dict], torch.Tensor]


def _refs(x: dict, zero_reference: bool = False):
    if not x["uses_reference"]:
        return None, None
    rc, rr = x["ref_chosen_logps"], x["ref_rejected_logps"]
    if zero_reference:
        return torch.zeros_like(rc), torch.zeros_like(rr)
    return rc, rr


def _preference_loss_on(token_logps, x: dict, kw: dict, zero_reference=False) -> torch.Tensor:
    """Sequence sums of [2B, T] per-token log-probs (masked), then `preference_loss`."""
    import fastrl

    seq = (token_logps * x["mask"]).sum(1)
    B = seq.shape[0] // 2
    lengths = x["mask"].sum(1)
    rc, rr = _refs(x, zero_reference)
    loss, _ = fastrl.preference_loss(
        seq[:B], seq[B:], rc, rr, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], **kw
    )
    return loss


def eager_loss(x: dict, kw: dict) -> torch.Tensor:
    return _preference_loss_on(eager_logprobs(x["hidden"], x["weight"], x["targets"]), x, kw)


def _fastrl(ctx):
    import fastrl

    impl = fastrl_impl(ctx)
    kw = ctx["loss_kw"]

    def f(x):
        rc, rr = _refs(x)
        loss, _ = fastrl.fused_preference_loss(
            x["hidden"],
            x["weight"],
            x["targets"],
            x["mask"],
            ref_chosen_logps=rc,
            ref_rejected_logps=rr,
            impl=impl,
            **kw,
        )
        return loss

    return f, f"fused_preference_loss, impl={impl!r}"


# DPOTrainer's fused-head outputs (without WPO's log_sum_sq_probs)
TRL_DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _trl_chunked(ctx):
    # DPOTrainer computes all of TRL_DPO_OUTPUTS, its loss uses the log-probs only
    head, note = trl_fused_head(ctx["device"], TRL_DPO_OUTPUTS, keep=1)
    kw = ctx["loss_kw"]

    def f(x):
        (lp,) = head(x)
        return _preference_loss_on(lp, x, kw)  # DPOTrainer: per_token_logps.sum(1), ...

    return f, f"{note}, outputs={TRL_DPO_OUTPUTS} + sums + preference_loss (TRL's loss)"


def _trl_selective(ctx):
    from trl.trainer.utils import selective_log_softmax

    kw = ctx["loss_kw"]

    def f(x):
        logps = selective_log_softmax(x["hidden"] @ x["weight"].T, x["targets"])
        return _preference_loss_on(logps, x, kw)

    return f, "logits in input dtype, selective_log_softmax (TRL's ORPO/CPO trainers) + loss"


# Liger's DPO loss types whose formula is ours with default options
LIGER_DPO_TYPES = (
    "sigmoid",
    "hinge",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "robust",
    "exo_pair",
)


def _liger(ctx):
    cfg: LossConfig = ctx["loss"]
    if cfg.loss_type not in (*LIGER_DPO_TYPES, "orpo", "simpo"):
        raise NotImplementedError(
            f"Liger-Kernel has no fused loss for loss_type={cfg.loss_type!r} "
            f"(it has DPO {', '.join(LIGER_DPO_TYPES)}; orpo; simpo)"
        )
    from liger_kernel import chunked_loss

    common = {"ignore_index": -100, "beta": cfg.beta}  # chunk_size=1, compiled=True: defaults
    zero_reference = cfg.loss_type in LIGER_DPO_TYPES
    if zero_reference:
        mod = chunked_loss.LigerFusedLinearDPOLoss(
            loss_type=cfg.loss_type, use_ref_model=False, **common
        )
        note = f"LigerFusedLinearDPOLoss(loss_type={cfg.loss_type!r}, use_ref_model=False)"
    elif cfg.loss_type == "orpo":
        mod = chunked_loss.LigerFusedLinearORPOLoss(compute_nll_loss=True, **common)
        note = "LigerFusedLinearORPOLoss(compute_nll_loss=True)"
    else:  # simpo, as our CPO-family default: cpo_alpha=1.0 (NLL term), simpo_gamma=0.5
        mod = chunked_loss.LigerFusedLinearSimPOLoss(
            alpha=1.0, gamma=0.5, compute_nll_loss=True, **common
        )
        note = "LigerFusedLinearSimPOLoss(alpha=1.0, gamma=0.5, compute_nll_loss=True)"

    def f(x):
        targets = x["targets"].masked_fill(x["mask"] == 0, -100)
        loss, _aux = mod(x["weight"], x["hidden"], targets)
        return loss

    f.zero_reference = zero_reference
    return f, note + ", chunk_size=1 compiled=True (grads computed in forward)"


METHODS: dict[str, Callable] = {
    "fastrl": _fastrl,
    "trl_chunked": _trl_chunked,
    "trl_selective": _trl_selective,
    "liger": _liger,
    "eager": eager_loss_method(eager_loss, "materialised fp32 logits + preference_loss"),
    "compile": compiled_loss_method(eager_loss),
}
DEFAULT_METHODS = ("fastrl", "trl_chunked", "liger", "eager")


# ----------------------------------------------------------------------------- inputs


def make_inputs(shape: PairShape, dtype, device, trainable: bool, mask_kind="full", seed=0):
    """Hidden states, lm_head, completion tokens and reference log-probs of B pairs.

    Rows are [chosen; rejected]. `ref_*_logps` are the fp32 sequence log-probs plus noise
    (sd 0.1 per token, i.e. 0.1 sqrt(length)), so the log-ratios are near 0 as at the
    start of training. `mask_kind="ragged"` right-pads each completion to a random length
    in [T/2, T] (pairs of unequal lengths)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    R, T, d = 2 * shape.B, shape.T, shape.d
    hidden, weight, targets = random_head_inputs((R, T), d, shape.V, dtype, device, gen)
    mask = completion_mask(mask_kind, R, T, gen).to(device)
    base, _, _, _ = _chunked_reference(hidden.reshape(-1, d), weight, targets.reshape(-1))
    seq = (base.view(R, T) * mask).sum(1)
    noise = 0.1 * mask.sum(1).float().sqrt() * torch.randn(R, generator=gen).to(device)
    ref = seq + noise
    hidden.requires_grad_(True)
    weight.requires_grad_(trainable)
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": targets,
        "mask": mask,
        "ref_chosen_logps": ref[: shape.B],
        "ref_rejected_logps": ref[shape.B :],
        "num_items": int(mask.sum()),
    }


def reference_loss(
    x: dict, kw: dict, zero_reference: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32 loss and gradients: masked sums of fp32 per-token log-probs, then
    `fastrl.preference_loss` on them."""
    return chunked_reference_loss(x, lambda lp, _: _preference_loss_on(lp, x, kw, zero_reference))


# ----------------------------------------------------------------------------- one case


def matmul_floor(shape: PairShape, n_tokens: int, dtype, device, trainable, timer) -> dict:
    """cuBLAS time of the matmuls the math needs on `n_tokens` rows: fwd = H @ W.T;
    fwdbwd = H @ W.T + recompute + dz @ W (+ dz.T @ H for a trainable head)."""
    rec = matmul_reference(
        Shape(shape.name, n_tokens, shape.d, shape.V), dtype, device, trainable, timer
    )
    if rec["status"] != "ok":
        return rec
    mm = rec["ms"]
    keep = ("mm_logits", "mm_dhidden", "mm_dweight", "fwd", "fwdbwd")
    return {**rec, "ms": {k: mm[k] for k in keep if k in mm}, "N": n_tokens}


def run_case(
    shape: PairShape,
    loss: LossConfig = LossConfig(),
    *,
    dtype=torch.float32,
    device: torch.device | str = "cpu",
    trainable: bool = False,
    methods=DEFAULT_METHODS,
    modes=MODES,
    mask_kind: str = "full",
    seed: int = 0,
    fastrl_impl: str | None = None,
    matmul: bool = True,
    check: bool = True,
    timer=None,
    verbose: bool = False,
) -> dict:
    """Benchmark every method on one (shape, loss, dtype, head) case; never raises for a
    method."""
    device = torch.device(device)
    timer = timer or (lambda fn: time_ms(fn, device))
    x = make_inputs(shape, dtype, device, trainable, mask_kind, seed)
    x["uses_reference"] = loss.uses_reference
    kw = loss_kwargs(loss)
    ctx = {"device": device, "dtype": dtype, "fastrl_impl": fastrl_impl}
    ctx.update(loss=loss, loss_kw=kw)
    n_active = x["num_items"]
    record = loss_case_record(
        shape,
        loss,
        n_active,
        dtype,
        trainable,
        modes,
        matmul_count,
        mask_kind,
        uses_reference=loss.uses_reference,
    )
    record["matmul"] = (
        matmul_floor(shape, n_active, dtype, device, trainable, timer)
        if matmul
        else {"status": "skipped", "reason": "disabled"}
    )
    # fp32 loss and gradients, by reference convention (zero reference log-probs or not)
    measure_loss_methods(
        record,
        x,
        ctx,
        METHODS,
        (lambda zero: reference_loss(x, kw, zero)) if check else None,
        methods=methods,
        modes=modes,
        timer=timer,
        verbose=verbose,
    )
    x = None
    free_memory(device)
    return record


# ----------------------------------------------------------------------------- CLI

CLI = BenchCLI(
    name="fused_preference_loss",
    parse_shapes=parse_shapes,
    shapes_help=f"comma list of {sorted(SHAPE_SETS)} or BxTxdxV, B = pairs",
    modes=MODES,
    default_modes="fwd,fwdbwd",
    methods=METHODS,
    default_methods=DEFAULT_METHODS,
    methods_help=f"comma list of {list(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    results_prefix="preference-",
    out_help="JSON path (default bench/results/preference-<dev>-<date>.json)",
    check=True,
)


def _add_loss_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--loss-type",
        default="sigmoid,orpo,simpo",
        help="comma list of preference_loss loss types (default sigmoid,orpo,simpo: the ones "
        "Liger-Kernel has fused losses for: DPO, ORPO, SimPO)",
    )
    p.add_argument("--beta", default="0.1", help="comma list of betas (default 0.1, TRL's)")
    add_mask_arg(p)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__, CLI, _add_loss_args)
    args = p.parse_args(argv)
    run = resolve_run_args(p, args, CLI)
    betas = parse_betas(p, args.beta)
    from fastrl.options.preference import LOSS_TYPES

    loss_types = csv_list(args.loss_type)
    for lt in loss_types:
        if lt not in LOSS_TYPES:
            p.error(f"unknown loss type {lt!r}; choose from {list(LOSS_TYPES)}")
    losses = [LossConfig(lt, b) for lt in loss_types for b in betas]
    run_loss_benchmark(CLI.name, run, losses, run_case, mask=args.mask, check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
