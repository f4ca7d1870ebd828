"""fastrl.trainers.DPOTrainer on tiny config-built models, CPU.

- the loss (and its LoRA gradients, and the logged metrics) on a fixed batch equals TRL
  1.16's ``DPOTrainer`` on the same pairs, model weights and LoRA adapter, for several
  loss types; TRL tokenizes string and chat-message datasets into the same ids;
- the loss equals `fastrl.preference_loss` on log-probs computed independently here
  (full logits, one unpadded sequence at a time), reference-free and LD-DPO included;
- precomputed reference log-probs equal the per-batch adapters-off ones (and the
  independent ones), and give the same loss;
- a training step changes the LoRA weights only and checkpoints hold the adapter only;
  gradient accumulation makes the update of one big batch; under DDP (two CPU processes,
  gloo) both ranks end with the same weights;
- chat-message datasets train; a NaN loss stops the run; held-out preference accuracy
  rises over a few steps on pairs from the shipped arithmetic task (whose rejected
  completion breaks the answer format: learnable in a few steps from a random model).
"""

import contextlib
import copy
import dataclasses
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from fastrl.demo.task import (  # noqa: E402
    build_tiny_model,
    build_tiny_tokenizer,
    preference_pairs,
)
from fastrl.ops.preference import loss as preference  # noqa: E402
from fastrl.options.preference import (  # noqa: E402
    AVERAGED_LOSS_TYPES,
    LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
)
from fastrl.trainers.data import render_prompt  # noqa: E402
from fastrl.trainers.dpo_config import DPOConfig  # noqa: E402
from fastrl.trainers.dpo_trainer import (  # noqa: E402
    DPOTrainer,
    PreferenceCollator,
    evaluate_preference_accuracy,
    tokenize_preference_dataset,
)
from tests.support.args import cpu_args  # noqa: E402
from tests.support.compare import TOL_OWN_LOGPS, TOL_SAME_LOGPS  # noqa: E402
from tests.support.lora import (  # noqa: E402
    LORA,
    lora_model,
    lora_params,
    share_adapter,
    train_changes_only_lora,
)
from tests.support.models import tiny_model, tiny_tokenizer  # noqa: E402
from tests.support.ranks import assert_ranks_end_equal  # noqa: E402
from tests.support.trl_dpo import PAIRED_DS, _configure_dpo  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*remove_unused_columns.*"),
]

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
LOGP_METRICS = ("logps/chosen", "logps/rejected")
# gradients of log-probs computed two ways (left- vs right-padded, chunked head vs logits)
TOL_GRADS = dict(rtol=1e-4, atol=1e-5)


def _args(tmp, **kw):
    base = dict(per_device_train_batch_size=4, activation_checkpointing=False, disable_tqdm=True)
    return DPOConfig(**cpu_args(tmp, **{**base, **kw}))


def _grads(loss, model):
    params = lora_params(model)
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads, strict=True))


def _assert_grads_close(ours, theirs, tol):
    """Close relative to each tensor's scale (LoRA gradients reach ~30 here, and summation
    order differs between the two computations)."""
    assert set(ours) == set(theirs)
    for name in ours:
        scale = max(1.0, float(theirs[name].abs().max()))
        torch.testing.assert_close(
            ours[name], theirs[name], rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name
        )


def _configure(trainer, **options):
    """Change the loss options of a built DPOTrainer (what compute_loss reads)."""
    for k, v in options.items():
        setattr(trainer.args, k, v)
    if isinstance(trainer.args.loss_type, str):
        trainer.args.loss_type = [trainer.args.loss_type]
    trainer.loss_kwargs = trainer.args.preference_loss_kwargs()
    trainer._metrics["train"].clear()


def _batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _pair_trainers(tmp, **config):
    """Ours and TRL's around the same weights: TRL builds its LoRA from a peft_config on
    the base model (so its reference is the base, as ours), then gets our adapter.
    `config`: options both configs take at construction."""
    ds = datasets.Dataset.from_dict(PAIRED_DS)
    lora = lora_model()
    ours = DPOTrainer(
        copy.deepcopy(lora), _args(tmp / "ours", **config), train_dataset=ds,
        processing_class=tiny_tokenizer(),
    )  # fmt: skip
    trl_args = trl.DPOConfig(
        **cpu_args(
            tmp / "trl",
            per_device_train_batch_size=4,
            activation_checkpointing=False,
            bf16=False,
            **config,
        )
    )
    theirs = trl.DPOTrainer(
        tiny_model(),
        args=trl_args,
        train_dataset=ds,
        processing_class=tiny_tokenizer(),
        peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    share_adapter(lora, ours, theirs)
    return ours, theirs


@pytest.fixture(scope="module")
def pair_trainers(tmp_path_factory):
    return _pair_trainers(tmp_path_factory.mktemp("dpo"))


# ------------------------------------------------------------------------ config, data


def test_config_reads_the_loss_taxonomy(tmp_path):
    # what needs a reference model and what averages log-probs is the options' to say
    for loss_type in LOSS_TYPES:
        smoothing = 1e-3 if loss_type == "exo_pair" else 0.0  # exo_pair needs one
        args = DPOConfig(
            str(tmp_path), loss_type=loss_type, label_smoothing=smoothing, use_cpu=True
        )
        assert args.reference_free == (loss_type in REFERENCE_FREE_LOSS_TYPES)
        assert args.preference_loss_options().averaged == (loss_type in AVERAGED_LOSS_TYPES)


def test_config_defaults_and_refusals(tmp_path):
    args = DPOConfig(str(tmp_path), loss_type="ipo", use_cpu=True)
    assert args.loss_type == ["ipo"] and args.beta == 0.1 and args.max_length == 1024
    assert args.remove_unused_columns is False and args.logging_steps == 10
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {
        "use_reentrant": False
    }
    assert args.preference_loss_kwargs()["loss_type"] == "ipo"
    assert "f_alpha_divergence_coef" not in args.preference_loss_kwargs()
    assert not args.reference_free and DPOConfig(str(tmp_path), loss_type="simpo").reference_free
    assert DPOConfig(str(tmp_path), use_weighting=True).preference_loss_kwargs()["use_weighting"]
    with pytest.raises(ValueError, match="use_weighting=True .*'aot'"):  # at construction
        DPOTrainer(lora_model(), _args(tmp_path, use_weighting=True, loss_type="aot"),
                   train_dataset=datasets.Dataset.from_dict(PAIRED_DS),
                   processing_class=tiny_tokenizer())  # fmt: skip
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--loss_type",
            "sigmoid",
            "sft",
            "--loss_weights",
            "1",
            "0.5",
            "--beta",
            "0.3",
            "--max_completion_length",
            "7",
            "--use_cpu",
        ]
    )
    assert parsed.loss_type == ["sigmoid", "sft"] and parsed.loss_weights == [1.0, 0.5]
    assert parsed.beta == 0.3 and parsed.max_completion_length == 7
    # a bad loss configuration fails at construction, naming the option
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOTrainer(
            tiny_model(), _args(tmp_path, loss_type="exo_pair"), processing_class=tiny_tokenizer()
        )
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        DPOTrainer(
            tiny_model(),
            _args(tmp_path, loss_type="simpo", precompute_ref_log_probs=True),
            processing_class=tiny_tokenizer(),
        )


def test_tokenization_matches_trl_strings(pair_trainers):
    ours, theirs = pair_trainers
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert list(ours.train_dataset[col]) == list(theirs.train_dataset[col]), col


def test_tokenization_matches_trl_chat_messages(tmp_path):
    tok = build_tiny_tokenizer(chat_template=True)

    def turns(role, *texts):
        return [[{"role": role, "content": t}] for t in texts]

    ds = datasets.Dataset.from_dict(
        dict(
            prompt=turns("user", "12+5=", "3-1="),
            chosen=turns("assistant", "17", "2"),
            rejected=turns("assistant", "18", "1"),
        )
    )
    ours = tokenize_preference_dataset(ds, tok)
    theirs = trl.DPOTrainer(
        build_tiny_model(tok, "test"),
        ref_model=build_tiny_model(tok, "test"),
        args=trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False),
        train_dataset=ds,
        processing_class=tok,
    ).train_dataset
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert list(ours[col]) == list(theirs[col]), col
    assert tok.decode(ours[0]["prompt_ids"]) == "user: 12+5=\nassistant: "
    assert tok.decode(ours[0]["chosen_ids"]) == "17\n"


def test_string_prompts_through_the_chat_template_and_truncation():
    tok = build_tiny_tokenizer(chat_template=True)
    rows = dict(
        prompt=["123+456="], chosen=["<answer>579</answer>"], rejected=["<answer>5</answer>"]
    )
    row = tokenize_preference_dataset(rows, tok)[0]
    assert tok.decode(row["prompt_ids"]) == render_prompt(tok, "123+456=")
    assert tok.decode(row["prompt_ids"]) == "user: 123+456=\nassistant: "
    assert tok.decode(row["chosen_ids"]) == "<answer>579</answer>\n"
    plain = tokenize_preference_dataset(rows, tok, use_chat_template=False)[0]
    assert tok.decode(plain["prompt_ids"]) == "123+456="
    assert plain["chosen_ids"][-1] == tok.eos_token_id  # plain completions end with EOS
    cut = tokenize_preference_dataset(
        rows, tok, use_chat_template=False, max_prompt_length=4, max_completion_length=6
    )[0]
    assert tok.decode(cut["prompt_ids"]) == "456="  # keeps the prompt's end
    assert tok.decode(cut["chosen_ids"]) == "<answe"  # keeps the completion's start
    total = tokenize_preference_dataset(rows, tok, use_chat_template=False, max_length=10)[0]
    assert len(total["prompt_ids"]) + len(total["chosen_ids"]) == 10
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        two = dict(prompt=["1+1=", "123456789+1="], chosen=["2", "x"], rejected=["3", "y"])
        kept = tokenize_preference_dataset(two, tok, use_chat_template=False, max_length=8)
    assert len(kept) == 1


def test_collator_layout():
    batch = PreferenceCollator(pad_token_id=0)(
        [
            dict(prompt_ids=[5, 6, 7], chosen_ids=[8], rejected_ids=[9, 10, 11]),
            dict(prompt_ids=[12], chosen_ids=[13, 14], rejected_ids=[15]),
        ]
    )
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 0, 0],  # chosen rows: [left-padded prompt | right-padded completion]
        [0, 0, 12, 13, 14, 0],
        [5, 6, 7, 9, 10, 11],  # rejected rows
        [0, 0, 12, 15, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 0, 0],
    ]
    assert batch["completion_mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]]


# --------------------------------------------------------------------------- the loss


TRL_CASES = [
    dict(loss_type="sigmoid", beta=0.1),
    dict(loss_type="ipo", beta=0.5),
    dict(loss_type="apo_zero", beta=0.2),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type="sigmoid", ld_alpha=0.5),
]


@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: str(c["loss_type"]) + str(len(c)))
def test_loss_matches_trl(pair_trainers, case):
    _check_against_trl(*pair_trainers, case)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_wpo_loss_matches_trl(tmp_path, loss_type):
    """WPO: ours takes log sum_v p_v^2 from the policy's own kernel pass, TRL from its
    fused head's extra output (which it adds when built with use_weighting)."""
    ours, theirs = _pair_trainers(tmp_path, use_weighting=True)
    _check_against_trl(ours, theirs, dict(loss_type=loss_type, use_weighting=True))


def _check_against_trl(ours, theirs, case):
    _configure(ours, **{"beta": 0.1, "loss_weights": None, "ld_alpha": None, **case})
    _configure_dpo(
        theirs,
        case["loss_type"],
        beta=case.get("beta", 0.1),
        loss_weights=case.get("loss_weights"),
        ld_alpha=case.get("ld_alpha"),
        use_weighting=case.get("use_weighting", False),
        precompute=False,
    )
    loss = ours.compute_loss(ours.model, _batch(ours))
    trl_loss = theirs.compute_loss(theirs.model, _batch(theirs))
    # WPO's weights (exp of mean aligned log-probs, ~1e-4 here) scale loss and gradients
    # down: compare them relative to TRL's loss, so the tolerances keep their meaning
    unit = trl_loss.detach().abs() if case.get("use_weighting") else 1.0
    tol = TOL_SAME_LOGPS if case.get("ld_alpha") is None else TOL_OWN_LOGPS
    torch.testing.assert_close(loss / unit, trl_loss / unit, **tol)
    _assert_grads_close(
        _grads(loss / unit, ours.model), _grads(trl_loss / unit, theirs.model), TOL_GRADS
    )
    mine = {k: v[-1] for k, v in ours._metrics["train"].items()}
    trls = {k: v[-1] for k, v in theirs._metrics["train"].items()}
    for name in REWARD_METRICS + LOGP_METRICS:
        assert math.isclose(mine[name], trls[name], rel_tol=1e-5, abs_tol=1e-5), name


def _oracle_token_logps(model, pair, *, adapters):
    """Per-token completion log-probs of one unpadded sequence, from full logits."""
    out = []
    for comp in (pair["chosen_ids"], pair["rejected_ids"]):
        ids = torch.tensor([pair["prompt_ids"] + comp])
        with model.disable_adapter() if not adapters else contextlib.nullcontext():
            logits = model(input_ids=ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(lp[len(pair["prompt_ids"]) - 1 :])
    return out


def _oracle_loss(trainer, n=4):
    """preference_loss on log-probs computed here, independently of the trainer."""
    pairs = [trainer.train_dataset[i] for i in range(n)]
    args = trainer.args
    kw = args.preference_loss_kwargs()
    ld = args.ld_alpha

    def seq(lps):  # [chosen, rejected] per-token -> sums (LD-DPO-weighted) and lengths
        shared = min(len(x) for x in lps)
        if ld is None:
            return [x.sum() for x in lps]
        return [x[:shared].sum() + ld * x[shared:].sum() for x in lps]

    pol = [_oracle_token_logps(trainer.model, p, adapters=True) for p in pairs]
    c, r = (torch.stack(v) for v in zip(*(seq(x) for x in pol), strict=True))
    lens = [torch.tensor([len(x[i]) for x in pol]) for i in (0, 1)]
    ref = ()
    if not args.reference_free:
        with torch.no_grad():
            refs = [_oracle_token_logps(trainer.model, p, adapters=False) for p in pairs]
        ref = tuple(torch.stack(v) for v in zip(*(seq(x) for x in refs), strict=True))
    extra = {}
    if ld is not None:  # already LD-weighted above: no tails left
        zero = torch.zeros(n)
        extra = dict(
            chosen_tail_logps=zero,
            rejected_tail_logps=zero,
            ref_chosen_tail_logps=zero,
            ref_rejected_tail_logps=zero,
        )
    return preference.preference_loss(
        c, r, *ref, chosen_lengths=lens[0], rejected_lengths=lens[1], **extra, **kw
    )


ORACLE_CASES = TRL_CASES[:2] + [
    dict(loss_type="hinge", beta=0.3),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=0.3),
    dict(loss_type="cpo", beta=0.1),
    dict(loss_type="orpo", beta=0.1),
    dict(loss_type="sigmoid", ld_alpha=0.3, label_smoothing=0.1, rdpo_alpha=0.05),
]


@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: str(c["loss_type"]) + str(len(c)))
def test_loss_equals_preference_loss_on_independent_logps(pair_trainers, case, monkeypatch):
    ours, _ = pair_trainers
    defaults = dict(
        beta=0.1,
        loss_weights=None,
        ld_alpha=None,
        label_smoothing=0.0,
        rdpo_alpha=0.0,
        simpo_gamma=None,
    )
    _configure(ours, **{**defaults, **case})
    if ours.args.reference_free:  # no reference forward at all
        monkeypatch.setattr(ours, "reference_logps", lambda b: pytest.fail("reference ran"))
    loss = ours.compute_loss(ours.model, _batch(ours))
    want, metrics = _oracle_loss(ours)
    torch.testing.assert_close(loss, want, **TOL_OWN_LOGPS)
    _assert_grads_close(_grads(loss, ours.model), _grads(want, ours.model), TOL_GRADS)
    for name, value in metrics.items():
        assert math.isclose(
            ours._metrics["train"][name][-1], float(value), rel_tol=1e-5, abs_tol=1e-5
        ), name


def test_precomputed_reference_equals_per_batch(tmp_path):
    ds = datasets.Dataset.from_dict(PAIRED_DS)
    for ld_alpha in (None, 0.5):
        kw = dict(precompute_ref_log_probs=True, precompute_ref_batch_size=3, ld_alpha=ld_alpha)
        pre = DPOTrainer(
            lora_model(),
            _args(tmp_path, **kw),
            train_dataset=ds,
            processing_class=tiny_tokenizer(),
        )
        stored = torch.tensor(
            [pre.train_dataset["ref_chosen_logps"], pre.train_dataset["ref_rejected_logps"]]
        )
        batch = _batch(pre)
        assert "ref_chosen_logps" in batch
        per_batch = torch.stack(pre.reference_logps(batch))
        torch.testing.assert_close(stored, per_batch, **TOL_SAME_LOGPS)
        pairs = [pre.train_dataset[i] for i in range(4)]
        with torch.no_grad():
            oracle = [_oracle_token_logps(pre.model, p, adapters=False) for p in pairs]
        if ld_alpha is None:
            want = torch.tensor([[x.sum() for x in o] for o in oracle]).T
            torch.testing.assert_close(stored, want, **TOL_OWN_LOGPS)
        pre.model.train()
        with_columns = pre.compute_loss(pre.model, batch)
        without = {k: v for k, v in batch.items() if not k.startswith("ref_")}
        torch.testing.assert_close(with_columns, pre.compute_loss(pre.model, without))


# ---------------------------------------------------------------------- training runs


def test_training_step_changes_only_lora_and_saves_the_adapter(tmp_path):
    ds = datasets.Dataset.from_dict(PAIRED_DS)
    args = _args(
        tmp_path,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        activation_checkpointing=True,
    )
    trainer = DPOTrainer(tiny_model(), args, train_dataset=ds, processing_class=tiny_tokenizer())
    changed, after = train_changes_only_lora(trainer)
    assert {n for n, p in after.items() if p.requires_grad} >= changed
    logs = trainer.state.log_history
    for name in REWARD_METRICS + LOGP_METRICS + ("loss", "tokens_per_second", "num_tokens"):
        assert name in logs[0], name
    assert logs[1]["num_tokens"] == 2 * logs[0]["num_tokens"] > 0
    ckpt = tmp_path / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    metrics = trainer.evaluate(eval_dataset=PAIRED_DS)  # raw pairs get tokenized
    assert "eval_loss" in metrics and "eval_rewards/accuracies" in metrics


def test_resume_and_ctrl_c_end_where_an_uninterrupted_run_ends(tmp_path):
    tok = build_tiny_tokenizer()
    pairs = preference_pairs(24, 0)
    config = dict(gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2,
                  save_strategy="steps", save_steps=1)  # fmt: skip

    def trainer(name, **overrides):
        torch.manual_seed(0)  # the same LoRA initialisation every time
        args = _args(tmp_path / name, **{**config, **overrides})
        return DPOTrainer(build_tiny_model(tok, "test"), args, train_dataset=pairs,
                          processing_class=tok)  # fmt: skip

    def lora(t):
        return {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_" in n}

    full = trainer("full")
    full.train()
    expected = lora(full)
    # checkpoint 3 is past the first epoch (24 pairs = 3 steps of 2 x 4)
    for step in (1, 3):
        resumed = trainer(f"resumed{step}")
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{step}"))
        for name, value in lora(resumed).items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)

    # Ctrl-C in the second micro-batch of step 3: checkpoint-2 is saved and resumes exactly
    stopped = trainer("stopped", save_strategy="no")
    calls, real_loss = [], stopped.compute_loss

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    stopped.compute_loss = interrupt
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["checkpoint-2"]
    resumed = trainer("after_stop")
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "checkpoint-2"))
    for name, value in lora(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # the loss is a per-micro-batch mean: Trainer divides it by the accumulation steps, so
    # 2 x 2 pairs make the same update as 4 pairs (plain SGD shows the gradient's scale)
    ds = datasets.Dataset.from_dict(PAIRED_DS)
    weights = []
    for bs, ga in ((4, 1), (2, 2)):
        args = _args(
            tmp_path / f"{bs}",
            per_device_train_batch_size=bs,
            max_steps=1,
            gradient_accumulation_steps=ga,
            optim="sgd",
            learning_rate=0.1,
        )
        trainer = DPOTrainer(
            lora_model(), args, train_dataset=ds, processing_class=tiny_tokenizer()
        )
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in lora_params(trainer.model).items()})
    start = lora_params(lora_model())
    assert any(not torch.equal(weights[0][n], start[n]) for n in start)
    for name in start:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6)


def test_chat_message_dataset_trains(tmp_path):
    tok = build_tiny_tokenizer(chat_template=True)
    pairs = preference_pairs(8, 1)
    ds = datasets.Dataset.from_dict(
        dict(
            prompt=[[{"role": "user", "content": p}] for p in pairs["prompt"]],
            chosen=[[{"role": "assistant", "content": c}] for c in pairs["chosen"]],
            rejected=[[{"role": "assistant", "content": r}] for r in pairs["rejected"]],
        )
    )
    args = _args(tmp_path, max_steps=2, learning_rate=1e-2, logging_steps=1)
    trainer = DPOTrainer(
        build_tiny_model(tok, "test"), args, train_dataset=ds, processing_class=tok
    )
    row = trainer.train_dataset[0]
    assert tok.decode(row["prompt_ids"]) == f"user: {pairs['prompt'][0]}\nassistant: "
    assert tok.decode(row["chosen_ids"]) == pairs["chosen"][0] + "\n"
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    ds = datasets.Dataset.from_dict(PAIRED_DS)
    model = lora_model()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
    trainer = DPOTrainer(
        model, _args(tmp_path, max_steps=1), train_dataset=ds, processing_class=tiny_tokenizer()
    )
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite DPO loss at step 0 \(this process: loss nan.*learning_rate",
    ):
        trainer.train()


def test_oom_names_the_settings_to_lower(tmp_path):
    trainer = DPOTrainer(
        lora_model(), _args(tmp_path, max_steps=1),
        train_dataset=datasets.Dataset.from_dict(PAIRED_DS), processing_class=tiny_tokenizer(),
    )  # fmt: skip

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    trainer.compute_loss = oom
    with pytest.raises(torch.OutOfMemoryError) as info:
        trainer.train()
    for name in ("per_device_train_batch_size", "max_length", "precompute_ref_log_probs"):
        assert name in str(info.value)


def _format_pairs(n, seed, split):
    """Arithmetic pairs where the rejected completion breaks the answer format (the
    closing tag is missing): a preference a few DPO steps learn and carry to held-out
    problems."""
    ds = preference_pairs(n, seed, split=split)
    return ds.map(lambda row: {"rejected": row["chosen"].replace("</answer>", "")})


def test_preference_accuracy_rises_on_held_out_pairs(tmp_path):
    tok = build_tiny_tokenizer()
    args = _args(
        tmp_path,
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=2e-2,
        beta=0.5,
        lora_r=8,
        lora_alpha=16,
    )
    trainer = DPOTrainer(
        build_tiny_model(tok, "test"),
        args,
        train_dataset=_format_pairs(64, 0, "train"),
        processing_class=tok,
    )
    held_out = _format_pairs(48, 0, "test")
    assert evaluate_preference_accuracy(trainer, None, held_out) == 0.5  # policy == reference
    trainer.train()
    after = evaluate_preference_accuracy(trainer, None, held_out)
    assert after >= 0.9, after
    # the same measure for a bare peft model, and reference-free (sequence log-probs)
    assert evaluate_preference_accuracy(trainer.model, tok, held_out) == after
    free = evaluate_preference_accuracy(trainer.model, tok, held_out, reference_free=True)
    assert 0.0 <= free <= 1.0


def test_config_survives_dataclasses_replace(tmp_path):
    args = _args(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    again = dataclasses.replace(args, beta=0.2)
    assert again.loss_type == ["sigmoid", "sft"] and again.beta == 0.2


DDP_SCRIPT = """
from fastrl.trainers import DPOConfig, DPOTrainer
from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer, preference_pairs
tok = build_tiny_tokenizer()
args = DPOConfig({out!r}, per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                 use_cpu=True, save_strategy="no", disable_tqdm=True, ddp_backend="gloo",
                 activation_checkpointing=False)
trainer = DPOTrainer(build_tiny_model(tok, "test"), args, train_dataset=preference_pairs(64, 0),
                     processing_class=tok)
trainer.train()
"""


@pytest.mark.slow
def test_data_parallel_ranks_end_with_the_same_weights(tmp_path):
    assert_ranks_end_equal(DDP_SCRIPT, tmp_path)
