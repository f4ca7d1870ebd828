"""The padding figure (issue 9, section 1): a GRPO-shaped batch of 8 x 512 tokens with 25%
of each row valid against the same batch all valid, `linear_logprobs` and
`fused_policy_loss` forward and forward+backward -> padding-<device>-<date>.json + .png.

    python tools/gpu_padding.py --out DIR/padding-<stem>.json        # GPU: Llama-3-8B head, bf16
    python tools/gpu_padding.py --out ... --tiny                     # CPU: torch path, small head

Cost should follow the scored tokens: the ratio of times is 0.25 at best; the targets are
<= 0.3 on a GPU and <= 0.5 on a CPU. Padding is right padding (a GRPO batch: each
completion then its pad), `ignore_index` targets for linear_logprobs, mask 0 for
fused_policy_loss; frozen lm_head. Always exits 0 once it has measured: the ratios are
findings, recorded with `meets_target`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.common as bc  # noqa: E402

sys.path.pop(0)  # so that the checkout's kernels/ cannot shadow Hugging Face's `kernels`

import torch  # noqa: E402
from gpu_plan import Variant, smoke_variants  # noqa: E402

IGNORE = -100
VALID = 0.25


def make_batch(B: int, T: int, d: int, V: int, dtype, device, seed: int = 0) -> dict:
    # drawn on the device: 0.5 G normals of a real head take seconds on a CPU
    g = torch.Generator(device=device).manual_seed(seed)
    kw = {"generator": g, "device": device}
    x = {
        "h": torch.randn(B, T, d, **kw).to(dtype),
        "w": (torch.randn(V, d, **kw) * (3.0 / math.sqrt(d))).to(dtype),
        "t": torch.randint(0, V, (B, T), **kw),
        "adv": torch.randn(B, **kw),
        "g": torch.randn(B, T, **kw),
        "old": -torch.rand(B, T, **kw) * 8,
    }
    valid = torch.arange(T, device=device)[None, :] < int(T * VALID)
    x["valid"] = valid.expand(B, T)
    return x


def linear_fns(x: dict, padded: bool, impl: str) -> dict:
    import fastrl

    t = x["t"].masked_fill(~x["valid"], IGNORE) if padded else x["t"]
    h = x["h"].detach().requires_grad_()

    def fwdbwd():
        logp = fastrl.linear_logprobs(h, x["w"], t, impl=impl)
        return torch.autograd.grad(logp, [h], x["g"])

    def infer():
        with torch.no_grad():
            return fastrl.linear_logprobs(h, x["w"], t, impl=impl)

    return {"fwdbwd": fwdbwd, "infer": infer}


def policy_fns(x: dict, padded: bool, impl: str) -> dict:
    import fastrl

    mask = x["valid"].long() if padded else torch.ones_like(x["t"])
    h = x["h"].detach().requires_grad_()

    def loss():
        return fastrl.fused_policy_loss(
            h, x["w"], x["t"], mask, x["adv"], old_logps=x["old"], loss_type="dapo",
            num_items_in_batch=int(mask.sum()), impl=impl,
        )[0]  # fmt: skip

    def fwdbwd():
        return torch.autograd.grad(loss(), [h])

    return {"fwdbwd": fwdbwd, "fwd": loss}


def measure(op: str, x: dict, impl: str, variant: Variant | None, timer) -> list[dict]:
    fns = linear_fns if op == "linear_logprobs" else policy_fns
    rows = []
    with bc.environ(variant.env if variant else {}):
        calls = {(mode, padded): fn for padded in (False, True)
                 for mode, fn in fns(x, padded, impl).items()}  # fmt: skip
        for fn in calls.values():  # one-time costs (compilation, first-call set-up) first
            fn()
        times = {key: timer(fn) for key, fn in calls.items()}
        for mode in dict.fromkeys(m for m, _ in times):
            full, part = times[mode, False], times[mode, True]
            rows.append(
                {"op": op, "impl": impl, "variant": variant.name if variant else "default",
                 "mode": mode, "ms_all_valid": full, "ms_25pct_valid": part, "ratio": part / full}
            )  # fmt: skip
    return rows


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "ratio" in r]
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(rows), 3) + 1.5))
    labels = [f"{r['op']} {r['impl']} {r['variant']} {r['mode']}" for r in rows]
    ax.barh(range(len(rows)), [r["ratio"] for r in rows], color="#d62728")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['ratio']:.2f} ({r['ms_25pct_valid']:.3g}/{r['ms_all_valid']:.3g} ms)",
                    (r["ratio"], i), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=7)  # fmt: skip
    target = results["config"]["target"]
    ax.axvline(target, color="k", ls="--", lw=1, label=f"target {target}")
    ax.axvline(VALID, color="0.5", ls=":", lw=1, label=f"valid fraction {VALID}")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time with 25% of each row valid / time all valid (lower is better)")
    c, env = results["config"], results["env"]
    ax.set_title(
        f"Padding: {c['B']}x{c['T']} tokens, d={c['d']} V={c['V']} {c['dtype']}, frozen head\n"
        f"{env['device']} ({env['date']}) | torch {env['torch']} | triton {env['triton']}",
        fontsize=9,
    )
    ax.set_xlim(0, max([1.05, *(r["ratio"] * 1.3 for r in rows)]))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="CPU shapes (the dry run)")
    p.add_argument("--head", help="d x V of the lm_head (default: 4096x128256 on a GPU, "
                   "64x1000 on a CPU; the CPU figure in the README uses 256x8192)")  # fmt: skip
    args = p.parse_args(argv)
    device = bc.resolve_device("auto")
    gpu = device.type == "cuda" and not args.tiny
    # the CPU figure runs the PyTorch path: 4096 rows through the interpreter take minutes
    B, T, d, V = (8, 512, 4096, 128256) if gpu else (8, 512, 64, 1000)
    if args.head:
        d, V = (int(x) for x in args.head.lower().split("x"))
    dtype = torch.bfloat16 if gpu else torch.float32
    timer = (lambda fn: bc.quick_time_ms(fn, device, rep_ms=50, min_reps=5)) if gpu else (
        lambda fn: bc.time_ms(fn, device, cpu_min_reps=3, cpu_budget_s=0.1)
    )  # fmt: skip
    x = make_batch(B, T, d, V, dtype, device)
    results = {
        "benchmark": "padding",
        "env": bc.environment(device),
        "config": {"B": B, "T": T, "d": d, "V": V, "dtype": bc.dtype_name(dtype),
                   "valid_fraction": VALID, "padding": "right", "target": 0.3 if gpu else 0.5},
        "rows": [],
    }  # fmt: skip
    plan: list[tuple[str, str, Variant | None]] = [("linear_logprobs", "torch", None)]
    plan += [("fused_policy_loss", "torch", None)]
    if gpu:
        designs = [v for v in smoke_variants("logprobs") if "preference" in v.benches]
        plan += [("linear_logprobs", "triton", v) for v in (None, *designs)]
        plan += [("fused_policy_loss", "triton", v) for v in (None, *smoke_variants("policy"))]
    for op, impl, variant in plan:
        try:
            rows = measure(op, x, impl, variant, timer)
        except Exception as e:
            name = variant.name if variant else "default"
            rows = [{"op": op, "impl": impl, "variant": name, "error": bc.error_reason(e)}]
        for r in rows:
            if "ratio" in r:
                r["meets_target"] = r["ratio"] <= results["config"]["target"]
            print(f"{r['op']:18} {r['impl']:6} {r['variant']:10} {r.get('mode', ''):7} "
                  + (f"{r['ms_25pct_valid']:.3g} / {r['ms_all_valid']:.3g} ms = {r['ratio']:.2f}"
                     if "ratio" in r else r["error"]), flush=True)  # fmt: skip
        results["rows"] += rows
        bc.write_json(results, args.out)
    print(f"wrote {args.out} and {plot(results, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
