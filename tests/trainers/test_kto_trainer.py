"""fastrl.trainers.KTOTrainer on the tiny config-built models, CPU (the loss, gradients and
metrics against TRL's KTOTrainer: tests/parity/test_trl_parity_kto.py).

- the config: TRL's names and defaults, and its refusals (a batch of one with the KL
  term, precomputed KL references without sequential batches), each naming the flag;
- the data: unpaired plain and chat-message datasets, paired ones unpaired, bad columns
  and labels refused naming them; the collator's [completions; KL pairs] layout;
- the loss equals `kto_loss` on log-probs computed independently here (full logits, one
  unpadded sequence at a time), a batch with one kind of label only included;
- precomputed reference log-probs equal the per-batch ones;
- a few training steps change the LoRA weights only, log TRL's metrics, save the
  adapter only, and a reload of it gives the trained policy's log-probs.
"""

import math
import warnings

import pytest
import torch

datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from fastrl import kto_loss  # noqa: E402
from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer, preference_pairs  # noqa: E402
from fastrl.trainers import KTOConfig, KTOTrainer, unpair_preference_dataset  # noqa: E402
from fastrl.trainers.dpo_trainer import _sequence_logps  # noqa: E402
from fastrl.trainers.kto_trainer import KTOCollator, _rows  # noqa: E402
from tests.support.compare import TOL_OWN_LOGPS  # noqa: E402
from tests.support.lora import lora_model, train_changes_only_lora  # noqa: E402
from tests.support.models import tiny_model, tiny_tokenizer  # noqa: E402
from tests.support.trl_kto import UNPAIRED_DS, B, common_args, first_batch  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*remove_unused_columns.*"),
]

METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected", "entropy", "logits/chosen", "logits/rejected")  # fmt: skip


def _args(tmp, **kw):
    return KTOConfig(**common_args(tmp, disable_tqdm=True, **kw))


def _trainer(tmp, data=None, model=None, **kw):
    return KTOTrainer(
        lora_model() if model is None else model,
        _args(tmp, **kw),
        train_dataset=datasets.Dataset.from_dict(UNPAIRED_DS if data is None else data),
        processing_class=tiny_tokenizer(),
    )


# ------------------------------------------------------------------------ config, data


def test_config_defaults_and_refusals(tmp_path):
    args = KTOConfig(str(tmp_path), use_cpu=True)
    assert (args.loss_type, args.beta, args.desirable_weight, args.undesirable_weight) == (
        "kto", 0.1, 1.0, 1.0,
    )  # fmt: skip
    assert args.max_length == 1024 and args.logging_steps == 10
    assert args.train_sampling_strategy == "sequential" and args.remove_unused_columns is False
    assert args.activation_checkpointing
    refusals = [
        (dict(per_device_train_batch_size=1), "per_device_train_batch_size must be > 1"),
        (dict(loss_type="sigmoid"), r"loss_type must be one of \('kto', 'apo_zero_unpaired'\)"),
        (dict(beta=0.0), "beta"),
        (dict(undesirable_weight=-1.0), "undesirable_weight"),
        (dict(max_prompt_length=0), "max_prompt_length"),
        (dict(precompute_ref_log_probs=True, train_sampling_strategy="random"),
         "train_sampling_strategy must be sequential"),
        (dict(precompute_ref_log_probs=True, precompute_ref_batch_size=3),
         "leave --precompute_ref_batch_size unset"),
    ]  # fmt: skip
    for kw, match in refusals:
        with pytest.raises(ValueError, match=match):
            KTOConfig(str(tmp_path), use_cpu=True, **kw)
    # without the KL term those are fine
    KTOConfig(str(tmp_path), use_cpu=True, loss_type="apo_zero_unpaired",
              per_device_train_batch_size=1, precompute_ref_log_probs=True,
              train_sampling_strategy="random", precompute_ref_batch_size=3)  # fmt: skip
    with pytest.raises(TypeError, match="fastrl KTOConfig"):
        KTOTrainer(tiny_model(), args=object(), processing_class=tiny_tokenizer())


def test_bad_columns_and_labels_are_refused(tmp_path):
    no_label = {k: v for k, v in UNPAIRED_DS.items() if k != "label"}
    with pytest.raises(ValueError, match=r"missing \['label'\]"):
        _trainer(tmp_path, data=no_label)
    with pytest.raises(ValueError, match=r"missing \['completion', 'label'\]"):
        _trainer(tmp_path, data=dict(prompt=["w1"], answer=["w2"]))
    with pytest.raises(ValueError, match="label column must hold booleans .* got 2"):
        _trainer(tmp_path, data={**UNPAIRED_DS, "label": [1, 0, 2, 1, 0, 0]})
    with pytest.raises(ValueError, match="label column .* got 'yes'"):
        _trainer(tmp_path, data={**UNPAIRED_DS, "label": ["yes"] * B})
    ints = _trainer(tmp_path, data={**UNPAIRED_DS, "label": [1, 0, 1, 1, 0, 0]})
    assert list(ints.train_dataset["label"]) == UNPAIRED_DS["label"]


def test_unbalanced_labels_warn_as_trl(tmp_path):
    data = {**UNPAIRED_DS, "label": [True] * 5 + [False]}
    with pytest.warns(UserWarning, match=r"5 desirable and 1 undesirable .*\[0\.2, 0\.27\]"):
        _trainer(tmp_path, data=data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _trainer(tmp_path, data=data, desirable_weight=0.25)  # in range: quiet


def test_unpair_preference_dataset():
    paired = dict(prompt=["a", "b"], chosen=["c1", "c2"], rejected=["r1", "r2"], id=[7, 8])
    rows = unpair_preference_dataset(paired).to_dict()
    assert rows == dict(prompt=["a", "b", "a", "b"], completion=["c1", "c2", "r1", "r2"],
                        label=[True, True, False, False], id=[7, 8, 7, 8])  # fmt: skip


def test_collator_layout():
    examples = [
        dict(prompt_ids=[5, 6], completion_ids=[7], label=True),
        dict(prompt_ids=[8], completion_ids=[9, 10, 11], label=False),
        dict(prompt_ids=[12, 13, 14], completion_ids=[15, 16], label=1),
    ]
    batch = KTOCollator(pad_token_id=0)(examples)
    assert batch["label"].tolist() == [True, False, True]
    assert batch["input_ids"].tolist() == [
        [0, 5, 6, 7, 0, 0],
        [0, 0, 8, 9, 10, 11],
        [12, 13, 14, 15, 16, 0],
        # the KL pairs: prompt i with the completion of example i - 1 (cyclically)
        [0, 5, 6, 15, 16, 0],
        [0, 0, 8, 7, 0, 0],
        [12, 13, 14, 9, 10, 11],
    ]
    assert batch["completion_mask"].tolist() == [
        [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1],
    ]  # fmt: skip
    assert (batch["attention_mask"] == (batch["input_ids"] != 0)).all()
    plain = KTOCollator(pad_token_id=0, pad_to_multiple_of=4, kl=False)(examples)
    assert plain["input_ids"].shape == (3, 8) and plain["completion_mask"].shape == (3, 4)


def test_chat_message_data_is_tokenized_through_the_template(tmp_path):
    tok = build_tiny_tokenizer(chat_template=True)
    pairs = preference_pairs(4, 1)
    ds = dict(
        prompt=[[{"role": "user", "content": p}] for p in pairs["prompt"]],
        completion=[[{"role": "assistant", "content": c}] for c in pairs["chosen"]],
        label=[True, False, True, False],
    )
    trainer = KTOTrainer(build_tiny_model(tok, "test"), _args(tmp_path, max_steps=1),
                         train_dataset=ds, processing_class=tok)  # fmt: skip
    row = trainer.train_dataset[0]
    assert tok.decode(row["prompt_ids"]) == f"user: {pairs['prompt'][0]}\nassistant: "
    assert tok.decode(row["completion_ids"]) == pairs["chosen"][0] + "\n"
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


# ------------------------------------------------------------------------------ loss


def _oracle_logps(model, batch, n, *, adapters):
    """Summed completion log-probs from full logits, one unpadded row at a time."""
    out = []
    for i in range(n):
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        C = int(batch["completion_mask"][i].sum())
        ctx = model.disable_adapter() if not adapters else torch.enable_grad()
        with torch.no_grad(), ctx:
            logits = model(input_ids=row[None]).logits[0, :-1].double()
        lp = torch.log_softmax(logits, -1).gather(-1, row[1:, None])[:, 0]
        out.append(lp[-C:].sum())
    return torch.stack(out)


@pytest.mark.parametrize(
    "labels, loss_type",
    [(UNPAIRED_DS["label"], "kto"), ([True] * B, "kto"), ([False] * B, "apo_zero_unpaired")],
    ids=["mixed", "all-desirable", "all-undesirable"],
)
def test_loss_equals_kto_loss_on_independent_logps(tmp_path, labels, loss_type):
    trainer = _trainer(tmp_path, data={**UNPAIRED_DS, "label": labels}, loss_type=loss_type,
                       beta=0.3)  # fmt: skip
    trainer.model.train()
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    model = trainer.model
    kw = dict(loss_type=loss_type, beta=0.3)
    if loss_type == "kto":
        kl_rows = {k: v[B:] for k, v in batch.items() if k != "label"}
        kw["kl_logps"] = _oracle_logps(model, kl_rows, B, adapters=True)
        kw["ref_kl_logps"] = _oracle_logps(model, kl_rows, B, adapters=False)
    want, want_metrics = kto_loss(
        _oracle_logps(model, batch, B, adapters=True),
        _oracle_logps(model, batch, B, adapters=False),
        batch["label"],
        **kw,
    )
    torch.testing.assert_close(loss.double(), want, **TOL_OWN_LOGPS)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for name, value in want_metrics.items():
        assert math.isclose(logged[name], float(value), rel_tol=1e-5, abs_tol=1e-5) or (
            math.isnan(logged[name]) and value.isnan()
        ), name
    assert math.isnan(logged["rewards/margins"]) == (len(set(labels)) == 1)
    loss.backward()  # gradient reaches the adapters
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())


def test_precomputed_reference_equals_per_batch(tmp_path):
    per_batch = _trainer(tmp_path / "a")
    pre = _trainer(tmp_path / "b", precompute_ref_log_probs=True)
    batch = first_batch(per_batch)
    ref, ref_kl = per_batch.reference_logps(batch)
    torch.testing.assert_close(torch.tensor(pre.train_dataset["ref_logps"]), ref)
    torch.testing.assert_close(torch.tensor(pre.train_dataset["ref_KL_logps"]), ref_kl)
    pre_batch = first_batch(pre)
    assert "ref_logps" in pre_batch and "ref_KL_logps" in pre_batch
    per_batch.model.train()
    pre.model.train()
    torch.testing.assert_close(
        pre.compute_loss(pre.model, pre_batch), per_batch.compute_loss(per_batch.model, batch)
    )


# -------------------------------------------------------------------------- training


def test_training_changes_only_lora_logs_metrics_and_saves_the_adapter(tmp_path):
    args = dict(max_steps=3, learning_rate=1e-2, logging_steps=1, save_strategy="steps",
                save_steps=3, per_device_train_batch_size=3)  # fmt: skip
    trainer = _trainer(tmp_path, model=tiny_model(), **args)
    train_changes_only_lora(trainer)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for name in ("loss", "kl", "entropy", "num_tokens", "tokens_per_second"):
        assert all(name in h for h in logs), name
    # batches of 3 sequential rows: labels [T, F, T] then [T, F, F]: both kinds each time
    for name in METRICS:
        assert name in logs[0], name
    ckpt = tmp_path / "checkpoint-3"
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    # the saved adapter is the trained policy
    reloaded = peft.PeftModel.from_pretrained(tiny_model(), str(ckpt))
    batch = first_batch(trainer, 3)
    ours, _ = _sequence_logps(trainer.model, batch, adapters=True, impl="torch")
    again, _ = _sequence_logps(reloaded, batch, adapters=True, impl="torch")
    torch.testing.assert_close(again, ours)
    metrics = trainer.evaluate(eval_dataset=UNPAIRED_DS)  # raw rows get tokenized
    assert "eval_loss" in metrics and "eval_kl" in metrics


def test_a_batch_of_one_kind_trains_and_logs_only_that_kind(tmp_path):
    data = {**UNPAIRED_DS, "label": [True] * 3 + [False] * 3}
    options = dict(max_steps=2, learning_rate=1e-2, logging_steps=1, per_device_train_batch_size=3)
    trainer = _trainer(tmp_path, data=data, model=tiny_model(), **options)
    trainer.train()
    first, second = (h for h in trainer.state.log_history if "loss" in h)
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"])
    assert "rewards/chosen" in first and "rewards/rejected" not in first
    assert "rewards/rejected" in second and "rewards/chosen" not in second
    assert "rewards/margins" not in first and "rewards/margins" not in second


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    model = lora_model()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
    trainer = _trainer(tmp_path, model=model, max_steps=1)
    with pytest.raises(FloatingPointError, match=r"non-finite KTO loss at step 0 .*labels"):
        trainer.train()


def test_kl_batch_rows_are_checked(tmp_path):
    trainer = _trainer(tmp_path)
    batch = first_batch(trainer)
    with pytest.raises(ValueError, match=r"rows \[completions; KL pairs\]"):
        trainer.compute_loss(trainer.model, {**_rows(batch, slice(0, B)), "label": batch["label"]})


DDP_KL_SCRIPT = """
from fastrl.trainers import KTOConfig, KTOTrainer
from fastrl.trainers.dpo_trainer import _sequence_logps
from fastrl.trainers.kto_trainer import _rows
from tests.support.models import tiny_tokenizer
from tests.support.lora import lora_model
from tests.support.trl_kto import UNPAIRED_DS
args = KTOConfig({out!r}, per_device_train_batch_size=3, use_cpu=True, save_strategy="no",
                 disable_tqdm=True, ddp_backend="gloo", activation_checkpointing=False,
                 report_to="none")
trainer = KTOTrainer(lora_model(), args, train_dataset=UNPAIRED_DS,
                     processing_class=tiny_tokenizer())
rank = dist.get_rank()  # the trainer's set-up made the process group
batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3 * rank, 3 * rank + 3)])
ref, ref_kl = trainer.reference_logps(batch)
# each rank's reference KL log-probs lowered by another amount: unequal positive means
batch.update(ref_logps=ref, ref_KL_logps=ref_kl - 4.0 * (rank + 1))
kl_logps, _ = _sequence_logps(trainer.model, _rows(batch, slice(3, None)), adapters=True,
                              impl="torch")
local = (kl_logps - batch["ref_KL_logps"]).mean().reshape(1)
means = [torch.zeros(1) for _ in range(2)]
dist.all_gather(means, local)
trainer.model.train()
trainer.compute_loss(trainer.model, batch)
logged = trainer._metrics["train"]["kl"][-1]
want = max(0.0, float(torch.cat(means).mean()))
assert want > 0 and abs(logged - want) < 1e-5 and abs(logged - float(local)) > 1e-3, (logged, want)
print("KL_GATHERED")
"""


@pytest.mark.slow
def test_kl_reference_point_is_averaged_over_processes(tmp_path):
    """TRL's KL point under DDP: the mean over processes of each one's batch mean."""
    from tests.support.ranks import run_ranks

    out = run_ranks(DDP_KL_SCRIPT.format(out=str(tmp_path / "out")), tmp_path)
    assert out.count("KL_GATHERED") == 2, out[-2000:]
