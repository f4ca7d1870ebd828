"""Parity with TRL 1.16's `RewardTrainer`: loss, gradients and metrics on a fixed batch.

Both trainers wrap copies of one tiny random `LlamaForSequenceClassification`
(``num_labels=1``) with the same LoRA (peft ``SEQ_CLS``: the score head in
``modules_to_save``); fastrl's adapter weights are then set to TRL's, with the LoRA B
matrices made non-zero so that every adapter weight gets a gradient. TRL's own
`compute_loss` runs on a batch made by TRL's own collator; fastrl's on the same batch.
The tokenizer's pad token is not its EOS, so both read the reward at the same token (see
`fastrl.trainers.reward_model` for the case where they differ).
"""

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from trl.trainer.reward_trainer import DataCollatorForPreference  # noqa: E402

from fastrl.trainers import RewardConfig, RewardTrainer  # noqa: E402
from tests.support.models import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*remove_unused_columns.*"),
]

assert trl.__version__ == "1.16.0", f"parity is pinned to TRL 1.16.0, found {trl.__version__}"

B = 4


def _seq_cls():
    config = copy.deepcopy(tiny_model().config)
    config.num_labels = 1
    torch.manual_seed(7)
    model = transformers.LlamaForSequenceClassification(config).float()
    with torch.no_grad():  # livelier rewards than the 0.02-std init
        model.score.weight.mul_(20)
    return model


def _rows(seed):
    g = torch.Generator().manual_seed(seed)

    def text():
        n = int(torch.randint(2, 9, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (n,), generator=g))

    return [{"chosen": text(), "rejected": text(), "margin": float(i) / 2} for i in range(B)]


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    tok = tiny_tokenizer()
    data = datasets.Dataset.from_list(_rows(0))
    common = dict(per_device_train_batch_size=B, report_to="none", use_cpu=True,
                  save_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip
    base = _seq_cls()
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    theirs = trl.RewardTrainer(
        copy.deepcopy(base),
        args=trl.RewardConfig(
            str(tmp_path_factory.mktemp("trl")), gradient_checkpointing=False, **common
        ),  # fmt: skip
        train_dataset=data,
        processing_class=tok,
        peft_config=peft.LoraConfig(task_type="SEQ_CLS", **lora),
    )
    ours = RewardTrainer(
        copy.deepcopy(base),
        args=RewardConfig(
            str(tmp_path_factory.mktemp("fastrl")),
            activation_checkpointing=False,
            lora_r=8,
            lora_alpha=16,
            **common,
        ),  # fmt: skip
        train_dataset=data,
        processing_class=tok,
    )
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        params = dict(theirs.model.named_parameters())
        for name, p in params.items():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        mine = dict(ours.model.named_parameters())
        assert {n for n, p in mine.items() if p.requires_grad} == {
            n for n, p in params.items() if p.requires_grad
        }
        for name, p in mine.items():
            p.copy_(params[name])
    return theirs, ours


def _batch(trainer, seed, margin):
    rows = _rows(seed)
    tok = trainer.processing_class
    for r in rows:
        r["chosen_ids"] = tok(r["chosen"] + tok.eos_token)["input_ids"]
        r["rejected_ids"] = tok(r["rejected"] + tok.eos_token)["input_ids"]
        if not margin:
            del r["margin"]
    return DataCollatorForPreference(pad_token_id=tok.pad_token_id)(rows)


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("coef", [None, 0.01, 0.3])
def test_loss_and_gradients_match_trl(trainers, margin, coef):
    theirs, ours = trainers
    theirs.args.center_rewards_coefficient = coef
    ours.args.center_rewards_coefficient = coef
    batch = _batch(theirs, 5, margin)
    trl_loss, trl_grads = _loss_and_grads(theirs, batch)
    loss, grads = _loss_and_grads(ours, batch)
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=1e-5)
    assert any("score" in n for n in grads) and any("lora_A" in n for n in grads)
    for name, g in trl_grads.items():
        assert g.abs().max() > 0, name  # every weight takes part
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)
    # the metrics TRL logged for this batch
    trl_metrics = {k: v[-1] for k, v in theirs._metrics["train"].items() if k != "num_tokens"}
    ours_metrics = {k: v[-1] for k, v in ours._metrics["train"].items()}
    for name, value in trl_metrics.items():
        assert ours_metrics[name] == pytest.approx(value, abs=1e-6, rel=1e-5), name


def test_tokenization_matches_trl(trainers):
    theirs, ours = trainers
    explicit = [{"prompt": "w1 w2", "chosen": " w3 w4", "rejected": " w5<eos>"}]
    for rows in (explicit, _rows(3)):  # an explicit prompt; implicit (in the texts)
        rows = datasets.Dataset.from_list(rows)
        trl_data = theirs._prepare_dataset(rows, theirs.processing_class, theirs.args, "x")
        data = ours._tokenize(rows, ours.args, ours.processing_class)
        for column in ("chosen_ids", "rejected_ids"):
            assert data[column] == trl_data[column]


def test_reward_token_is_the_last_attended_one():
    """With a pad token distinct from EOS, fastrl reads the reward where transformers'
    head (and so TRL) reads it. With pad == EOS, transformers skips the final EOS of a
    plain-text pair (it looks like padding) and reads the token before it; fastrl reads
    the EOS, the last attended token. Pinned here as the one intended difference."""
    from fastrl.trainers.reward_model import sequence_rewards

    model = _seq_cls().eval()
    att = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])  # EOS = 1, pad = 0
        ours = sequence_rewards(model, ids, att)
        torch.testing.assert_close(ours, model(input_ids=ids, attention_mask=att).logits[:, 0])
        model.config.pad_token_id = 1  # pad = EOS
        ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 1]])
        theirs = model(input_ids=ids, attention_mask=att).logits[:, 0]
        torch.testing.assert_close(sequence_rewards(model, ids, att), ours)
        before_eos = sequence_rewards(model, ids[:, :3], torch.tensor([[1, 1, 1], [1, 1, 0]]))
        torch.testing.assert_close(theirs, before_eos)
        assert (theirs - ours).abs().min() > 1e-3
