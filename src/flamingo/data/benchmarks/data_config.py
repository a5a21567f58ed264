"""Where each benchmark's files are: a YAML file mapped to dataclasses.

    root: /datasets              # optional; relative paths resolve against it (default: this file's folder)
    tasks:
      coco:
        test:  {annotations: coco/dataset_coco.json, media: coco/images}
        train: {annotations: coco/dataset_coco.json, media: coco/images}
      vqav2:
        test:  {questions: vqav2/v2_OpenEnded_mscoco_val2014_questions.json,
                annotations: vqav2/v2_mscoco_val2014_annotations.json, media: coco/val2014}
        train: {questions: ..., annotations: ..., media: coco/train2014}

`test` is the official evaluation split (the test query set, B.1.4); `train` provides the support
sets and the validation query set. Without `train`, support examples come from the `test` split
with the query samples held out (recorded in the results). The fields each task reads are listed
in `tasks.py` (`TASKS[name].fields`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flamingo.config_io import load_structured, short
from flamingo.data.benchmarks.samples import EvalDataError

SPLITS = ("train", "test")


@dataclass
class SplitPaths:
    annotations: Path | None = None  # the main annotation file (JSON / JSONL / CSV)
    questions: Path | None = None  # VQA-style question file (VQAv2, OK-VQA)
    media: Path | None = None  # folder of the images / videos (class folders for ImageNet)
    class_names: Path | None = None  # JSON {folder: class name} (ImageNet)
    relevance: Path | None = None  # VisDial dense annotations
    video_map: Path | None = None  # id -> file name (MSVD youtube_mapping.txt, NextQA map_vid_vidorID.json)
    media_pattern: str | None = None  # file name under `media`, formatted with the record's fields

    def required(self, name: str, where: str) -> Path:
        """The path field `name`, which the task needs (`where`: "tasks.NAME.SPLIT", for the error)."""
        value = getattr(self, name)
        if value is None:
            raise EvalDataError(f"data config: {where}.{name} is required for this task")
        return value


@dataclass
class TaskData:
    test: SplitPaths
    train: SplitPaths | None = None


@dataclass
class DataConfig:
    path: Path
    tasks: dict[str, TaskData]

    def task(self, name: str) -> TaskData:
        if name not in self.tasks:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise EvalDataError(f"{self.path}: tasks: no entry for task {name!r} (it has: {known})")
        return self.tasks[name]


_PATH_FIELDS = {f.name for f in fields(SplitPaths)} - {"media_pattern"}


def _split(raw: Any, root: Path, where: str, path: Path) -> SplitPaths:
    if not isinstance(raw, dict):
        raise EvalDataError(f"{path}: {where}: expected a mapping of file fields, got {type(raw).__name__}")
    known = {f.name for f in fields(SplitPaths)}
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        raise EvalDataError(f"{path}: {where}: unknown field(s) {short(unknown)} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise EvalDataError(f"{path}: {where}.{key}: expected a string, got {type(value).__name__}")
        values[key] = (root / Path(value).expanduser()) if key in _PATH_FIELDS else value
    return SplitPaths(**values)


def load_data_config(path: str | Path) -> DataConfig:
    path = Path(path)
    raw = load_structured(path, "data config file", EvalDataError)
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict):
        raise EvalDataError(f"{path}: tasks: expected a top-level 'tasks' mapping of task name -> splits")
    unknown = sorted(set(raw) - {"root", "tasks"}, key=str)
    if unknown:
        raise EvalDataError(f"{path}: unknown top-level field(s) {short(unknown)} (known: root, tasks)")
    root = path.parent
    if raw.get("root") is not None:
        if not isinstance(raw["root"], str):
            raise EvalDataError(f"{path}: root: expected a string")
        root = root / Path(raw["root"]).expanduser()
    tasks = {}
    for name, entry in raw["tasks"].items():
        if not isinstance(entry, dict) or "test" not in entry:
            raise EvalDataError(f"{path}: tasks.{str(name)[:80]}: expected a mapping with a 'test' split (and optionally 'train')")
        extra = sorted(set(entry) - set(SPLITS), key=str)
        if extra:
            raise EvalDataError(f"{path}: tasks.{str(name)[:80]}: unknown split(s) {short(extra)} (known: train, test)")
        tasks[str(name)] = TaskData(
            test=_split(entry["test"], root, f"tasks.{name}.test", path),
            train=_split(entry["train"], root, f"tasks.{name}.train", path) if entry.get("train") is not None else None)
    return DataConfig(path, tasks)
