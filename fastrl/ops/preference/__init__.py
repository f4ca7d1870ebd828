"""The DPO family of preference losses (TRL's DPOTrainer loss types, CPO/SimPO/AlphaPO,
ORPO, KTO).

- `loss.py`: `preference_loss`, `kto_loss`, `ld_tail_logps`;
- `fused.py`: `fused_preference_loss` from hidden states;
- `naive.py`: the float64 oracles.
"""

from fastrl.ops.preference.fused import fused_preference_loss
from fastrl.ops.preference.loss import kto_loss, ld_tail_logps, preference_loss

__all__ = ["fused_preference_loss", "kto_loss", "ld_tail_logps", "preference_loss"]
