"""Run a training script on two CPU processes (gloo, torchrun) and check that both ranks
end with the same LoRA weights: each rank trains on its own shard, so equal weights mean
the gradients were all-reduced, i.e. the loss's forward went through the DDP wrapper."""

import pathlib
import subprocess
import sys

_HEADER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
"""

# the script must leave the trained trainer in `trainer`
_CHECK = """
assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
# the configs' default: every LoRA weight is used, so DDP need not search for unused ones
assert trainer.model_wrapped.find_unused_parameters is False
vec = torch.cat([p.detach().flatten() for n, p in trainer.model.named_parameters() if "lora_" in n])
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


def assert_ranks_end_equal(script: str, tmp_path: pathlib.Path) -> None:
    """`script` (it may use `{out}`, a fresh output directory) trains `trainer` with
    `ddp_backend="gloo"`; run it on two processes and check their LoRA weights."""
    root = str(pathlib.Path(__file__).resolve().parents[2])
    path = tmp_path / "ranks.py"
    body = script.format(out=str(tmp_path / "out"))
    path.write_text(_HEADER.format(root=root) + body + _CHECK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("RANKS_EQUAL") == 2, done.stdout[-2000:]
