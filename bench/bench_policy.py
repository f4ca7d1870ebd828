"""Benchmark `fastrl.fused_policy_loss`: the GRPO-family loss straight from hidden states.

    python bench/bench_policy.py                        # GPU shapes on CUDA, tiny ones on CPU
    python bench/bench_policy.py --shapes gpu-quick --loss-type dapo,grpo --beta 0.04
    python bench/bench_policy.py --shapes 8x2048x4096x128256 --methods fastrl,trl_chunked

Every case (shape x head x loss config) runs every method forward and forward+backward
on the same inputs (hidden [B, T, d], lm_head weight [V, d], targets, mask, advantages
[B], old and reference log-probs [B, T]) in the same process:

  fastrl       fastrl.fused_policy_loss (impl "triton" on CUDA, "torch" on CPU)
  trl_chunked  TRL 1.16's current path: per-token log-probs and entropies from TRL's
               chunked head trl.kernels.chunked_logprob.ChunkedLogProbFunction, called
               as TRL's fused LM head calls it (outputs=("log_probs", "entropy"), only the
               completion tokens on Triton devices, every position elsewhere), then the
               loss in PyTorch. That loss is `fastrl.policy_loss`, which reproduces TRL's
               GRPOTrainer._compute_loss (parity-tested against TRL itself in
               tests/parity/test_trl_parity_grpo.py): same formula, same PyTorch ops' cost.
  liger        Liger-Kernel's LigerFusedLinearGRPOLoss (chunk_size=1, compiled=True, its
               defaults; epsilon_low/high, beta, loss_type, importance_sampling_level,
               max_completion_length, num_items_in_batch mapped from ours,
               use_bias_correction_kl=True as TRL; reference log-probs passed in as
               ref_per_token_logps). It computes the gradients inside its forward.
  eager        logits = (H @ W.T).float(); log_softmax; gather; `fastrl.policy_loss`
               (materialises [B, T, V] logits; computes no entropy)
  compile      torch.compile of `eager` (opt-in: not in the default --methods)

plus the plain cuBLAS (torch.mm) matmuls the math needs, for the "x matmul" ratio: for a
frozen lm_head forward+backward needs two N x V x d matmuls (H @ W.T and dz @ W; a fused
loss forms dz in the forward pass), a trainable one three (+ dz.T @ H). A method that is
not installed, fails or runs out of memory is recorded with its reason; the run always
finishes. Results go to bench/results/policy-<device>-<date>.json plus a PNG.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
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

from bench.bench_logprobs import Shape, eager_logprobs, matmul_reference
from bench.common import (
    MIB,
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
    measure_methods,
    model_of,
    model_shape_sets,
    parse_betas,
    parse_shape_spec,
    peak_memory_mib,
    random_head_inputs,
    resolve_run_args,
    run_loss_benchmark,
    shape_label,
    synchronize,
    time_ms,
    trl_fused_head,
)
from bench.common import error_reason as _reason
from fastrl.options.policy import DEFAULTS as POLICY
from fastrl.options.policy import LOSS_TYPES, TOKEN_COUNT_LOSS_TYPES

# ----------------------------------------------------------------------------- shapes

G = 8  # completions per prompt (GRPO's group size): the batch is one group
GPU_LENGTHS = (1024, 2048, 4096, 8192)  # completion lengths: N = G x length tokens


@dataclass(frozen=True)
class PolicyShape:
    name: str  # the model whose head this is, or a free label
    B: int  # completions
    T: int  # completion length (padded)
    d: int  # hidden size
    V: int  # vocabulary

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def label(self) -> str:
        return shape_label(self.name, self.d, self.V, f"N={self.B}x{self.T}")


SHAPE_SETS: dict[str, list[PolicyShape]] = {
    # a few seconds per method on 2 CPU cores; odd sizes so tails get exercised
    "cpu": [PolicyShape("cpu", G, 33, 64, 1000), PolicyShape("cpu", G, 97, 128, 4000)],
    "smoke": [PolicyShape("smoke", 4, 9, 32, 500)],
    # gpu-quick: the target shape (N = 16384 tokens) for each head
    **model_shape_sets(lambda model, d, V, T: PolicyShape(model, G, T, d, V), GPU_LENGTHS, 2048),
}


def parse_shapes(spec: str) -> list[PolicyShape]:
    """Comma-separated shape-set names (see SHAPE_SETS) and/or `BxTxdxV` quadruples."""
    return parse_shape_spec(
        spec, SHAPE_SETS, lambda B, T, d, V: PolicyShape(model_of(d, V), B, T, d, V), "BxTxdxV"
    )


MODES = ("fwd", "fwdbwd")
# 2*N*V*d matmuls each mode needs at least: forward = H @ W.T; forward+backward adds dz @ W
# (dH) and, for a trainable head, dz.T @ H (dW). No recompute: a fused loss knows dz in
# its forward pass.
MATMULS = {"fwd": 1, "fwdbwd": 2}


def matmul_count(mode: str, trainable: bool) -> int:
    return MATMULS[mode] + (trainable and mode == "fwdbwd")


# ----------------------------------------------------------------------------- loss config


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = POLICY.loss_type
    beta: float = POLICY.beta
    epsilon: float = POLICY.epsilon
    epsilon_high: float | None = POLICY.epsilon_high
    importance_sampling_level: str = POLICY.importance_sampling_level

    @property
    def label(self) -> str:
        s = self.loss_type + (f" beta={self.beta:g}" if self.beta else "")
        return s + (" seq" if self.importance_sampling_level == "sequence" else "")


def loss_kwargs(cfg: LossConfig, inputs: dict) -> dict:
    """`policy_loss` options for one case (evaluation-style: one accumulation step)."""
    kw = dict(
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        importance_sampling_level=cfg.importance_sampling_level,
    )
    if cfg.loss_type == "dr_grpo":
        kw["max_completion_length"] = inputs["targets"].shape[1]
    if cfg.loss_type in TOKEN_COUNT_LOSS_TYPES:
        kw["num_items_in_batch"] = inputs["num_items"]
    return kw


# ----------------------------------------------------------------------------- methods
# A method factory takes the case context and returns `f(inputs) -> loss` (0-d tensor,
# differentiable w.r.t. inputs["hidden"] and, if trainable, inputs["weight"]) and a note,
# or raises to be recorded as skipped.

LossFn = Callable[[dict], torch.Tensor]


def _policy_loss_on(logps, x: dict, kw: dict, entropy=None) -> torch.Tensor:
    import fastrl

    ref = x["ref_logps"] if kw["beta"] else None
    loss, _ = fastrl.policy_loss(
        logps, x["old_logps"], x["advantages"], x["mask"], ref_logps=ref, entropy=entropy, **kw
    )
    return loss


def eager_loss(x: dict, kw: dict) -> torch.Tensor:
    return _policy_loss_on(eager_logprobs(x["hidden"], x["weight"], x["targets"]), x, kw)


def _fastrl(ctx):
    import fastrl

    impl = fastrl_impl(ctx)
    kw = ctx["loss_kw"]

    def f(x):
        loss, _ = fastrl.fused_policy_loss(
            x["hidden"],
            x["weight"],
            x["targets"],
            x["mask"],
            x["advantages"],
            old_logps=x["old_logps"],
            ref_logps=x["ref_logps"] if kw["beta"] else None,
            impl=impl,
            **kw,
        )
        return loss

    return f, f"fused_policy_loss, impl={impl!r}"


def _trl_chunked(ctx):
    # GRPOTrainer asks TRL's fused head for entropies too
    head, note = trl_fused_head(ctx["device"], ("log_probs", "entropy"), keep=2)
    kw = ctx["loss_kw"]

    def f(x):
        lp, ent = head(x)
        return _policy_loss_on(lp, x, kw, entropy=ent)

    return f, note + " + policy_loss (TRL's loss)"


def _liger(ctx):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    kw = ctx["loss_kw"]
    cfg: LossConfig = ctx["loss"]
    mod = LigerFusedLinearGRPOLoss(
        beta=cfg.beta,
        use_ref_model=cfg.beta != 0,
        epsilon_low=cfg.epsilon,
        epsilon_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high,
        loss_type=cfg.loss_type,
        max_completion_length=kw.get("max_completion_length"),
        importance_sampling_level=cfg.importance_sampling_level,
        temperature=1.0,
        use_bias_correction_kl=True,  # TRL's default (and fastrl's)
    )

    def f(x):
        loss, _metrics = mod(
            x["hidden"],
            x["weight"],
            x["targets"],
            x["mask"],
            x["advantages"],
            ref_per_token_logps=x["ref_logps"] if cfg.beta else None,
            old_per_token_logps=x["old_logps"],
            num_items_in_batch=kw.get("num_items_in_batch"),
        )
        return loss

    return f, "LigerFusedLinearGRPOLoss chunk_size=1 compiled=True (grads computed in forward)"


METHODS: dict[str, Callable] = {
    "fastrl": _fastrl,
    "trl_chunked": _trl_chunked,
    "liger": _liger,
    "eager": eager_loss_method(eager_loss, "materialised fp32 logits + policy_loss"),
    "compile": compiled_loss_method(eager_loss),
}
DEFAULT_METHODS = ("fastrl", "trl_chunked", "liger", "eager")


# ----------------------------------------------------------------------------- inputs


@torch.no_grad()
def _chunked_reference(
    hidden, weight, targets, g_logps=None, g_entropy=None, need_dw=False, max_elems=2**26
):
    """fp32 log-probs and entropies of `hidden @ weight.T` in row chunks (never the whole
    [N, V] at once). With `g_logps` (and `g_entropy`), also the gradients w.r.t. hidden
    and weight of `sum(g_logps * logps + g_entropy * entropy)`."""
    N, V = hidden.shape[0], weight.shape[0]
    rows = max(1, max_elems // V)
    w = weight.float()
    logps = torch.empty(N, device=hidden.device)
    entropy = torch.empty(N, device=hidden.device)
    dh = torch.zeros(hidden.shape, device=hidden.device) if g_logps is not None else None
    dw = torch.zeros(weight.shape, device=hidden.device) if need_dw else None
    for s in range(0, N, rows):
        h = hidden[s : s + rows].float()
        z = h @ w.T
        logp_all = torch.log_softmax(z, dim=-1)
        p = logp_all.exp()
        t = targets[s : s + rows]
        logps[s : s + rows] = logp_all.gather(-1, t[:, None]).squeeze(-1)
        ent = -(p * logp_all).sum(-1)
        entropy[s : s + rows] = ent
        if g_logps is None:
            continue
        # d logp_t / dz = onehot(t) - p ; d entropy / dz = -p (log p + entropy)
        dz = -g_logps[s : s + rows, None] * p
        dz.scatter_add_(-1, t[:, None], g_logps[s : s + rows, None])
        if g_entropy is not None:
            dz -= g_entropy[s : s + rows, None] * p * (logp_all + ent[:, None])
        dh[s : s + rows] = dz @ w
        if dw is not None:
            dw += dz.T @ h
    return logps, entropy, dh, dw


def make_inputs(shape: PolicyShape, dtype, device, trainable: bool, mask_kind="full", seed=0):
    """Hidden states, lm_head, completion tokens and everything the loss needs.

    `old_logps` / `ref_logps` are the fp32 log-probs of the targets plus noise (sd 0.05 /
    0.1), so the ratios sit near 1 and some tokens are clipped, as in training.
    `mask_kind="ragged"` right-pads each completion to a random length in [T/2, T]."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T, d = shape.B, shape.T, shape.d
    hidden, weight, targets = random_head_inputs((B, T), d, shape.V, dtype, device, gen)
    mask = completion_mask(mask_kind, B, T, gen).to(device)
    rewards = torch.randn(B, generator=gen)
    advantages = ((rewards - rewards.mean()) / (rewards.std() + 1e-4)).to(device)
    base, _, _, _ = _chunked_reference(hidden.reshape(-1, d), weight, targets.reshape(-1))
    base = base.view(B, T)
    old = base + 0.05 * torch.randn(B, T, generator=gen).to(device)
    ref = base + 0.1 * torch.randn(B, T, generator=gen).to(device)
    hidden.requires_grad_(True)
    weight.requires_grad_(trainable)
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": targets,
        "mask": mask,
        "advantages": advantages,
        "old_logps": old,
        "ref_logps": ref,
        "num_items": int(mask.sum()),
    }


def _params(x: dict) -> list[torch.Tensor]:
    return [x["hidden"]] + ([x["weight"]] if x["weight"].requires_grad else [])


def chunked_reference_loss(
    x: dict, loss_on: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32 loss and gradients (dH, and dW for a trainable head) of a loss benchmark's
    inputs `x`, in row chunks: fp32 per-token log-probs and entropies ([rows, T]),
    `loss_on(logps, entropy)`, then its gradient w.r.t. them pushed through the head chunk
    by chunk."""
    R, T, d = x["hidden"].shape
    h = x["hidden"].detach().reshape(-1, d)
    t = x["targets"].reshape(-1)
    lp, ent, _, _ = _chunked_reference(h, x["weight"].detach(), t)
    lp = lp.view(R, T).requires_grad_(True)
    ent = ent.view(R, T).requires_grad_(True)
    with torch.enable_grad():
        loss = loss_on(lp, ent)
        # a loss that does not use the entropies gets None for them: no entropy term
        g_lp, g_ent = torch.autograd.grad(loss, [lp, ent], allow_unused=True)
    g_ent = None if g_ent is None else g_ent.reshape(-1)
    trainable = x["weight"].requires_grad
    _, _, dh, dw = _chunked_reference(
        h, x["weight"].detach(), t, g_lp.reshape(-1), g_ent, need_dw=trainable
    )
    grads = [dh.view(R, T, d)] + ([dw] if trainable else [])
    return loss.detach(), grads


def reference_loss(x: dict, kw: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32 loss and gradients: `fastrl.policy_loss` on fp32 log-probs and entropies."""
    return chunked_reference_loss(x, lambda lp, ent: _policy_loss_on(lp, x, kw, entropy=ent))


# ----------------------------------------------------------------------------- one case


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def measure_method(fn: LossFn, x: dict, modes, device, timer, ref=None) -> dict:
    """Time and measure one method on one case. Raises on failure (caller records it)."""
    params = _params(x)
    rec: dict = {"ms": {}, "peak_mem_mib": {}}

    def fwd():
        return fn(x)

    def fwdbwd():
        return torch.autograd.grad(fn(x), params)

    # warm-up (compiles, autotunes) and a correctness check against the fp32 reference
    loss = fwd()
    if loss.dim() != 0:
        raise RuntimeError(f"returned a loss of shape {tuple(loss.shape)}, expected a scalar")
    grads = torch.autograd.grad(loss, params)
    if ref is not None:
        ref_loss, ref_grads = ref
        rec["loss"] = float(loss.detach())
        rec["loss_abs_err"] = float((loss.detach().float() - ref_loss).abs())
        rec["grad_rel_err"] = max(
            float((g.float() - r).abs().max() / r.abs().max().clamp(min=1e-30))
            for g, r in zip(grads, ref_grads, strict=True)
        )
    del loss, grads
    synchronize(device)

    # memory: peak above the inputs, the method's outputs (loss, graph, dH/dW) included
    if "fwd" in modes:
        rec["peak_mem_mib"]["fwd"] = peak_memory_mib(fwd, device)
    if "fwdbwd" in modes:
        peak = peak_memory_mib(fwdbwd, device)
        rec["peak_mem_mib"]["fwdbwd"] = peak
        # the workspace: peak minus the gradients handed back (dH [, dW] in input dtype)
        rec["extra_mem_mib"] = None if peak is None else peak - _nbytes(params) / MIB

    if "fwd" in modes:
        rec["ms"]["fwd"] = timer(fwd)
    if "fwdbwd" in modes:
        rec["ms"]["fwdbwd"] = timer(fwdbwd)
    return rec


def measure_loss_methods(
    record: dict,
    x: dict,
    ctx: dict,
    factories: dict[str, Callable],
    reference: Callable[[bool], tuple] | None,
    *,
    methods: Sequence[str],
    modes: Sequence[str],
    timer: Callable,
    verbose: bool,
) -> None:
    """Measure every method of a loss benchmark's case into record["methods"], each
    checked against an fp32 reference (None: no check).

    `reference(zero)` gives the reference (loss, grads); `zero` is True for methods marked
    `zero_reference` (bench_preference: a DPO loss run with zero reference log-probs).
    The usual one is computed up front, the other when a method first needs it; each
    records its loss (`reference_loss`, `reference_loss_zero_ref`) or why it failed."""
    device = ctx["device"]
    refs: dict[bool, tuple | None] = {}

    def compute_reference(zero: bool) -> None:
        suffix = "_zero_ref" if zero else ""
        try:
            refs[zero] = reference(zero)
            record["reference_loss" + suffix] = float(refs[zero][0])
        except Exception as e:
            refs[zero] = None
            record["reference_reason" + suffix] = _reason(e)
            free_memory(device)

    if reference is not None:
        compute_reference(False)

    def measure(fn: LossFn) -> dict:
        zero = bool(getattr(fn, "zero_reference", False))
        if reference is not None and zero not in refs:
            compute_reference(zero)
        return measure_method(fn, x, modes, device, timer, refs.get(zero))

    record["methods"] = measure_methods(
        methods,
        factories,
        ctx,
        measure,
        flops=record["flops"],
        matmul_ms=record["matmul"].get("ms", {}),
        device=device,
        verbose=verbose,
    )


def matmul_floor(shape: PolicyShape, n_tokens: int, dtype, device, trainable, timer) -> dict:
    """cuBLAS time of the matmuls a fused loss cannot avoid, on `n_tokens` rows:
    fwd = H @ W.T; fwdbwd = H @ W.T + dz @ W (+ dz.T @ H for a trainable head)."""
    mm_shape = Shape(shape.name, n_tokens, shape.d, shape.V)
    rec = matmul_reference(mm_shape, dtype, device, trainable, timer)
    if rec["status"] != "ok":
        return rec
    mm = rec["ms"]
    ms = {k: mm[k] for k in ("mm_logits", "mm_dhidden", "mm_dweight") if k in mm}
    ms["fwd"] = mm["mm_logits"]
    ms["fwdbwd"] = mm["mm_logits"] + mm["mm_dhidden"] + mm.get("mm_dweight", 0.0)
    return {**rec, "ms": ms, "N": n_tokens}


def loss_only(x: dict, kw: dict, device, timer, group_size: int) -> dict:
    """Time of the loss-only parts on [B, T] (log-probs given): `policy_loss` forward +
    backward and `group_advantages` on [B] rewards (the issue wants both < 2% of the head)."""
    import fastrl

    out: dict = {}
    B = x["targets"].shape[0]
    logps = (x["old_logps"] + 0.01).detach().requires_grad_(True)

    def pl():
        return torch.autograd.grad(_policy_loss_on(logps, x, kw), [logps])

    rewards = torch.randn(B, device=device)
    group = min(group_size, B)
    try:
        out["policy_loss_ms"] = timer(pl)
    except Exception as e:
        out["policy_loss_ms"] = None
        out["policy_loss_reason"] = _reason(e)
    try:
        out["group_advantages_ms"] = timer(lambda: fastrl.group_advantages(rewards, group))
    except Exception as e:
        out["group_advantages_ms"] = None
        out["group_advantages_reason"] = _reason(e)
    return out


def run_case(
    shape: PolicyShape,
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
    kw = loss_kwargs(loss, x)
    ctx = {"device": device, "dtype": dtype, "fastrl_impl": fastrl_impl}
    ctx.update(loss=loss, loss_kw=kw)
    n_active = x["num_items"]
    record = loss_case_record(
        shape, loss, n_active, dtype, trainable, modes, matmul_count, mask_kind
    )
    record["matmul"] = (
        matmul_floor(shape, n_active, dtype, device, trainable, timer)
        if matmul
        else {"status": "skipped", "reason": "disabled"}
    )
    measure_loss_methods(
        record,
        x,
        ctx,
        METHODS,
        (lambda _: reference_loss(x, kw)) if check else None,
        methods=methods,
        modes=modes,
        timer=timer,
        verbose=verbose,
    )

    lo = loss_only(x, kw, device, timer, G)
    head_ms = record["methods"].get("fastrl", {}).get("ms", {}).get("fwdbwd")
    if head_ms:
        lo["fraction_of_fastrl"] = {
            k.removesuffix("_ms"): v / head_ms for k, v in lo.items() if k.endswith("_ms") and v
        }
    record["loss_only"] = lo
    x = None  # not `del x`: the reference lambda above closes over it
    free_memory(device)
    return record


# ----------------------------------------------------------------------------- CLI

CLI = BenchCLI(
    name="fused_policy_loss",
    parse_shapes=parse_shapes,
    shapes_help=f"comma list of {sorted(SHAPE_SETS)} or BxTxdxV",
    modes=MODES,
    default_modes="fwd,fwdbwd",
    methods=METHODS,
    default_methods=DEFAULT_METHODS,
    methods_help=f"comma list of {list(METHODS)} (default: all but compile)",
    results_prefix="policy-",
    out_help="JSON path (default bench/results/policy-<dev>-<date>.json)",
    check=True,
)


def _add_loss_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--loss-type",
        default=POLICY.loss_type,
        help=f"comma list of {','.join(LOSS_TYPES)} (default {POLICY.loss_type}, TRL's)",
    )
    p.add_argument(
        "--beta", default=str(POLICY.beta), help="comma list of KL coefficients (default TRL's)"
    )
    p.add_argument("--epsilon", type=float, default=POLICY.epsilon)
    p.add_argument("--epsilon-high", type=float, default=None)
    p.add_argument(
        "--level",
        choices=["token", "sequence"],
        default="token",
        help="importance_sampling_level (sequence = GSPO)",
    )
    add_mask_arg(p)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__, CLI, _add_loss_args)
    args = p.parse_args(argv)
    run = resolve_run_args(p, args, CLI)
    betas = parse_betas(p, args.beta)
    losses = [
        LossConfig(lt, b, args.epsilon, args.epsilon_high, args.level)
        for lt in csv_list(args.loss_type)
        for b in betas
    ]
    run_loss_benchmark(
        CLI.name, run, losses, run_case, mask=args.mask, check=not args.no_check, group_size=G
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
