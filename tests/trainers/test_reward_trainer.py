"""RewardTrainer / RewardConfig / RewardModel on a tiny config-built Llama, CPU.

- `reward_loss` against a float64 oracle (margin, centring) with its gradients;
- a few steps on a separable toy set: the loss falls, held-out accuracy (``eval_accuracy``)
  rises, LoRA and score weights change and nothing else does;
- the saved adapter reloads as `RewardModel` with the trainer's own scores; it drives a
  one-step GRPO run as a reward function;
- tokenization as TRL (EOS appended, prompt prepended, chat messages), max_length drops;
- errors for bad columns and options.
"""

import math

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from fastrl.trainers import GRPOConfig, GRPOTrainer, RewardConfig, RewardModel  # noqa: E402
from fastrl.trainers.reward_model import last_token_index, sequence_rewards  # noqa: E402
from fastrl.trainers.reward_trainer import (  # noqa: E402
    RewardCollator,
    RewardTrainer,
    reward_loss,
    tokenize_reward_dataset,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]


def _pairs(n, seed):
    """Separable pairs: the chosen completion is made of vowels, the rejected of 'xyz'."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(2, 6, (1,), generator=g))
        good = "".join("aeiou"[int(i)] for i in torch.randint(0, 5, (k,), generator=g))
        bad = "".join("xyz"[int(i)] for i in torch.randint(0, 3, (k,), generator=g))
        rows.append({"prompt": "q:", "chosen": good, "rejected": bad})
    return rows


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny causal-LM checkpoint with its tokenizer (the trainer adds a score head)."""
    path = tmp_path_factory.mktemp("base")
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, "test", seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _args(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12,
              learning_rate=3e-2, logging_steps=4, report_to="none", use_cpu=True,
              save_strategy="no", seed=0, disable_tqdm=True, eval_strategy="no")  # fmt: skip
    kw.update(overrides)
    return RewardConfig(**kw)


def _oracle(c, r, margin=None, coef=None):
    c, r = c.double(), r.double()
    d = c - r - (0 if margin is None else margin.double())
    loss = torch.log1p(torch.exp(-d)).mean()
    return loss + (0 if coef is None else coef * ((c + r) ** 2).mean())


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("coef", [None, 0.01, 0.5])
def test_reward_loss_matches_float64_oracle(margin, coef):
    g = torch.Generator().manual_seed(3)
    c = torch.randn(7, generator=g).requires_grad_()
    r = torch.randn(7, generator=g).requires_grad_()
    m = torch.rand(7, generator=g) if margin else None
    loss, metrics = reward_loss(c, r, margin=m, center_rewards_coefficient=coef)
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    ref = _oracle(c64, r64, m, coef)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    gc, gr = torch.autograd.grad(loss, (c, r))
    rc, rr = torch.autograd.grad(ref, (c64, r64))
    torch.testing.assert_close(gc.double(), rc, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gr.double(), rr, atol=1e-6, rtol=1e-6)
    assert float(metrics["accuracy"]) == float((c > r).float().mean())
    assert math.isclose(float(metrics["margin"]), float((c - r).mean().detach()), rel_tol=1e-6)
    assert float(metrics["max_reward"]) == float(torch.cat([c, r]).max())


def test_reward_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="rewards_chosen"):
        reward_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="margin"):
        reward_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2))


def test_tokenization_as_trl():
    tok = build_tiny_tokenizer(chat_template=True)
    data = tokenize_reward_dataset([{"prompt": "p", "chosen": "ab", "rejected": "c<eos>"}], tok)
    eos = tok.eos_token_id
    assert data[0]["chosen_ids"] == tok("pab")["input_ids"] + [eos]
    assert data[0]["rejected_ids"] == tok("pc")["input_ids"] + [eos]  # no second EOS
    chat = [{"prompt": [{"role": "user", "content": "p"}],
             "chosen": [{"role": "assistant", "content": "ab"}],
             "rejected": [{"role": "assistant", "content": "c"}]}]  # fmt: skip
    data = tokenize_reward_dataset(chat, tok)
    whole = chat[0]["prompt"] + chat[0]["chosen"]
    expected = tok.apply_chat_template(whole, tokenize=True, return_dict=True)["input_ids"]
    assert data[0]["chosen_ids"] == expected
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        data = tokenize_reward_dataset(
            [{"chosen": "a", "rejected": "b"}, {"chosen": "aaaaaa", "rejected": "b"}],
            tok,
            max_length=3,
        )
    assert len(data) == 1


def test_collator_right_pads_and_keeps_margin():
    rows = [{"chosen_ids": [5, 6, 7], "rejected_ids": [8], "margin": 0.5},
            {"chosen_ids": [9], "rejected_ids": [4, 4], "margin": 1}]  # fmt: skip
    batch = RewardCollator(0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0], [8, 0, 0], [4, 4, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 1, 2]
    assert batch["margin"].tolist() == [0.5, 1.0]
    assert last_token_index(batch["attention_mask"]).tolist() == [2, 0, 0, 1]


def test_training_learns_a_separable_set_and_reloads(base_dir, tmp_path):
    train, held_out = _pairs(48, 0), _pairs(16, 1)
    trainer = RewardTrainer(base_dir, _args(tmp_path), train_dataset=train, eval_dataset=held_out)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = trainer.evaluate()
    trainer.train()
    last = trainer.evaluate()
    trained = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_" in n for n in trained)
    assert any("score.modules_to_save" in n for n in trained)
    assert all("lora_" in n or "modules_to_save" in n for n in trained), sorted(trained)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert last["eval_loss"] < first["eval_loss"]
    # a fresh score head barely separates the pairs (margin ~0.04, loss ~log 2)
    assert first["eval_margin"] < 0.5 and first["eval_loss"] > 0.6
    assert last["eval_accuracy"] == 1.0 and last["eval_margin"] > 2.0
    for name in ("eval_margin", "eval_rewards/chosen", "eval_mean_reward", "eval_min_reward"):
        assert name in last

    # save and reload: the adapter with its score head scores as the trainer's model
    trainer.save_model(str(tmp_path / "rm"))
    rm = RewardModel(str(tmp_path / "rm"), dtype=torch.float32, batch_size=3)
    prompts = [r["prompt"] for r in held_out[:5]]
    completions = [r["chosen"] for r in held_out[:5]]
    scores = rm(prompts, completions, answer=[None] * 5)
    batch = RewardCollator(trainer.processing_class.pad_token_id)(
        [
            {
                "chosen_ids": trainer.processing_class(p + c + "<eos>")["input_ids"],
                "rejected_ids": [5],
            }
            for p, c in zip(prompts, completions, strict=True)
        ]  # fmt: skip
    )
    model.eval()
    with torch.no_grad():
        ours = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])[:5]
    torch.testing.assert_close(torch.tensor(scores), ours, atol=1e-5, rtol=1e-5)
    bad = rm(prompts, [r["rejected"] for r in held_out[:5]])
    assert sum(s > b for s, b in zip(scores, bad, strict=True)) >= 4

    # a full checkpoint (the adapter merged in) scores the same
    full = tmp_path / "full"
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(full)
    trainer.processing_class.save_pretrained(full)
    full_rm = RewardModel(str(full), dtype=torch.float32, name="full")
    torch.testing.assert_close(torch.tensor(full_rm(prompts, completions)), torch.tensor(scores))
    assert full_rm.__name__ == "full"

    # chat messages go through the chat template, as RewardTrainer tokenizes them
    chat_tok = build_tiny_tokenizer(chat_template=True)
    full_rm.tokenizer = chat_tok
    messages = [[{"role": "user", "content": p}] for p in prompts[:2]]
    answers = [[{"role": "assistant", "content": c}] for c in completions[:2]]
    ids = [chat_tok.apply_chat_template(m + a, tokenize=True, return_dict=True)["input_ids"]
           for m, a in zip(messages, answers, strict=True)]  # fmt: skip
    batch = RewardCollator(0)([{"chosen_ids": i, "rejected_ids": [5]} for i in ids])
    with torch.no_grad():
        want = sequence_rewards(merged, batch["input_ids"], batch["attention_mask"])[:2]
    torch.testing.assert_close(torch.tensor(full_rm(messages, answers)), want)
    assert full_rm(prompts[:2], answers) == pytest.approx(full_rm(messages, answers))

    # the reward model as a GRPO reward function: one step
    tok = trainer.processing_class
    policy = build_tiny_model(tok, "test", seed=1)
    grpo_args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4,
                           num_generations=4, max_completion_length=4, max_steps=1,
                           report_to="none", use_cpu=True, save_strategy="no",
                           disable_tqdm=True, logging_steps=1)  # fmt: skip
    grpo = GRPOTrainer(policy, rm, args=grpo_args, train_dataset=[{"prompt": "q:"}] * 4,
                       processing_class=tok)  # fmt: skip
    grpo.train()
    logged = grpo.state.log_history[0]
    assert math.isfinite(logged["rewards/rm/mean"])


def test_margin_and_centering_reach_the_loss(base_dir, tmp_path):
    rows = [dict(r, margin=2.0) for r in _pairs(8, 2)]
    args = _args(tmp_path, center_rewards_coefficient=0.5)
    trainer = RewardTrainer(base_dir, args, train_dataset=rows)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        r = sequence_rewards(trainer.model, batch["input_ids"], batch["attention_mask"])
    c, j = r.chunk(2)
    expected = _oracle(c, j, batch["margin"], 0.5)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    assert not math.isclose(float(expected), float(_oracle(c, j)), rel_tol=1e-3)


def test_errors(base_dir, tmp_path):
    with pytest.raises(ValueError, match="missing \\['rejected'\\]"):
        RewardTrainer(base_dir, _args(tmp_path), train_dataset=[{"chosen": "a", "other": "b"}])
    with pytest.raises(ValueError, match="reward pairs: .*all strings or all lists"):
        tokenize_reward_dataset(
            [{"chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}],
            build_tiny_tokenizer(chat_template=True),
        )
    with pytest.raises(ValueError, match="--center_rewards_coefficient"):
        _args(tmp_path, center_rewards_coefficient=-1.0)
    with pytest.raises(ValueError, match="--max_length"):
        _args(tmp_path, max_length=0)
    with pytest.raises(ValueError, match="--kernel_impl 'torch' has no effect"):
        _args(tmp_path, kernel_impl="torch")
    tok = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="sequence-classification"):
        RewardTrainer(build_tiny_model(tok, "test"), _args(tmp_path), train_dataset=_pairs(2, 0),
                      processing_class=tok)  # fmt: skip
    two = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardTrainer(two, _args(tmp_path), train_dataset=_pairs(2, 0), processing_class=tok)
    with pytest.raises(ValueError, match="not a directory"):
        RewardModel(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither an adapter"):
        RewardModel(str(tmp_path))


DDP_SCRIPT = """
from fastrl.trainers import RewardConfig, RewardTrainer
from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer
from tests.trainers.test_reward_trainer import _pairs

tok = build_tiny_tokenizer()
args = RewardConfig({out!r}, per_device_train_batch_size=4, max_steps=2, learning_rate=5e-2,
                    use_cpu=True, save_strategy="no", disable_tqdm=True, ddp_backend="gloo",
                    report_to="none", activation_checkpointing=False)
config = build_tiny_model(tok, "test").config
config.num_labels = 1
torch.manual_seed(0)
model = transformers.LlamaForSequenceClassification(config)
trainer = RewardTrainer(model, args, train_dataset=_pairs(16, 0), processing_class=tok)
trainer.train()
head = trainer.model.get_base_model().score.modules_to_save["default"].weight.detach().clone()
every = [torch.zeros_like(head) for _ in range(2)]
dist.all_gather(every, head)
assert torch.equal(every[0], every[1])
"""


@pytest.mark.slow
def test_data_parallel_ranks_end_with_the_same_weights(tmp_path):
    # the rewards' forward goes through the DDP wrapper: LoRA and score grads all-reduced
    from tests.support.ranks import assert_ranks_end_equal

    assert_ranks_end_equal("import transformers\n" + DDP_SCRIPT, tmp_path)
