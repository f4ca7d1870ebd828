"""Parity with TRL 1.16: `fused_policy_loss` against `GRPOTrainer._compute_loss`.

The inputs, trainer configuration and TRL step are those of test_trl_parity_grpo.py; what
differs is what fastrl is given: not log-probs but the tiny Llama's last hidden states at
the positions that predict the completion tokens (sliced as TRL's fused head slices them)
and its `lm_head.weight`, so fastrl computes the log-probs itself, at TRL's sampling
temperature (0.7 here: TRL divides the logits by it). Compared: the loss, every metric
TRL logged and the gradient w.r.t. every model parameter, the backbone's through the
hidden states; for every loss_type x importance_sampling_level x beta x delta that
fastrl accepts, with impl="triton" (through the interpreter on a CPU: tests/conftest.py)
and impl="torch". Token-level losses under Triton take the single pass, where the
gradient is formed in the forward; sequence-level ones take the two-pass path.
"""

import pytest
import torch

pytest.importorskip("trl")

from fastrl import fused_policy_loss  # noqa: E402
from tests.support import DEVICE, to_device  # noqa: E402
from tests.support.compare import TOL_OWN_LOGPS, _assert_grads_close, _grads  # noqa: E402
from tests.support.trl_grpo import (  # noqa: E402
    GRID,
    _configure,
    _fastrl_kwargs,
    _grpo_trainer,
    _inputs,
    _trl_step,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

TEMPERATURE = 0.7
NO_DELTA = ("cispo", "sapo", "vespo")  # fastrl refuses delta there (TRL ignores it)
CASES = [c for c in GRID if not (c[3] is not None and c[0] in NO_DELTA)]


@pytest.fixture(scope="module")
def grpo_t(tmp_path_factory):
    """The parity module's GRPOTrainer, scoring completions at a temperature other than 1."""
    trainer = _grpo_trainer(tmp_path_factory.mktemp("grpo_fused"), temperature=TEMPERATURE)
    assert trainer.temperature == TEMPERATURE
    # an untied head: its gradient and the embedding's are compared separately
    assert trainer.model.lm_head.weight is not trainer.model.get_input_embeddings().weight
    return trainer


def _spy_single_pass(monkeypatch):
    import fastrl.kernels.fused_policy_loss as k

    calls = []
    real = k.fused_policy_loss_fwd
    monkeypatch.setattr(
        k, "fused_policy_loss_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    return calls


def _hidden(model, inputs):
    """The backbone's last hidden states at the positions TRL scores the completion from.

    TRL's fused head (trl.trainer.utils.add_fused_lm_head) runs `model.base_model`, drops
    the last position, and `_get_per_token_logps_and_entropies` keeps the last
    `logits_to_keep` = completion-length positions.
    """
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    out = model.base_model(input_ids=ids, attention_mask=att, use_cache=False)
    return out.last_hidden_state[:, :-1][:, -inputs["completion_ids"].shape[1] :]


def _fused(trainer, inputs, impl, **overrides):
    """fastrl's loss from the hidden states and lm_head, on DEVICE (differentiable)."""
    model = trainer.model
    kw = {k: to_device(v) for k, v in _fastrl_kwargs(trainer, inputs).items()}
    kw.update(overrides)
    loss, metrics = fused_policy_loss(
        _hidden(model, inputs).to(DEVICE),
        model.lm_head.weight.to(DEVICE),
        inputs["completion_ids"].to(DEVICE),
        inputs["completion_mask"].to(DEVICE),
        inputs["advantages"].to(DEVICE),
        old_logps=to_device(inputs.get("old_per_token_logps")),
        temperature=trainer.temperature,
        impl=impl,
        **kw,
    )
    return loss.cpu(), {k: v.cpu() for k, v in metrics.items()}


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize(
    "loss_type,level,beta,delta", CASES, ids=["-".join(map(str, c)) for c in CASES]
)
def test_fused_loss_matches_trl(grpo_t, monkeypatch, impl, loss_type, level, beta, delta):
    _configure(grpo_t, loss_type=loss_type, level=level, beta=beta, delta=delta)
    inputs = _inputs(grpo_t, GRID.index((loss_type, level, beta, delta)))
    params = [p for p in grpo_t.model.parameters() if p.requires_grad]
    trl_loss, _, _, trl_metrics = _trl_step(grpo_t, inputs, monkeypatch)
    trl_grads = _grads(trl_loss, params)
    assert torch.isfinite(trl_loss)

    calls = _spy_single_pass(monkeypatch)
    loss, metrics = _fused(grpo_t, inputs, impl)
    grads = _grads(loss, params)
    # the gradient is formed in the forward exactly when the loss is token-level under Triton
    # (vespo's weight needs the whole row's log-probs first: two passes)
    single = impl == "triton" and level == "token" and loss_type != "vespo"
    assert calls == ([1] if single else [])

    # the log-probs are computed independently of TRL's (unchunked, fastrl's kernels)
    torch.testing.assert_close(loss, trl_loss, **TOL_OWN_LOGPS)
    _assert_grads_close(grads, trl_grads, TOL_OWN_LOGPS)
    trl_metrics.pop("entropy_coef", None)
    assert set(trl_metrics) <= set(metrics), set(trl_metrics) - set(metrics)
    for name, value in trl_metrics.items():
        torch.testing.assert_close(
            metrics[name], torch.tensor(value), equal_nan=True, **TOL_OWN_LOGPS, msg=name
        )
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        # the inputs are off-policy enough for the clip to be active somewhere
        assert metrics["clip_ratio/region_mean"] > 0


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", NO_DELTA)
def test_fused_refuses_delta_where_trl_ignores_it(grpo_t, impl, loss_type, level):
    _configure(grpo_t, loss_type=loss_type, level=level, beta=0.04)
    inputs = _inputs(grpo_t, 0)
    with pytest.raises(ValueError, match="delta"):
        _fused(grpo_t, inputs, impl, delta=1.5)
