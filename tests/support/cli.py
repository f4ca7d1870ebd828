"""What the `fastrl` command's end-to-end tests share: the shipped task's tiny model and
tokenizer saved as a checkpoint directory, and datasets written as JSONL files."""

import json
from pathlib import Path

from fastrl.demo import task


def save_tiny_checkpoint(path: Path) -> Path:
    """`path` holding the shipped task's tiny (``size="test"``) model and its tokenizer."""
    tok = task.build_tiny_tokenizer()
    task.build_tiny_model(tok, size="test").save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    """`path` holding ``rows`` (a list of dicts or a ``datasets.Dataset``), one a line."""
    rows = rows.to_list() if hasattr(rows, "to_list") else rows
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path
