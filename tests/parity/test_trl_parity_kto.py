"""Parity with TRL 1.16: fastrl's `KTOTrainer` against ``trl.KTOTrainer``, trainer to
trainer.

Both are built on the same dataset around the same tiny Llama and LoRA adapter (TRL's
reference: its base with the adapter off, as fastrl's); each trainer's own collator makes
the first batch from its own tokenized dataset (the ids are compared first), and each
trainer's ``compute_loss`` runs on it: TRL's fused head on the full model (logits-free
too) against fastrl's backbone + `linear_logprobs` + `kto_loss`. Compared: the loss, its
gradient w.r.t. every LoRA weight, and every metric both log (``kl``, ``rewards/*``,
``logps/*``, ``entropy``, ``logits/*``), for both loss types, unequal weights, batches
with one kind of label only, a positive KL reference point (reference log-probs given as
precomputed columns to both), and ``precompute_ref_log_probs`` end to end.
"""

import math

import pytest
import torch

from tests.support.compare import TOL_SAME_LOGPS
from tests.support.lora import lora_params
from tests.support.trl_kto import UNPAIRED_DS, B, first_batch, kto_pair

trl = pytest.importorskip("trl")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*remove_unused_columns.*"),
]

assert trl.__version__ == "1.16.0", f"parity is pinned to TRL 1.16.0, found {trl.__version__}"

# gradients of log-probs computed two ways (left- vs right-padded, chunked head vs TRL's)
TOL_GRADS = dict(rtol=1e-4, atol=1e-5)
METRICS = (
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "logits/chosen",
    "logits/rejected",
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return kto_pair(tmp_path_factory.mktemp("kto"))


def _configure(ours, theirs, loss_type="kto", beta=0.1, weights=(1.0, 1.0), precompute=False):
    """What both trainers read at call time."""
    ours.args.loss_type, ours.args.beta = loss_type, beta
    ours.args.desirable_weight, ours.args.undesirable_weight = weights
    ours.loss_kwargs = ours.args.kto_loss_kwargs()
    ours.data_collator.kl = loss_type == "kto"
    theirs.loss_type, theirs.beta = loss_type, beta
    theirs.calculate_KL = loss_type == "kto"
    theirs.desirable_weight, theirs.undesirable_weight = weights
    theirs.precompute_ref_logps = precompute
    for t in (ours, theirs):
        t._metrics["train"].clear()


def _grads(loss, model):
    params = lora_params(model)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def _check(ours, theirs, batches, want_kl_positive=None):
    loss = ours.compute_loss(ours.model, batches[0])
    trl_loss = theirs.compute_loss(theirs.model, batches[1])
    torch.testing.assert_close(loss, trl_loss, **TOL_SAME_LOGPS)
    g, trl_g = _grads(loss, ours.model), _grads(trl_loss, theirs.model)
    assert set(g) == set(trl_g)
    for name in g:  # relative to each tensor's scale: summation orders differ
        scale = max(1.0, float(trl_g[name].abs().max()))
        tol = dict(rtol=TOL_GRADS["rtol"], atol=TOL_GRADS["atol"] * scale)
        torch.testing.assert_close(g[name], trl_g[name], **tol, msg=name)
    assert max(float(v.abs().max()) for v in g.values()) > 0
    mine = {k: v[-1] for k, v in ours._metrics["train"].items()}
    trls = {k: v[-1] for k, v in theirs._metrics["train"].items()}
    for name in METRICS:
        if name not in trls:  # TRL logs nothing for a kind the batch lacks: ours is NaN
            assert math.isnan(mine[name]), name
            continue
        assert math.isclose(mine[name], trls[name], rel_tol=1e-5, abs_tol=1e-5), name
    if want_kl_positive is not None:
        assert (mine["kl"] > 0) == want_kl_positive
    return mine


def test_tokenization_matches_trl(pair):
    ours, theirs = pair
    for col in ("prompt_ids", "completion_ids", "label"):
        assert list(ours.train_dataset[col]) == list(theirs.train_dataset[col]), col
    # TRL's KL completions are ours: each batch's completions rotated by one
    kl = [list(c) for c in theirs.train_dataset["KL_completion_ids"]]
    done = [list(c) for c in ours.train_dataset["completion_ids"]]
    assert kl == done[-1:] + done[:-1]


CASES = {
    "kto": dict(loss_type="kto"),
    "kto-beta-weights": dict(loss_type="kto", beta=0.3, weights=(1.33, 0.5)),
    "apo_zero_unpaired": dict(loss_type="apo_zero_unpaired"),
    "apo_zero_unpaired-weights": dict(loss_type="apo_zero_unpaired", beta=0.5, weights=(0.7, 2.0)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_loss_gradients_and_metrics_match_trl(pair, case):
    ours, theirs = pair
    _configure(ours, theirs, **case)
    batches = first_batch(ours), first_batch(theirs)
    _check(ours, theirs, batches, want_kl_positive=False if case["loss_type"] == "kto" else None)


@pytest.mark.parametrize("labels", [[True] * 4, [False] * 4], ids=["desirable", "undesirable"])
def test_one_kind_of_label_matches_trl(pair, labels):
    ours, theirs = pair
    _configure(ours, theirs, "kto", beta=0.2)
    rows = lambda t: [{**t.train_dataset[i], "label": lab} for i, lab in enumerate(labels)]  # noqa: E731
    batches = ours.data_collator(rows(ours)), theirs.data_collator(rows(theirs))
    mine = _check(ours, theirs, batches)
    kind = "rejected" if labels[0] else "chosen"
    assert math.isnan(mine[f"rewards/{kind}"]) and math.isnan(mine["rewards/margins"])


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_positive_kl_reference_point_matches_trl(pair, loss_type):
    """Reference log-probs given to both as precomputed columns, the KL pairs' lowered so
    that TRL's estimate is positive (unclamped)."""
    ours, theirs = pair
    _configure(ours, theirs, loss_type, beta=0.5, precompute=True)
    batches = first_batch(ours), first_batch(theirs)
    ref, ref_kl = ours.reference_logps(batches[0])
    g = torch.Generator().manual_seed(3)
    extra = dict(ref_logps=ref + torch.randn(B, generator=g))
    if loss_type == "kto":
        extra["ref_KL_logps"] = ref_kl - 8.0 + torch.randn(B, generator=g)
    for batch in batches:
        batch.update(extra)
    _check(ours, theirs, batches, want_kl_positive=True if loss_type == "kto" else None)


def test_precompute_ref_log_probs_matches_trl(tmp_path):
    ours, theirs = kto_pair(tmp_path, precompute_ref_log_probs=True)
    for col in ("ref_logps", "ref_KL_logps"):
        torch.testing.assert_close(
            torch.tensor(ours.train_dataset[col]), torch.tensor(theirs.train_dataset[col]),
            **TOL_SAME_LOGPS,
        )  # fmt: skip
    _configure(ours, theirs, "kto", beta=0.2, precompute=True)
    _check(ours, theirs, (first_batch(ours), first_batch(theirs)))


def test_paired_dataset_is_unpaired_as_trl(tmp_path):
    paired = dict(
        prompt=UNPAIRED_DS["prompt"][:3],
        chosen=UNPAIRED_DS["completion"][:3],
        rejected=UNPAIRED_DS["completion"][3:],
    )
    ours, theirs = kto_pair(tmp_path, data=paired)
    for col in ("prompt_ids", "completion_ids", "label"):
        assert list(ours.train_dataset[col]) == list(theirs.train_dataset[col]), col
    assert list(ours.train_dataset["label"]) == [True] * 3 + [False] * 3
    _configure(ours, theirs, "kto")
    _check(ours, theirs, (first_batch(ours), first_batch(theirs)))


def test_triton_head_matches_trl(pair):
    """The same through the Triton kernels (the interpreter on a CPU: tests/conftest.py)."""
    ours, theirs = pair
    _configure(ours, theirs, "kto", beta=0.3, weights=(1.2, 0.9))
    ours.args.kernel_impl = "triton"
    try:
        _check(ours, theirs, (first_batch(ours), first_batch(theirs)))
    finally:
        ours.args.kernel_impl = "auto"
