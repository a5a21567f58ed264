"""Offline batch inference (`flamingo batch`): a dataset of prompts through the serving engine, in
this process (`run_batch`) or across a Ray cluster (`flamingo.serving.batch.on_ray`).

Each record is checked exactly as the server checks a request (the same request models, limits and
door); continuous batching and the prefix cache do the rest: a few-shot support set that the whole
dataset shares is encoded once. Results go to a JSONL file, one line per record with its id; a
bad record is written to a rejects file with the reason, never fatal; a run that stops midway
leaves `OUT.partial`, and the same command resumes it.
"""

from flamingo.serving.batch.records import BatchDefaults, RawRecord, read_records
from flamingo.serving.batch.runner import BatchOutput, BatchSummary, RecordRunner, run_batch

__all__ = ["BatchDefaults", "BatchOutput", "BatchSummary", "RawRecord", "RecordRunner", "read_records", "run_batch"]
