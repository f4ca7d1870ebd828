"""Compile every fastrl Triton kernel for a real GPU target on a machine without one.

The interpreter that runs the kernels in CPU tests skips the compiler: type rules,
constexpr folding, layouts and shared-memory budgets are only checked when Triton lowers
a kernel to PTX and `ptxas` assembles it. Triton can do that without a GPU; what it needs
a driver for is the launch. So this script installs a stand-in driver that reports the
target (`--arch`, e.g. 90 for H100/H200, 89 for a 24 GB RTX 4090) and turns every launch
into a no-op, then drives the public API with `impl="triton"` on CPU tensors: every
kernel the real shapes reach is compiled with its default config, forward and backward.
Outputs are garbage (nothing runs); only the compilation is checked.

Run in a fresh process with TRITON_INTERPRET unset (the kernels must be decorated as
compiled kernels): `python tests/support/compile_for_gpu.py --arch 90`. Prints one JSON
line per compiled kernel: its name and variant, shared memory bytes, the target's budget,
cubin size, the matrix instructions its dots use (wgmma, mma or none), registers and
spilled bytes. A kernel over the budget fails as its launch would on that GPU (OutOfResources).
"""

import argparse
import itertools
import json
import os
import re
import subprocess
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run with TRITON_INTERPRET unset: the kernels must be compiled kernels")

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

# Max shared memory per block (opt-in), bytes: what a launch on that GPU would allow.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _NoLaunch:
    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


class CompileOnlyDriver:
    """A Triton driver for a GPU that is not there: it names the target, and launches do
    nothing. Records every kernel it is asked to load."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.max_shared = MAX_SHARED[arch]
        self.loaded: list[dict] = []
        self.variant = ""  # what the caller is compiling, for the records
        self.launcher_cls = _NoLaunch
        self.utils = self

    # the driver interface the JIT runtime uses
    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_properties(self, device):
        return {"max_shared_mem": self.max_shared, "multiprocessor_count": 132}

    def inspect_ptx(self, module, function, name, metadata_group, hash):
        """Triton calls this just before `load_binary`: which matrix instructions the
        kernel's dots became (wgmma on Hopper, mma.sync before, none for fp32 'ieee'),
        and the registers and spilled bytes `ptxas -v` reports (spills cost speed)."""
        from triton.backends.nvidia.compiler import get_ptxas

        ptx_path = next(p for f, p in metadata_group.items() if f.endswith(".ptx"))
        with open(ptx_path) as f:
            ptx = f.read()
        kinds = [k for k in ("wgmma.mma_async", "mma.sync") if k in ptx]
        arch = self.target.arch
        ptxas = get_ptxas(arch).path
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run(
            [ptxas, "-v", "--gpu-name", gpu, ptx_path, "-o", os.devnull],
            capture_output=True, text=True,
        ).stderr  # fmt: skip
        registers = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        self._ptx_info = dict(
            mma=kinds[0].split(".")[0] if kinds else "none",
            registers=int(registers.group(1)) if registers else None,
            spill_bytes=int(spills.group(1)) if spills else None,
        )

    def load_binary(self, name, kernel, shared, device):
        record = dict(name=name, shared=shared, max_shared=self.max_shared, cubin_bytes=len(kernel))
        self.loaded.append({**record, **self._ptx_info, "variant": self.variant})
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads


def _drive_every_kernel(fake: CompileOnlyDriver) -> None:
    """Call the public API with impl="triton" at shapes that reach every kernel and its
    constexpr variants (bf16 and fp32, bias, softcap, entropy, is_top1, log sum p^2)."""
    from fastrl.kernels.fused_policy_loss import ROW_KERNELS

    import fastrl
    from fastrl.ops.logprobs.custom_ops import shard_statistics
    from fastrl.ops.logprobs.params import LogprobsParams

    g = torch.Generator().manual_seed(0)
    N, V, D = 300, 2048 + 77, 256
    for dtype in (torch.bfloat16, torch.float32):
        h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).requires_grad_()
        b = torch.randn(V, generator=g).to(dtype).requires_grad_()
        t = torch.randint(0, V, (N,), generator=g)
        for kw in (dict(), dict(bias=b, softcap=30.0, temperature=0.7)):
            opts = "bias+softcap" if kw else "plain"
            fake.variant = f"{str(dtype)[6:]} {opts} logp+entropy+top1+sumsq, bwd"
            out = fastrl.linear_logprobs(
                h, w, t, return_entropy=True, return_is_top1=True,
                return_log_sum_sq_probs=True, impl="triton", **kw,
            )  # fmt: skip
            (out[0].sum() + out[1].sum()).backward()
            fake.variant = f"{str(dtype)[6:]} {opts} logp"
            fastrl.linear_logprobs(h.detach(), w.detach(), t, impl="triton", **kw)
            fake.variant = f"{str(dtype)[6:]} {opts} cublas logp+entropy+top1+sumsq, bwd"
            out = fastrl.linear_logprobs(
                h, w, t, return_entropy=True, return_is_top1=True,
                return_log_sum_sq_probs=True, impl="triton", design="cublas", **kw,
            )  # fmt: skip
            (out[0].sum() + out[1].sum()).backward()
            fake.variant = f"{str(dtype)[6:]} {opts} frozen logp+top1+sumsq, bwd"
            frozen_kw = {**kw, "bias": b.detach()} if kw else {}  # a frozen head
            out = fastrl.linear_logprobs(
                h, w.detach(), t, return_is_top1=True, return_log_sum_sq_probs=True,
                impl="triton", design="frozen", **frozen_kw,
            )  # fmt: skip
            out[0].sum().backward()
            # a vocab shard's statistics (linear_logprobs(process_group=...)): the forward
            # kernels that also store the row max and the target logit
            bias = b.detach() if kw else None
            for design in ("tiles", "cublas"):
                fake.variant = f"{str(dtype)[6:]} {opts} {design} shard statistics"
                params = LogprobsParams(
                    temperature=kw.get("temperature", 1.0), softcap=kw.get("softcap"),
                    ignore_index=-1, return_entropy=True, return_is_top1=False,
                    return_log_sum_sq=True, backend=design,
                )  # fmt: skip
                shard_statistics(h.detach(), w.detach(), bias, t, params)

    fake.variant = "losses"
    B, G, T = 8, 4, 37
    rewards = torch.randn(B, 2, generator=g)
    fastrl.group_advantages(rewards, G, weights=torch.tensor([1.0, 0.5]), impl="triton")
    fastrl.group_advantages(rewards[:, 0], G, scale="batch", impl="triton")
    logps = torch.randn(B, T, generator=g).requires_grad_()
    mask = torch.ones(B, T)
    adv = torch.randn(B, generator=g)
    for loss_type, beta in (
        ("dapo", 0.0), ("grpo", 0.04), ("cispo", 0.0), ("sapo", 0.04), ("vespo", 0.04),
    ):  # fmt: skip
        loss, _ = fastrl.policy_loss(
            logps, logps.detach() - 0.1, adv, mask, ref_logps=logps.detach() + 0.1,
            loss_type=loss_type, beta=beta, num_items_in_batch=mask.sum(), impl="triton",
        )  # fmt: skip
        loss.backward()
    for dtype in (torch.bfloat16, torch.float32):  # GAE's scan: fp32 math from both
        fake.variant = f"gae {str(dtype)[6:]}"
        r, v = (torch.randn(B, T, generator=g).to(dtype) for _ in range(2))
        fastrl.gae_advantages(r, v, mask.bool(), gamma=0.99, lam=0.95, impl="triton")
        # the two-pass chunked scan (off by default): chunks of 2 x 1024 tokens over 5000
        from fastrl.kernels.gae import gae_fwd

        fake.variant = f"gae chunked {str(dtype)[6:]}"
        r, v = (torch.randn(3, 5000, generator=g).to(dtype) for _ in range(2))
        gae_fwd(r, v, torch.ones(3, 5000, dtype=torch.bool), 0.99, 0.95, chunk_t=2048)

    ids = torch.randint(0, V, (B, T), generator=g)
    # the fused single pass: half (dz over Z's own bytes) and fp32, each row kernel
    for dtype, row_kernel in itertools.product((torch.bfloat16, torch.float32), ROW_KERNELS):
        fake.variant = f"fused {str(dtype)[6:]} {row_kernel}"
        os.environ["FASTRL_FUSED_ROW_KERNEL"] = row_kernel
        hid = torch.randn(B, T, D, generator=g).to(dtype).requires_grad_()
        head = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
        loss, _ = fastrl.fused_policy_loss(
            hid, head, ids, mask, adv, old_logps=torch.randn(B, T, generator=g) - 5,
            ref_logps=torch.randn(B, T, generator=g) - 5, beta=0.04, loss_type="dapo",
            num_items_in_batch=mask.sum(), impl="triton",
        )  # fmt: skip
        loss.backward()
    os.environ.pop("FASTRL_FUSED_ROW_KERNEL")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED))
    arch = p.parse_args().arch
    fake = CompileOnlyDriver(arch)
    driver.set_active(fake)
    knobs.runtime.kernel_load_start_hook = fake.inspect_ptx
    # decorate every kernel as a compiled kernel now, before the flag below is set
    import fastrl.kernels.cublas_logprobs
    import fastrl.kernels.frozen_logprobs
    import fastrl.kernels.fused_policy_loss
    import fastrl.kernels.gae
    import fastrl.kernels.group_advantages
    import fastrl.kernels.linear_logprobs
    import fastrl.kernels.policy_loss  # noqa: F401

    # the public API accepts CPU tensors for impl="triton" under the interpreter flag; the
    # kernels are already decorated as compiled kernels, so nothing is interpreted
    os.environ["TRITON_INTERPRET"] = "1"
    _drive_every_kernel(fake)
    for record in fake.loaded:
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
