"""The per-sample predictions files: append-only JSONL, one per task and rank, read back on
resumption so that finished samples are not recomputed.

Rank r writes `predictions/TASK.jsonl` (r = 0) or `predictions/TASK.rank{r}.jsonl`; lines are
flushed and fsynced after each batch, so a killed run loses at most the batch in flight. A last
line cut short by the kill is dropped when the file is opened again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from flamingo.config_io import short
from flamingo.data.benchmarks.samples import EvalDataError

STATUSES = ("ok", "missing", "ooc")
DAMAGED = "the predictions file is damaged; delete it to recompute this task"


def record_key(shots: int, trial: int, sample_id: str) -> tuple[int, int, str]:
    return shots, trial, sample_id


def shard_path(directory: Path, task: str, rank: int) -> Path:
    return directory / (f"{task}.jsonl" if rank == 0 else f"{task}.rank{rank}.jsonl")


def _read_lines(path: Path) -> tuple[list[dict], bool]:
    """The complete records of a file and whether a torn (unparseable) last line was found."""
    records, torn = [], False
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise EvalDataError(f"{path}: not UTF-8 text (byte {err.start}; {DAMAGED})") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1:]):
                raise EvalDataError(f"{path}: line {i + 1} is not valid JSON ({DAMAGED})") from None
            torn = True
            continue
        problem = _record_problem(record)
        if problem:
            raise EvalDataError(f"{path}: line {i + 1}: {problem} ({DAMAGED})")
        records.append(record)
    return records, torn


def _record_problem(record: object) -> str | None:
    """What is wrong with a record read back (None: it has the shape the runner writes)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key, kind in (("shots", int), ("trial", int), ("id", str), ("status", str)):
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            return f"field {key!r}: expected {kind.__name__}, got {short(record.get(key))}"
    if record["status"] not in STATUSES:
        return f"field 'status': expected one of {', '.join(STATUSES)}, got {short(record['status'])}"
    if record["status"] == "ok":
        if "prediction" in record and not isinstance(record["prediction"], str):
            return f"field 'prediction': expected a string, got {short(record['prediction'])}"
        if "ranked" in record and not (isinstance(record["ranked"], list)
                                       and all(isinstance(r, str) for r in record["ranked"])):
            return f"field 'ranked': expected a list of strings, got {short(record['ranked'])}"
        if "scores" in record and not (isinstance(record["scores"], list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in record["scores"])):
            return f"field 'scores': expected a list of numbers, got {short(record['scores'])}"
        if not any(k in record for k in ("prediction", "ranked")):
            return "an 'ok' record without 'prediction' or 'ranked'"
    return None


def read_all(directory: Path, task: str) -> list[dict]:
    """Every record of a task, from all ranks' files."""
    out: list[dict] = []
    for path in sorted(directory.glob(f"{task}.jsonl")) + sorted(directory.glob(f"{task}.rank*.jsonl")):
        out += _read_lines(path)[0]
    return out


class RecordWriter:
    """Appends records to this rank's file (opened once; torn last line removed first)."""

    def __init__(self, directory: Path, task: str, rank: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = shard_path(directory, task, rank)
        if self.path.exists():
            records, torn = _read_lines(self.path)
            if torn:  # rewrite without the partial line, so the next append starts clean
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
                tmp.replace(self.path)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        self._file.write("".join(json.dumps(r) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def merge_shards(directory: Path, task: str) -> list[dict]:
    """Rank 0, after every rank finished: fold the other ranks' files into `TASK.jsonl`, sorted
    by (shots, trial, id); returns the records."""
    records = read_all(directory, task)
    records.sort(key=lambda r: (r["shots"], r["trial"], r["id"]))
    unique = {record_key(r["shots"], r["trial"], r["id"]): r for r in records}
    path = shard_path(directory, task, 0)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in unique.values()), encoding="utf-8")
    tmp.replace(path)
    for shard in directory.glob(f"{task}.rank*.jsonl"):
        shard.unlink()
    return list(unique.values())
