"""What tools/gpu_check.sh measures, in one table: fastrl's run-time design variants, and
each benchmark's shapes, methods and flags on a GPU and in the CPU dry run.

    python tools/gpu_plan.py list                        # the variants and the benchmarks
    python tools/gpu_plan.py args logprobs [--dry-run] [--out-dir DIR --stem STEM]
                                                         # its command line, one item a line
    python tools/gpu_plan.py check                       # every name and shape resolves

To measure another design, add a `Variant` (its environment variables are set around the
method, see bench/common.py's --variant); to benchmark another shape or peer, edit
`BENCHES`. A value fastrl rejects at run time is recorded as `skipped` with the reason and
the run goes on. Standard library only: the shell driver calls it before anything heavy.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

DESIGN = "FASTRL_LOGPROBS_DESIGN"  # linear_logprobs, impl="triton": tiles | cublas | frozen
CHUNK_ROWS = "FASTRL_CUBLAS_CHUNK_ROWS"  # the cublas design's token x vocab chunk
CHUNK_VOCAB = "FASTRL_CUBLAS_CHUNK_VOCAB"
FUSED_MB = "FASTRL_FUSED_CHUNK_MB"  # fused_policy_loss single pass: logits chunk, 64..512 MiB
ROW_KERNEL = "FASTRL_FUSED_ROW_KERNEL"  # its row kernel: lanes (default) | reduced


@dataclass(frozen=True)
class Variant:
    name: str  # the benchmarks' method is fastrl:<name>
    env: dict[str, str]
    benches: tuple[str, ...]  # the benchmarks that time it; the smoke calls every variant
    note: str

    def flag(self) -> str:
        return f"--variant={self.name}:" + ",".join(f"{k}={v}" for k, v in self.env.items())


VARIANTS: tuple[Variant, ...] = (
    Variant("tiles", {DESIGN: "tiles"}, ("logprobs", "preference"), "Triton tile GEMM + epilogue"),
    Variant(
        "cublas", {DESIGN: "cublas"}, ("logprobs", "preference"), "cuBLAS chunks, default size"
    ),
    Variant(
        "frozen",
        {DESIGN: "frozen"},
        ("logprobs", "preference"),
        "2 GEMMs for a frozen head (E_p[W] in the forward); cublas elsewhere",
    ),
    Variant(
        "cublas-4096x8192",
        {DESIGN: "cublas", CHUNK_ROWS: "4096", CHUNK_VOCAB: "8192"},
        ("logprobs",),
        "32 M logits a chunk (64 MiB in bf16)",
    ),
    Variant(
        "cublas-4096x32768",
        {DESIGN: "cublas", CHUNK_ROWS: "4096", CHUNK_VOCAB: "32768"},
        ("logprobs",),
        "TRL 1.16's tile: 128 M logits a chunk (256 MiB in bf16)",
    ),
    Variant(
        "cublas-16384x4096",
        {DESIGN: "cublas", CHUNK_ROWS: "16384", CHUNK_VOCAB: "4096"},
        ("logprobs",),
        "tall chunk: W read once per 16k tokens, 64 M logits",
    ),
    *(
        Variant(f"chunk{mb}", {FUSED_MB: str(mb)}, ("policy",), f"single pass, {mb} MiB chunks")
        for mb in (64, 128, 256, 512)
    ),
    Variant("rows-reduced", {ROW_KERNEL: "reduced"}, ("policy",), "row kernel reducing per step"),
    # the smoke's own: chunks so small that the smoke shapes have tails in both directions
    Variant(
        "cublas-tails",
        {DESIGN: "cublas", CHUNK_ROWS: "16", CHUNK_VOCAB: "256"},
        (),
        "smoke only: tails",
    ),
)

# the lm_heads of bench/common.py's HEADS (checked by `check`): model -> (d, V)
HEADS = {"Llama-3-8B": (4096, 128256), "Qwen2.5-7B": (3584, 152064), "Qwen2.5-1.5B": (1536, 151936)}
# tokens per batch, the target first: a stage that runs out of time loses the
# cheap small cases, not the ones the targets are stated at
TOKENS = (16384, 4096, 1024)
G = 8  # completions of a GRPO batch (bench_policy.py's B); bench_preference.py: 8 pairs


def _shapes(rows: int) -> str:
    """Every head at every TOKENS count: `NxdxV` (rows=0), else `BxTxdxV` with B = `rows`
    and T = N / (the completions B stands for: G, or 2G for G pairs)."""
    out = []
    for n in TOKENS:
        for d, V in HEADS.values():
            out.append(f"{n}x{d}x{V}" if not rows else f"{G}x{n // rows}x{d}x{V}")
    return ",".join(out)


@dataclass(frozen=True)
class Bench:
    name: str  # the gpu_check stage and the Variant.benches key
    script: str
    prefix: str  # its results file: <prefix><device>-<date>.json (bench/results' names)
    gpu_shapes: str
    dry_shapes: str  # tiny, with tails in N, d and V: each call ~0.1 s in the interpreter
    gpu_methods: tuple[str, ...]
    dry_methods: tuple[str, ...]
    flags: tuple[str, ...] = field(default=())

    def args(self, dry_run: bool) -> list[str]:
        """The benchmark's flags, --out and --head aside."""
        args = ["--shapes", self.dry_shapes if dry_run else self.gpu_shapes]
        args += ["--methods", ",".join(self.dry_methods if dry_run else self.gpu_methods)]
        args += [v.flag() for v in VARIANTS if self.name in v.benches]
        # --quick: shorter do_bench windows; at these sizes the medians stay stable and it
        # saves ~1/4 of the run. The dry run drives the Triton kernels (interpreted).
        args += [*self.flags, "--quick"]
        if dry_run:
            args += ["--fastrl-impl", "triton"]
        return args


# The dry run times fastrl's variants (the Triton kernels, interpreted) and the eager
# baseline: importing TRL costs ~7 s a process on a CPU, Liger's losses and CCE's CPU path
# torch.compile for ~20 s, and the peers' own code is tested by tests/cli/test_bench_*; `check`
# (tests/cli/test_gpu_check.py) makes sure the GPU run's method names still resolve.
DRY_METHODS = ("fastrl", "eager")

BENCHES: dict[str, Bench] = {
    b.name: b
    for b in (
        # `compile` (torch.compile of eager) is left out: ~30 s of compilation per shape
        Bench(
            "logprobs",
            "bench/bench_logprobs.py",
            "",
            _shapes(0),
            "13x24x200",
            ("fastrl", "eager", "trl_chunked", "trl_selective", "liger", "cce"),
            DRY_METHODS,
        ),
        Bench(
            "policy",
            "bench/bench_policy.py",
            "policy-",
            _shapes(G),
            "2x7x24x200",
            ("fastrl", "trl_chunked", "liger", "eager"),
            DRY_METHODS,
        ),
        Bench(
            "preference",
            "bench/bench_preference.py",
            "preference-",
            _shapes(2 * G),
            "1x7x24x200",
            ("fastrl", "trl_chunked", "liger", "eager"),
            DRY_METHODS,
            ("--loss-type", "sigmoid"),  # DPO; the variants are linear_logprobs' designs
        ),
    )
}


def smoke_variants(group: str) -> list[Variant]:
    """The variants the smoke calls for `group`: "logprobs" (linear_logprobs' designs, also
    under fused_preference_loss) or "policy" (the fused single pass)."""
    return [v for v in VARIANTS if group in v.benches or (not v.benches and group == "logprobs")]


def check() -> list[str]:
    """Problems with the table: methods or shapes a benchmark would reject, heads that
    differ from bench/common.py's. Imports the benchmarks (and torch)."""
    import importlib
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        import bench.common as common

        problems = []
        if sorted(HEADS.values()) != sorted((d, V) for _, d, V in common.HEADS.values()):
            problems.append(f"HEADS {HEADS} differ from bench.common.HEADS {common.HEADS}")
        for b in BENCHES.values():
            mod = importlib.import_module("bench." + Path(b.script).stem)
            for m in (*b.gpu_methods, *b.dry_methods):
                if m not in mod.METHODS:
                    problems.append(f"{b.name}: unknown method {m!r}")
            for spec in (b.gpu_shapes, b.dry_shapes):
                shapes = mod.parse_shapes(spec)
                named = [s for s in shapes if s.name == "custom"]
                if spec == b.gpu_shapes and named:
                    problems.append(f"{b.name}: shapes not named by their model: {named}")
            if not mod.parse_shapes(b.gpu_shapes):
                problems.append(f"{b.name}: no GPU shapes")
        names = [v.name for v in VARIANTS]
        if len(set(names)) != len(names):
            problems.append(f"variant names repeat: {names}")
        return problems
    finally:
        sys.path.pop(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the variants and the benchmarks")
    a = sub.add_parser("args", help="a benchmark's command line, one item a line")
    a.add_argument("bench", choices=sorted(BENCHES))
    a.add_argument("--dry-run", action="store_true")
    a.add_argument("--out-dir", help="add --out OUT_DIR/<prefix><stem>.json")
    a.add_argument("--stem", default="results", help="<device>-<date>")
    sub.add_parser("check", help="every method and shape resolves in the benchmarks")
    args = p.parse_args(argv)
    if args.cmd == "args":
        b = BENCHES[args.bench]
        line = [b.script, *b.args(args.dry_run)]
        if args.out_dir:
            line += ["--out", f"{args.out_dir}/{b.prefix}{args.stem}.json"]
        print("\n".join(line))
    elif args.cmd == "list":
        for v in VARIANTS:
            env = " ".join(f"{k}={val}" for k, val in v.env.items())
            print(f"{v.name:20} {','.join(v.benches) or 'smoke':20} {env}  # {v.note}")
        for b in BENCHES.values():
            print(f"{b.name}: {b.script} {' '.join(b.args(False))}")
    else:
        problems = check()
        print("\n".join(problems) or "ok")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
