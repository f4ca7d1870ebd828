"""Call every fastrl kernel and design variant once at small shapes and compare with the
PyTorch path in fp32 -> smoke.json.

    python tools/gpu_smoke.py --out DIR/smoke.json --jobs 3   # GPU: bf16, fp16, fp32
    python tools/gpu_smoke.py --out DIR/smoke.json --tiny     # CPU, interpreter: fp32

tools/gpu_check.sh runs it twice: plain (every kernel compiles and runs, and its results
are sane: a broken tile shows up here in seconds, before the benchmarks) and under
`compute-sanitizer --tool memcheck` (no out-of-bounds or misaligned access). What is
called: linear_logprobs forward and backward (frozen head; trainable head with bias,
softcap, temperature, entropy, is_top1, log sum p^2; inference) under every design in
tools/gpu_plan.py; fused_preference_loss under those designs; fused_policy_loss's single
pass under every chunk size, at a real vocabulary too (several chunks); policy_loss and
group_advantages with impl="triton". The reference is impl="torch" in fp32 on the same
(rounded) inputs; the bound per dtype only catches gross errors, tests/ pin accuracy.

Exit status: 0 every call ok; 3 a call raised, returned non-finite values or missed the
bound (all written); anything else: the script itself failed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.common as bc  # noqa: E402

sys.path.pop(0)  # so that the checkout's kernels/ cannot shadow Hugging Face's `kernels`

import torch  # noqa: E402
from gpu_plan import Variant, smoke_variants  # noqa: E402

# max |got - ref| / max |ref| allowed per dtype: sanity bounds (a wrong tile or mask gives
# O(1)), several times the rounding of the logits in that dtype at these scales
BOUND = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IGNORE = -100

Outputs = dict[str, torch.Tensor]


class StickyCudaError(RuntimeError):
    """The CUDA context is broken (illegal address, ...): every later call would fail."""


def _is_sticky(e: BaseException) -> bool:
    text = str(e).lower()
    return any(k in text for k in ("illegal memory access", "illegal instruction",
                                   "misaligned address", "unspecified launch failure",
                                   "device-side assert"))  # fmt: skip


# ----------------------------------------------------------------------------- inputs


def make_inputs(N: int, B: int, d: int, V: int, device: torch.device, seed: int = 0) -> Outputs:
    """fp32 master tensors: each call casts them to its dtype (and the reference upcasts
    that rounding again), so both see the same numbers."""
    g = torch.Generator().manual_seed(seed)
    T = N // B
    x = {
        "h": torch.randn(N, d, generator=g),
        "w": torch.randn(V, d, generator=g) * (3.0 / math.sqrt(d)),  # logits std ~3
        "b": torch.randn(V, generator=g) * 0.5,
        "t": torch.randint(0, V, (N,), generator=g),
        "g_logp": torch.randn(N, generator=g),
        "g_ent": torch.randn(N, generator=g),
        "hs": torch.randn(B, T, d, generator=g),
        "ts": torch.randint(0, V, (B, T), generator=g),
        "adv": torch.randn(B, generator=g),
        "noise": torch.randn(2, B, T, generator=g) * 0.05,
        "rewards": torch.randn(B * 2, 2, generator=g),
    }
    x["t"][::7] = IGNORE  # ignored positions: 0, no gradient
    mask = torch.ones(B, T, dtype=torch.long)
    for i in range(1, B):  # right padding of varying length; row 0 fully valid
        mask[i, T - max(1, (i * T) // (2 * B)) :] = 0
    x["ms"] = mask
    return {k: v.to(device) for k, v in x.items()}


def cast(x: Outputs, dtype: torch.dtype, reference: bool) -> Outputs:
    """The float inputs in `dtype` (the reference: that rounding, back in fp32)."""
    out = {}
    for k, v in x.items():
        if v.is_floating_point() and k in ("h", "w", "b", "hs"):
            v = v.to(dtype)
            v = v.float() if reference else v
        out[k] = v
    return out


# ----------------------------------------------------------------------------- the calls


def linear(opts: str) -> Callable[[str, Outputs], Outputs]:
    """linear_logprobs: "frozen" (ignore_index rows, entropy), "full" (trainable head,
    bias, softcap, temperature, every output) or "infer" (no_grad)."""

    def run(impl: str, x: Outputs) -> Outputs:
        import fastrl

        full = opts == "full"
        h = x["h"].clone().requires_grad_(opts != "infer")
        w = x["w"].clone().requires_grad_(full)
        b = x["b"].clone().requires_grad_() if full else None
        kw: dict = {"return_entropy": True, "impl": impl}
        if full:
            kw.update(bias=b, softcap=30.0, temperature=0.7)
            kw.update(return_is_top1=True, return_log_sum_sq_probs=True)
        if opts == "infer":
            with torch.no_grad():
                logp, ent = fastrl.linear_logprobs(h, w, x["t"], **kw)
            return {"logp": logp, "entropy": ent}
        out = fastrl.linear_logprobs(h, w, x["t"], **kw)
        logp, ent = out[0], out[1]
        params = [h, w, b] if full else [h]
        loss = (logp * x["g_logp"]).sum() + (ent * x["g_ent"]).sum()
        grads = torch.autograd.grad(loss, params)
        res = {"logp": logp, "entropy": ent, "dhidden": grads[0]}
        if full:
            res.update(log_sum_sq_probs=out[3], dweight=grads[1], dbias=grads[2])
        return res

    return run


def _logps_of(x: Outputs) -> torch.Tensor:
    """fp32 log-probs of the completion batch, from which old/ref log-probs are made."""
    import fastrl

    h, w = x["hs"].detach().float(), x["w"].detach().float()
    with torch.no_grad():
        return fastrl.linear_logprobs(h, w, x["ts"], impl="torch")


def fused_policy(trainable: bool) -> Callable[[str, Outputs], Outputs]:
    def run(impl: str, x: Outputs) -> Outputs:
        import fastrl

        base = _logps_of(x)
        h = x["hs"].clone().requires_grad_()
        w = x["w"].clone().requires_grad_(trainable)
        ms = x["ms"]
        loss, _ = fastrl.fused_policy_loss(
            h, w, x["ts"], ms, x["adv"], old_logps=base + x["noise"][0],
            ref_logps=base + x["noise"][1], beta=0.04, loss_type="dapo",
            num_items_in_batch=int(ms.sum()), impl=impl,
        )  # fmt: skip
        grads = torch.autograd.grad(loss, [h, w] if trainable else [h])
        res = {"loss": loss, "dhidden": grads[0]}
        if trainable:
            res["dweight"] = grads[1]
        return res

    return run


def fused_preference(impl: str, x: Outputs) -> Outputs:
    import fastrl

    h = x["hs"].clone().requires_grad_()
    B = h.shape[0] // 2
    seq = (_logps_of(x) * x["ms"]).sum(1)
    loss, _ = fastrl.fused_preference_loss(
        h, x["w"], x["ts"], x["ms"], ref_chosen_logps=seq[:B] - 0.3,
        ref_rejected_logps=seq[B:] + 0.3, loss_type="sigmoid", beta=0.1, impl=impl,
    )  # fmt: skip
    (g,) = torch.autograd.grad(loss, [h])
    return {"loss": loss, "dhidden": g}


def policy_loss(loss_type: str) -> Callable[[str, Outputs], Outputs]:
    def run(impl: str, x: Outputs) -> Outputs:
        import fastrl

        base = _logps_of(x)
        lp = (base + 0.5 * x["noise"][0]).requires_grad_()
        loss, _ = fastrl.policy_loss(
            lp, base + x["noise"][0], x["adv"], x["ms"], ref_logps=base + x["noise"][1],
            loss_type=loss_type, beta=0.04, num_items_in_batch=int(x["ms"].sum()), impl=impl,
        )  # fmt: skip
        (g,) = torch.autograd.grad(loss, [lp])
        return {"loss": loss, "dlogps": g}

    return run


def group_advantages(impl: str, x: Outputs) -> Outputs:
    import fastrl

    r = x["rewards"]
    weights = torch.tensor([1.0, 0.5], device=r.device)
    return {
        "mean_group": fastrl.group_advantages(r[:, 0], 4, impl=impl),
        "rloo_batch": fastrl.group_advantages(
            r[:, 0], 4, baseline="rloo", scale="batch", impl=impl
        ),
        "weighted": fastrl.group_advantages(r, 4, weights=weights, impl=impl),
    }


# ----------------------------------------------------------------------------- running


def compare(got: Outputs, ref: Outputs) -> dict[str, float]:
    """max |got - ref| / max |ref| per output (inf where got is not finite)."""
    errs = {}
    for k, r in ref.items():
        g = got[k].detach().double()
        r = r.detach().double()
        if g.shape != r.shape:
            errs[k] = math.inf
            continue
        scale = max(float(r.abs().max()) if r.numel() else 0.0, 1e-6)
        errs[k] = float((g - r).abs().max()) / scale if torch.isfinite(g).all() else math.inf
    return errs


def call(name: str, fn: Callable, x: Outputs, dtype: torch.dtype, variant: Variant | None) -> dict:
    rec: dict = {"call": name, "variant": variant.name if variant else "default"}
    rec["dtype"] = bc.dtype_name(dtype)
    env = variant.env if variant else {}
    t0 = time.perf_counter()
    try:
        with bc.environ(env):
            got = fn("triton", cast(x, dtype, reference=False))
            bc.synchronize(x["h"].device)  # an asynchronous fault surfaces at this call
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        ref = fn("torch", cast(x, dtype, reference=True))
        rec["rel_err"] = compare(got, ref)
        worst = max(rec["rel_err"].values(), default=0.0)
        rec["status"] = "ok" if worst <= BOUND[dtype] else "inaccurate"
        if not math.isfinite(worst):
            rec["status"] = "nonfinite"
    except Exception as e:
        rec.update(status="error", reason=bc.error_reason(e), seconds=time.perf_counter() - t0)
        if _is_sticky(e):
            raise StickyCudaError(rec["reason"]) from e
    return rec


Call = tuple[str, Callable, str, list, bool]


def plan(tiny: bool) -> list[Call]:
    """(call name, function, inputs key, variants, in every dtype or only the first) for
    every call, in order. The loss-only kernels take fp32 log-probs whatever the head's
    dtype: one call each. In the interpreter (`tiny`, ~0.4 s a call) every variant runs
    under one call of its group, the other calls under the default and the cublas design."""
    designs = [None, *smoke_variants("logprobs")]
    chunks = [None, *smoke_variants("policy")]
    some = designs if not tiny else [None, *(v for v in designs[1:] if v.name == "cublas")]
    most = designs if not tiny else designs[:3]
    calls: list[Call] = [
        ("linear_logprobs[frozen]", linear("frozen"), "small", designs, True),
        ("linear_logprobs[full]", linear("full"), "small", most, True),
        ("linear_logprobs[infer]", linear("infer"), "small", some, True),
        ("fused_preference_loss[sigmoid]", fused_preference, "small", some, True),
        ("fused_policy_loss[dapo beta]", fused_policy(False), "small", chunks, True),
        ("fused_policy_loss[trainable]", fused_policy(True), "small", [None], True),
    ]  # fmt: skip
    for lt in ("dapo", "grpo", "cispo", "sapo"):
        calls.append((f"policy_loss[{lt}]", policy_loss(lt), "small", [None], False))
    calls.append(("group_advantages", group_advantages, "small", [None], False))
    if not tiny:  # a real vocabulary: several chunks in every design (not interpretable)
        name = "linear_logprobs[frozen] V=128256"
        calls.append((name, linear("frozen"), "vocab", designs, False))
        name = "fused_policy_loss[dapo beta] V=128256"
        calls.append((name, fused_policy(False), "vocab", chunks, False))
    return calls


def run_calls(args: argparse.Namespace) -> dict:
    """This process's share of the calls (--shard i/n: every n-th, from the i-th)."""
    device = bc.resolve_device("auto")
    tiny = args.tiny or device.type != "cuda"
    dtypes = [DTYPES[d] for d in bc.csv_list(args.dtypes or default_dtypes(device))]
    # tiny: tails in every tile of the interpreter's 16 x 64 x 32 blocks; GPU: odd sizes
    # over several tiles, and a real vocabulary at a small d (600 rows: 2-3 fused chunks)
    sizes = {"small": (14, 2, 24, 200)} if tiny else {"small": (300, 4, 256, 2125)}
    if not tiny:
        sizes["vocab"] = (600, 4, 128, 128256)
    inputs = {k: make_inputs(*s, device=device) for k, s in sizes.items()}
    shard, shards = (int(x) for x in args.shard.split("/"))
    items = [
        (name, fn, key, dtype, v)
        for name, fn, key, variants, every_dtype in plan(tiny)
        for dtype in (dtypes if every_dtype else dtypes[:1])
        for v in variants
    ]
    # a shard per dtype where there are enough (each compiles its own kernels), else every
    # n-th call
    if shards <= len(dtypes):
        items = [it for it in items if dtypes.index(it[3]) % shards == shard]
    else:
        items = items[shard::shards]
    out = {
        "env": {k: bc.environment(device)[k] for k in ("device", "torch", "triton", "date")},
        "sizes": {k: dict(zip(("N", "B", "d", "V"), s, strict=True)) for k, s in sizes.items()},
        "bounds": {bc.dtype_name(k): v for k, v in BOUND.items()},
        "calls": [],
    }
    try:
        for name, fn, key, dtype, v in items:
            rec = call(name, fn, inputs[key], dtype, v)
            out["calls"].append(rec)
            if rec["status"] != "ok":
                print(f"{rec['status']}: {name} {rec['variant']} {rec['dtype']} "
                      f"{rec.get('reason') or rec.get('rel_err')}", flush=True)  # fmt: skip
            bc.write_json(out, args.out)  # after every call: a hang keeps the rest
    except StickyCudaError as e:
        out["aborted"] = f"CUDA context broken, later calls not run: {e}"
    return out


def default_dtypes(device: torch.device) -> str:
    return "fp32" if device.type != "cuda" else "bf16,fp16,fp32"


def run_jobs(args: argparse.Namespace) -> dict:
    """Every call, split over --jobs processes: Triton compiles each kernel variant on its
    first call, one at a time in a process, and most of a GPU smoke is compilation; the
    processes share the on-disk cache that the later stages then hit."""
    parts = [Path(f"{args.out}.part{i}") for i in range(args.jobs)]
    base = [sys.executable, __file__, *(["--tiny"] if args.tiny else [])]
    base += ["--dtypes", args.dtypes] if args.dtypes else []
    procs = [
        subprocess.Popen([*base, "--out", str(part), "--shard", f"{i}/{args.jobs}"])
        for i, part in enumerate(parts)
    ]
    codes = [proc.wait() for proc in procs]
    out: dict = {"calls": [], "jobs": args.jobs}
    for part, code in zip(parts, codes, strict=True):
        data = json.loads(part.read_text()) if part.exists() else {}
        if not data or code not in (0, 3):
            out.setdefault("aborted", "")
            out["aborted"] += f"{part.name} exited with {code}; "
        for key in ("env", "sizes", "bounds"):
            if key in data:
                out.setdefault(key, data[key])
        out["calls"] += data.get("calls", [])
        if data.get("aborted"):
            out["aborted"] = out.get("aborted", "") + data["aborted"] + "; "
        part.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="interpreter shapes (the dry run)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16")
    p.add_argument("--jobs", type=int, default=1, help="processes (not under a sanitizer)")
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = run_jobs(args) if args.jobs > 1 else run_calls(args)
    counts: dict[str, int] = {}
    for rec in out["calls"]:
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    out["counts"] = counts
    bc.write_json(out, args.out)
    aborted = out.get("aborted")
    print(
        f"smoke: {len(out['calls'])} calls, {counts}" + (f"; ABORTED: {aborted}" if aborted else "")
    )
    return 0 if counts.get("ok", 0) == len(out["calls"]) and not aborted else 3


if __name__ == "__main__":
    sys.exit(main())
