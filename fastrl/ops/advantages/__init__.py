"""Group-normalised advantages (GRPO's mean baseline, RLOO's leave-one-out).

- `group.py`: `group_advantages`;
- `naive.py`: the float64 oracle `naive_group_advantages`;
- kernel: `fastrl.kernels.group_advantages`.
"""

from fastrl.ops.advantages.group import group_advantages

__all__ = ["group_advantages"]
