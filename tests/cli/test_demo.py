"""The demo's task, tokenizer, model, SFT warm-up and evaluation (all fast, CPU)."""

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from fastrl.demo.task import (  # noqa: E402
    arithmetic_dataset,
    build_tiny_model,
    build_tiny_tokenizer,
    evaluate_accuracy,
    generate_completions,
    preference_accuracy,
    preference_pairs,
    sft_warmup,
)
from fastrl.trainers.rewards import exact_match_answer, format_reward  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are too small to gain from intra-op threads, and on a busy machine
    (pytest -n 2 on two cores) extra threads make them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------- datasets


def test_arithmetic_dataset_is_deterministic_and_correct():
    a = arithmetic_dataset(50, seed=3)
    assert a.column_names == ["prompt", "answer", "completion"]
    assert a.to_dict() == arithmetic_dataset(50, seed=3).to_dict()
    assert a.to_dict() != arithmetic_dataset(50, seed=4).to_dict()
    assert arithmetic_dataset(20, seed=3).to_dict() == a.select(range(20)).to_dict()  # prefix
    for row in a:
        expr = row["prompt"]
        assert expr.endswith("=")
        assert int(row["answer"]) == eval(expr[:-1])  # noqa: S307 - our own digits and +/-
        assert int(row["answer"]) >= 0
        assert row["completion"] == f"<answer>{row['answer']}</answer>"
        for operand in expr[:-1].replace("-", "+").split("+"):
            assert len(operand) == 2  # default digits=(2, 2)
    assert len(set(a["prompt"])) == 50


def test_train_and_test_splits_are_disjoint():
    train = set(arithmetic_dataset(2000, seed=0, digits=(1, 2))["prompt"])
    test = set(arithmetic_dataset(200, seed=0, digits=(1, 2), split="test")["prompt"])
    assert not train & test
    with pytest.raises(ValueError, match="too small"):
        arithmetic_dataset(500, seed=0, digits=(1, 1), ops=("+",))  # only 100 problems
    with pytest.raises(ValueError, match="split"):
        arithmetic_dataset(1, split="valid")


def test_arithmetic_dataset_options():
    neg = arithmetic_dataset(200, seed=1, ops=("-",), allow_negative=True)
    assert any(int(x) < 0 for x in neg["answer"])
    assert all("-" in p for p in neg["prompt"])
    reward = exact_match_answer()(neg["prompt"], neg["completion"], answer=neg["answer"])
    assert reward == [1.0] * 200


def test_preference_pairs():
    pairs = preference_pairs(100, seed=0)
    assert pairs.column_names == ["prompt", "chosen", "rejected", "answer"]
    assert pairs.to_dict() == preference_pairs(100, seed=0).to_dict()
    assert pairs["prompt"] == arithmetic_dataset(100, seed=0)["prompt"]
    n = len(pairs)
    em = exact_match_answer()
    assert em(pairs["prompt"], pairs["chosen"], answer=pairs["answer"]) == [1.0] * n
    assert em(pairs["prompt"], pairs["rejected"], answer=pairs["answer"]) == [0.0] * n
    assert format_reward()(pairs["prompt"], pairs["rejected"]) == [1.0] * n  # same format
    for chosen, rejected in zip(pairs["chosen"], pairs["rejected"], strict=True):
        assert int(rejected[8:-9]) >= 0
        assert len(rejected) == len(chosen)  # a near miss, same number of digits


# ------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_and_specials(tok):
    assert len(tok) == tok.vocab_size == 101
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "347+86=<answer>433</answer>\n#### -5 Ok?"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no special tokens added
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("é")["input_ids"]) == ["<unk>"]
    ids = tok("1+1=")["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "1+1="
    batch = tok(["1", "123"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [tok.convert_tokens_to_ids("1"), 0, 0]


def test_tokenizer_chat_template():
    tok = build_tiny_tokenizer(chat_template=True)
    messages = [{"role": "user", "content": "1+2="}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "user: 1+2=\nassistant: "
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


# ------------------------------------------------------------------- model, SFT, eval


def test_build_tiny_model(tok):
    model = build_tiny_model(tok, "test", seed=1)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.vocab_size == len(tok) and cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.generation_config.eos_token_id == tok.eos_token_id
    state = torch.random.get_rng_state()
    again = build_tiny_model(tok, "test", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
    other = build_tiny_model(tok, "test", seed=2)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    assert build_tiny_model(tok, "tiny").config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="size"):
        build_tiny_model(tok, "huge")


def test_sft_warmup_lowers_loss_and_is_reproducible(tok):
    data = arithmetic_dataset(64, seed=0)
    model = build_tiny_model(tok, "test", seed=0)
    losses = sft_warmup(model, tok, data, steps=30, lr=1e-2, batch_size=16, seed=0, progress=False)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert not model.training
    again = build_tiny_model(tok, "test", seed=0)
    assert (
        sft_warmup(again, tok, data, steps=30, lr=1e-2, batch_size=16, seed=0, progress=False)
        == losses
    )
    with pytest.raises(ValueError, match="completion"):
        sft_warmup(model, tok, data.remove_columns("completion"), steps=1, progress=False)


def test_sft_warmup_early_stop(tok):
    data = arithmetic_dataset(40, seed=0)
    train, val = data.select(range(32)), data.select(range(32, 40))
    model = build_tiny_model(tok, "test", seed=0)
    kw = dict(steps=10, batch_size=4, progress=False)
    losses = sft_warmup(
        model, tok, train, eval_dataset=val, target_accuracy=0.0, eval_every=3, **kw
    )
    assert len(losses) == 3  # the first evaluation meets a 0% target
    losses = sft_warmup(
        model, tok, train, eval_dataset=val, target_accuracy=1.1, eval_every=3, **kw
    )
    assert len(losses) == 10  # never met: all steps
    with pytest.raises(ValueError, match="both"):
        sft_warmup(model, tok, train, target_accuracy=0.5, **kw)


def test_sft_then_format_is_learned(tok):
    # a few more steps: the fixed answer format is the easy part and must come first
    data = arithmetic_dataset(256, seed=0)
    model = build_tiny_model(tok, "test", seed=0)
    sft_warmup(model, tok, data, steps=60, lr=1e-2, batch_size=32, seed=0, progress=False)
    test = arithmetic_dataset(16, seed=0, split="test")
    outs = generate_completions(model, tok, test["prompt"], max_new_tokens=24)
    assert sum(format_reward(r"<answer>\d+</answer>")(None, outs)) >= 12


def test_evaluate_accuracy_and_left_padding(tok):
    model = build_tiny_model(tok, "test", seed=0)
    data = arithmetic_dataset(12, seed=0, digits=(1, 3), split="test")
    batched = generate_completions(model, tok, data["prompt"], max_new_tokens=6, batch_size=12)
    single = [generate_completions(model, tok, [p], max_new_tokens=6)[0] for p in data["prompt"]]
    assert batched == single  # left padding does not change greedy outputs
    assert tok.padding_side == "right"  # restored
    assert evaluate_accuracy(model, tok, data, max_new_tokens=6) == 0.0

    class Oracle(torch.nn.Module):
        """Generates the reference completion: accuracy must be 1."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, **kwargs):
            rows = []
            for ids, mask in zip(input_ids, attention_mask, strict=True):
                prompt = tok.decode(ids[mask.bool()])
                answer = eval(prompt[:-1])  # noqa: S307
                rows.append(ids.tolist() + tok(f"<answer>{answer}</answer>")["input_ids"])
            width = max(len(r) for r in rows)
            return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])

    assert evaluate_accuracy(Oracle(), tok, data, batch_size=5) == 1.0


def test_sampled_accuracy_is_seeded_and_leaves_the_global_rng(tok):
    model = build_tiny_model(tok, "test", seed=0)
    data = arithmetic_dataset(6, seed=0, split="test")
    prompts = data["prompt"]
    state = torch.random.get_rng_state()
    a = generate_completions(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == generate_completions(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert a != generate_completions(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=4)
    greedy = generate_completions(model, tok, prompts, max_new_tokens=6)
    assert a != greedy  # a random model's samples are not its argmax
    acc = evaluate_accuracy(model, tok, data, max_new_tokens=6, temperature=1.0, num_samples=3)
    assert acc == 0.0
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_accuracy(model, tok, data, num_samples=2)
    with pytest.raises(ValueError, match="temperature"):
        generate_completions(model, tok, prompts, temperature=-1.0)


def test_preference_accuracy(tok):
    model = build_tiny_model(tok, "test", seed=0)
    pairs = preference_pairs(16, seed=0, split="test")
    acc = preference_accuracy(model, tok, pairs, batch_size=5)
    assert 0.0 <= acc <= 1.0
    swapped = pairs.rename_columns({"chosen": "rejected", "rejected": "chosen"})
    # ties are impossible in practice; chosen/rejected swapped flips the accuracy
    assert preference_accuracy(model, tok, swapped) == pytest.approx(1.0 - acc)


# ------------------------------------------------------------------------ demo plot


def test_demo_plot_draws_held_out_accuracy_as_two_markers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from fastrl.demo.run import _plot_rewards

    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: None)  # keep the figure to inspect it
    history = [{"step": s, "reward": 0.1 * s, "rewards/exact_match/mean": 0.05 * s} for s in (1, 2)]
    _plot_rewards(history, tmp_path / "curve.png", (0.25, 0.4))
    assert (tmp_path / "curve.png").stat().st_size > 0
    ax = plt.gcf().axes[0]
    # two measurements are points (a scatter), not a line: only the rewards are lines
    assert [line.get_label() for line in ax.get_lines()] == [
        "reward (sum, train)",
        "exact_match/mean",
    ]
    (points,) = ax.collections
    assert points.get_offsets().tolist() == [[0, 0.25], [2, 0.4]]
    real_close("all")


# ------------------------------------------------------------------ demo stages


def test_dpo_and_reward_model_share_the_task_pairs():
    from fastrl.demo.run import STAGES, preference_data

    cfg = STAGES["quick"]
    train, held_out = preference_data({**cfg, "pairs": 8, "rm_pairs": 24}, seed=0)
    assert len(train) == 24 and len(held_out) == max(cfg["test"], 32)
    # DPO takes the first rows: the same pairs preference_pairs builds for that count
    assert train.select(range(8)).to_dict() == preference_pairs(8, seed=0).to_dict()
    assert held_out.to_dict() == preference_pairs(len(held_out), seed=0, split="test").to_dict()
    assert not set(train["prompt"]) & set(held_out["prompt"])
