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
                 tests/test_trl_parity_dpo.py): same formula, same PyTorch ops' cost. For
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
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script: import the `bench` package from the repo root, then take the root
    # off sys.path again so that its kernels/ cannot shadow Hugging Face's `kernels`.
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, _root)
    import bench.common  # noqa: F401

    sys.path.remove(_root)

from bench.bench_logprobs import DTYPES, HEADS, Shape, matmul_count, matmul_reference
from bench.bench_policy import _chunked_reference, _csv, measure_method
from bench.common import error_reason as _reason
from bench.common import (
    finish_run,
    free_memory,
    measure_methods,
    parse_shape_spec,
    resolve_device,
    time_ms,
)

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
        size = f"N=2x{self.B}x{self.T}"
        if any(self.name == model for model, _, _ in HEADS.values()):
            return f"{self.name} {size}"
        return f"{self.name} d={self.d} V={self.V} {size}"


def _model_shapes(key: str, lengths=GPU_LENGTHS) -> list[PairShape]:
    name, d, V = HEADS[key]
    return [PairShape(name, PAIRS, T, d, V) for T in lengths]


SHAPE_SETS: dict[str, list[PairShape]] = {
    # tiny, odd sizes so tails get exercised; the whole default CPU run takes < 1 min
    "cpu": [PairShape("cpu", 2, 33, 64, 1000), PairShape("cpu", 2, 61, 96, 2500)],
    "smoke": [PairShape("smoke", 2, 9, 32, 500)],
    "gpu": [s for key in HEADS for s in _model_shapes(key)],
    "gpu-quick": [s for key in HEADS for s in _model_shapes(key, (2048,))],
    **{key: _model_shapes(key) for key in HEADS},
}


def parse_shapes(spec: str) -> list[PairShape]:
    """Comma-separated shape-set names (see SHAPE_SETS) and/or `BxTxdxV` quadruples
    (B = pairs)."""
    return parse_shape_spec(
        spec, SHAPE_SETS, lambda B, T, d, V: PairShape("custom", B, T, d, V), "BxTxdxV"
    )


MODES = ("fwd", "fwdbwd")

# ----------------------------------------------------------------------------- loss config


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = "sigmoid"
    beta: float = 0.1

    @property
    def label(self) -> str:
        return f"{self.loss_type} beta={self.beta:g}"

    @property
    def uses_reference(self) -> bool:
        from fastrl.preference import REFERENCE_FREE_LOSS_TYPES

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
    logits = (x["hidden"] @ x["weight"].T).float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1)
    return _preference_loss_on(logps, x, kw)


def _fastrl(ctx):
    import fastrl

    impl = ctx.get("fastrl_impl") or ("triton" if ctx["device"].type == "cuda" else "torch")
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
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768
    kw = ctx["loss_kw"]
    compact = _use_triton(ctx["device"])

    def f(x):
        # as trl.trainer.utils.add_fused_lm_head's forward, with DPOTrainer's outputs
        hidden, targets, mask = x["hidden"], x["targets"], x["mask"].bool()
        if compact:  # score only the completion tokens
            h, t = hidden[mask], targets[mask]
        else:  # every position (fixed tile shapes), masked ones with label 0
            h = hidden.reshape(-1, hidden.shape[-1])
            t = targets.masked_fill(~mask, 0).reshape(-1)
        # apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
        #       outputs) -> (logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)
        lp = ChunkedLogProbFunction.apply(
            h, x["weight"], None, t, 1.0, chunk, None, 1.0, TRL_DPO_OUTPUTS
        )[0]
        if compact:
            lp = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        else:
            lp = lp.view(mask.shape).masked_fill(~mask, 0)
        return _preference_loss_on(lp, x, kw)  # DPOTrainer: per_token_logps.sum(1), ...

    where = "completion tokens only" if compact else "every position"
    note = f"ChunkedLogProbFunction chunk_size={chunk} ({where}), outputs={TRL_DPO_OUTPUTS}"
    return f, note + " + sums + preference_loss (TRL's loss)"


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


def _eager(ctx):
    kw = ctx["loss_kw"]
    return (lambda x: eager_loss(x, kw)), "materialised fp32 logits + preference_loss"


def _compile(ctx):
    torch._dynamo.reset()
    kw = ctx["loss_kw"]
    fn = torch.compile(eager_loss, dynamic=False)
    return (lambda x: fn(x, kw)), "torch.compile(eager), dynamic=False"


METHODS: dict[str, Callable] = {
    "fastrl": _fastrl,
    "trl_chunked": _trl_chunked,
    "trl_selective": _trl_selective,
    "liger": _liger,
    "eager": _eager,
    "compile": _compile,
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
    R, T, d, V = 2 * shape.B, shape.T, shape.d, shape.V
    # logits ~ N(0, 2^2): peaked enough to look like an LM head, no overflow in fp16
    hidden = torch.randn(R, T, d, generator=gen).to(device, dtype)
    weight = (torch.randn(V, d, generator=gen) * (2.0 / math.sqrt(d))).to(device, dtype)
    targets = torch.randint(0, V, (R, T), generator=gen).to(device)
    if mask_kind == "full":
        mask = torch.ones(R, T, dtype=torch.long)
    elif mask_kind == "ragged":
        lengths = torch.randint((T + 1) // 2, T + 1, (R,), generator=gen)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    else:
        raise ValueError(f"mask_kind must be 'full' or 'ragged', got {mask_kind!r}")
    mask = mask.to(device)
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


def reference_loss(x: dict, kw: dict, zero_reference: bool = False):
    """fp32 loss and gradients (dH, and dW for a trainable head), in row chunks: fp32
    per-token log-probs, masked sums and `fastrl.preference_loss` on them, then its
    gradient w.r.t. the per-token log-probs pushed through the head chunk by chunk."""
    R, T, d = x["hidden"].shape
    h = x["hidden"].detach().reshape(-1, d)
    t = x["targets"].reshape(-1)
    lp, _, _, _ = _chunked_reference(h, x["weight"].detach(), t)
    lp = lp.view(R, T).requires_grad_(True)
    with torch.enable_grad():
        loss = _preference_loss_on(lp, x, kw, zero_reference)
        (g_lp,) = torch.autograd.grad(loss, [lp])
    trainable = x["weight"].requires_grad
    _, _, dh, dw = _chunked_reference(
        h, x["weight"].detach(), t, g_lp.reshape(-1), None, need_dw=trainable
    )
    grads = [dh.view(R, T, d)] + ([dw] if trainable else [])
    return loss.detach(), grads


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
    flops_unit = 2.0 * n_active * shape.V * shape.d
    record: dict = {
        "shape": {**asdict(shape), "N": shape.N},
        "label": shape.label,
        "dtype": str(dtype).removeprefix("torch."),
        "head": "trainable" if trainable else "frozen",
        "loss": asdict(loss),
        "loss_label": loss.label,
        "uses_reference": loss.uses_reference,
        "mask": mask_kind,
        "active_tokens": n_active,
        "modes": list(modes),
        "flops": {m: matmul_count(m, trainable) * flops_unit for m in modes},
        "methods": {},
    }
    record["matmul"] = (
        matmul_floor(shape, n_active, dtype, device, trainable, timer)
        if matmul
        else {"status": "skipped", "reason": "disabled"}
    )

    # fp32 loss and gradients, by reference convention (zero reference log-probs or not)
    refs: dict = {}
    if check:
        try:
            refs[False] = reference_loss(x, kw)
            record["reference_loss"] = float(refs[False][0])
        except Exception as e:
            refs[False] = None
            record["reference_reason"] = _reason(e)
            free_memory(device)

    def measure(fn):
        zero = bool(getattr(fn, "zero_reference", False))
        if check and zero not in refs:  # computed when a method first needs it
            try:
                refs[zero] = reference_loss(x, kw, zero)
                record["reference_loss_zero_ref"] = float(refs[zero][0])
            except Exception as e:
                refs[zero] = None
                record["reference_reason_zero_ref"] = _reason(e)
                free_memory(device)
        return measure_method(fn, x, modes, device, timer, refs.get(zero))

    record["methods"] = measure_methods(
        methods,
        METHODS,
        ctx,
        measure,
        flops=record["flops"],
        matmul_ms=record["matmul"].get("ms", {}),
        device=device,
        verbose=verbose,
    )
    x = refs = None
    free_memory(device)
    return record


# ----------------------------------------------------------------------------- CLI


def summary_line(rec: dict) -> str:
    parts = []
    for name, m in rec["methods"].items():
        if m["status"] == "ok":
            ms = m["ms"].get("fwdbwd", next(iter(m["ms"].values()), float("nan")))
            s = f"{name} {ms:.3g}ms"
            if "fwdbwd" in m.get("x_matmul", {}):
                s += f" ({m['x_matmul']['fwdbwd']:.2f}x mm)"
            if m.get("extra_mem_mib") is not None:
                s += f"/{m['extra_mem_mib']:.0f}MiB"
            parts.append(s)
        else:
            parts.append(f"{name} {m['status']}")
    label = rec["label"]
    if not label.endswith(rec["loss_label"]):
        label += f" {rec['loss_label']}"
    return f"{label} {rec['dtype']} {rec['head']}: " + ", ".join(parts)


def main(argv=None) -> int:
    from bench.common import default_results_path, environment, progress, write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help=f"comma list of {sorted(SHAPE_SETS)} or BxTxdxV, B = pairs "
        "(default: gpu on CUDA, cpu else)",
    )
    p.add_argument(
        "--loss-type",
        default="sigmoid,orpo,simpo",
        help="comma list of preference_loss loss types (default sigmoid,orpo,simpo: the ones "
        "Liger-Kernel has fused losses for: DPO, ORPO, SimPO)",
    )
    p.add_argument("--beta", default="0.1", help="comma list of betas (default 0.1, TRL's)")
    p.add_argument(
        "--mask",
        choices=["full", "ragged"],
        default="full",
        help="full: every token counts; ragged: completions right-padded to lengths in [T/2, T]",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA")
    p.add_argument("--modes", default="fwd,fwdbwd", help=f"comma list of {MODES}")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma list of {list(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    )
    head = p.add_mutually_exclusive_group()
    head.add_argument("--head", choices=["frozen", "trainable", "both"], default="frozen")
    head.add_argument("--frozen", dest="head", action="store_const", const="frozen")
    head.add_argument("--trainable", dest="head", action="store_const", const="trainable")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU only: torch threads (default 1: stable numbers on a shared machine; 0 = torch's)",
    )
    p.add_argument("--fastrl-impl", default=None, help="override fastrl's impl (triton/torch)")
    p.add_argument("--no-check", action="store_true", help="skip the fp32 reference loss/grads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="JSON path (default bench/results/preference-<dev>-<date>.json)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or parse_shapes("gpu" if device.type == "cuda" else "cpu")
    dtype = (
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if args.dtype == "auto"
        else DTYPES[args.dtype]
    )
    modes = _csv(args.modes)
    methods = _csv(args.methods)
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {MODES}")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {list(METHODS)}")
    try:
        betas = [float(b) for b in _csv(args.beta)]
    except ValueError:
        p.error(f"--beta must be a comma list of numbers, got {args.beta!r}")
    from fastrl.preference import LOSS_TYPES

    loss_types = _csv(args.loss_type)
    for lt in loss_types:
        if lt not in LOSS_TYPES:
            p.error(f"unknown loss type {lt!r}; choose from {list(LOSS_TYPES)}")
    losses = [LossConfig(lt, b) for lt in loss_types for b in betas]
    heads = [False, True] if args.head == "both" else [args.head == "trainable"]
    out_path = Path(args.out) if args.out else default_results_path(device, prefix="preference-")

    env = environment(device)
    title = "fastrl.fused_preference_loss" + (f" ({losses[0].label})" if len(losses) == 1 else "")
    results = {
        "benchmark": "fused_preference_loss",
        "title": title,
        "env": env,
        "config": {
            "dtype": str(dtype).removeprefix("torch."),
            "modes": modes,
            "methods": methods,
            "losses": [asdict(c) for c in losses],
            "mask": args.mask,
            "seed": args.seed,
        },
        "cases": [],
    }
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} -> {out_path}")
    cases = [(s, c, tr) for tr in heads for c in losses for s in shapes]
    bar = progress(cases, desc="fused_preference_loss", unit="case")
    for shape, cfg, trainable in bar:
        if hasattr(bar, "set_postfix_str"):
            head = "trainable" if trainable else "frozen"
            bar.set_postfix_str(f"{shape.label} {cfg.label} {head}")
        rec = run_case(
            shape,
            cfg,
            dtype=dtype,
            device=device,
            trainable=trainable,
            methods=methods,
            modes=modes,
            mask_kind=args.mask,
            seed=args.seed,
            fastrl_impl=args.fastrl_impl,
            check=not args.no_check,
            verbose=args.verbose,
        )
        if len(losses) > 1:  # tell the loss configs apart in the plot
            rec["label"] += f" {cfg.label}"
        results["cases"].append(rec)
        write_json(results, out_path)  # after every case, so a crash keeps what was measured
        (bar.write if hasattr(bar, "write") else print)(summary_line(rec))

    finish_run(results, out_path, plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
