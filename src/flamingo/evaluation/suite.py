"""`evaluate`: run benchmarks end to end into an output directory, resumable and distributable.

    out/
      run.json                 model, data config and settings of the run (a resumed run must match)
      predictions/TASK.jsonl   one record per (shots, trial, query)
      results.json / results.md / results.png

Under torchrun, rank r evaluates queries r, r + world, ... into its own predictions file and
rank 0 merges them and writes the results.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from flamingo.data.benchmarks.data_config import DataConfig, SplitPaths
from flamingo.data.benchmarks.loaders import LOADERS
from flamingo.data.benchmarks.samples import EvalDataError
from flamingo.data.benchmarks.tasks import TaskSpec, get_task
from flamingo.evaluation.records import RecordWriter, merge_shards, read_all, record_key
from flamingo.evaluation.report import summarize, write_reports
from flamingo.evaluation.rices import cache_path
from flamingo.evaluation.runner import TaskEvaluator
from flamingo.evaluation.settings import EvalSettings
from flamingo.evaluation.subsets import Subsets, make_subsets
from flamingo.model.flamingo import Flamingo
from flamingo.outputs import cache_root, write_text_atomic


def world() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch, (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _barrier(size: int) -> None:
    if size > 1:
        torch.distributed.barrier()


def load_subsets(task: TaskSpec, data: DataConfig, settings: EvalSettings) -> Subsets:
    paths = data.task(task.name)
    for split, split_paths in (("test", paths.test), ("train", paths.train)):
        unread = [f.name for f in fields(SplitPaths) if getattr(split_paths, f.name) is not None
                  and f.name not in task.fields] if split_paths is not None else []
        if unread:  # most likely a field meant for another task: say so rather than ignore it
            raise EvalDataError(f"{data.path}: tasks.{task.name}.{split}: task {task.name} does not read "
                                f"{', '.join(unread)} (it reads: {', '.join(task.fields)})")
    loader = LOADERS[task.loader]
    train = loader(paths.train, "train", f"tasks.{task.name}.train") if paths.train is not None else None
    test = loader(paths.test, "test", f"tasks.{task.name}.test")
    if not test:
        raise EvalDataError(f"task {task.name}: the test split has no samples")
    return make_subsets(task, train, test, split=settings.split, support_size=settings.support_size,
                        support_per_class=settings.support_per_class, query_size=settings.query_size,
                        query_per_class=settings.query_per_class, seed=settings.seed,
                        zero_shot_examples=settings.zero_shot_examples)


def _check_run(out_dir: Path, identity: dict[str, Any]) -> None:
    """A resumed run must have the same model, data and settings as the one it continues."""
    path = out_dir / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        differ = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        if differ:
            raise EvalDataError(f"{path}: this output directory holds a run with different {', '.join(differ)}; "
                                f"use another --out (or delete it) to start a new run")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(identity, indent=2) + "\n")


def evaluate(model: Flamingo, tasks: list[str], data: DataConfig, settings: EvalSettings, out_dir: str | Path, *,
             model_name: str = "model", cache_dir: Path | None = None, progress: bool = True) -> dict | None:
    """Evaluate `model` on `tasks`; returns the results (rank 0; None on other ranks)."""
    settings.validate()
    specs = [get_task(name) for name in tasks]
    out_dir = Path(out_dir)
    rank, size = world()
    identity = {"model": model_name, "data": str(data.path), "settings": settings.to_dict()}
    if rank == 0:
        _check_run(out_dir, identity)
    _barrier(size)
    predictions = out_dir / "predictions"
    model.eval()
    summaries: dict[str, Any] = {}
    for task in specs:
        subsets = load_subsets(task, data, settings)
        if settings.ensemble and task.open_ended:
            subsets.notes.append("ensembling applies to close-ended tasks only: not used here")
        if task.zero_shot_only and any(s > 0 for s in settings.shots):
            subsets.notes.append("zero-shot benchmark: only 0 shots evaluated")
        evaluator = TaskEvaluator(model, task, subsets, settings, rank=rank, world=size, progress=progress)
        if settings.rices and any(s > 0 for s in settings.shots) and not task.zero_shot_only:
            cache = cache_path(cache_dir or cache_root() / "rices", model, task.name, settings.split)
            if rank == 0:  # one process computes the support features; the others read the cache
                evaluator.build_index(cache)
            _barrier(size)
            if rank != 0:
                evaluator.build_index(cache)
        done = {record_key(r["shots"], r["trial"], r["id"]) for r in read_all(predictions, task.name)}
        writer = RecordWriter(predictions, task.name, rank)
        try:
            evaluator.run(done, writer)
        finally:
            writer.close()
        _barrier(size)
        if rank == 0:
            records = merge_shards(predictions, task.name)
            summaries[task.name] = summarize(task, records, subsets.query, evaluator.plan(), evaluator.trial_info,
                                             subsets.notes, len(subsets.support))
            summaries[task.name]["missing_media"]["support_unreadable"] = len(evaluator.media.failed)
    if rank != 0:
        return None
    results = _merge_previous(out_dir, {**identity, "tasks": summaries})
    write_reports(out_dir, results)
    return results


def _merge_previous(out_dir: Path, results: dict) -> dict:
    """Keep the other tasks of an earlier invocation on the same output directory."""
    path = out_dir / "results.json"
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        results["tasks"] = {**{k: v for k, v in previous.get("tasks", {}).items() if k not in results["tasks"]},
                            **results["tasks"]}
    return results

