"""Training data from Python lists, a `datasets.Dataset`, or local JSONL/CSV/parquet files,
and prompt rendering (chat template where the tokenizer has one)."""

import csv
import json
import os
from pathlib import Path

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: the columns of preference pairs (TRL's), of pairs tokenized already, and of precomputed
#: reference log-probs; the command line checks a data file against them
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
PREFERENCE_TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
REFERENCE_LOGPS_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
#: the columns of reward-model pairs (TRL's RewardTrainer: a prompt is optional) and of
#: pairs tokenized already
REWARD_COLUMNS = ("chosen", "rejected")
REWARD_TOKEN_COLUMNS = ("chosen_ids", "rejected_ids")
#: the columns that hold text (or chat messages) in the trainers' datasets: a CSV file's
#: are read as strings, so that a column of numbers ("12", "007") stays text
#: the columns a trainer reads as text (a reward function's `answer` and other columns
#: reach it as the file holds them)
TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected")


def check_data_file(path: str | os.PathLike) -> list[str] | None:
    """The column names of a local data file, checked without `datasets` (whose errors name
    neither the file nor the line): the file exists and is not empty, every JSONL line is a
    JSON object, every CSV row has the header's number of fields. None where the columns are
    not known without loading (parquet, a saved dataset directory). Raises ValueError
    naming the file, and the line where one is at fault."""
    path = Path(path)
    if path.is_dir():
        return None
    if not path.exists():
        raise ValueError(f"data file {str(path)!r} does not exist")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"data file {str(path)!r}: unknown format {path.suffix!r}; "
            f"use one of {sorted(_FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty")
    if fmt == "parquet":
        return None
    if fmt == "csv":
        return _csv_columns(path)
    if path.suffix.lower() == ".json":
        # a .json file is either one JSON document (a list of rows) or JSON lines
        try:
            with open(path, encoding="utf-8") as f:
                document = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            document = None
        if isinstance(document, list):
            return _row_columns(path, document)
        if isinstance(document, dict) and all(isinstance(v, list) for v in document.values()):
            return list(document)  # column format, {"prompt": [...], ...}, as datasets reads
    return _jsonl_columns(path)


def _row_columns(path: Path, rows: list) -> list[str]:
    if not rows:
        raise ValueError(f"data file {str(path)!r} has no rows")
    columns: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(
                f"data file {str(path)!r}: row {i} is a {type(row).__name__}, expected an object"
            )
        columns.update(dict.fromkeys(row))
    return list(columns)


def _jsonl_columns(path: Path) -> list[str]:
    columns: dict[str, None] = {}  # a dict keeps the first row's order
    rows = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"data file {str(path)!r} line {number}: not valid JSON ({e.msg} at column "
                    f"{e.colno})"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"data file {str(path)!r} line {number}: expected a JSON object "
                    f"(one row per line), got a {type(row).__name__}"
                )
            columns.update(dict.fromkeys(row))
            rows += 1
    if not rows:
        raise ValueError(f"data file {str(path)!r} has no rows (only blank lines)")
    return list(columns)


def _csv_columns(path: Path) -> list[str]:
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first name
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
            rows = 0
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(
                        f"data file {str(path)!r} line {reader.line_num}: {len(row)} fields, "
                        f"the header has {len(header)} ({header})"
                    )
                rows += 1
        except StopIteration:
            header, rows = [], 0
        except csv.Error as e:
            raise ValueError(f"data file {str(path)!r} line {reader.line_num}: {e}") from None
    if not header or not rows:
        raise ValueError(f"data file {str(path)!r} has no rows (a header line, then one per row)")
    return header


def load_data(data, *, split: str = "train"):
    """A `datasets.Dataset` from rows (`list[dict]`), columns (`dict[str, list]`), a
    Dataset/DatasetDict, a local .jsonl/.json/.csv/.parquet file, or a dataset saved with
    `save_to_disk`. A CSV file's `TEXT_COLUMNS` are read as strings (pandas would make a
    column of numbers int64)."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"split {split!r} not in the DatasetDict, which has {list(data)}")
        return data[split]
    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, list):
        if not data or not all(isinstance(row, dict) for row in data):
            raise ValueError("data as a list must be a non-empty list of dicts (one per row)")
        return datasets.Dataset.from_list(data)
    if isinstance(data, dict):
        return datasets.Dataset.from_dict(data)
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            return load_data(datasets.load_from_disk(str(path)), split=split)
        columns = check_data_file(path)
        fmt = _FORMATS[path.suffix.lower()]
        kwargs = {}
        if fmt == "csv":  # pandas would read a text column of numbers as int64 / float64
            kwargs["converters"] = {c: str for c in columns or () if c in TEXT_COLUMNS}
        return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    raise TypeError(
        "data must be a list of dicts, a dict of lists, a datasets.Dataset or a file path, "
        f"got {type(data).__name__}"
    )


def require_columns(dataset, columns: tuple[str, ...], what: str) -> None:
    """`dataset` has `columns` (ValueError naming `what` and the missing ones), and those
    of them that are `TEXT_COLUMNS`, and a `prompt` wherever there is one, hold text
    (`check_text_columns`): a wrong type fails here, when a trainer builds its dataset,
    not at a later step."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{what} needs columns {list(columns)}; missing {missing} in {dataset.column_names}"
        )
    text = tuple(c for c in columns if c in TEXT_COLUMNS)
    # a prompt the trainer does not require may be missing from a row (None: no prompt)
    optional = () if "prompt" in columns else ("prompt",)
    check_text_columns(dataset, text + optional, what, optional=optional)


def _is_text(value) -> bool:
    """A string, or a list of chat messages (dicts, `{"role": ..., "content": ...}`)."""
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(m, dict) for m in value)
    )


def prompt_dataset(train_dataset, what: str):
    """An online trainer's (`what`: "GRPOTrainer", "PPOTrainer") training prompts as a
    `datasets.Dataset` with a `prompt` column of text, checked before the model loads."""
    if train_dataset is None:
        raise ValueError(f"{what} needs a train_dataset with a 'prompt' column")
    train_dataset = load_data(train_dataset)
    require_columns(train_dataset, ("prompt",), what)
    return train_dataset


def _is_text_feature(feature) -> bool:
    """A `datasets` feature whose every value is text: a string, or a list of messages."""
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return isinstance(feature.feature, dict)
    return isinstance(feature, list) and len(feature) == 1 and isinstance(feature[0], dict)


def check_text_columns(
    dataset, columns: tuple[str, ...], what: str, *, optional: tuple[str, ...] = ()
) -> None:
    """Each of `columns` that `dataset` has holds text: strings or lists of chat messages,
    no nulls (None passes in the `optional` ones). Read from the column's type (no pass
    over the data) unless it is at fault; then ValueError naming `what`, the column, the
    first row at fault (counted from 0, as `dataset[i]`), its value and type. Anything but
    a `datasets.Dataset` passes."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        return
    for name in columns:
        if name not in dataset.column_names:
            continue
        if _is_text_feature(dataset.features[name]) and (
            name in optional or not dataset.data.column(name).null_count
        ):
            continue
        for i, value in enumerate(dataset[name]):
            if _is_text(value) or (value is None and name in optional):
                continue
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:60] + "..."
            hint = ""
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                hint = '; give text that looks like a number as a string ("12", not 12)'
            raise ValueError(
                f"{what}: column {name!r} must hold strings or lists of chat messages; row "
                f"{i} holds {shown} ({type(value).__name__}){hint}"
            )


def check_chat_template(dataset, tokenizer, what: str) -> None:
    """Chat-message prompts need a tokenizer with a chat template to render them:
    ValueError naming `what` and the first such row, when the trainer is built (the
    rollout would fail at its first step)."""
    import datasets

    if getattr(tokenizer, "chat_template", None) is not None:
        return
    if not isinstance(dataset, datasets.Dataset) or "prompt" not in dataset.column_names:
        return
    if isinstance(dataset.features["prompt"], datasets.Value):  # strings: no pass needed
        return
    for i, prompt in enumerate(dataset["prompt"]):
        if isinstance(prompt, list):
            raise ValueError(
                f"{what}: the prompts are chat messages (row {i} of the dataset, --dataset), "
                "but the tokenizer (--model's) has no chat_template to render them; give "
                "plain-string prompts, or a model whose tokenizer has a chat template"
            )


def render_prompt(tokenizer, prompt, *, use_chat_template: bool = True) -> str:
    """The text a completion continues: chat messages (a list of {role, content}) always
    through the chat template; a plain string through it as a user turn when the tokenizer
    has a template and `use_chat_template`, else as is."""
    if isinstance(prompt, list):
        if tokenizer.chat_template is None:
            raise ValueError("a conversational prompt needs a tokenizer with a chat_template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise TypeError(
            f"a prompt must be a string or a list of messages, got {type(prompt).__name__}"
        )
    if use_chat_template and tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def join_message_contents(completion) -> str:
    """A completion as text: a string as is, or the contents of a list of messages joined
    (all of them: for tokenisation; rewards read the last assistant message instead)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m["content"] for m in completion)
    raise TypeError(
        f"a completion must be a string or a list of messages, got {type(completion).__name__}"
    )
