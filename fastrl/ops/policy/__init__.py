"""GRPO-family policy losses.

- `loss.py`: `policy_loss` on per-token log-probs, in steps: `inputs.py` (the tensors),
  `terms.py` (per-token terms, PyTorch or the kernel; `vespo.py`, VESPO's sequence
  weight), `aggregate.py` (masks, sampler
  weights, normalisers, entropy bonus, and their per-token coefficients), `metrics.py`;
- `fused.py`: `fused_policy_loss` from hidden states (gradients formed in the forward);
- `naive.py`: the float64 oracle `naive_policy_loss`;
- the options: `fastrl.options.policy.PolicyLossOptions`;
- kernels: `fastrl.kernels.policy_loss` (per-token terms), `.fused_policy_loss`.
"""

from fastrl.ops.policy.fused import fused_policy_loss
from fastrl.ops.policy.loss import policy_loss

__all__ = ["fused_policy_loss", "policy_loss"]
