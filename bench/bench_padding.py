"""What padding costs: a GRPO-shaped batch with a fraction of each row valid, against the
same batch all valid, for `linear_logprobs` and `fused_policy_loss` forward+backward.

    python bench/bench_padding.py                         # CUDA: Llama-3-8B head, bf16
    python bench/bench_padding.py --device cpu            # CPU: d=256, V=8192, fp32
    python bench/bench_padding.py --dry-run               # seconds: a tiny head

A GRPO batch is a [B, T] grid padded to its longest completion; here each row's first
`valid * T` positions count (right padding, as after generation). The heads score only the
valid rows (`compact=True`, their default), so the time should follow the valid tokens;
`compact=False` (score every row, zero the padded ones) is measured beside it. Issue 9's
figures: at 25% valid <= 0.5x the all-valid time on a CPU, <= 0.3x on a GPU.
Results: bench/results/padding-<device>-<date>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # as a script: see bench_logprobs.py
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, _root)
    import bench.common  # noqa: F401

    sys.path.remove(_root)

from bench.common import (  # noqa: E402
    default_results_path,
    environment,
    progress,
    resolve_device,
    time_ms,
    write_json,
)
from fastrl import fused_policy_loss, linear_logprobs  # noqa: E402

HEADS = {"cuda": (4096, 128256, torch.bfloat16), "cpu": (256, 8192, torch.float32)}
TINY = (48, 1000, torch.float32)


def batch(B, T, d, V, dtype, device, valid):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, d, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=g) / d**0.5).to(device, dtype)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.arange(T) < max(1, round(valid * T))).expand(B, T).long().to(device)
    adv = torch.randn(B, generator=g).to(device)
    return hidden, weight, targets, mask, adv


def step_fn(op, inputs, compact, impl):
    hidden, weight, targets, mask, adv = inputs
    scored = torch.where(mask.bool(), targets, -100)
    n_valid = int(mask.sum())  # DAPO's normaliser, known to a trainer before the step

    def logprobs():
        logp = linear_logprobs(hidden, weight, scored, impl=impl, compact=compact)
        logp.sum().backward()

    def policy():
        loss, _ = fused_policy_loss(
            hidden, weight, targets, mask, adv, old_logps=None, loss_type="dapo",
            num_items_in_batch=n_valid, impl=impl, compact=compact,
        )  # fmt: skip
        loss.backward()

    def run():
        hidden.grad = None
        (logprobs if op == "linear_logprobs" else policy)()

    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--batch", default="8x512", help="B x T of the completion grid")
    p.add_argument("--valid", default="1.0,0.5,0.25", help="valid fractions of each row")
    p.add_argument("--head", default=None, help="d x V (default: per device, see --help)")
    p.add_argument("--impl", default="auto", help="auto | triton | torch")
    p.add_argument("--dry-run", action="store_true", help="a tiny head and batch (seconds)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    B, T = (2, 64) if args.dry_run else map(int, args.batch.split("x"))
    d, V, dtype = TINY if args.dry_run else HEADS["cuda" if device.type == "cuda" else "cpu"]
    if args.head and not args.dry_run:
        d, V = map(int, args.head.split("x"))
    fractions = [float(x) for x in args.valid.split(",")]
    results = {
        "benchmark": "padding",
        "environment": environment(device),
        "config": dict(B=B, T=T, d=d, V=V, dtype=str(dtype)[6:], impl=args.impl),
        "cases": [],
    }
    jobs = [
        (op, compact, f)
        for op in ("linear_logprobs", "fused_policy_loss")
        for compact in (True, False)
        for f in fractions
    ]
    step_fn(jobs[0][0], batch(B, T, d, V, dtype, device, 0.5), True, args.impl)()  # lazy init
    for op, compact, f in progress(jobs, desc="padding"):
        inputs = batch(B, T, d, V, dtype, device, f)
        ms = time_ms(step_fn(op, inputs, compact, args.impl), device)
        results["cases"].append(dict(op=op, compact=compact, valid=f, fwdbwd_ms=ms))
    full = {(c["op"], c["compact"]): c["fwdbwd_ms"] for c in results["cases"] if c["valid"] == 1}
    for c in results["cases"]:
        base = full.get((c["op"], c["compact"]))
        c["ratio_to_all_valid"] = None if base is None else c["fwdbwd_ms"] / base
        tag = "compact" if c["compact"] else "every row"
        ratio = "" if base is None else f"  {c['ratio_to_all_valid']:.2f}x all-valid"
        print(f"{c['op']:18s} {tag:9s} valid {c['valid']:.2f}: {c['fwdbwd_ms']:8.2f} ms{ratio}")

    out = Path(args.out) if args.out else default_results_path(device, "padding-")
    write_json(results, out)
    print(f"wrote {out}")
    if not args.no_plot:
        print(f"wrote {plot(results, out.with_suffix('.png'))}")
    return results


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, op in zip(axes, ("linear_logprobs", "fused_policy_loss"), strict=True):
        for compact, color in ((True, "#d62728"), (False, "#7f7f7f")):
            cases = [c for c in results["cases"] if c["op"] == op and c["compact"] == compact]
            xs = [c["valid"] for c in cases]
            ys = [c["ratio_to_all_valid"] for c in cases]
            label = "compact (default)" if compact else "every row scored"
            ax.plot(xs, ys, "o-", color=color, label=label)
        ax.plot([0, 1], [0, 1], ":", color="black", lw=0.8, label="proportional")
        ax.set_title(f"{op} fwd+bwd")
        ax.set_xlabel("valid fraction of each row")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 1.3)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("time / all-valid time")
    axes[0].legend(loc="upper left", fontsize=8)
    env = results["environment"]
    fig.suptitle(
        f"padding cost, {cfg['B']}x{cfg['T']} batch, d={cfg['d']} V={cfg['V']} {cfg['dtype']}"
        f" - {env['device']} ({env['date']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
