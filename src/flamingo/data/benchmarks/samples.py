"""Evaluation samples and the strict readers of annotation files.

Every problem with an annotation file raises `EvalDataError` with one line naming the file and the
field (a `ValueError`, so the CLI reports it and exits with code 2). A missing *media file* is not
an error here: it is found when the sample is used, counted and reported (see `media.py`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flamingo.errors import UserError


class EvalDataError(UserError):
    """An evaluation input (data config, annotation file, task name) that cannot be used."""


@dataclass
class Sample:
    """One example of a benchmark, in the split it came from.

    media: the image path, or the video path (with `start`/`end` seconds for a segment), or None
    for media-free examples. `answers` holds every reference (captions, the 10 VQA answers, the
    class name, the correct choice); `choices` the candidates of close-ended tasks that rank
    per-sample options (STAR, VisDial); `extra` any task-specific field (meme text, relevance...).
    """

    id: str
    media: Path | None
    answers: list[str] = field(default_factory=list)
    question: str = ""
    choices: list[str] = field(default_factory=list)
    label: str = ""  # class name / correct choice for close-ended tasks
    start: float | None = None
    end: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _missing(path: Path, what: str) -> EvalDataError:
    return EvalDataError(f"{path}: {what} file does not exist")


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise _missing(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalDataError(f"{path}: {what} is not valid JSON: {err}") from None


def read_jsonl(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise _missing(path, what)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalDataError(f"{path}: line {number} is not valid JSON: {err}") from None
        if not isinstance(row, dict):
            raise EvalDataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_csv(path: Path, what: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise _missing(path, what)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        absent = [c for c in required if c not in columns]
        if absent:
            raise EvalDataError(f"{path}: {what} has no column(s) {', '.join(absent)} (columns: {', '.join(columns)})")
        return list(reader)


def get(record: Any, key: str, path: Path, where: str, kind: type | tuple[type, ...] = object) -> Any:
    """record[key], checked: a clear error naming the file, the record and the field otherwise."""
    if not isinstance(record, dict):
        raise EvalDataError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise EvalDataError(f"{path}: {where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EvalDataError(f"{path}: {where}: field {key!r} should be {names}, got {type(value).__name__}")
    return value


def items(container: Any, key: str | None, path: Path) -> list:
    """The list of records of an annotation file: the file itself (key None) or container[key]."""
    value = container if key is None else get(container, key, path, "top level", list)
    if not isinstance(value, list):
        raise EvalDataError(f"{path}: top level: expected a JSON list, got {type(value).__name__}")
    return value
