"""Liger-Kernel 0.8 drop-ins on fastrl's fused heads: change one import.

``from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss`` becomes ``from
fastrl.integrations.liger import LigerFusedLinearGRPOLoss``; the same for the DPO, CPO,
SimPO, ORPO and KTO modules and for ``liger_kernel.ops``'
``LigerFusedLinearScaledCrossEntropyFunction``. Constructors, forward signatures,
defaults, reductions and return values are Liger 0.8.5's (tests/parity/
test_liger_dropin.py runs both on the same inputs); each class takes one extra keyword,
``impl`` ("auto", "triton", "torch"), for fastrl's head. Options fastrl does not compute, or
that Liger ignores where fastrl would not, raise a ValueError naming them (see each
module). Liger itself is not imported.
"""

from fastrl.integrations.liger.cross_entropy import LigerFusedLinearScaledCrossEntropyFunction
from fastrl.integrations.liger.grpo import LigerFusedLinearGRPOLoss
from fastrl.integrations.liger.kto import LigerFusedLinearKTOLoss
from fastrl.integrations.liger.preference import (
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
)

__all__ = [
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearGRPOLoss",
    "LigerFusedLinearKTOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearScaledCrossEntropyFunction",
    "LigerFusedLinearSimPOLoss",
]
