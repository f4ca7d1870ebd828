"""fastrl.reference, the user-facing namespace of the oracles, re-exports each op's own
(the tests import them from the op's folder)."""

import fastrl.reference
from fastrl.ops.advantages.naive import (
    naive_gae_advantages,
    naive_group_advantages,
    naive_reinforce_plus_plus_advantages,
    naive_remax_advantages,
)
from fastrl.ops.logprobs.naive import naive_linear_logprobs
from fastrl.ops.policy.naive import naive_policy_loss
from fastrl.ops.preference.naive import naive_kto_loss, naive_ld_tail_logps, naive_preference_loss
from fastrl.ops.value.naive import naive_value_loss

ORACLES = [
    naive_gae_advantages,
    naive_group_advantages,
    naive_reinforce_plus_plus_advantages,
    naive_remax_advantages,
    naive_value_loss,
    naive_kto_loss,
    naive_ld_tail_logps,
    naive_linear_logprobs,
    naive_policy_loss,
    naive_preference_loss,
]


def test_reference_re_exports_the_ops_oracles():
    assert sorted(fastrl.reference.__all__) == sorted(f.__name__ for f in ORACLES)
    for oracle in ORACLES:
        assert getattr(fastrl.reference, oracle.__name__) is oracle
