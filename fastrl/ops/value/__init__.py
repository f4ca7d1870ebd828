"""PPO's value (critic) loss.

- `loss.py`: `value_loss` (OpenRLHF's ``ValueLoss``, verl's ``compute_value_loss``);
- `naive.py`: the float64 oracle `naive_value_loss`.

Elementwise work and two reductions: PyTorch, no kernel.
"""

from fastrl.ops.value.loss import value_loss

__all__ = ["value_loss"]
