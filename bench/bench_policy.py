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
               tests/test_trl_parity_grpo.py): same formula, same PyTorch ops' cost.
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
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script: import the `bench` package from the repo root, then take the root
    # off sys.path again so that its kernels/ cannot shadow Hugging Face's `kernels`.
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, _root)
    import bench.common  # noqa: F401

    sys.path.remove(_root)

from bench.bench_logprobs import DTYPES, HEADS, Shape, matmul_reference
from bench.common import (
    MIB,
    finish_run,
    free_memory,
    measure_methods,
    parse_shape_spec,
    peak_memory_mib,
    resolve_device,
    synchronize,
    time_ms,
)
from bench.common import error_reason as _reason

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
        if any(self.name == model for model, _, _ in HEADS.values()):
            return f"{self.name} N={self.B}x{self.T}"
        return f"{self.name} d={self.d} V={self.V} N={self.B}x{self.T}"


def _model_shapes(key: str, lengths=GPU_LENGTHS) -> list[PolicyShape]:
    name, d, V = HEADS[key]
    return [PolicyShape(name, G, T, d, V) for T in lengths]


SHAPE_SETS: dict[str, list[PolicyShape]] = {
    # a few seconds per method on 2 CPU cores; odd sizes so tails get exercised
    "cpu": [PolicyShape("cpu", G, 33, 64, 1000), PolicyShape("cpu", G, 97, 128, 4000)],
    "smoke": [PolicyShape("smoke", 4, 9, 32, 500)],
    "gpu": [s for key in HEADS for s in _model_shapes(key)],
    # the target shape (N = 16384 tokens) for each head
    "gpu-quick": [s for key in HEADS for s in _model_shapes(key, (2048,))],
    **{key: _model_shapes(key) for key in HEADS},
}


def parse_shapes(spec: str) -> list[PolicyShape]:
    """Comma-separated shape-set names (see SHAPE_SETS) and/or `BxTxdxV` quadruples."""
    return parse_shape_spec(
        spec, SHAPE_SETS, lambda B, T, d, V: PolicyShape("custom", B, T, d, V), "BxTxdxV"
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
    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    importance_sampling_level: str = "token"

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
    if cfg.loss_type in ("dapo", "cispo"):
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
    logits = (x["hidden"] @ x["weight"].T).float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1)
    return _policy_loss_on(logps, x, kw)


def _fastrl(ctx):
    import fastrl

    impl = ctx.get("fastrl_impl") or ("triton" if ctx["device"].type == "cuda" else "torch")
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
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768
    kw = ctx["loss_kw"]
    compact = _use_triton(ctx["device"])

    def f(x):
        # as trl.trainer.utils.add_fused_lm_head's forward (GRPOTrainer asks for entropy)
        hidden, targets, mask = x["hidden"], x["targets"], x["mask"].bool()
        if compact:  # score only the completion tokens
            h, t = hidden[mask], targets[mask]
        else:  # every position (fixed tile shapes), masked ones with label 0
            h = hidden.reshape(-1, hidden.shape[-1])
            t = targets.masked_fill(~mask, 0).reshape(-1)
        # apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
        #       outputs) -> (logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)
        lp, ent, *_ = ChunkedLogProbFunction.apply(
            h, x["weight"], None, t, 1.0, chunk, None, 1.0, ("log_probs", "entropy")
        )
        if compact:
            lp = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
            ent = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        else:
            lp = lp.view(mask.shape).masked_fill(~mask, 0)
            ent = ent.view(mask.shape).masked_fill(~mask, 0)
        return _policy_loss_on(lp, x, kw, entropy=ent)

    where = "completion tokens only" if compact else "every position"
    return f, f"ChunkedLogProbFunction chunk_size={chunk} ({where}) + policy_loss (TRL's loss)"


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


def _eager(ctx):
    kw = ctx["loss_kw"]
    return (lambda x: eager_loss(x, kw)), "materialised fp32 logits + policy_loss"


def _compile(ctx):
    torch._dynamo.reset()
    kw = ctx["loss_kw"]
    fn = torch.compile(eager_loss, dynamic=False)
    return (lambda x: fn(x, kw)), "torch.compile(eager), dynamic=False"


METHODS: dict[str, Callable] = {
    "fastrl": _fastrl,
    "trl_chunked": _trl_chunked,
    "liger": _liger,
    "eager": _eager,
    "compile": _compile,
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
    B, T, d, V = shape.B, shape.T, shape.d, shape.V
    # logits ~ N(0, 2^2): peaked enough to look like an LM head, no overflow in fp16
    hidden = torch.randn(B, T, d, generator=gen).to(device, dtype)
    weight = (torch.randn(V, d, generator=gen) * (2.0 / math.sqrt(d))).to(device, dtype)
    targets = torch.randint(0, V, (B, T), generator=gen).to(device)
    if mask_kind == "full":
        mask = torch.ones(B, T, dtype=torch.long)
    elif mask_kind == "ragged":
        lengths = torch.randint((T + 1) // 2, T + 1, (B,), generator=gen)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    else:
        raise ValueError(f"mask_kind must be 'full' or 'ragged', got {mask_kind!r}")
    mask = mask.to(device)
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


def reference_loss(x: dict, kw: dict):
    """fp32 loss and gradients (dH, and dW for a trainable head), in row chunks:
    fp32 log-probs and entropies, `fastrl.policy_loss` on them, then its gradient w.r.t.
    the log-probs (and entropies) pushed through the head chunk by chunk."""
    B, T, d = x["hidden"].shape
    h = x["hidden"].detach().reshape(-1, d)
    t = x["targets"].reshape(-1)
    lp, ent, _, _ = _chunked_reference(h, x["weight"].detach(), t)
    lp = lp.view(B, T).requires_grad_(True)
    ent = ent.view(B, T).requires_grad_(True)
    with torch.enable_grad():
        loss = _policy_loss_on(lp, x, kw, entropy=ent)
        g_lp, g_ent = torch.autograd.grad(loss, [lp, ent], allow_unused=True)
    g_ent = None if g_ent is None else g_ent.reshape(-1)
    trainable = x["weight"].requires_grad
    _, _, dh, dw = _chunked_reference(
        h, x["weight"].detach(), t, g_lp.reshape(-1), g_ent, need_dw=trainable
    )
    grads = [dh.view(B, T, d)] + ([dw] if trainable else [])
    return loss.detach(), grads


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
    flops_unit = 2.0 * n_active * shape.V * shape.d
    record: dict = {
        "shape": {**asdict(shape), "N": shape.N},
        "label": shape.label,
        "dtype": str(dtype).removeprefix("torch."),
        "head": "trainable" if trainable else "frozen",
        "loss": asdict(loss),
        "loss_label": loss.label,
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
    mm_ms = record["matmul"].get("ms", {})
    ref = None
    if check:
        try:
            ref = reference_loss(x, kw)
            record["reference_loss"] = float(ref[0])
        except Exception as e:
            record["reference_reason"] = _reason(e)
            free_memory(device)

    record["methods"] = measure_methods(
        methods,
        METHODS,
        ctx,
        partial(measure_method, x=x, modes=modes, device=device, timer=timer, ref=ref),
        flops=record["flops"],
        matmul_ms=mm_ms,
        device=device,
        verbose=verbose,
    )

    lo = loss_only(x, kw, device, timer, G)
    head_ms = record["methods"].get("fastrl", {}).get("ms", {}).get("fwdbwd")
    if head_ms:
        lo["fraction_of_fastrl"] = {
            k.removesuffix("_ms"): v / head_ms for k, v in lo.items() if k.endswith("_ms") and v
        }
    record["loss_only"] = lo
    del x, ref
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


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def main(argv=None) -> int:
    from bench.common import default_results_path, environment, progress, write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help=f"comma list of {sorted(SHAPE_SETS)} or BxTxdxV (default: gpu on CUDA, cpu else)",
    )
    p.add_argument(
        "--loss-type",
        default="dapo",
        help="comma list of grpo,bnpo,dr_grpo,dapo,cispo,sapo,luspo (default dapo, TRL's)",
    )
    p.add_argument(
        "--beta", default="0.0", help="comma list of KL coefficients (default 0.0, TRL's)"
    )
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--epsilon-high", type=float, default=None)
    p.add_argument(
        "--level",
        choices=["token", "sequence"],
        default="token",
        help="importance_sampling_level (sequence = GSPO)",
    )
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
        help=f"comma list of {list(METHODS)} (default: all but compile)",
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
        "--out", default=None, help="JSON path (default bench/results/policy-<dev>-<date>.json)"
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
    losses = [
        LossConfig(lt, b, args.epsilon, args.epsilon_high, args.level)
        for lt in _csv(args.loss_type)
        for b in betas
    ]
    heads = [False, True] if args.head == "both" else [args.head == "trainable"]
    out_path = Path(args.out) if args.out else default_results_path(device, prefix="policy-")

    env = environment(device)
    title = "fastrl.fused_policy_loss" + (f" ({losses[0].label})" if len(losses) == 1 else "")
    results = {
        "benchmark": "fused_policy_loss",
        "title": title,
        "env": env,
        "config": {
            "dtype": str(dtype).removeprefix("torch."),
            "modes": modes,
            "methods": methods,
            "losses": [asdict(c) for c in losses],
            "mask": args.mask,
            "group_size": G,
            "seed": args.seed,
        },
        "cases": [],
    }
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} -> {out_path}")
    cases = [(s, c, tr) for tr in heads for c in losses for s in shapes]
    bar = progress(cases, desc="fused_policy_loss", unit="case")
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
