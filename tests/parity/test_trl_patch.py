"""`patch_trl`: TRL's own trainers on fastrl's fused head give TRL's numbers.

The head-level tests compare the patch with TRL's `ChunkedLogProbFunction` (outputs and
every gradient) on odd sizes with a vocab tail; the trainer-level tests run the losses of
TRL 1.16's GRPOTrainer, DPOTrainer (with and without WPO), KTOTrainer and SFTTrainer with
and without the patch on the tiny model of the parity tests and compare the loss, every
parameter's gradient and every metric the trainer logged.
"""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import trl.trainer.utils as trl_utils  # noqa: E402

from fastrl.integrations import patch_trl  # noqa: E402
from fastrl.integrations.trl import TRLPatch  # noqa: E402
from tests.support.models import tiny_model, tiny_tokenizer  # noqa: E402
from tests.support.trl_dpo import (  # noqa: E402
    KTO_PROMPT_LENS,
    PAIRED_DS,
    _configure_dpo,
    _configure_kto,
    _dpo_batch,
    _kto_batch,
    _ref_model,
)
from tests.support.trl_dpo import _common_args as _dpo_args  # noqa: E402
from tests.support.trl_grpo import _common_args, _configure, _grpo_trainer, _inputs  # noqa: E402

TRL_HEAD = trl_utils._ChunkedLogProbFunction
N, D, VOCAB, CHUNK = 37, 24, 301, 128  # 301 = 2 full chunks + a 45-column tail
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with TRL's own head in place."""
    assert trl_utils._ChunkedLogProbFunction is TRL_HEAD
    yield
    trl_utils._ChunkedLogProbFunction = TRL_HEAD


def _head_inputs(with_bias):
    """Random targets, every third one its row's argmax (is_top1 both ways)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(VOCAB, D, generator=g)).requires_grad_()
    bias = torch.randn(VOCAB, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, VOCAB, (N,), generator=g)
    with torch.no_grad():
        best = (hidden @ weight.T + (0 if bias is None else bias)).argmax(-1)
    targets[::3] = best[::3]
    targets[-1] = VOCAB - 1  # a target in the tail
    return hidden, weight, bias, targets


def _run_head(fn, inputs, temperature, softcap, scale, outputs):
    """The head's outputs and the gradients of a loss using log-probs and entropy."""
    hidden, weight, bias, targets = inputs
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    out = fn.apply(hidden, weight, bias, targets, temperature, CHUNK, softcap, scale, outputs)
    g = torch.Generator().manual_seed(1)
    loss = (out[0] * torch.randn(N, generator=g)).sum()
    if out[1] is not None:
        loss = loss + (out[1] * torch.randn(N, generator=g)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out, grads


HEAD_CASES = {
    "plain": (1.0, None, 1.0, False),
    "T0.7-bias": (0.7, None, 1.0, True),
    "softcap5": (1.0, 5.0, 1.0, False),
    "scale0.25-T1.3-bias": (1.3, None, 0.25, True),
    "scale2-softcap3-bias": (0.9, 3.0, 2.0, True),
}


OUTPUTS = [
    ("log_probs",),
    ("log_probs", "entropy"),
    ("log_probs", "entropy", "mean_logits", "is_top1"),  # DPOTrainer's policy
    ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"),  # ... with WPO
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("outputs", OUTPUTS, ids="+".join)
@pytest.mark.parametrize("case", HEAD_CASES, ids=str)
def test_patch_trl_head_matches_trl(impl, outputs, case):
    temperature, softcap, scale, with_bias = HEAD_CASES[case]
    inputs = _head_inputs(with_bias)
    theirs, their_grads = _run_head(TRL_HEAD, inputs, temperature, softcap, scale, outputs)
    patch = patch_trl(impl=impl)
    ours, our_grads = _run_head(patch, inputs, temperature, softcap, scale, outputs)
    served = not (softcap is not None and "mean_logits" in outputs)
    assert (patch.calls, patch.fallback_calls) == ((1, 0) if served else (0, 1))
    names = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert (a is None) == (b is None), name
        if name == "is_top1" and a is not None:
            assert torch.equal(a, b) and 0 < a.sum() < N
        elif a is not None:
            torch.testing.assert_close(a, b, **TOL, msg=name)
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_patch_trl_passes_what_it_cannot_serve_to_trl():
    """The mean logit after a softcap is not linear in the hidden state: TRL's head."""
    inputs = _head_inputs(True)
    outputs = ("log_probs", "entropy", "mean_logits")
    theirs, their_grads = _run_head(TRL_HEAD, inputs, 1.0, 5.0, 1.0, outputs)
    patch = patch_trl()
    ours, our_grads = _run_head(patch, inputs, 1.0, 5.0, 1.0, outputs)
    assert (patch.calls, patch.fallback_calls) == (0, 1)
    for a, b in zip(ours + our_grads, theirs + their_grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_patch_trl_undo_context_manager_and_repatch():
    with patch_trl(impl="torch") as patch:
        assert trl_utils._ChunkedLogProbFunction is patch
        again = patch_trl(impl="triton")  # replaces, keeps TRL's original underneath
        assert again.original is TRL_HEAD and again.impl == "triton"
        patch.undo()  # not the active patch any more: no-op
        assert trl_utils._ChunkedLogProbFunction is again
        again.undo()
        assert trl_utils._ChunkedLogProbFunction is TRL_HEAD
    assert trl_utils._ChunkedLogProbFunction is TRL_HEAD
    with pytest.raises(RuntimeError), patch_trl():
        raise RuntimeError("the trainer failed")
    assert trl_utils._ChunkedLogProbFunction is TRL_HEAD


def test_patch_trl_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl must be one of .* got 'cuda'"):
        patch_trl(impl="cuda")
    assert trl_utils._ChunkedLogProbFunction is TRL_HEAD


# --------------------------------------------------------------------------- trainers


def _loss_and_grads(trainer, compute):
    trainer.model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(ours, theirs, unit=1.0):
    """Loss and gradients equal, in units of `unit` (WPO's weights shrink both ~1e-4x)."""
    torch.testing.assert_close(ours[0] / unit, theirs[0] / unit, **TOL)
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) > 0
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name] / unit, theirs[1][name] / unit, **TOL, msg=name)


def _metrics_match(theirs, ours):
    assert ours.keys() == theirs.keys()
    for name in ours.keys() - {"num_tokens"}:  # a running total over calls
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name


def _with_and_without_patch(trainer, compute, impl="auto"):
    """(TRL's (loss, grads, metrics), the patched run's, the patch)."""

    def run():
        trainer._metrics["train"].clear()
        loss, grads = _loss_and_grads(trainer, compute)
        return loss, grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}

    theirs = run()
    with patch_trl(impl=impl) as patch:
        ours = run()
    return theirs, ours, patch


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    return _grpo_trainer(tmp_path_factory.mktemp("grpo"))


GRPO_CASES = [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo", level="sequence"),
    dict(loss_type="dr_grpo", top_entropy_quantile=0.5, entropy_coef=0.01),
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("config", GRPO_CASES, ids=lambda c: "-".join(f"{k}={c[k]}" for k in c))
def test_patch_trl_grpo_loss_matches_trl(grpo, impl, config):
    _configure(grpo, **config)
    inputs = _inputs(grpo, 3)
    theirs, ours, patch = _with_and_without_patch(
        grpo, lambda: grpo._compute_loss(grpo.model, inputs), impl=impl
    )
    assert patch.calls == 1 and patch.fallback_calls == 0
    _assert_same(ours[:2], theirs[:2])
    assert "entropy" in ours[2] and "clip_ratio/region_mean" in ours[2]
    _metrics_match(theirs[2], ours[2])


@pytest.fixture(scope="module", params=[False, True], ids=["dpo", "wpo"])
def dpo(request, tmp_path_factory):
    """TRL's DPOTrainer; with WPO (use_weighting at construction) its head also returns
    log_sum_sq_probs."""
    args = _dpo_args(tmp_path_factory.mktemp("dpo"))
    trainer = trl.DPOTrainer(
        model=tiny_model(),
        ref_model=_ref_model(),
        args=trl.DPOConfig(**args, use_weighting=request.param),
        train_dataset=datasets.Dataset.from_dict(PAIRED_DS),
        processing_class=tiny_tokenizer(),
    )
    trainer.model.train()
    return trainer


def _make_even_rows_greedy(model, batch):
    """Completion tokens of every other sequence become the policy's greedy choice, so
    that the token accuracy DPOTrainer logs (from is_top1) is neither 0 nor 1."""
    ids, mask = batch["input_ids"], batch["completion_mask"].bool()
    even = torch.arange(len(ids)) % 2 == 0
    with torch.no_grad():
        for t in range(1, ids.shape[1]):
            rows = mask[:, t] & even
            if rows.any():
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
                ids[rows, t] = logits[rows, t - 1].argmax(-1)


@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed-ref", "ref-model"])
def test_patch_trl_dpo_loss_matches_trl(dpo, precompute):
    _configure_dpo(
        dpo, ["sigmoid", "ipo"], loss_weights=[1.0, 0.5], precompute=precompute,
        use_weighting=dpo.args.use_weighting,
    )  # fmt: skip
    batch = _dpo_batch(dpo, 5)
    _make_even_rows_greedy(dpo.model, batch)
    theirs, ours, patch = _with_and_without_patch(dpo, lambda: dpo.compute_loss(dpo.model, batch))
    assert (patch.calls, patch.fallback_calls) == (1 if precompute else 2, 0)
    _assert_same(ours[:2], theirs[:2], unit=theirs[0].abs() if dpo.args.use_weighting else 1.0)
    # logits/*, mean_token_accuracy and entropy come from the head's extra outputs
    assert {"logits/chosen", "mean_token_accuracy", "entropy"} <= ours[2].keys()
    assert 0.2 < theirs[2]["mean_token_accuracy"] < 0.8
    _metrics_match(theirs[2], ours[2])


def test_patch_trl_kto_loss_matches_trl(tmp_path):
    """KTOTrainer asks its head for the mean logit too (its logits/* metrics)."""
    trainer = trl.KTOTrainer(
        model=tiny_model(), ref_model=_ref_model(),
        args=trl.KTOConfig(**_dpo_args(tmp_path)),
        train_dataset=datasets.Dataset.from_dict(
            dict(prompt=["w1", "w2 w3"], completion=[" w4", " w5 w6"], label=[True, False])
        ),
        processing_class=tiny_tokenizer(),
    )  # fmt: skip
    _configure_kto(trainer, precompute=False)  # the reference model's pass goes through it too
    labels = [i % 2 == 0 for i in range(len(KTO_PROMPT_LENS))]
    batch = _kto_batch(trainer, 7, labels)
    theirs, ours, patch = _with_and_without_patch(
        trainer, lambda: trainer.compute_loss(trainer.model, batch)
    )
    assert patch.calls >= 2 and patch.fallback_calls == 0
    _assert_same(ours[:2], theirs[:2])
    assert {"logits/chosen", "logits/rejected"} <= ours[2].keys()
    _metrics_match(theirs[2], ours[2])


def test_patch_trl_sft_loss_matches_trl(tmp_path):
    """SFTTrainer's loss is the mean token NLL; it logs token accuracy (is_top1)."""
    trainer = trl.SFTTrainer(
        model=tiny_model(),
        args=trl.SFTConfig(**_dpo_args(tmp_path)),
        train_dataset=datasets.Dataset.from_dict(dict(text=["w1 w2 w3 w4", "w5 w6 w7"] * 2)),
        processing_class=tiny_tokenizer(),
    )
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    _make_even_rows_greedy(trainer.model, {**batch, "completion_mask": batch["attention_mask"]})
    batch["labels"] = torch.where(batch["labels"] == -100, -100, batch["input_ids"])
    theirs, ours, patch = _with_and_without_patch(
        trainer, lambda: trainer.compute_loss(trainer.model, dict(batch))
    )
    assert patch.calls == 1 and patch.fallback_calls == 0
    _assert_same(ours[:2], theirs[:2])
    assert 0 < theirs[2]["mean_token_accuracy"] < 1
    _metrics_match(theirs[2], ours[2])


@pytest.mark.slow
def test_patch_trl_grpo_trainer_trains(tmp_path):
    """A real `trl.GRPOTrainer.train()` (generation, reference pass, optimizer) under the
    patch: the head calls go to fastrl and the run logs finite losses."""
    # beta > 0: TRL loads its reference from a path
    tiny_model().save_pretrained(tmp_path / "model")
    trainer = trl.GRPOTrainer(
        model=str(tmp_path / "model"),
        reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        args=trl.GRPOConfig(**_common_args(tmp_path), beta=0.04, max_steps=2, logging_steps=1),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5"] * 4}),
        processing_class=tiny_tokenizer(),
    )
    with patch_trl() as patch:
        trainer.train()
    assert patch.calls >= 4 and patch.fallback_calls == 0  # policy + reference, per step
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert isinstance(patch, TRLPatch)
