"""Parity with TRL 1.16: `preference_loss` and `kto_loss` against TRL's own trainers.

Nothing here re-implements TRL. Real trainers are built once per module around the tiny
random Llama of tests/support/models.py (and its in-code tokenizer): ``trl.DPOTrainer``,
``trl.KTOTrainer``, ``trl.experimental.cpo.CPOTrainer`` and
``trl.experimental.orpo.ORPOTrainer``. Each case sets the attributes the trainer reads at
call time (see `_configure_dpo` and friends) and runs the trainer's own loss on a batch
made by its own data collator:

- DPO and KTO: ``_compute_loss``; the per-token log-probs TRL's fused head computed (and
  its ``log_sum_sq_probs`` for WPO) are captured from the model's forward, and fastrl is
  fed their sums over the completion tokens (plus lengths, LD-DPO tails, WPO's aligned
  log-probs, the KL pairs' log-probs). Compared: the loss, its gradient w.r.t. those
  per-token log-probs and every model parameter, and every metric TRL logged that
  sequence log-probs determine (all at TRL's float32 rounding, LD-DPO at the tolerance
  of log-probs summed another way: see `_check_dpo`);
- CPO and ORPO: ``get_batch_loss_metrics`` (TRL's sequence log-probs come from its own
  ``get_batch_logps``, called again without averaging for the sums fastrl takes), the
  gradient w.r.t. the logits and every parameter; and their ``cpo_loss`` /
  ``odds_ratio_loss`` methods on leaf sequence log-probs.

Where fastrl refuses a configuration it is because TRL refuses it too (checked by
building the trainer) or because TRL would silently ignore an option (checked by showing
that TRL's loss does not change). Where they differ on purpose: fastrl's ``sigmoid`` reads
``label_smoothing`` (cDPO; TRL 1.16 ignores it), and two TRL bugs (WPO with ``hinge``
cannot be differentiated, WPO with ``sft`` raises) are pinned as such.
"""

import itertools
import os

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from fastrl import kto_loss, ld_tail_logps, preference_loss, sequence_logprobs  # noqa: E402
from fastrl.options.preference import DPO_LOSS_TYPES  # noqa: E402
from tests.support.compare import (  # noqa: E402
    TOL_OWN_LOGPS,
    TOL_SAME_LOGPS,
    _assert_grads_close,
    _grads,
)
from tests.support.models import tiny_model, tiny_tokenizer  # noqa: E402
from tests.support.trl_dpo import (  # noqa: E402
    CPO_NAMES,
    MODEL_METRICS,
    PAIRED_DS,
    B,
    _check_metrics,
    _common_args,
    _configure_cpo,
    _configure_dpo,
    _configure_kto,
    _dpo_batch,
    _dpo_step,
    _fastrl_cpo_kwargs,
    _fastrl_dpo_kwargs,
    _kto_batch,
    _own_sequence_logps,
    _paired_batch,
    _ref_model,
    _spy_forward,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*remove_unused_columns.*"),
]

assert trl.__version__ == "1.16.0", f"parity is pinned to TRL 1.16.0, found {trl.__version__}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dpo(tmp_path_factory):
    # use_weighting at construction: the fused head then also returns log_sum_sq_probs,
    # which the WPO cases need (the trainer reads use_weighting itself at call time).
    args = trl.DPOConfig(**_common_args(tmp_path_factory.mktemp("dpo")), use_weighting=True)
    trainer = trl.DPOTrainer(
        model=tiny_model(),
        ref_model=_ref_model(),
        args=args,
        train_dataset=datasets.Dataset.from_dict(PAIRED_DS),
        processing_class=tiny_tokenizer(),
    )
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def kto(tmp_path_factory):
    args = trl.KTOConfig(**_common_args(tmp_path_factory.mktemp("kto")))
    ds = datasets.Dataset.from_dict(
        dict(prompt=["w1", "w2 w3"], completion=[" w4", " w5 w6"], label=[True, False])
    )
    trainer = trl.KTOTrainer(
        model=tiny_model(),
        ref_model=_ref_model(),
        args=args,
        train_dataset=ds,
        processing_class=tiny_tokenizer(),
    )
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def cpo(tmp_path_factory):
    args = CPOConfig(**_common_args(tmp_path_factory.mktemp("cpo"), 4), max_length=32)
    trainer = CPOTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=datasets.Dataset.from_dict(PAIRED_DS),
        processing_class=tiny_tokenizer(),
    )
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def orpo(tmp_path_factory):
    args = ORPOConfig(**_common_args(tmp_path_factory.mktemp("orpo"), 4), max_length=32)
    trainer = ORPOTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=datasets.Dataset.from_dict(PAIRED_DS),
        processing_class=tiny_tokenizer(),
    )
    trainer.model.train()
    return trainer


def _assert_loss_close(loss, trl_loss, tol=TOL_SAME_LOGPS):
    """Absolutely and relatively close: WPO's weights make some losses ~1e-6."""
    torch.testing.assert_close(loss, trl_loss, **tol)
    _assert_grads_close([loss], [trl_loss], tol)


def _assert_logp_grads_close(loss, trl_loss, logps, mask, tol=TOL_SAME_LOGPS):
    """Gradients w.r.t. the per-token log-probs on the completion tokens. TRL sums the whole
    row, whose other entries are the fused head's zero fill (their gradient goes nowhere)."""
    (ours,), (theirs,) = _grads(loss, [logps]), _grads(trl_loss, [logps])
    m = mask.to(ours.dtype)
    _assert_grads_close([ours * m], [theirs * m], tol)


# --------------------------------------------------------------------------- DPO


def _dpo_fastrl(trainer, batch, out, ref_out, **overrides):
    """fastrl's loss from TRL's per-token log-probs (`out.log_probs`, differentiable)."""
    mask = batch["completion_mask"][:, 1:]
    lp = out.log_probs
    chosen, rejected = sequence_logprobs(lp, mask).chunk(2)
    lengths = batch["completion_mask"].sum(1)
    kw = dict(_fastrl_dpo_kwargs(trainer), **overrides)
    kw["chosen_lengths"], kw["rejected_lengths"] = lengths.chunk(2)
    if ref_out is None:
        ref = (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    else:
        ref = sequence_logprobs(ref_out.log_probs, mask).chunk(2)
    if kw["ld_alpha"] is not None:
        kw["chosen_tail_logps"], kw["rejected_tail_logps"] = ld_tail_logps(lp, mask)
        if ref_out is None:  # precomputed reference log-probs are already LD-weighted
            kw["ref_chosen_tail_logps"] = kw["ref_rejected_tail_logps"] = torch.zeros(B)
        else:
            tails = ld_tail_logps(ref_out.log_probs, mask)
            kw["ref_chosen_tail_logps"], kw["ref_rejected_tail_logps"] = tails
    if kw["use_weighting"]:
        aligned = sequence_logprobs(lp.detach() - out.log_sum_sq_probs, mask).chunk(2)
        kw["chosen_aligned_logps"], kw["rejected_aligned_logps"] = aligned
    return preference_loss(chosen, rejected, *ref, **kw)


def _check_dpo(trainer, batch, monkeypatch):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trl_loss, out, ref_out, trl_metrics = _dpo_step(trainer, batch, monkeypatch)
    assert torch.isfinite(trl_loss)
    lp = out.log_probs
    loss, metrics = _dpo_fastrl(trainer, batch, out, ref_out)
    # LD-DPO: TRL sums the shared part and the tail of each completion directly, fastrl is
    # given the whole sum and the tail; whole - tail differs from TRL's shared sum by the
    # float32 rounding of the sums (an ulp of |sum| ~ 40 is 4e-6), which the losses carry
    # to ~1e-5 relative (discopop's tau = 0.05 multiplies it by 20): the tolerance of
    # log-probs computed another way. Every other case gets the same sums as TRL.
    tol = TOL_SAME_LOGPS if trainer.ld_alpha is None else TOL_OWN_LOGPS
    _assert_loss_close(loss, trl_loss, tol)
    _assert_logp_grads_close(loss, trl_loss, lp, batch["completion_mask"][:, 1:], tol)
    _assert_grads_close(_grads(loss, params), _grads(trl_loss, params), tol)
    _check_metrics(metrics, trl_metrics, tol=tol)
    assert set(metrics) - set(trl_metrics) == set(), "fastrl logs what TRL does not"
    return trl_loss, loss, metrics


EXO_EPS = 1e-3  # exo_pair needs label smoothing > 0; the EXO paper's value


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_types_match_trl(dpo, monkeypatch, loss_type, beta):
    eps = EXO_EPS if loss_type == "exo_pair" else 0.0
    _configure_dpo(dpo, loss_type, beta=beta, label_smoothing=eps)
    seed = DPO_LOSS_TYPES.index(loss_type) + (100 if beta != 0.1 else 0)
    _check_dpo(dpo, _dpo_batch(dpo, seed), monkeypatch)


@pytest.mark.parametrize(
    "loss_type,eps",
    [("robust", 0.1), ("robust", 0.45), ("exo_pair", 0.2), ("aot", 0.2)] + [("aot_unpaired", 0.3)],
)
def test_dpo_label_smoothing_matches_trl(dpo, monkeypatch, loss_type, eps):
    _configure_dpo(dpo, loss_type, label_smoothing=eps)
    _check_dpo(dpo, _dpo_batch(dpo, 200), monkeypatch)


def test_trl_ignores_label_smoothing_for_sigmoid(dpo, monkeypatch):
    # TRL 1.16's sigmoid has no cDPO term; fastrl applies label_smoothing there (cDPO, as
    # TRL < 1.0 did), so it matches TRL at label_smoothing=0 only.
    batch = _dpo_batch(dpo, 210)
    _configure_dpo(dpo, "sigmoid", label_smoothing=0.2)
    smoothed = dpo.compute_loss(dpo.model, batch)
    _configure_dpo(dpo, "sigmoid")
    assert torch.equal(smoothed, dpo.compute_loss(dpo.model, batch))
    trl_loss, out, _, _ = _dpo_step(dpo, batch, monkeypatch)
    ours, _ = _dpo_fastrl(dpo, batch, out, None, label_smoothing=0.2)
    assert not torch.allclose(ours, trl_loss)


F_DIVERGENCES = [
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 1.0),  # the limit case TRL maps back to reverse_kl
]
F_CASES = [
    (t, f, coef)
    for t in ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
    for f, coef in F_DIVERGENCES
] + [("sigmoid", "alpha_divergence", 2.5), ("robust", "alpha_divergence", -0.5)]


@pytest.mark.parametrize("loss_type,f_type,coef", F_CASES)
def test_dpo_f_divergence_matches_trl(dpo, monkeypatch, loss_type, f_type, coef):
    eps = {"exo_pair": EXO_EPS, "robust": 0.1}.get(loss_type, 0.0)
    _configure_dpo(
        dpo, loss_type, label_smoothing=eps, f_divergence_type=f_type, f_alpha_divergence_coef=coef
    )
    _check_dpo(dpo, _dpo_batch(dpo, 300 + F_CASES.index((loss_type, f_type, coef))), monkeypatch)


def test_dpo_alpha_divergence_cap_matches_trl(dpo, monkeypatch):
    # (coef - 1) * log-ratio above 80 for one pair: TRL caps the exponent (no gradient there)
    _configure_dpo(dpo, "hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=3.0)
    batch = _dpo_batch(dpo, 320)
    with torch.no_grad():
        batch["ref_chosen_logps"][2] -= 60.0
    _check_dpo(dpo, batch, monkeypatch)


LD_CASES = list(itertools.product(["sigmoid", "ipo", "sigmoid_norm", "aot", "sft"], [0.5, 0.0]))


@pytest.mark.parametrize("loss_type,ld_alpha", LD_CASES + [("hinge", 1.0)])
@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_ld_alpha_matches_trl(dpo, monkeypatch, loss_type, ld_alpha, precompute):
    # precompute=False: the reference model runs, its LD split taken with ld_tail_logps too
    _configure_dpo(dpo, loss_type, ld_alpha=ld_alpha, precompute=precompute)
    _check_dpo(dpo, _dpo_batch(dpo, 400), monkeypatch)


WPO_TYPES = [t for t in DPO_LOSS_TYPES if t not in ("aot", "aot_unpaired", "sft")]


@pytest.mark.parametrize("loss_type", WPO_TYPES)
def test_dpo_wpo_weighting_matches_trl(dpo, monkeypatch, loss_type):
    eps = EXO_EPS if loss_type == "exo_pair" else 0.0
    _configure_dpo(dpo, loss_type, use_weighting=True, label_smoothing=eps, beta=0.3)
    batch = _dpo_batch(dpo, 500 + WPO_TYPES.index(loss_type))
    if loss_type == "hinge":
        # TRL multiplies the WPO weights in place into relu's output, which relu's backward
        # needs: its loss cannot be differentiated. Its gradient is taken with relu's math
        # written out of place (clamp saves its input, not its output).
        loss = dpo.compute_loss(dpo.model, batch)
        with pytest.raises(RuntimeError, match="inplace"):
            loss.backward()
        dpo.model.zero_grad(set_to_none=True)
        monkeypatch.setattr(torch, "relu", lambda x: torch.clamp(x, min=0))  # undone in the step
    _check_dpo(dpo, batch, monkeypatch)


def test_trl_wpo_with_sft_fails(dpo, monkeypatch):
    # TRL multiplies the WPO weights in place into sft's expanded scalar, which torch
    # refuses; fastrl weights the (constant per pair) NLL term like any other loss.
    _configure_dpo(dpo, "sft", use_weighting=True)
    batch = _dpo_batch(dpo, 520)
    with pytest.raises(RuntimeError, match="memory location"):
        dpo.compute_loss(dpo.model, batch)


MPO_CASES = [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO's recipe
    (["apo_zero", "ipo", "hinge"], None),
    (["sigmoid_norm", "robust", "discopop"], [0.5, -0.25, 2.0]),
]


@pytest.mark.parametrize("types,weights", MPO_CASES)
def test_dpo_loss_lists_match_trl(dpo, monkeypatch, types, weights):
    eps = 0.1 if "robust" in types else 0.0
    _configure_dpo(dpo, types, loss_weights=weights, label_smoothing=eps, beta=0.2)
    _check_dpo(dpo, _dpo_batch(dpo, 600 + MPO_CASES.index((types, weights))), monkeypatch)


def test_dpo_everything_at_once_matches_trl(dpo, monkeypatch):
    _configure_dpo(
        dpo,
        # not sft (TRL's sft + WPO fails), not sigmoid (TRL ignores label_smoothing there)
        ["discopop", "robust", "sigmoid_norm", "exo_pair", "ipo"],
        loss_weights=[1.0, 0.5, 0.3, 0.2, 0.1],
        label_smoothing=0.15,
        f_divergence_type="js_divergence",
        ld_alpha=0.3,
        use_weighting=True,
        precompute=False,
        beta=0.25,
    )
    _check_dpo(dpo, _dpo_batch(dpo, 700), monkeypatch)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_down"])
def test_dpo_from_own_logps_matches_trl(dpo, monkeypatch, loss_type):
    # fastrl fed sequence log-probs computed independently (full logits, log_softmax), the
    # reference model's too: loss and every parameter's gradient
    _configure_dpo(dpo, loss_type, precompute=False)
    batch = _dpo_batch(dpo, 800)
    params = [p for p in dpo.model.parameters() if p.requires_grad]
    trl_loss, _, _, _ = _dpo_step(dpo, batch, monkeypatch)
    chosen, rejected = _own_sequence_logps(dpo.model, batch).chunk(2)
    with torch.no_grad():
        ref = _own_sequence_logps(dpo.ref_model, batch).chunk(2)
    lengths = batch["completion_mask"].sum(1).chunk(2)
    loss, _ = preference_loss(
        chosen,
        rejected,
        *ref,
        loss_type=loss_type,
        beta=dpo.beta,
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
    )
    torch.testing.assert_close(loss, trl_loss, **TOL_OWN_LOGPS)
    _assert_grads_close(_grads(loss, params), _grads(trl_loss, params), TOL_OWN_LOGPS)


REFUSED = [
    (dict(loss_type=["bco_pair"], f_divergence_type="js_divergence"), ValueError, "f_divergence"),
    (dict(loss_type=["aot"], f_divergence_type="forward_kl"), ValueError, "f_divergence"),
    (dict(loss_type=["exo_pair"]), ValueError, "label_smoothing|Label smoothing"),
    (dict(loss_type=["aot_unpaired"], use_weighting=True), NotImplementedError, None),
    (dict(loss_type=["sigmoid"], loss_weights=[1.0, 2.0]), ValueError, "loss_weights"),
]


@pytest.mark.parametrize("config,trl_error,match", REFUSED)
def test_dpo_refuses_what_trl_refuses(tmp_path, config, trl_error, match):
    from accelerate.state import AcceleratorState, PartialState

    # Every TrainingArguments resets accelerate's process-wide state in place, which the
    # module's trainers share: put it back afterwards.
    saved = [(c._shared_state, dict(c._shared_state)) for c in (AcceleratorState, PartialState)]
    try:
        with pytest.raises(trl_error, match=match):
            args = trl.DPOConfig(**_common_args(tmp_path), **config)
            trl.DPOTrainer(
                model=tiny_model(),
                ref_model=_ref_model(),
                args=args,
                train_dataset=datasets.Dataset.from_dict(PAIRED_DS),
                processing_class=tiny_tokenizer(),
            )
    finally:
        for shared, copy in saved:
            shared.clear()
            shared.update(copy)
    kw = {k: v for k, v in config.items()}
    kw["use_weighting"] = kw.get("use_weighting", False)
    z = torch.zeros(2)
    extra = {}
    if kw["use_weighting"]:
        extra = dict(chosen_aligned_logps=z, rejected_aligned_logps=z)
        extra.update(chosen_lengths=z, rejected_lengths=z)
    with pytest.raises(ValueError):
        preference_loss(z, z, z, z, **kw, **extra)


IGNORED = [
    ("hinge", dict(label_smoothing=0.2)),
    ("ipo", dict(label_smoothing=0.2)),
    ("sigmoid", dict(discopop_tau=0.5)),
    ("sigmoid", dict(f_alpha_divergence_coef=2.0)),  # with f_divergence_type="reverse_kl"
]


@pytest.mark.parametrize("loss_type,option", IGNORED)
def test_dpo_refuses_what_trl_ignores(dpo, loss_type, option):
    batch = _dpo_batch(dpo, 230)
    _configure_dpo(dpo, loss_type)
    plain = dpo.compute_loss(dpo.model, batch)
    _configure_dpo(dpo, loss_type, **option)
    assert torch.equal(dpo.compute_loss(dpo.model, batch), plain)
    (name,) = option
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=name):
        preference_loss(
            z, z, z, z, loss_type=loss_type, chosen_lengths=z, rejected_lengths=z, **option
        )


# --------------------------------------------------------------------------- KTO


def _check_kto(trainer, batch, monkeypatch):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    policy_calls = _spy_forward(monkeypatch, trainer.model)
    ref_calls = _spy_forward(monkeypatch, trainer.ref_model)
    trainer._metrics["train"].clear()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    monkeypatch.undo()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    kl_term = trainer.calculate_KL
    assert len(policy_calls) == 1 + kl_term  # the KL pairs (no grad) first, then the batch
    out = policy_calls[-1]
    mask = batch["completion_mask"][:, 1:]
    kl_mask = batch["KL_completion_mask"][:, 1:]
    lp = out.log_probs
    kw = dict(
        loss_type=trainer.loss_type,
        beta=trainer.beta,
        desirable_weight=trainer.desirable_weight,
        undesirable_weight=trainer.undesirable_weight,
    )
    if trainer.precompute_ref_logps:
        ref = batch["ref_logps"]
        ref_kl = batch["ref_KL_logps"]
    else:  # the reference model ran: KL pairs first, then the batch
        ref = sequence_logprobs(ref_calls[-1].log_probs, mask)
        ref_kl = sequence_logprobs(ref_calls[0].log_probs, kl_mask) if kl_term else None
    if kl_term:
        kw["kl_logps"] = sequence_logprobs(policy_calls[0].log_probs, kl_mask)
        kw["ref_kl_logps"] = ref_kl
    loss, metrics = kto_loss(sequence_logprobs(lp, mask), ref, batch["label"], **kw)
    _assert_loss_close(loss, trl_loss)
    _assert_logp_grads_close(loss, trl_loss, lp, mask)
    _assert_grads_close(_grads(loss, params), _grads(trl_loss, params), TOL_SAME_LOGPS)
    _check_metrics(metrics, trl_metrics)
    # kto_loss reads nothing back: a kind the batch lacks gives NaN where TRL logs nothing
    logged = {k for k, v in metrics.items() if not v.isnan()}
    assert logged == set(trl_metrics) - MODEL_METRICS
    return metrics


LABELS = {
    "mixed": [1, 0, 1, 1, 0, 0, 1],
    "all_desirable": [1] * 7,
    "all_undesirable": [0] * 7,
}
KTO_CASES = list(
    itertools.product(["kto", "apo_zero_unpaired"], LABELS, [(1.0, 1.0), (1.33, 0.75)])
)


@pytest.mark.parametrize("loss_type,labels,weights", KTO_CASES)
def test_kto_matches_trl(kto, monkeypatch, loss_type, labels, weights):
    _configure_kto(kto, loss_type, weights=weights, beta=0.2)
    seed = KTO_CASES.index((loss_type, labels, weights))
    metrics = _check_kto(
        kto, _kto_batch(kto, 900 + seed, LABELS[labels], kl_shift=2.0), monkeypatch
    )
    if loss_type == "kto":
        assert metrics["kl"] > 0


def test_kto_kl_clamped_at_zero_matches_trl(kto, monkeypatch):
    _configure_kto(kto, "kto")
    metrics = _check_kto(kto, _kto_batch(kto, 950, LABELS["mixed"], kl_shift=-5.0), monkeypatch)
    assert metrics["kl"] == 0


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_with_reference_model_matches_trl(kto, monkeypatch, loss_type):
    _configure_kto(kto, loss_type, precompute=False, beta=0.5, weights=(0.8, 1.2))
    _check_kto(kto, _kto_batch(kto, 960, LABELS["mixed"]), monkeypatch)


# --------------------------------------------------------------------------- CPO / SimPO


def _spy_batch_logps(monkeypatch, trainer):
    """Record TRL's own sequence log-probs, summed (not averaged), and the completion
    lengths, from the logits and labels its get_batch_logps is called with."""
    seen = {}
    real = trainer.get_batch_logps

    def spy(logits, labels, average_log_prob=False, is_encoder_decoder=False):
        seen["logits"] = logits
        seen["sums"] = real(logits, labels, average_log_prob=False)
        seen["lengths"] = (labels[:, 1:] != -100).sum(-1)
        return real(logits, labels, average_log_prob, is_encoder_decoder)

    monkeypatch.setattr(trainer, "get_batch_logps", spy)
    return seen


def _check_paired(trainer, monkeypatch, fastrl_kwargs, *, nll_from_trl=False):
    """get_batch_loss_metrics vs preference_loss on TRL's own summed log-probs."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    batch = _paired_batch(trainer)
    seen = _spy_batch_logps(monkeypatch, trainer)
    if nll_from_trl:
        real_forward = trainer.concatenated_forward

        def forward_spy(model, batch):
            out = real_forward(model, batch)
            seen["nll"] = out[4]
            return out

        monkeypatch.setattr(trainer, "concatenated_forward", forward_spy)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    monkeypatch.undo()
    chosen, rejected = seen["sums"].chunk(2)
    n_c, n_r = seen["lengths"].chunk(2)
    kw = dict(fastrl_kwargs, chosen_lengths=n_c, rejected_lengths=n_r)
    if nll_from_trl:
        kw["nll"] = seen["nll"]
    loss, metrics = preference_loss(chosen, rejected, **kw)
    logits = seen["logits"]
    _assert_loss_close(loss, trl_loss)
    _assert_grads_close(_grads(loss, [logits]), _grads(trl_loss, [logits]), TOL_SAME_LOGPS)
    _assert_grads_close(_grads(loss, params), _grads(trl_loss, params), TOL_SAME_LOGPS)
    _check_metrics(metrics, trl_metrics)
    return trl_loss, metrics, seen


CPO_CASES = [
    (t, alpha, eps, cpo_alpha)
    for t in CPO_NAMES
    for alpha, eps, cpo_alpha in [(0.0, 0.0, 1.0), (0.3, 0.1, 0.5), (-0.2, 0.0, 0.0)]
    if not (eps and t in ("hinge", "ipo"))  # TRL warns and ignores; fastrl refuses
]


@pytest.mark.parametrize("loss_type,alpha,eps,cpo_alpha", CPO_CASES)
def test_cpo_matches_trl(cpo, monkeypatch, loss_type, alpha, eps, cpo_alpha):
    _configure_cpo(cpo, loss_type, alpha=alpha, label_smoothing=eps, cpo_alpha=cpo_alpha, beta=0.3)
    _, metrics, _ = _check_paired(cpo, monkeypatch, _fastrl_cpo_kwargs(cpo))
    assert (metrics["nll_loss"] == 0) == (cpo_alpha == 0)


@pytest.mark.parametrize("loss_type", list(CPO_NAMES))
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_cpo_loss_method_matches_trl(cpo, loss_type, alpha):
    # CPOTrainer.cpo_loss on leaf log-probs (already averaged for ipo/simpo: lengths of 1)
    _configure_cpo(cpo, loss_type, alpha=alpha, label_smoothing=0.0, beta=0.2)
    g = torch.Generator().manual_seed(1000)
    c = (-3 * torch.rand(8, generator=g)).requires_grad_()
    r = (-3 * torch.rand(8, generator=g)).requires_grad_()
    losses, chosen_rewards, rejected_rewards = cpo.cpo_loss(c, r)
    trl_loss = losses.mean()
    ones = torch.ones(8)
    kw = dict(_fastrl_cpo_kwargs(cpo), cpo_alpha=0.0)
    loss, metrics = preference_loss(c, r, chosen_lengths=ones, rejected_lengths=ones, **kw)
    _assert_loss_close(loss, trl_loss)
    _assert_grads_close(_grads(loss, [c, r]), _grads(trl_loss, [c, r]), TOL_SAME_LOGPS)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), **TOL_SAME_LOGPS)
    torch.testing.assert_close(
        metrics["rewards/rejected"], rejected_rewards.mean(), **TOL_SAME_LOGPS
    )


def test_alphapo_is_simpo_without_nll(cpo, tmp_path):
    from accelerate.state import AcceleratorState, PartialState

    saved = [(c._shared_state, dict(c._shared_state)) for c in (AcceleratorState, PartialState)]
    try:
        args = CPOConfig(**_common_args(tmp_path, 4), loss_type="alphapo", alpha=0.25)
    finally:
        for shared, copy in saved:
            shared.clear()
            shared.update(copy)
    assert (args.loss_type, args.cpo_alpha) == ("simpo", 0.0)
    c, r, n = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -3.0]), torch.tensor([2, 3])
    kw = dict(chosen_lengths=n, rejected_lengths=n, alpha=0.25)
    want, _ = preference_loss(c, r, loss_type="simpo", cpo_alpha=0.0, **kw)
    got, _ = preference_loss(c, r, loss_type="alphapo", **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_cpo_refuses_label_smoothing_trl_ignores(cpo, loss_type):
    _configure_cpo(cpo, loss_type)
    c, r = torch.tensor([-1.0, -2.5]), torch.tensor([-2.0, -0.5])
    plain = cpo.cpo_loss(c, r)[0]
    cpo.label_smoothing = 0.2  # TRL warns at init and ignores it
    assert torch.equal(cpo.cpo_loss(c, r)[0], plain)
    n = torch.ones(2)
    with pytest.raises(ValueError, match="label_smoothing=0.2 has no effect"):
        preference_loss(
            c,
            r,
            loss_type=CPO_NAMES[loss_type],
            label_smoothing=0.2,
            chosen_lengths=n,
            rejected_lengths=n,
        )


# --------------------------------------------------------------------------- ORPO


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl(orpo, monkeypatch, beta):
    orpo.beta = beta
    orpo.model.train()
    trl_loss, metrics, seen = _check_paired(
        orpo, monkeypatch, dict(loss_type="orpo", beta=beta), nll_from_trl=True
    )
    # TRL's ORPO NLL runs over the prompt tokens too: fastrl's default (the chosen
    # completion tokens only, as CPO and the ORPO paper) differs, hence nll= above
    chosen, rejected = seen["sums"].chunk(2)
    n_c, n_r = seen["lengths"].chunk(2)
    own, _ = preference_loss(
        chosen, rejected, loss_type="orpo", beta=beta, chosen_lengths=n_c, rejected_lengths=n_r
    )
    assert not torch.allclose(own, trl_loss)


def test_orpo_odds_ratio_method_matches_trl(orpo):
    orpo.beta = 0.3
    g = torch.Generator().manual_seed(1100)
    # average log-probs on both sides of -log 2 (the two branches of log1mexp)
    c = torch.cat([-0.05 - 0.6 * torch.rand(4, generator=g), -1 - 4 * torch.rand(4, generator=g)])
    r = torch.cat([-1 - 4 * torch.rand(4, generator=g), -0.05 - 0.6 * torch.rand(4, generator=g)])
    c.requires_grad_()
    r.requires_grad_()
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = (
        orpo.odds_ratio_loss(c, r)
    )
    trl_loss = -losses.mean()  # ORPO's loss is nll - mean(losses)
    ones = torch.ones(8)
    loss, metrics = preference_loss(
        c,
        r,
        loss_type="orpo",
        beta=0.3,
        chosen_lengths=ones,
        rejected_lengths=ones,
        nll=torch.zeros(()),
    )
    _assert_loss_close(loss, trl_loss)
    _assert_grads_close(_grads(loss, [c, r]), _grads(trl_loss, [c, r]), TOL_SAME_LOGPS)
    torch.testing.assert_close(metrics["log_odds_ratio"], log_odds_ratio, **TOL_SAME_LOGPS)
    torch.testing.assert_close(metrics["log_odds_chosen"], log_odds_chosen, **TOL_SAME_LOGPS)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), **TOL_SAME_LOGPS)
