"""Advantages: group-normalised (GRPO's mean baseline, RLOO's leave-one-out) and per
token (GAE from a value model; REINFORCE++, REINFORCE++-baseline and ReMax without one).

- `group.py`: `group_advantages`;
- `gae.py`: `gae_advantages` (kernel: `fastrl.kernels.gae`);
- `reinforce.py`: `kl_shaped_rewards`, `discounted_returns`,
  `reinforce_plus_plus_advantages`, `remax_advantages`;
- `tokens.py`: their shared checks and `masked_whiten` (OpenRLHF's batch whitening);
- `naive.py`: the float64 oracles;
- kernels: `fastrl.kernels.group_advantages`, `fastrl.kernels.gae`.
"""

from fastrl.ops.advantages.gae import gae_advantages
from fastrl.ops.advantages.group import group_advantages
from fastrl.ops.advantages.reinforce import (
    discounted_returns,
    kl_shaped_rewards,
    reinforce_plus_plus_advantages,
    remax_advantages,
)
from fastrl.ops.advantages.tokens import masked_whiten

__all__ = [
    "discounted_returns",
    "gae_advantages",
    "group_advantages",
    "kl_shaped_rewards",
    "masked_whiten",
    "reinforce_plus_plus_advantages",
    "remax_advantages",
]
