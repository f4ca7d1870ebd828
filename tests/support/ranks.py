"""Run a training script on two CPU processes (gloo, torchrun) and check that both ranks
end with the same LoRA weights: each rank trains on its own shard, so equal weights mean
the gradients were all-reduced, i.e. the loss's forward went through the DDP wrapper.

`run_ranks` runs any script on two processes; `FSDP_ON_CPU` and `DEEPSPEED_ON_CPU` are
the lines a script starts with to get FSDP2 or DeepSpeed on CPU processes (see there)."""

import pathlib
import subprocess
import sys
import time

_HEADER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
"""

# the script must leave the trained trainer in `trainer`
_CHECK = """
assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
# the configs' default: every LoRA weight is used, so DDP need not search for unused ones
assert trainer.model_wrapped.find_unused_parameters is False
_kept = [(n, p) for n, p in trainer.model.named_parameters() if any(k in n for k in _COMPARED)]
assert all(any(k in n for n, _ in _kept) for k in _COMPARED), (_COMPARED, [n for n, _ in _kept])
vec = torch.cat([p.detach().flatten() for n, p in _kept])
every = [torch.zeros_like(vec) for _ in range(dist.get_world_size())]
dist.all_gather(every, vec)
assert torch.equal(every[0], every[1]), (every[0] - every[1]).abs().max()
assert vec.abs().sum() > 0
print("RANKS_EQUAL", dist.get_rank(), flush=True)
dist.barrier()
# Leave without interpreter teardown: on a loaded machine gloo's worker threads can abort
# it ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489),
# even after destroy_process_group. Both ranks have passed the barrier, nothing is pending.
sys.stderr.flush()
os._exit(0)
"""


# accelerate 1.15 turns an FSDP plugin into DistributedType.FSDP for accelerator devices
# only: on CPU processes (MULTI_CPU, gloo) it keeps DDP and silently drops the plugin. These
# lines make it take the plugin there too, so the Trainer prepares the model with
# `fully_shard` (FSDP2 itself runs on CPU with gloo). Tests only.
FSDP_ON_CPU = """
import accelerate.state
from accelerate.utils import DistributedType
_state_init = accelerate.state.AcceleratorState.__init__
def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # both states, as accelerate does on GPUs (each AcceleratorState() re-reads the other)
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu
"""

# accelerate 1.15 starts DeepSpeed only off CPU (`not cpu`), and without an accelerator
# device it starts no process group at all (one process, distributed type NO). These lines
# give such processes gloo, so DeepSpeed (its CPU accelerator) runs ZeRO-3 there. Tests
# only; the script's TrainingArguments must not set use_cpu.
# DeepSpeed's CPU backend JIT-compiles a C++ shared-memory all-reduce (deepspeed_shm_comm)
# the first time a fresh install calls init_distributed: ~45 s of g++ on CI's 2 cores for
# the first ZeRO-3 test; gloo does the same collectives
NO_DEEPSPEED_SHM_BUILD = """
import deepspeed.comm.torch
# the module itself: the package's `torch` attribute is PyTorch (deepspeed.comm's star import)
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
"""

DEEPSPEED_ON_CPU = (
    NO_DEEPSPEED_SHM_BUILD
    + """
import accelerate.state
from accelerate.utils import DistributedType
_prepare_backend = accelerate.state.PartialState._prepare_backend
def _gloo_for_deepspeed(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if found is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true":
        return "gloo", DistributedType.MULTI_CPU
    return found, kind
accelerate.state.PartialState._prepare_backend = _gloo_for_deepspeed
"""
)

# leave without interpreter teardown (see _CHECK)
EXIT = """
dist.barrier()
sys.stderr.flush()
os._exit(0)
"""


def run_ranks(script: str, tmp_path: pathlib.Path, *, python: str = sys.executable) -> str:
    """Run `script` (after `_HEADER`: os, sys, torch, dist imported, the repository on the
    path) on two torchrun processes with `python`; its stdout. Fails with the end of
    stderr when a process fails."""
    root = str(pathlib.Path(__file__).resolve().parents[2])
    path = tmp_path / "ranks.py"
    path.write_text(_HEADER.format(root=root) + script)
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=root)
    # a failing rank's traceback, not the launcher's that follows it
    ranks = [line for line in done.stderr.splitlines() if line.startswith("[rank")]
    assert done.returncode == 0, "\n".join(ranks[-40:]) or done.stderr[-3000:]
    return done.stdout


def assert_ranks_end_equal(
    script: str, tmp_path: pathlib.Path, *, also: tuple[str, ...] = ()
) -> None:
    """`script` (it may use `{out}`, a fresh output directory) trains `trainer` with
    `ddp_backend="gloo"`; run it on two processes and check their LoRA weights and the
    parameters whose names contain one of `also` (e.g. `("value_head",)`; each must
    match at least one)."""
    body = script.format(out=str(tmp_path / "out"))
    compared = f"\n_COMPARED = {('lora_', *also)!r}\n"
    stdout = run_ranks(body + compared + _CHECK, tmp_path)
    assert stdout.count("RANKS_EQUAL") == 2, stdout[-2000:]


def join_processes(ctx, timeout: float) -> None:
    """Wait for the workers of a `torch.multiprocessing.start_processes(..., join=False)`
    context for at most `timeout` seconds. A worker that fails makes `join` raise (and stop
    the others); one still running at the deadline (a hung collective) has every worker
    terminated (killed if it ignores that) and fails the test, so a hang never blocks CI."""
    import pytest

    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, min(10.0, deadline - time.monotonic()))):
        if time.monotonic() < deadline:
            continue
        alive = [p.pid for p in ctx.processes if p.is_alive()]
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        pytest.fail(f"worker processes {alive} still running after {timeout:g} s: terminated")


def sleep_forever(rank: int) -> None:
    """A worker that hangs (tests of `join_processes`)."""
    while True:
        time.sleep(1)
