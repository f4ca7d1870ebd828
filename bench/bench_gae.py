"""Benchmark `fastrl.gae_advantages`' Triton scan against a copy of the same bytes.

    python bench/bench_gae.py                          # GPU shapes on CUDA, tiny ones on CPU
    python bench/bench_gae.py --shapes 256x4096 --blocks 1x1024,2x512,1x512c512 --dtype fp32

Issue 14's target: the GAE kernel runs at memory bandwidth, >= 70% of the speed of a copy
of the same bytes. The op reads rewards and values (`--dtype`) and the bool mask once and
writes fp32 advantages and returns once, so it moves B * T * (2 * itemsize + 1 + 8) bytes;
the reference is `dst.copy_(src)` of uint8 buffers half that size (a copy reads and writes
its size: the same bytes moved). Per shape it times:

  copy          the copy above (the bandwidth a kernel of this traffic can reach)
  triton BxT    kernels/gae.py `gae_fwd` with BLOCK_B=B rows per program and BLOCK_T=T
                tokens per scan step, for each `--blocks` entry (default: the tile shapes
                worth sweeping on a GPU; the shipped default is kernels/config.py's);
                `BxTcC` splits each row into chunks of C tokens (the two-pass scan that
                fills the SMs when B is small)
  torch         the PyTorch path (`impl="torch"`): a loop over the tokens, as verl's and
                OpenRLHF's GAE are written (off with `--methods copy,triton`; skipped past
                T = 4096 tokens, where one call takes seconds)

Each Triton result is checked against the PyTorch path before it is timed (a tile that
computes something else is reported, not timed). Reported: ms (do_bench median on CUDA),
GB/s of the op's bytes, `of_copy` = copy ms / method ms (>= 0.7 meets the target).
Results go to bench/results/gae-<device>-<date>.json plus a PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, _root)
    import bench.common  # noqa: F401

    sys.path.remove(_root)

from bench.common import (  # noqa: E402
    default_results_path,
    environment,
    error_reason,
    progress,
    resolve_device,
    time_ms,
    write_json,
)

# 3.4 to 54 MB moved (a few microseconds: launch latency counts) and 218 MB (1024 x 16384:
# bandwidth, the target's regime)
GPU_SHAPES = ((64, 4096), (256, 4096), (1024, 2048), (4096, 1024), (1024, 16384))
#: the PyTorch loop launches ~10 kernels a token: past this many tokens a call takes seconds
TORCH_MAX_T = 4096
CPU_SHAPES = ((5, 37),)
GPU_BLOCKS = ((1, 1024, 0), (1, 512, 0), (1, 2048, 0), (2, 512, 0), (4, 256, 0),
              (1, 512, 512), (1, 1024, 1024), (1, 256, 1024))  # fmt: skip
CPU_BLOCKS = ((4, 8, 0), (2, 8, 16))
METHODS = ("copy", "triton", "torch")
TARGET = 0.7
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _pairs(text: str, what: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"{what}: expected AxB[,AxB...], got {text!r}")
    return pairs  # type: ignore[return-value]


def _tiles(text: str) -> list[tuple[int, int, int]]:
    """`BxT` or `BxTcC` items: rows per program, tokens per step, tokens per chunk."""
    tiles = []
    for item in text.split(","):
        head, _, chunk = item.partition("c")
        ((bb, bt),) = _pairs(head, "--blocks")
        if chunk and not chunk.isdigit():
            raise argparse.ArgumentTypeError(f"--blocks: chunk of {item!r} is not a number")
        tiles.append((bb, bt, int(chunk or 0)))
    return tiles


def tile_name(bb: int, bt: int, chunk: int) -> str:
    return f"triton {bb}x{bt}" + (f"c{chunk}" if chunk else "")


def gae_inputs(B: int, T: int, dtype: torch.dtype, device: torch.device):
    """Rewards, values [B, T] of `dtype` and a right-padded bool mask (rows of 3/4 to all
    of T tokens, the shape of a completion batch)."""
    gen = torch.Generator().manual_seed(B * 7919 + T)
    rewards = torch.randn(B, T, generator=gen).to(device, dtype)
    values = torch.randn(B, T, generator=gen).to(device, dtype)
    lengths = torch.randint(3 * T // 4, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return rewards, values, mask


def op_bytes(B: int, T: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return B * T * (2 * itemsize + 1 + 2 * 4)


def bench_shape(B: int, T: int, dtype: torch.dtype, blocks, methods, device) -> dict:
    from fastrl.kernels.gae import gae_fwd

    from fastrl import gae_advantages

    r, v, m = gae_inputs(B, T, dtype, device)
    nbytes = op_bytes(B, T, dtype)
    want = gae_advantages(r, v, m, gamma=0.99, lam=0.95, impl="torch")  # once: the check
    calls: dict[str, object] = {}
    if "copy" in methods:
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        calls["copy"] = lambda: dst.copy_(src)
    if "triton" in methods:
        for bb, bt, ct in blocks:
            calls[tile_name(bb, bt, ct)] = lambda bb=bb, bt=bt, ct=ct: gae_fwd(
                r, v, m, 0.99, 0.95, block_b=bb, block_t=bt, chunk_t=ct
            )
    if "torch" in methods:
        calls["torch"] = lambda: gae_advantages(r, v, m, gamma=0.99, lam=0.95, impl="torch")
    rows: dict[str, dict] = {}
    for name, fn in calls.items():
        row: dict = {}
        if name == "torch" and T > TORCH_MAX_T:
            rows[name] = dict(status="skipped", reason=f"T > {TORCH_MAX_T}: seconds a call")
            continue
        try:
            if name.startswith("triton"):
                got = fn()
                for g, w in zip(got, want, strict=True):
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
            ms = time_ms(fn, device)
            row.update(status="ok", ms=ms, gb_per_s=nbytes / ms / 1e6)
        except Exception as e:  # a failing tile is a result, not the end of the run
            row.update(status="failed", reason=error_reason(e))
        rows[name] = row
    copy_ms = rows.get("copy", {}).get("ms")
    for name, row in rows.items():
        if copy_ms and row.get("status") == "ok" and name != "copy":
            row["of_copy"] = copy_ms / row["ms"]
    return dict(B=B, T=T, dtype=str(dtype).removeprefix("torch."), bytes=nbytes, methods=rows)


def summary_line(case: dict) -> str:
    parts = []
    for name, row in case["methods"].items():
        if row["status"] != "ok":
            parts.append(f"{name} {row['status']}")
            continue
        share = f" ({row['of_copy']:.2f} of copy)" if "of_copy" in row else ""
        parts.append(f"{name} {row['ms'] * 1e3:.1f} us {row['gb_per_s']:.0f} GB/s{share}")
    return f"{case['B']}x{case['T']} {case['dtype']}: " + ", ".join(parts)


def plot(results: dict, path: Path) -> Path:
    """Per shape, each Triton tile's and the torch path's share of the copy's speed, the
    target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["rows"]
    names = [n for n in cases[0]["methods"] if n != "copy"] if cases else []
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) + 2), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(cases))]
        ys = [c["methods"].get(name, {}).get("of_copy", 0.0) for c in cases]
        ax.bar(xs, ys, width, label=name)
    ax.axhline(TARGET, color="k", linestyle="--", linewidth=1, label=f"target {TARGET}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{c['B']}x{c['T']}\n{c['dtype']}" for c in cases])
    ax.set_ylabel("speed / speed of a copy of the same bytes")
    ax.set_yscale("log")
    env = results["environment"]
    ax.set_title(f"GAE scan on {env['device']} ({env['date']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=lambda s: _pairs(s, "--shapes"), default=None,
                   help="BxT list (default on CUDA: GPU_SHAPES)")  # fmt: skip
    p.add_argument("--blocks", type=_tiles, default=None,
                   help="BLOCK_BxBLOCK_T tiles, powers of 2 (CUDA: GPU_BLOCKS)")  # fmt: skip
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="rewards and values")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gae-...)")
    opts = p.parse_args(argv)
    methods = [m for m in opts.methods.split(",") if m]
    if bad := [m for m in methods if m not in METHODS]:
        p.error(f"--methods: unknown {bad}; of {list(METHODS)}")
    device = resolve_device(opts.device)
    cuda = device.type == "cuda"
    shapes = opts.shapes or (GPU_SHAPES if cuda else CPU_SHAPES)
    blocks = opts.blocks or (GPU_BLOCKS if cuda else CPU_BLOCKS)
    if bad := [b for b in blocks if any(x & (x - 1) for x in b[:2]) or b[2] % b[1]]:
        p.error(f"--blocks: tile sides must be powers of 2 and chunks their multiples: {bad}")
    dtype = DTYPES[opts.dtype]
    results = dict(
        benchmark="gae",
        config=dict(shapes=shapes, blocks=blocks, dtype=opts.dtype, methods=methods,
                    gamma=0.99, lam=0.95, target_of_copy=TARGET),
        environment=environment(device),
        rows=[],
    )  # fmt: skip
    for B, T in progress(shapes, desc="gae"):
        case = bench_shape(B, T, dtype, blocks, methods, device)
        results["rows"].append(case)
        print(summary_line(case), flush=True)
    out = write_json(results, opts.out or default_results_path(device, "gae-"))
    print(f"wrote {out}")
    if not opts.no_plot:
        print(f"wrote {plot(results, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
