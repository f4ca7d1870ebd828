"""Parity with TRL 1.16: `fused_preference_loss` against TRL's DPO, CPO and ORPO trainers.

The trainers, batches and configurations are those of test_trl_parity_dpo.py; what
differs is what fastrl is given: not sequence log-probs but the tiny Llama's last hidden
states at the positions that predict the completion tokens and its ``lm_head.weight``,
so fastrl computes the log-probs (and lengths, LD-DPO tails) itself:

- DPO: TRL's fused head runs ``model.base_model``, drops the last position and scores
  the labels ``input_ids[:, 1:]`` where ``completion_mask[:, 1:]`` is set
  (`DPOTrainer._compute_loss`); fastrl gets the same hidden states, targets and mask, and
  the precomputed reference log-probs of the batch or the reference model's hidden
  states and head (``ref_hidden``, ``ref_weight``);
- CPO / SimPO / ORPO: TRL's ``get_batch_logps`` drops the last logit and scores the
  labels ``concatenated_labels[:, 1:]`` that are not -100; fastrl gets the hidden states
  under those logits. ORPO's NLL covers the prompt tokens too: it is computed in the test
  from the same hidden states and passed as ``nll``.

Compared: the loss, every metric TRL logged that sequence log-probs determine, and the
gradient w.r.t. every model parameter (the head directly, the backbone through the
hidden states), with impl="triton" (through the interpreter on a CPU: tests/conftest.py)
and impl="torch", at the tolerance of log-probs computed independently of TRL's.
"""

import os

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from fastrl import fused_preference_loss, linear_logprobs  # noqa: E402
from tests.support import DEVICE, to_device  # noqa: E402
from tests.support.compare import TOL_OWN_LOGPS, _assert_grads_close, _grads  # noqa: E402
from tests.support.models import tiny_model, tiny_tokenizer  # noqa: E402
from tests.support.trl_dpo import (  # noqa: E402
    MODEL_METRICS,
    PAIRED_DS,
    _check_metrics,
    _common_args,
    _configure_cpo,
    _configure_dpo,
    _dpo_batch,
    _dpo_step,
    _fastrl_cpo_kwargs,
    _fastrl_dpo_kwargs,
    _paired_batch,
    _ref_model,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*remove_unused_columns.*"),
]

IMPLS = ["triton", "torch"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dpo(tmp_path_factory):
    # use_weighting at construction: the fused head then also returns log_sum_sq_probs,
    # which TRL's WPO reads (the trainer reads use_weighting itself at call time)
    args = trl.DPOConfig(**_common_args(tmp_path_factory.mktemp("fused_dpo")), use_weighting=True)
    trainer = trl.DPOTrainer(
        model=tiny_model(),
        ref_model=_ref_model(),
        args=args,
        train_dataset=datasets.Dataset.from_dict(PAIRED_DS),
        processing_class=tiny_tokenizer(),
    )
    # an untied head: its gradient and the embedding's are compared separately
    assert trainer.model.lm_head.weight is not trainer.model.get_input_embeddings().weight
    return trainer


@pytest.fixture(scope="module")
def cpo(tmp_path_factory):
    args = CPOConfig(**_common_args(tmp_path_factory.mktemp("fused_cpo"), 4), max_length=32)
    return CPOTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=datasets.Dataset.from_dict(PAIRED_DS),
        processing_class=tiny_tokenizer(),
    )


@pytest.fixture(scope="module")
def orpo(tmp_path_factory):
    args = ORPOConfig(**_common_args(tmp_path_factory.mktemp("fused_orpo"), 4), max_length=32)
    return ORPOTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=datasets.Dataset.from_dict(PAIRED_DS),
        processing_class=tiny_tokenizer(),
    )


# --------------------------------------------------------------------------- helpers


def _hidden(model, input_ids, attention_mask):
    """The backbone's last hidden states at the positions that predict tokens 1..L-1, as
    TRL's fused head (trl.trainer.utils.add_fused_lm_head) and get_batch_logps drop the
    last position."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[:, :-1]


def _check(trainer, loss, metrics, trl_loss, trl_metrics):
    """Loss, every parameter's gradient and the metrics, at the tolerance of log-probs
    computed independently of TRL's."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    torch.testing.assert_close(loss, trl_loss, **TOL_OWN_LOGPS)
    _assert_grads_close([loss], [trl_loss], TOL_OWN_LOGPS)  # relatively too: WPO's is ~1e-6
    grads, trl_grads = _grads(loss, params), _grads(trl_loss, params)
    _assert_grads_close(grads, trl_grads, TOL_OWN_LOGPS)
    # the gradient reaches the backbone through the hidden states, and the head
    assert grads[0].abs().max() > 0 and grads[-1].abs().max() > 0
    _check_metrics(metrics, trl_metrics, tol=TOL_OWN_LOGPS)


# --------------------------------------------------------------------------- DPO


def _wpo_aligned_logps(model, batch):
    """WPO's aligned log-probs, log p - log sum_v p_v^2 summed over each completion, from
    the full logits (fused_preference_loss takes them as given)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        tok = lp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        aligned = tok - torch.logsumexp(2 * lp, -1)
        return (aligned * batch["completion_mask"][:, 1:]).sum(1).chunk(2)


def _dpo_fused(trainer, batch, impl, pass_aligned=False):
    """fastrl's loss from the policy's hidden states and head, on DEVICE (differentiable).
    With WPO the kernel computes the aligned log-probs, unless `pass_aligned`."""
    model = trainer.model
    ids, att = batch["input_ids"], batch["attention_mask"]
    kw = _fastrl_dpo_kwargs(trainer)
    if trainer.precompute_ref_logps:
        kw.update(ref_chosen_logps=batch["ref_chosen_logps"])
        kw.update(ref_rejected_logps=batch["ref_rejected_logps"])
        if trainer.ld_alpha is not None:  # precomputed reference log-probs are LD-weighted
            zero = torch.zeros_like(batch["ref_chosen_logps"])
            kw.update(ref_chosen_tail_logps=zero, ref_rejected_tail_logps=zero)
    else:
        ref = trainer.ref_model
        with torch.no_grad():
            kw.update(ref_hidden=_hidden(ref, ids, att), ref_weight=ref.lm_head.weight)
    if trainer.use_weighting and pass_aligned:
        c, r = _wpo_aligned_logps(model, batch)
        kw.update(chosen_aligned_logps=c, rejected_aligned_logps=r)
    loss, metrics = fused_preference_loss(
        _hidden(model, ids, att).to(DEVICE),
        model.lm_head.weight.to(DEVICE),
        ids[:, 1:].to(DEVICE),
        batch["completion_mask"][:, 1:].to(DEVICE),
        impl=impl,
        **{k: to_device(v) for k, v in kw.items()},
    )
    return loss.cpu(), {k: v.cpu() for k, v in metrics.items()}


MPO = (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])  # MPO's recipe
DPO_CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "hinge": dict(loss_type="hinge", beta=0.5),
    "robust": dict(loss_type="robust", label_smoothing=0.1),
    "bco_pair": dict(loss_type="bco_pair"),
    "sppo_hard": dict(loss_type="sppo_hard", beta=0.5),
    "apo_zero": dict(loss_type="apo_zero"),
    "discopop": dict(loss_type="discopop"),
    "sft": dict(loss_type="sft"),
    "mpo": dict(loss_type=MPO[0], loss_weights=MPO[1], beta=0.2),
    "ld_alpha": dict(loss_type="sigmoid", ld_alpha=0.5),
    "ld_alpha-ipo": dict(loss_type="ipo", ld_alpha=0.0, beta=0.5),
    "wpo": dict(loss_type="sigmoid", use_weighting=True, beta=0.3),
    "wpo-aligned-passed": dict(loss_type="ipo", use_weighting=True, pass_aligned=True),
    "js-hinge": dict(loss_type="hinge", f_divergence_type="js_divergence"),
    # the reference model runs: fastrl gets its hidden states and head (ref_hidden)
    "ref_hidden-sigmoid": dict(loss_type="sigmoid", precompute=False),
    "ref_hidden-mpo": dict(loss_type=MPO[0], loss_weights=MPO[1], precompute=False),
    "ref_hidden-ld_alpha": dict(loss_type="sigmoid", ld_alpha=0.3, precompute=False),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", DPO_CASES.values(), ids=DPO_CASES.keys())
def test_fused_dpo_matches_trl(dpo, monkeypatch, impl, case):
    seed = 1200 + list(DPO_CASES.values()).index(case)
    case = dict(case)
    pass_aligned = case.pop("pass_aligned", False)
    _configure_dpo(dpo, **case)
    batch = _dpo_batch(dpo, seed)
    trl_loss, _, _, trl_metrics = _dpo_step(dpo, batch, monkeypatch)
    assert torch.isfinite(trl_loss)
    loss, metrics = _dpo_fused(dpo, batch, impl, pass_aligned)
    _check(dpo, loss, metrics, trl_loss, trl_metrics)
    assert set(metrics) == set(trl_metrics) - MODEL_METRICS


# --------------------------------------------------------------------------- CPO / SimPO / ORPO


def _paired_inputs(trainer, padding_value):
    """TRL's own concatenation of the chosen and rejected rows, and its batch."""
    batch = _paired_batch(trainer)
    cat = trainer.concatenated_inputs(batch, padding_value=padding_value)
    return batch, cat["concatenated_input_ids"], cat["concatenated_attention_mask"], cat


def _paired_fused(trainer, cat_ids, cat_att, labels, impl, orpo_nll=False, **kw):
    """fastrl from the hidden states under TRL's logits[:, :-1] and labels[:, 1:]; with
    `orpo_nll`, ORPO's NLL over the chosen rows' prompt and completion tokens, from the
    same hidden states."""
    model = trainer.model
    hidden = _hidden(model, cat_ids, cat_att).to(DEVICE)
    weight = model.lm_head.weight.to(DEVICE)
    targets = labels[:, 1:]
    mask = targets != -100
    if orpo_nll:
        n = targets.shape[0] // 2
        seen = torch.where(cat_att[:n, 1:] == 1, cat_ids[:n, 1:], -100).to(DEVICE)
        lp = linear_logprobs(hidden[:n], weight, seen, impl=impl)
        kw["nll"] = -lp.sum() / (seen != -100).sum()
    loss, metrics = fused_preference_loss(
        hidden,
        weight,
        targets.to(DEVICE),
        mask.to(DEVICE),
        impl=impl,
        **kw,
    )
    return loss.cpu(), {k: v.cpu() for k, v in metrics.items()}


CPO_CASES = {
    "cpo": dict(loss_type="sigmoid", beta=0.3),
    "cpo-alphapo-smoothed": dict(loss_type="sigmoid", alpha=0.3, label_smoothing=0.1),
    "cpo_hinge": dict(loss_type="hinge", beta=0.3, cpo_alpha=0.5),
    "cpo_ipo": dict(loss_type="ipo", beta=0.3),
    "simpo": dict(loss_type="simpo", beta=2.0, cpo_alpha=0.0),
    "simpo-cpo_alpha": dict(loss_type="simpo", beta=2.0, label_smoothing=0.1, cpo_alpha=0.5),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CPO_CASES.values(), ids=CPO_CASES.keys())
def test_fused_cpo_matches_trl(cpo, impl, case):
    _configure_cpo(cpo, **case)
    batch, ids, att, cat = _paired_inputs(cpo, cpo.pad_token_id)
    trl_loss, trl_metrics = cpo.get_batch_loss_metrics(cpo.model, batch)
    assert torch.isfinite(trl_loss)
    loss, metrics = _paired_fused(
        cpo, ids, att, cat["concatenated_labels"], impl, **_fastrl_cpo_kwargs(cpo)
    )
    _check(cpo, loss, metrics, trl_loss, trl_metrics)
    assert (metrics["nll_loss"] == 0) == (cpo.cpo_alpha == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_fused_orpo_matches_trl(orpo, impl, beta):
    orpo.beta = beta
    orpo.model.train()
    batch, ids, att, cat = _paired_inputs(orpo, orpo.padding_value)
    trl_loss, trl_metrics = orpo.get_batch_loss_metrics(orpo.model, batch)
    labels = cat["concatenated_labels"]
    loss, metrics = _paired_fused(orpo, ids, att, labels, impl, orpo_nll=True, loss_type="orpo",
                                  beta=beta)  # fmt: skip
    _check(orpo, loss, metrics, trl_loss, trl_metrics)
    # the NLL over prompt and completion tokens is TRL's, not fastrl's default
    own, _ = _paired_fused(orpo, ids, att, labels, impl, loss_type="orpo", beta=beta)
    assert not torch.allclose(own, trl_loss)
