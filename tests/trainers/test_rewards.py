"""Built-in reward functions and `call_reward`'s error reporting."""

import math
import pickle

import pytest

from fastrl.trainers.rewards import (
    answers_equal,
    call_reward,
    completion_text,
    digit_match_answer,
    exact_match_answer,
    extract_answer,
    format_reward,
    length_penalty,
    reward_name,
)


def conv(text):
    """A completion in TRL's conversational format."""
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------ completion_text


def test_completion_text_formats():
    assert completion_text("abc") == "abc"
    assert completion_text(conv("abc")) == "abc"
    assert completion_text({"role": "assistant", "content": "x"}) == "x"
    blocks = [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        }
    ]
    assert completion_text(blocks) == "ab"
    multi = [
        {"role": "assistant", "content": "calling tool"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "<answer>42</answer>"},
    ]
    assert completion_text(multi) == "<answer>42</answer>"
    assert completion_text([]) == ""
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        completion_text(3)


# --------------------------------------------------------------- exact_match_answer


def test_extract_answer_default_pattern():
    assert extract_answer("<answer>123</answer>") == "123"
    assert extract_answer("so #### 42\nbye") == "42"
    assert extract_answer("<answer> 1 </answer> then <answer>2</answer>") == "2"  # last wins
    assert extract_answer("no answer here") is None
    assert extract_answer("x=7", r"x=(\d+)") == "7"
    assert extract_answer("x=7", r"x=\d+") == "x=7"  # no group: the whole match


def test_answers_equal_numeric_then_string():
    assert answers_equal("1,000", "1000")
    assert answers_equal("1000.0", "1000")
    assert answers_equal("+5", "5")
    assert answers_equal("3/4", "0.75")
    assert not answers_equal("12", "13")
    assert answers_equal(" Paris ", "Paris")
    assert not answers_equal("paris", "Paris")


def test_exact_match_answer_scores_known_strings():
    fn = exact_match_answer()
    completions = [
        "<answer>433</answer>",
        "<answer>433.0</answer>",
        "<answer>434</answer>",
        "433",  # no answer format
        "#### 433",
        "<answer>1,433</answer>",
    ]
    answers = ["433", "433", "433", "433", 433, "1433"]
    assert fn(["p"] * 6, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert fn(["p"], [conv("<answer>7</answer>")], answer=["7"]) == [1.0]
    assert fn.__name__ == "exact_match_answer"
    assert reward_name(fn) == "exact_match_answer"


def test_exact_match_answer_options():
    fn = exact_match_answer("solution", pattern=r"\\boxed\{(.*?)\}", name="boxed")
    assert fn.__name__ == "boxed"
    out = fn(["p", "p"], [r"\boxed{x+1}", r"\boxed{2}"], solution=["x+1", "3"], trainer_state=None)
    assert out == [1.0, 0.0]
    with pytest.raises(ValueError, match="column 'solution'"):
        fn(["p"], ["x"], answer=["1"])
    with pytest.raises(Exception):  # noqa: B017 - re.error
        exact_match_answer(pattern="(")


def test_digit_match_answer_gives_partial_credit_per_digit_place():
    fn = digit_match_answer()
    cases = {
        "<answer>133</answer>": 1.0,
        "<answer>143</answer>": 2 / 3,  # tens wrong
        "<answer>33</answer>": 2 / 3,  # hundreds missing
        "<answer>1330</answer>": 1 / 4,  # places align from the ones digit
        "<answer>1,33</answer>": 1.0,  # separators ignored, like exact_match_answer
        "<answer>-133</answer>": 0.0,  # opposite sign
        "<answer>13.3</answer>": 0.0,  # not an integer
        "133": 0.0,  # no answer
    }
    out = fn(["p"] * len(cases), list(cases), answer=["133"] * len(cases))
    assert out == pytest.approx(list(cases.values()))
    assert fn(["p", "p"], ["<answer>-7</answer>", conv("#### 0")], answer=[-17, "0"]) == [0.5, 1.0]
    assert fn.__name__ == "digit_match_answer" and "digit_match_answer(" in repr(fn)
    with pytest.raises(ValueError, match="column 'answer'"):
        fn(["p"], ["<answer>1</answer>"])


def test_rewards_are_picklable():
    for fn in (exact_match_answer(), digit_match_answer(), format_reward(), length_penalty(10)):
        clone = pickle.loads(pickle.dumps(fn))
        assert clone.__name__ == fn.__name__
        assert clone(["p"], ["<answer>1</answer>"], answer=["1"]) == fn(
            ["p"], ["<answer>1</answer>"], answer=["1"]
        )


# ------------------------------------------------------------------ format_reward


def test_format_reward():
    fn = format_reward()
    completions = [
        "<answer>12</answer>",
        " <answer>12</answer>\n",
        "x <answer>12</answer>",
        "<answer></answer>",
    ]
    assert fn(None, completions) == [1.0, 1.0, 0.0, 0.0]
    anywhere = format_reward(r"<answer>\d+</answer>", full=False, name="has_answer")
    assert anywhere(None, completions) == [1.0, 1.0, 1.0, 0.0]
    assert anywhere.__name__ == "has_answer"
    think = format_reward(r"<think>.*?</think>\s*<answer>.*?</answer>")
    assert think(None, [conv("<think>a\nb</think>\n<answer>1</answer>")]) == [1.0]


# ----------------------------------------------------------------- length_penalty


def test_length_penalty_chars():
    fn = length_penalty(10)  # full penalty at 20 chars
    out = fn(None, ["a" * 5, "a" * 10, "a" * 15, "a" * 20, "a" * 100])
    assert out == [0.0, 0.0, -0.5, -1.0, -1.0]
    fn = length_penalty(4, window=2, max_penalty=0.5)
    assert fn(None, [conv("abcde")]) == [-0.25]
    assert fn.__name__ == "length_penalty"


def test_length_penalty_tokens():
    fn = length_penalty(2, unit="tokens")
    assert fn(None, ["ignored", "x"], completion_ids=[[1, 2, 3], [1]]) == [-0.5, 0.0]
    with pytest.raises(ValueError, match="completion_ids"):
        fn(None, ["abc"])

    class CharTokenizer:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [list(t) for t in texts]}

    fn = length_penalty(2, unit="tokens", tokenizer=CharTokenizer())
    assert fn(None, ["abc", "ab"]) == [-0.5, 0.0]
    with pytest.raises(ValueError, match="unit"):
        length_penalty(2, unit="words")


# -------------------------------------------------------------------- call_reward


def test_call_reward_passes_columns_and_converts():
    seen = {}

    def my_reward(prompts, completions, answer, **kwargs):
        seen.update(kwargs)
        return [1, True, None]

    out = call_reward(
        my_reward, ["a", "b", "c"], ["x", "y", "z"], {"answer": [1, 2, 3], "extra": 5}
    )
    assert out[:2] == [1.0, 1.0] and math.isnan(out[2])
    assert seen == {"extra": 5}

    np = pytest.importorskip("numpy")
    assert call_reward(lambda prompts, completions, **k: np.ones(2), ["a", "b"], ["x", "y"]) == [
        1.0,
        1.0,
    ]


def test_call_reward_wrong_length_names_function():
    def too_few(prompts, completions, **kwargs):
        return [1.0]

    with pytest.raises(
        ValueError, match=r"'too_few'.*one float per completion \(2\).*1 values.*\[1\.0\]"
    ):
        call_reward(too_few, ["a", "b"], ["x", "y"])

    def scalar(prompts, completions, **kwargs):
        return 0.5

    with pytest.raises(ValueError, match=r"'scalar'.*got float"):
        call_reward(scalar, ["a"], ["x"])

    def strings(prompts, completions, **kwargs):
        return ["good"]

    with pytest.raises(ValueError, match=r"'strings' must return floats, got str at index 0: good"):
        call_reward(strings, ["a"], ["x"])


def test_call_reward_exception_shows_failing_sample():
    def picky(prompts, completions, answer, **kwargs):
        return [1.0 / int(a) for a in answer]  # ZeroDivisionError on answer 0

    prompts = ["1+1=", "5-5=", "2+2="]
    completions = ["<answer>2</answer>", "<answer>0</answer>" + "z" * 500, "<answer>4</answer>"]
    with pytest.raises(RuntimeError) as info:
        call_reward(picky, prompts, completions, {"answer": ["2", "0", "4"]})
    msg = str(info.value)
    assert "'picky' raised ZeroDivisionError" in msg
    assert "sample 1" in msg and "5-5=" in msg and "<answer>0</answer>zzz" in msg
    assert "more chars]" in msg  # the long completion is truncated
    assert len(msg) < 1000
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_call_reward_exception_only_in_batch():
    class BatchOnly:
        __name__ = "batch_only"

        def __call__(self, prompts, completions, **kwargs):
            if len(completions) > 1:
                raise KeyError("boom")
            return [0.0]

    with pytest.raises(
        RuntimeError, match=r"(?s)'batch_only' raised KeyError.*batch of 2.*prompt: +p0"
    ):
        call_reward(BatchOnly(), ["p0", "p1"], ["c0", "c1"])


# ---------------------------------------------------------------------- RewardModel


def test_reward_model_refuses_what_is_not_one(tmp_path):
    """A causal-LM checkpoint or a policy adapter would score with a random head: refused
    from their JSON files, before anything loads, saying to train one with `fastrl rm`."""
    import json

    from fastrl.trainers.rewards import RewardModel, check_reward_model_dir

    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"is a LlamaForCausalLM checkpoint, not a "
                       r"\*ForSequenceClassification .*`fastrl rm"):  # fmt: skip
        RewardModel(str(causal))
    policy = tmp_path / "kto-adapter"
    policy.mkdir()
    (policy / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    with pytest.raises(ValueError, match=r"task_type is 'CAUSAL_LM' .*'SEQ_CLS'.*`fastrl rm"):
        RewardModel(str(policy))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an adapter"):
        check_reward_model_dir(str(tmp_path / "empty"))


def test_reward_model_refuses_a_checkpoint_or_adapter_without_its_head(tmp_path, capfd):
    import json

    import torch
    from safetensors.torch import save_file

    from fastrl.trainers.rewards import RewardModel
    from tests.support.cli import save_tiny_checkpoint

    # a classifier's config over a causal LM's weights: the loading info says the score
    # head is missing (transformers' own multi-line report of it is muted)
    path = save_tiny_checkpoint(tmp_path / "relabelled")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks \['score.weight'\], which would start random"):
        RewardModel(str(path), dtype=torch.float32)
    assert "LOAD REPORT" not in capfd.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS"}))
    save_file({"base_model.model.model.layers.0.q.lora_A.weight": torch.zeros(1, 1)},
              str(adapter / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="the adapter holds no score head"):
        RewardModel(str(adapter))


def test_reward_model_loads_a_fastrl_rm_adapter_without_the_missing_head_report(tmp_path, capfd):
    """The base of a `fastrl rm` adapter has no score head: transformers would report it
    missing although the adapter restores it; the report is muted, the scores are the
    adapter's."""
    import torch

    from fastrl.demo.task import build_tiny_tokenizer
    from fastrl.trainers.reward_model import load_reward_model, sequence_rewards
    from fastrl.trainers.rewards import RewardModel
    from tests.support.cli import save_tiny_checkpoint

    base = save_tiny_checkpoint(tmp_path / "base")
    model = load_reward_model(str(base), dtype=torch.float32, gradient_checkpointing=False)
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.normal_()
    model.save_pretrained(tmp_path / "rm")
    build_tiny_tokenizer().save_pretrained(tmp_path / "rm")
    capfd.readouterr()
    rm = RewardModel(str(tmp_path / "rm"), dtype=torch.float32)
    assert "LOAD REPORT" not in capfd.readouterr().err
    ids = rm.tokenizer("1+1=2" + rm.tokenizer.eos_token)["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = sequence_rewards(model, torch.tensor([ids]), torch.ones(1, len(ids)))
    torch.testing.assert_close(torch.tensor(rm(["1+1="], ["2"])), expected.float())
