"""The DPO family of preference losses (TRL's DPOTrainer loss types, CPO/SimPO/AlphaPO,
ORPO, KTO).

- `loss.py`: `preference_loss`, the dispatcher: checks (`inputs.py`), the terms the
  families share, the family, the metrics; the options are
  `fastrl.options.preference.PreferenceLossOptions`;
- one file per family: `dpo.py` (TRL's DPOTrainer loss types), `cpo.py` (CPO, SimPO,
  AlphaPO), `orpo.py`, `kto.py` (`kto_loss`), `ld.py` (LD-DPO's `ld_tail_logps`);
- `fused.py`: `fused_preference_loss` from hidden states;
- `naive.py`: the float64 oracles.
"""

from fastrl.ops.preference.fused import fused_preference_loss
from fastrl.ops.preference.kto import kto_loss
from fastrl.ops.preference.ld import ld_tail_logps
from fastrl.ops.preference.loss import preference_loss

__all__ = ["fused_preference_loss", "kto_loss", "ld_tail_logps", "preference_loss"]
