"""Reward functions for GRPO, in TRL's convention.

A reward function is any callable ``fn(prompts, completions, **columns) -> list[float]``:

- ``prompts`` and ``completions`` are lists of equal length, one entry per sampled
  completion (a prompt appears G times in a row when G completions are drawn for it);
- each entry is either a plain string (standard format) or a list of chat messages
  ``[{"role": "assistant", "content": "..."}]`` (conversational format, what TRL's
  ``GRPOTrainer`` passes when the prompts are messages);
- ``columns`` are the other dataset columns, each a list aligned with ``completions``,
  plus whatever the trainer adds (TRL adds ``completion_ids``, ``trainer_state``, ...).
  A reward function takes ``**kwargs`` and ignores the ones it does not use;
- it returns one float per completion (``None`` means "no reward for this sample"; the
  trainer turns it into NaN, as TRL does).

The built-ins below are factories: each call returns a small picklable callable object
whose ``__name__`` is what the logs show (``rewards/<name>/mean``). Functions written by
users need nothing from this module; :func:`call_reward` is what the trainers use to call
any of them with clear errors.

    >>> fn = exact_match_answer()
    >>> fn(["1+2="], ["<answer>3</answer>"], answer=["3"])
    [1.0]
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "ANSWER_PATTERN",
    "ANSWER_FORMAT",
    "answers_equal",
    "call_reward",
    "check_reward_model_dir",
    "completion_text",
    "digit_match_answer",
    "exact_match_answer",
    "extract_answer",
    "format_reward",
    "length_penalty",
    "reward_name",
    "RewardModel",
]

#: Default answer extraction: the text inside ``<answer>...</answer>`` or after ``####``
#: (GSM8K style) up to the end of the line. The last occurrence in a completion wins.
ANSWER_PATTERN = r"<answer>(.*?)</answer>|####[ \t]*([^\n]*)"

#: Default format check: the whole completion (stripped) is one ``<answer>...</answer>``.
ANSWER_FORMAT = r"<answer>[^<]+</answer>"

_TRUNCATE = 200


# --------------------------------------------------------------------------- helpers


def completion_text(completion: Any) -> str:
    """The text of one completion, standard or conversational.

    A string is returned as is. A list of messages (TRL's conversational format) gives the
    content of its last assistant message (the final answer of a multi-turn/tool-using
    completion; the only message in the usual case); content given as a list of blocks
    (``[{"type": "text", "text": ...}]``) is joined. A single message dict is accepted too.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        if all(isinstance(m, dict) for m in completion):
            assistant = [m for m in completion if m.get("role", "assistant") == "assistant"]
            message = assistant[-1] if assistant else completion[-1]
            return _content_text(message.get("content", ""))
    raise TypeError(
        "a completion must be a string or a list of chat messages "
        f"([{{'role': 'assistant', 'content': ...}}]), got {type(completion).__name__}"
    )


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type", "text") == "text":
                parts.append(str(block.get("text", "")))
        return "".join(parts)
    return str(content)


def reward_name(fn: Callable) -> str:
    """The name logs use for a reward function (TRL's rule: ``functools.partial`` is
    unwrapped, then ``__name__``, else the class name)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def extract_answer(text: str, pattern: str | re.Pattern = ANSWER_PATTERN) -> str | None:
    """The final answer in ``text``: the last match of ``pattern``.

    The answer is the first group of the match that participated (so alternations such
    as ``<answer>(.*)</answer>|####(.*)`` work), or the whole match when the pattern has
    no groups. ``None`` when nothing matches.
    """
    regex = re.compile(pattern, re.DOTALL) if isinstance(pattern, str) else pattern
    last = None
    for last in regex.finditer(text):  # noqa: B007 - we want the last one
        pass
    if last is None:
        return None
    groups = [g for g in last.groups() if g is not None]
    return (groups[0] if groups else last.group(0)).strip()


def _as_number(text: str) -> Fraction | None:
    s = text.strip().replace(",", "").replace("_", "")
    if s.startswith("+"):
        s = s[1:]
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(predicted: str, reference: str) -> bool:
    """Numeric comparison when both parse as numbers (``"1,000" == "1000.0"``, ``"3/4" ==
    "0.75"``), else comparison of the stripped strings."""
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return a == b
    return predicted.strip() == reference.strip()


def _column(columns: dict, name: str, n: int, fn_name: str) -> list:
    if name not in columns:
        available = sorted(k for k, v in columns.items() if isinstance(v, (list, tuple)))
        raise ValueError(
            f"reward function {fn_name!r} needs the dataset column {name!r}, which was not "
            f"passed; available columns: {available}"
        )
    values = columns[name]
    if len(values) != n:
        raise ValueError(
            f"reward function {fn_name!r}: column {name!r} has {len(values)} values for "
            f"{n} completions"
        )
    return list(values)


# ------------------------------------------------------------------------- built-ins


class _AnswerReward:
    """Scores the completion's final answer against the dataset's with `score`."""

    factory = ""

    def __init__(self, answer_column: str, pattern: str, name: str):
        self.answer_column = answer_column
        self.pattern = pattern
        self._regex = re.compile(pattern, re.DOTALL)
        self.__name__ = name

    @staticmethod
    def score(predicted: str, reference: str) -> float:
        raise NotImplementedError

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        answers = _column(columns, self.answer_column, len(completions), self.__name__)
        rewards = []
        for completion, reference in zip(completions, answers, strict=True):
            predicted = extract_answer(completion_text(completion), self._regex)
            ok = predicted is not None and reference is not None
            rewards.append(self.score(predicted, str(reference)) if ok else 0.0)
        return rewards

    def __repr__(self):
        return f"{self.factory}(answer_column={self.answer_column!r}, pattern={self.pattern!r})"


class _ExactMatchAnswer(_AnswerReward):
    factory = "exact_match_answer"

    @staticmethod
    def score(predicted: str, reference: str) -> float:
        return 1.0 if answers_equal(predicted, reference) else 0.0


_INTEGER = re.compile(r"[+-]?\d+")


class _DigitMatchAnswer(_AnswerReward):
    factory = "digit_match_answer"

    @staticmethod
    def score(predicted: str, reference: str) -> float:
        p, r = (x.strip().replace(",", "").replace("_", "") for x in (predicted, reference))
        if not (_INTEGER.fullmatch(p) and _INTEGER.fullmatch(r)):
            return 0.0
        a, b = int(p), int(r)
        if (a < 0) != (b < 0):
            return 0.0
        da, db = str(abs(a))[::-1], str(abs(b))[::-1]  # ones digit first; unequal lengths
        return sum(x == y for x, y in zip(da, db, strict=False)) / max(len(da), len(db))


def exact_match_answer(
    answer_column: str = "answer",
    pattern: str = ANSWER_PATTERN,
    *,
    name: str = "exact_match_answer",
) -> Callable[..., list[float]]:
    """Reward 1.0 when the completion's final answer equals the dataset's, else 0.0.

    Args:
        answer_column: the dataset column holding the reference answer (any value; it is
            compared through ``str``).
        pattern: regex locating the answer in the completion; the last match wins and its
            first participating group is the answer (see :func:`extract_answer`). The
            default accepts ``<answer>123</answer>`` and ``#### 123``.
        name: the name logged for this reward.

    The comparison is numeric when both sides parse as numbers (commas ignored, so
    ``"1,234"`` equals ``"1234.0"``), otherwise on the stripped strings. A completion with
    no answer scores 0.0.
    """
    re.compile(pattern)  # fail here, not at the first reward call
    return _ExactMatchAnswer(answer_column, pattern, name)


def digit_match_answer(
    answer_column: str = "answer",
    pattern: str = ANSWER_PATTERN,
    *,
    name: str = "digit_match_answer",
) -> Callable[..., list[float]]:
    """Partial credit for integer answers: the share of digit places (ones, tens, ...)
    where the completion's final answer agrees with the dataset's, over the longer one's
    number of digits. 1.0 exactly when the integers are equal; 0.0 for no answer, a
    non-integer on either side, or opposite signs.

    ``"133"`` against ``"143"`` scores 2/3, ``"33"`` against ``"133"`` 2/3, ``"1330"``
    against ``"133"`` 1/4. A denser signal than :func:`exact_match_answer` for arithmetic:
    a model that gets one carry wrong still learns from it. Arguments as for
    :func:`exact_match_answer`.
    """
    re.compile(pattern)
    return _DigitMatchAnswer(answer_column, pattern, name)


class _FormatReward:
    def __init__(self, pattern: str, full: bool, flags: int, name: str):
        self.pattern = pattern
        self.full = full
        self.flags = flags
        self._regex = re.compile(pattern, flags)
        self.__name__ = name

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        test = self._regex.fullmatch if self.full else self._regex.search
        out = []
        for completion in completions:
            text = completion_text(completion)
            out.append(1.0 if test(text.strip() if self.full else text) else 0.0)
        return out

    def __repr__(self):
        return f"format_reward(pattern={self.pattern!r}, full={self.full})"


def format_reward(
    pattern: str = ANSWER_FORMAT,
    *,
    full: bool = True,
    flags: int = re.DOTALL,
    name: str = "format_reward",
) -> Callable[..., list[float]]:
    """Reward 1.0 when the completion has the expected format, else 0.0.

    Args:
        pattern: the regex. The default, ``<answer>[^<]+</answer>``, asks for a completion
            that is exactly one non-empty answer tag.
        full: ``True`` (default): the whole completion, leading/trailing whitespace
            stripped, must match (``re.fullmatch``); ``False``: the pattern may occur
            anywhere (``re.search``).
        flags: ``re`` flags; ``re.DOTALL`` by default so ``.`` crosses lines.
        name: the name logged for this reward.
    """
    re.compile(pattern, flags)
    return _FormatReward(pattern, full, flags, name)


class _LengthPenalty:
    def __init__(self, target, unit, window, max_penalty, tokenizer, name):
        self.target = target
        self.unit = unit
        self.window = window
        self.max_penalty = max_penalty
        self.tokenizer = tokenizer
        self.__name__ = name

    def _lengths(self, completions: list, columns: dict) -> list[int]:
        if self.unit == "chars":
            return [len(completion_text(c)) for c in completions]
        ids = columns.get("completion_ids")
        if ids is not None and len(ids) == len(completions):
            return [len(x) for x in ids]
        if self.tokenizer is None:
            raise ValueError(
                f"reward function {self.__name__!r} counts tokens but got neither a "
                "`completion_ids` column (TRL and fastrl pass one) nor a tokenizer; "
                "pass length_penalty(..., tokenizer=tok) or unit='chars'"
            )
        texts = [completion_text(c) for c in completions]
        return [len(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        out = []
        for length in self._lengths(completions, columns):
            excess = max(0, length - self.target)
            out.append(-self.max_penalty * min(1.0, excess / self.window) if excess else 0.0)
        return out

    def __repr__(self):
        return (
            f"length_penalty(target={self.target}, unit={self.unit!r}, window={self.window}, "
            f"max_penalty={self.max_penalty})"
        )


def length_penalty(
    target: int,
    *,
    unit: str = "chars",
    window: int | None = None,
    max_penalty: float = 1.0,
    tokenizer: Any = None,
    name: str = "length_penalty",
) -> Callable[..., list[float]]:
    """A penalty (reward <= 0) for completions longer than ``target``.

    ``0.0`` up to ``target``; beyond it the penalty grows linearly and reaches
    ``-max_penalty`` at ``target + window`` (then stays there)::

        reward = -max_penalty * min(1, max(0, length - target) / window)

    Args:
        target: the length allowed without penalty.
        unit: ``"chars"`` (characters of the completion text) or ``"tokens"``. Tokens are
            counted from the ``completion_ids`` column the trainer passes; without it,
            with ``tokenizer``.
        window: how far past ``target`` the penalty saturates; default ``target`` (full
            penalty at twice the target), at least 1.
        max_penalty: the largest penalty, >= 0.
        tokenizer: used to count tokens when no ``completion_ids`` are passed.
        name: the name logged for this reward.
    """
    if unit not in ("chars", "tokens"):
        raise ValueError(f"length_penalty: unit must be 'chars' or 'tokens', got {unit!r}")
    if target < 0:
        raise ValueError(f"length_penalty: target must be >= 0, got {target}")
    if max_penalty < 0:
        raise ValueError(f"length_penalty: max_penalty must be >= 0, got {max_penalty}")
    window = max(1, target if window is None else window)
    return _LengthPenalty(target, unit, window, float(max_penalty), tokenizer, name)


# ---------------------------------------------------------------------- call_reward


_TRAIN_ONE = "train a reward model with `fastrl rm --model BASE --dataset PAIRS`"


def check_reward_model_dir(path: str) -> dict | None:
    """What can be told of the directory `path` as a reward model from its JSON files
    alone (no torch): a peft adapter of task type ``SEQ_CLS`` (a causal-LM adapter, what
    `fastrl grpo|dpo|kto|ppo` save, has no score head), or a full checkpoint whose
    ``config.json`` names a ``*ForSequenceClassification`` architecture (a causal LM
    loaded as one gets a random score head). Returns the adapter's config (None for a
    full checkpoint); ValueError naming `path` and saying to train one otherwise."""
    adapter = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter):
        with open(adapter, encoding="utf-8") as f:
            config = json.load(f)
        task_type = config.get("task_type")
        if task_type != "SEQ_CLS":
            raise ValueError(
                f"reward model {path!r}: the adapter's task_type is {task_type!r} (a policy "
                "adapter, as `fastrl grpo|dpo|kto|ppo` save), not a reward model's "
                f"'SEQ_CLS'; {_TRAIN_ONE}"
            )
        return config
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"reward model {path!r}: neither an adapter (adapter_config.json) nor a "
            "checkpoint (config.json)"
        )
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"reward model {path!r} is a {'/'.join(architectures) or 'model'} checkpoint, "
            "not a *ForSequenceClassification reward model: its score head would be "
            f"random; {_TRAIN_ONE}"
        )
    return None


def _check_adapter_has_head(path: str) -> None:
    """The adapter's weights hold the score head (peft saves it with a SEQ_CLS adapter)."""
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        return  # a .bin adapter: peft reports what it lacks
    from safetensors import safe_open

    from fastrl.trainers.reward_model import SCORE_HEADS

    with safe_open(weights, "pt") as f:
        keys = list(f.keys())
    if not any(f".{head}." in key for key in keys for head in SCORE_HEADS):
        raise ValueError(
            f"reward model {path!r}: the adapter holds no score head "
            f"({'/'.join(SCORE_HEADS)} weights), so its scores would be random; "
            f"{_TRAIN_ONE}"
        )


class RewardModel:
    """A trained reward model as a GRPO reward function: ``fn(prompts, completions,
    **columns) -> list[float]``, one score per completion, batched, under
    ``torch.no_grad``, the score head run on each sequence's last hidden state only (no
    logits).

    Each prompt + completion is tokenized as `RewardTrainer` tokenized its pairs: plain
    text gets the EOS appended (where it does not end with it) and the tokenizer's
    special tokens; chat messages (prompt or completion) go through the chat template,
    a string prompt as a user turn and a string completion as an assistant turn.

    Args:
        path: a directory `RewardTrainer.save_model` wrote (a LoRA adapter with its score
            head and the tokenizer; the base is read from ``adapter_config.json``), or a
            full sequence-classification checkpoint with ``num_labels=1``.
        base_model: the base checkpoint of an adapter, where it is not the one the
            adapter records.
        batch_size: sequences per forward.
        max_length: keep at most the last ``max_length`` tokens of a sequence (the
            reward is read at the last one); None: no limit.
        device: default CUDA where available, else CPU.
        dtype: weights dtype (default bf16 on a bf16-capable GPU, else float32).
        name: the name logs use (``rewards/<name>/mean``); default the directory's name.
    """

    def __init__(
        self,
        path: str,
        *,
        base_model: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        device=None,
        dtype=None,
        name: str | None = None,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from fastrl.trainers.model import default_dtype
        from fastrl.trainers.reward_model import quiet_load_report

        if not os.path.isdir(path):
            raise ValueError(f"reward model {path!r}: not a directory")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        dtype = dtype or default_dtype()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        adapter_config = check_reward_model_dir(path)
        if adapter_config is not None:
            from peft import PeftModel

            _check_adapter_has_head(path)
            if base_model is None:
                base_model = adapter_config.get("base_model_name_or_path")
            if not base_model:
                raise ValueError(
                    f"reward model {path!r}: the adapter does not record its base model; "
                    "pass base_model"
                )
            # the base has no score head: transformers reports it missing, and the
            # adapter (checked above to hold it) restores it, so the report is muted
            with quiet_load_report():
                base = AutoModelForSequenceClassification.from_pretrained(
                    base_model, num_labels=1, dtype=dtype,
                    local_files_only=os.path.isdir(base_model),
                )  # fmt: skip
                model = PeftModel.from_pretrained(base, path)
        else:
            with quiet_load_report():
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=1, dtype=dtype, local_files_only=True,
                    output_loading_info=True,
                )  # fmt: skip
            missing = sorted(info.get("missing_keys") or ())
            if missing:
                raise ValueError(
                    f"reward model {path!r}: the checkpoint lacks {missing[:3]}"
                    f"{' ...' if len(missing) > 3 else ''}, which would start random; "
                    f"{_TRAIN_ONE}"
                )
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.__name__ = name or os.path.basename(os.path.normpath(path))

    def _ids(self, prompt, completion) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, list) or isinstance(completion, list):

            def turns(x, role):
                return x if isinstance(x, list) else [{"role": role, "content": x}]

            messages = turns(prompt, "user") + turns(completion, "assistant")
            if tok.chat_template is None:
                raise ValueError("conversational samples need a tokenizer with a chat_template")
            ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        else:
            text = f"{prompt}{completion}"
            if tok.eos_token and not text.endswith(tok.eos_token):
                text += tok.eos_token
            ids = tok(text)["input_ids"]
        return ids if self.max_length is None else ids[-self.max_length :]

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        import torch

        from fastrl.trainers.reward_model import sequence_rewards

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions: one each")
        seqs = [self._ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        pad = self.tokenizer.pad_token_id
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(seqs), self.batch_size):
                chunk = seqs[start : start + self.batch_size]
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                att = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, s in enumerate(chunk):
                    ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                    att[i, : len(s)] = 1
                scores = sequence_rewards(self.model, ids.to(self.device), att.to(self.device))
                out += scores.tolist()  # one sync per batch
        return out

    def __repr__(self):
        return f"RewardModel({self.__name__!r})"


def _short(value: Any, limit: int = _TRUNCATE) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def _to_float(value: Any) -> float:
    if value is None:
        return math.nan
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, (bool, int, float, Fraction)):
        return float(value)
    raise TypeError(type(value).__name__)


def _row(columns: dict, i: int, n: int) -> dict:
    """Columns restricted to sample ``i`` (per-sample columns are lists of length n)."""
    return {
        k: (v[i : i + 1] if isinstance(v, (list, tuple)) and len(v) == n else v)
        for k, v in columns.items()
    }


def call_reward(
    fn: Callable,
    prompts: Sequence,
    completions: Sequence,
    columns: dict | None = None,
    *,
    max_probe: int = 64,
) -> list[float]:
    """Call a reward function and check what it returns.

    ``fn(prompts=prompts, completions=completions, **columns)`` must return one number per
    completion (a list, tuple, numpy array or 1-d tensor; ``None`` entries become NaN, as
    in TRL). The result is a ``list[float]``.

    Raises:
        ValueError: the function returned the wrong number of values or a non-number; the
            message names the function and shows what it returned.
        RuntimeError: the function raised. The message names it, the original exception
            is chained, and the first sample it fails on is shown (prompt and completion,
            truncated): the samples are re-tried one at a time, up to ``max_probe`` of
            them, to find it; when none fails alone, the first sample of the batch is
            shown.
    """
    columns = dict(columns or {})
    prompts, completions = list(prompts), list(completions)
    name = reward_name(fn)
    n = len(completions)
    try:
        out = fn(prompts=prompts, completions=completions, **columns)
    except Exception as exc:
        index, alone = 0, False
        for i in range(min(n, max_probe)):
            try:
                fn(
                    prompts=prompts[i : i + 1],
                    completions=completions[i : i + 1],
                    **_row(columns, i, n),
                )
            except Exception:
                index, alone = i, True
                break
        where = f"sample {index}" if alone else f"the batch of {n} (first sample shown)"
        sample = ""
        if n:
            sample = (
                f"\n  prompt:     {_short(prompts[index] if index < len(prompts) else None)}"
                f"\n  completion: {_short(completions[index])}"
            )
        raise RuntimeError(
            f"reward function {name!r} raised {type(exc).__name__}: {exc}\n"
            f"failing on {where}:{sample}"
        ) from exc

    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy array / tensor
    if not isinstance(out, (list, tuple)) or len(out) != n:
        got = f"{len(out)} values" if isinstance(out, (list, tuple)) else type(out).__name__
        raise ValueError(
            f"reward function {name!r} must return one float per completion ({n}), "
            f"got {got}: {_short(out)}"
        )
    rewards = []
    for i, value in enumerate(out):
        try:
            rewards.append(_to_float(value))
        except TypeError:
            raise ValueError(
                f"reward function {name!r} must return floats, got {type(value).__name__} "
                f"at index {i}: {_short(value)} (returned {_short(out)})"
            ) from None
    return rewards
