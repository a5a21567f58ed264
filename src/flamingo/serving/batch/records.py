"""What `flamingo batch` reads: records, from one of the three layouts `flamingo.data` reads.

- a JSONL file: one record per line, a JSON object: `id`, then either `prompt` (`<image>` where each
  image of `images` goes) or `messages` (OpenAI chat messages, as `/v1/chat/completions` takes them),
  and decoding options (`max_tokens`, `temperature`, `top_p`, `n`, `beams` or `num_beams`, `stop`,
  `seed`). Images are paths relative to the file's folder or data: URLs (base64);
- a folder of images (`x.png`, with an optional `x.json` holding the record's fields): one record
  per image, its id the file's stem;
- WebDataset shards (`.tar`, a brace pattern, or a folder of them): one record per sample, its
  images the sample's image members, its fields from an optional `json` member, its id the key.

Records of a folder or shards usually take the prompt of `BatchDefaults` (`--prompt`), which may
begin with a few-shot support set of its own images: the record's images go at its last
placeholders. Lines are parsed when the record runs, so a damaged line is a reject, not a crash.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from flamingo.config_io import short
from flamingo.data.config import DataError
from flamingo.data.media import IMAGE_EXTS
from flamingo.data.sources import CORRUPT_FIELD, UNSAFE_FIELD, count_shard_samples, iter_shard, list_folder, resolve_paths


@dataclass(frozen=True)
class BatchDefaults:
    """What a record that gives no prompt (or messages) is asked: `prompt`, whose last placeholders
    take the record's own images, after `prompt_images` (paths or data: URLs)."""

    prompt: str | None = None
    prompt_images: tuple[str, ...] = ()


@dataclass(frozen=True)
class RawRecord:
    """One record as read, before it is parsed and checked."""

    where: str  # for messages: "line 3", "shard-000.tar:0042", "cat.png"
    line: str | None = None  # a JSONL line
    key: str | None = None  # a sample's key (an image's stem, a shard sample's key): its id unless its JSON has one
    images: tuple[str, ...] = ()  # a sample's images: paths under the media root, or data: URLs
    meta: str | None = None  # a sample's JSON member (its record fields)
    error: str | None = None  # why it cannot be read (an undecodable line, a damaged shard)

    def as_row(self) -> dict[str, Any]:
        return {"where": self.where, "line": self.line, "key": self.key, "images": list(self.images),
                "meta": self.meta, "error": self.error}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RawRecord:
        return cls(row["where"], row.get("line"), row.get("key"), tuple(row.get("images") or ()), row.get("meta"),
                   row.get("error"))


@dataclass
class Dataset:
    """An input: its layout ("jsonl", "folder", "shards"), its files, the folder its relative image
    paths are read from (None for shards), and its number of records."""

    kind: str
    paths: list[Path]
    media_root: Path | None
    count: int

    def records(self) -> Iterator[RawRecord]:
        if self.kind == "jsonl":
            return _jsonl_records(self.paths[0])
        if self.kind == "folder":
            return iter(folder_records(self.paths[0]))
        return (record for shard in self.paths for record in _shard_records(shard))


def open_dataset(source: str | Path) -> Dataset:
    """The input named by `source` (a .jsonl file, a folder of images, shards); errors name it."""
    kind, paths = resolve_paths([str(source)])
    if kind == "jsonl":
        with open(paths[0], "rb") as f:
            count = sum(1 for line in f if line.strip())
        return Dataset(kind, paths, paths[0].parent, count)
    if kind == "folder":
        return Dataset(kind, paths, paths[0], len(folder_records(paths[0])))
    return Dataset(kind, paths, None, sum(count_shard_samples(p) for p in paths))


def read_records(source: str | Path) -> Iterator[RawRecord]:
    """The records of `source`, in stored order."""
    return open_dataset(source).records()


def _jsonl_records(path: Path) -> Iterator[RawRecord]:
    with open(path, "rb") as f:
        for number, data in enumerate(f, 1):
            if not data.strip():
                continue
            try:
                yield RawRecord(f"line {number}", line=data.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield RawRecord(f"line {number}", error=f"not UTF-8 text: {err.reason} at byte {err.start}")


def folder_records(folder: Path) -> list[RawRecord]:
    """One record per image of the folder (sorted by name), with its `x.json` fields if any."""
    try:
        samples = list_folder(folder, "pairs")
    except DataError:
        raise DataError(f"folder {folder}: no images ({', '.join(IMAGE_EXTS)}) to run") from None
    records = []
    for sample in samples:
        key = sample.name.rpartition("/")[2]
        if UNSAFE_FIELD in sample.fields:
            records.append(RawRecord(key, key=key, error=sample.fields[UNSAFE_FIELD]))
            continue
        images = tuple(sample.fields[ext].name for ext in sorted(sample.fields) if ext in IMAGE_EXTS)
        meta = sample.fields["json"].read_text("utf-8", errors="replace") if "json" in sample.fields else None
        records.append(RawRecord(images[0], key=key, images=images, meta=meta))
    return records


def _shard_records(path: Path) -> Iterator[RawRecord]:
    damage: list[str] = []
    samples = 0
    for sample in iter_shard(path, 0, lambda kind, message: damage.append(message)):
        samples += 1
        yield sample_record(sample.name, sample.name.rpartition(":")[2], sample.fields)
    if damage and not samples:  # a shard that cannot be opened: one reject says so
        yield RawRecord(path.name, error=damage[-1])


def sample_record(where: str, key: str, fields: dict[str, Any]) -> RawRecord:
    """The record of a WebDataset sample (extension -> bytes): its images as data: URLs."""
    if CORRUPT_FIELD in fields:
        return RawRecord(where, key=key, error=str(fields[CORRUPT_FIELD]))
    images = tuple(data_url(fields[ext], ext) for ext in sorted(fields) if ext.lower() in IMAGE_EXTS)
    meta = fields.get("json")
    if isinstance(meta, bytes):
        meta = meta.decode("utf-8", errors="replace")
    return RawRecord(where, key=key, images=images, meta=meta)


def data_url(data: bytes, ext: str = "png") -> str:
    """Image bytes as a data: URL, the form the server's media resolver reads (and checks)."""
    kind = {"jpg": "jpeg", "tif": "tiff"}.get(ext.lower(), ext.lower())
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def parse_fields(raw: RawRecord) -> dict[str, Any]:
    """The record's JSON object (a JSONL line or a sample's JSON member; {} for a bare sample).
    Raises ValueError naming the problem."""
    text = raw.line if raw.line is not None else raw.meta
    if text is None:
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err.msg} at column {err.colno}: {short(text[:80])}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {short(doc)}")
    return doc
