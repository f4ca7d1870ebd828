"""Every Triton kernel compiles for real GPUs, on a machine without one.

The CPU tests run the kernels through the interpreter, which never lowers them: this
compiles each one (forward and backward, half precision and fp32, every option's
constexpr variant) to a cubin for the H100/H200 (sm_90) and for the 24 GB RTX 4090
(sm_89), checks its shared memory against what a block may use there, the tensor-core
instructions of the matmul tiles and the register spills of the hot path (`ptxas -v`).
See tests/support/compile_for_gpu.py.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "support" / "compile_for_gpu.py"
KERNELS = {
    "linear_logprobs_fwd_kernel",
    "linear_logprobs_combine_kernel",
    "linear_logprobs_bwd_kernel",
    "group_advantages_fwd_kernel",
    "group_advantages_batch_kernel",
    "gae_fwd_kernel",
    "gae_chunk_fwd_kernel",
    "policy_loss_fwd_kernel",
    "policy_loss_bwd_kernel",
    "fused_policy_loss_fwd_kernel",
    "cublas_logprobs_fwd_kernel",
    "cublas_logprobs_bwd_kernel",
    "frozen_logprobs_fwd_kernel",
}


def _not_the_pinned_triton() -> bool:
    """The stand-in driver is written against Triton 3.9's runtime (hooks, driver calls),
    the version constraints-cpu.txt pins for CI. A GPU image may carry another Triton;
    there the kernels compile for real in the GPU tests."""
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2]) != (3, 9)


@pytest.mark.slow
@pytest.mark.skipif(_not_the_pinned_triton(), reason="the stand-in driver targets Triton 3.9")
@pytest.mark.parametrize("arch", [90, 89], ids=["sm90-h100", "sm89-rtx4090"])
def test_every_kernel_compiles_within_the_shared_memory_budget(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", str(arch)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    # a kernel over the budget fails its launch with OutOfResources: a non-zero exit
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {r["name"] for r in records} == KERNELS
    assert all(0 <= r["shared"] <= r["max_shared"] and r["cubin_bytes"] > 0 for r in records)
    # the tile kernels' half-precision dots run on the tensor cores of their generation
    # (Hopper's wgmma, else mma); fp32 inputs use exact fp32 FMAs ('ieee')
    tensor_core = "wgmma" if arch >= 90 else "mma"
    for name in ("linear_logprobs_fwd_kernel", "linear_logprobs_bwd_kernel"):
        kinds = {r["mma"] for r in records if r["name"] == name}
        assert kinds == {tensor_core, "none"}, (name, kinds)
    # the hot path spills no registers: the row/epilogue kernels of the cuBLAS designs and
    # the GAE scans everywhere, and the bf16 tile kernels on Hopper (on sm_89 two forward
    # variants spill 8 bytes)
    epilogues = (
        "fused_policy_loss_fwd_kernel",
        "cublas_logprobs_fwd_kernel",
        "cublas_logprobs_bwd_kernel",
        "gae_fwd_kernel",
        "gae_chunk_fwd_kernel",
    )
    hot = [r for r in records if r["name"] in epilogues]
    if arch >= 90:
        hot += [r for r in records if r["mma"] == "wgmma"]
    assert hot and all(r["spill_bytes"] == 0 for r in hot), [
        (r["name"], r["variant"], r["spill_bytes"]) for r in hot if r["spill_bytes"]
    ]
