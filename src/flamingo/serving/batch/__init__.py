"""Offline batch inference (`flamingo batch`): a dataset of prompts through the serving engine, in
this process (`run_batch`) or across a Ray cluster (`flamingo.serving.batch.on_ray`).

Each record is checked exactly as the server checks a request (the same request models, limits and
door); continuous batching and the prefix cache do the rest: a few-shot support set that the whole
dataset shares is encoded once. Results go to a JSONL file, one line per record with its id; a
bad record is written to a rejects file with the reason, never fatal; a run that stops midway
leaves `OUT.partial`, and the same command resumes it.
"""

from typing import Any

# `from flamingo.serving.batch import run_batch` without importing the engine (and the serve extra's
# packages) when the command line only builds its parser.
_EXPORTS = {"BatchDefaults": "records", "RawRecord": "records", "read_records": "records",
            "BatchOutput": "runner", "BatchSummary": "runner", "RecordRunner": "runner", "run_batch": "runner"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
