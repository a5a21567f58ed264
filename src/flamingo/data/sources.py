"""Where samples come from, and in which order each rank reads them.

A *record* is one raw sample: a dict of fields (extension -> bytes for WebDataset shards, or ->
a `Path` read lazily for folders) with a stable id `uid`. Three layouts are read:

- WebDataset tar shards (the layout of LAION / MMC4 / OBELICS releases): files `KEY.EXT` grouped
  by key, read with the `webdataset` library's tar iterator and key grouping;
- a folder: pairs `x.jpg` + `x.txt`, videos `x.mp4` + `x.txt` or frame folders `x/` + `x.txt`,
  interleaved documents `x.json` (images referenced by paths relative to the folder);
- a JSONL file: one sample per line (paths relative to the file's folder).

Media files of a folder or JSONL dataset must lie inside its root (the folder, or the JSONL
file's folder) once symlinks are resolved: an absolute path, a `..` or a symlink leading out of
it is refused (the sample is skipped as `unsafe_path`) unless `allow_absolute_paths` is set, so a
dataset cannot make a conversion copy arbitrary local files into shards.

Order. Epoch e (counted from 0) has its own order, the same on every rank: folder/JSONL records
are permuted (seeded by seed, dataset name and epoch); shards are permuted and each shard is read
through a shuffle buffer seeded by (seed, name, epoch, shard). Rank r of W then reads: with at
least W shards, the shards at positions r, r+W, ... of the epoch's shard order (a shard-level
split); otherwise (and for folders/JSONL) the records at positions i = r (mod W) of the epoch's
record stream (a sample-level split). Both cover every record exactly once per epoch.

Position. `RankStream.records(position)` starts after `position` records of this rank's endless
stream (epoch after epoch), without decoding anything before it: whole shards are skipped by
counting their samples from the tar headers, a partly read shard is replayed without decoding.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from flamingo.data.config import DataError
from flamingo.data.media import IMAGE_EXTS, VIDEO_EXTS, SkipSample

CAPTION_EXTS = ("txt", "caption", "text")
CORRUPT_FIELD = "__corrupt__"  # a placeholder record of a damaged shard
UNSAFE_FIELD = "__unsafe__"  # a folder sample with a file leading outside the dataset folder
ALLOW_HINT = "pass --allow-absolute-paths (allow_absolute_paths: true) if you trust the dataset"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped metadata members


@dataclass
class Record:
    """One raw sample. `fields`: extension -> bytes (shards) or Path (folders); `doc`: a parsed
    JSON line (JSONL); `base`: folder that relative paths in the sample are resolved against
    (None inside shards); `uid`: (unit, index) stable across epochs, ranks and world sizes;
    `allow_outside`: media paths may lead outside `base` (see the module docstring)."""

    uid: tuple[int, int]
    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    base: Path | None = None
    allow_outside: bool = False

    def read(self, ext: str) -> bytes:
        value = self.fields[ext]
        return value.read_bytes() if isinstance(value, Path) else value


def outside_root(path: Path, root: Path) -> str | None:
    """Why `path` is not inside `root` once symlinks are resolved ("absolute" / "links" / ".."),
    or None when it is."""
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if inside:
        return None
    if path.is_absolute() and not path.is_relative_to(root):
        return "absolute"
    return ".." if ".." in path.parts else "links"


def confined(path: Path, record: Record, what: str) -> Path:
    """`path` (a media file or folder of `record`), or SkipSample("unsafe_path") when it leads
    outside the dataset root and the record does not allow that."""
    if record.allow_outside or record.base is None:
        return path
    problem = outside_root(path, record.base)
    if problem is None:
        return path
    how = {"absolute": "is an absolute path outside", "..": "climbs out of", "links": "is a link leading out of"}
    raise SkipSample("unsafe_path", f"{record.name}: {what} {str(path)[:200]} {how[problem]} the dataset folder "
                                    f"{record.base}; {ALLOW_HINT}")


def keyed_rng(*keys: int | str) -> np.random.Generator:
    """A generator determined by its keys alone (non-negative ints, and strings by their CRC32):
    the same stream in every run, process and rank, whatever else drew random numbers before."""
    return np.random.default_rng([key if isinstance(key, int) else zlib.crc32(key.encode("utf-8")) for key in keys])


# ----------------------------------------------------------------------------- resolving
def resolve_paths(paths: list[str]) -> tuple[str, list[Path]]:
    """("shards", tar files) | ("folder", [dir]) | ("jsonl", [file]). Errors name the path."""
    from braceexpand import braceexpand  # installed with webdataset

    shards: list[Path] = []
    others: list[tuple[str, Path]] = []
    for pattern in paths:
        expanded = list(braceexpand(os.path.expanduser(pattern)))
        for item in expanded:
            if any(ch in item for ch in "*?["):
                matches = sorted(glob.glob(item))
                if not matches:
                    raise DataError(f"path {pattern!r}: the pattern {item!r} matches no file")
                for m in matches:
                    if m.endswith(".tar"):
                        shards.append(Path(m))
                    else:
                        others.append(("?", Path(m)))
                continue
            p = Path(item)
            if not p.exists():
                raise DataError(f"path {pattern!r}: {item} does not exist")
            if p.is_file() and p.name.endswith(".tar"):
                shards.append(p)
            elif p.is_file() and p.suffix == ".jsonl":
                others.append(("jsonl", p))
            elif p.is_dir():
                tars = sorted(p.glob("*.tar"))
                if tars:
                    shards.extend(tars)
                else:
                    others.append(("folder", p))
            else:
                raise DataError(f"path {pattern!r}: {item} is not a .tar shard, a .jsonl file or a folder")
    if shards and others:
        raise DataError(f"paths {paths!r} mix tar shards with {others[0][1]}: give shards, or one folder, "
                        "or one .jsonl file")
    if shards:
        unique = sorted(set(shards), key=lambda p: str(p))
        return "shards", unique
    if len(others) != 1 or others[0][0] == "?":
        raise DataError(f"paths {paths!r}: expected tar shards, one folder or one .jsonl file, "
                        f"got {[str(p) for _, p in others]}")
    return others[0][0], [others[0][1]]


# --------------------------------------------------------------------------------- shards
def _shard_members(path: Path) -> Iterator[tuple[str, str]]:
    """(key, extension) of the members of a shard, as webdataset groups them, from the headers
    only (tarfile seeks over the data of a file on disk). A member whose data runs past the end
    of the file raises tarfile.ReadError (a truncated shard)."""
    from webdataset.tariterators import base_plus_ext

    size = path.stat().st_size
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.offset_data + info.size > size:
                raise tarfile.ReadError(f"{path}: truncated inside {info.name}")
            if not info.isreg() or _META.match(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is not None:
                yield key, ext
            tar.members = []
        end = tar.offset  # tarfile stops quietly at a damaged header: check what follows
    with open(path, "rb") as f:
        f.seek(end)
        tail = 0
        while chunk := f.read(1 << 16):
            if chunk.count(0) != len(chunk):
                raise tarfile.ReadError(f"{path}: unreadable data after offset {end}")
            tail += len(chunk)
    if tail < 1024:  # no end-of-archive marker: the file was cut
        raise tarfile.ReadError(f"{path}: truncated (no end-of-archive marker)")


def scan_shard(path: Path) -> tuple[int, str | None]:
    """(records, damage) of a shard: its samples (runs of one key) plus, for a damaged shard, one
    record standing for its unreadable rest (read back as `corrupt_shard`, so the damage is
    counted), and a message describing the damage (None for a sound shard)."""
    count, last = 0, None
    try:
        for key, _ in _shard_members(path):
            if key != last:
                count, last = count + 1, key
    except (tarfile.TarError, OSError, EOFError) as err:
        return count + 1, f"shard {path} is damaged: {err}"
    return count, None


def count_shard_samples(path: Path) -> int:
    return scan_shard(path)[0]


def iter_shard(path: Path, unit: int, on_error: Callable[[str, str], None]) -> Iterator[Record]:
    """The samples of one shard in stored order (webdataset tar iterator + key grouping). In a
    damaged shard, the sample being read when the damage was met may lack members: it comes as a
    placeholder record (CORRUPT_FIELD: what was wrong), and the shard ends there."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    damage: list[str] = []

    def handler(exn: Exception) -> bool:
        # webdataset appends its stream and URL to the exception (args, " @ <stream>"): keep the reason
        reason = str(exn.args[0] if exn.args else exn).partition(" @ <")[0]
        damage.append(f"shard {path}: {type(exn).__name__}: {reason}")
        on_error("corrupt_shard", damage[-1])
        return False  # stop reading this shard, keep what was read

    try:
        stream = open(path, "rb")
    except OSError as err:
        on_error("corrupt_shard", f"shard {path}: cannot open: {err}")
        return
    with stream:
        files = tar_file_expander([{"url": str(path), "stream": stream}], handler=handler)
        for index, sample in enumerate(group_by_keys(files, handler=handler)):
            name = f"{path.name}:{sample['__key__']}"
            if damage:  # grouped after the damage: possibly cut short
                yield Record((unit, index), name, {CORRUPT_FIELD: damage[-1]}, None)
                return
            yield Record((unit, index), name, {k: v for k, v in sample.items() if not k.startswith("__")}, None)


# --------------------------------------------------------------------------- folder/JSONL
def frame_files(folder: Path) -> list[Path]:
    """The image files of a frame folder, in name order."""
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTS)


def list_folder(folder: Path, kind: str, allow_outside: bool = False) -> list[Record]:
    """The samples of a folder, sorted by name (see the module docstring for the layouts). A
    sample with a file leading outside the folder gets an UNSAFE_FIELD saying so (unless
    `allow_outside`)."""
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    records: list[Record] = []

    def add(key: str, fields: dict[str, Any]) -> None:
        record = Record((0, len(records)), f"{folder.name}/{key}", fields, folder, allow_outside)
        for value in fields.values():
            try:
                confined(value, record, "file")
            except SkipSample as skip:
                record.fields = {UNSAFE_FIELD: skip.message}
                break
        records.append(record)

    if kind == "interleaved":
        for p in entries:
            if p.is_file() and p.suffix == ".json":
                add(p.stem, {"json": p})
        if not records:
            raise DataError(f"folder {folder}: no interleaved documents: expected NAME.json files "
                            f"(a document with 'texts' and 'images' or 'text_list' and 'image_info')")
        return records

    by_stem: dict[str, dict[str, Path]] = {}
    dirs: dict[str, Path] = {}
    for p in entries:
        if p.is_dir():
            dirs[p.name] = p
        elif p.is_file() and "." in p.name:
            stem, ext = p.name.split(".", 1)
            by_stem.setdefault(stem, {})[ext.lower()] = p
    media_exts = IMAGE_EXTS if kind == "pairs" else VIDEO_EXTS
    for stem in sorted(set(by_stem) | (set(dirs) if kind == "video" else set())):
        files = by_stem.get(stem, {})
        if not any(e in files for e in media_exts) and not (kind == "video" and stem in dirs):
            continue
        fields: dict[str, Any] = dict(files)
        if kind == "video" and stem in dirs and not any(e in files for e in media_exts):
            for i, f in enumerate(frame_files(dirs[stem])):
                fields[f"frame{i:06d}.{f.suffix.lower().lstrip('.')}"] = f
        add(stem, fields)
    if not records:
        what = ("image files with captions (x.jpg + x.txt)" if kind == "pairs"
                else "video files or frame folders with captions (x.mp4 + x.txt, or x/ + x.txt)")
        raise DataError(f"folder {folder}: no {kind} samples found: expected {what}")
    return records


def list_jsonl(path: Path, allow_outside: bool = False) -> list[Record]:
    """One record per non-empty line; lines are parsed when processed (bad ones are counted)."""
    records = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                records.append(Record((0, len(records)), f"{path.name}:{lineno}", {"jsonl": line}, path.parent,
                                      allow_outside))
    if not records:
        raise DataError(f"JSONL file {path} has no samples (it is empty)")
    return records


# --------------------------------------------------------------------------------- stream
def shuffle_buffer(records: Iterator[Record], size: int, rng: np.random.Generator) -> Iterator[Record]:
    """Deterministic buffer shuffle (webdataset's scheme, with an explicit generator)."""
    if size <= 1:
        yield from records
        return
    buffer: list[Record] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        i = int(rng.integers(len(buffer)))
        yield buffer[i]
        buffer[i] = record
    order = rng.permutation(len(buffer))
    for i in order:
        yield buffer[i]


class Source:
    """The records of one dataset and their order per epoch (the same on every rank)."""

    def __init__(self, paths: list[str], kind: str, name: str, seed: int, shuffle: bool, buffer: int,
                 allow_outside: bool = False) -> None:
        self.layout, files = resolve_paths(paths)
        self.kind, self.name, self.seed, self.shuffle, self.buffer = kind, name, seed, shuffle, buffer
        self.shards: list[Path] = files if self.layout == "shards" else []
        self.records: list[Record] = []
        if self.layout == "folder":
            self.records = list_folder(files[0], kind, allow_outside)
        elif self.layout == "jsonl":
            self.records = list_jsonl(files[0], allow_outside)
        self._counts: dict[int, int] = {}
        self._damage: dict[int, str | None] = {}

    # -- units: shards or, for folders/JSONL, single records
    @property
    def num_units(self) -> int:
        return len(self.shards) if self.layout == "shards" else len(self.records)

    def unit_count(self, unit: int) -> int:
        if self.layout != "shards":
            return 1
        if unit not in self._counts:
            self._counts[unit], self._damage[unit] = scan_shard(self.shards[unit])
        return self._counts[unit]

    def unit_order(self, epoch: int) -> list[int]:
        n = self.num_units
        if not self.shuffle:
            return list(range(n))
        return [int(i) for i in keyed_rng(self.seed, self.name, epoch).permutation(n)]

    def unit_records(self, unit: int, epoch: int) -> Iterator[Record]:
        if self.layout != "shards":
            yield self.records[unit]
            return
        records = self._exact_shard(unit)
        if self.shuffle and self.buffer > 1:
            records = shuffle_buffer(records, self.buffer, keyed_rng(self.seed, self.name, epoch, unit + 1))
        yield from records

    def _exact_shard(self, unit: int) -> Iterator[Record]:
        """Exactly `unit_count(unit)` records: a shard whose data turns out damaged yields
        placeholder records for the samples its headers announced (they are counted as
        `corrupt_shard`), so positions stay exact whatever the damage."""
        expected = self.unit_count(unit)
        errors: list[str] = []
        produced = 0
        for record in iter_shard(self.shards[unit], unit, lambda reason, msg: errors.append(msg)):
            if produced == expected:
                break
            yield record
            produced += 1
        message = (self._damage.get(unit) or (errors[-1] if errors else None)
                   or f"shard {self.shards[unit]}: fewer samples than its headers announce")
        for index in range(produced, expected):
            yield Record((unit, index), f"{self.shards[unit].name}:#{index}", {CORRUPT_FIELD: message}, None)


class RankStream:
    """The endless record stream of one rank (see the module docstring)."""

    def __init__(self, source: Source, rank: int, world_size: int) -> None:
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise DataError(f"rank/world_size: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.source, self.rank, self.world = source, rank, world_size
        self.shard_split = source.layout == "shards" and source.num_units >= world_size

    def _units(self, epoch: int) -> list[int]:
        order = self.source.unit_order(epoch)
        return order[self.rank::self.world] if self.shard_split else order

    def epoch_length(self, epoch: int) -> int:
        """Records this rank reads in `epoch` (counts shard samples from tar headers)."""
        if self.shard_split:
            return sum(self.source.unit_count(u) for u in self._units(epoch))
        total = sum(self.source.unit_count(u) for u in range(self.source.num_units))
        return max(0, (total - self.rank + self.world - 1) // self.world)

    def locate(self, position: int, epochs: int | None = None) -> tuple[int, int]:
        """(epoch, records into that epoch) of this rank's `position`-th record."""
        epoch = 0
        while True:
            if epochs is not None and epoch >= epochs:
                return epoch, 0
            length = self.epoch_length(epoch)
            if length == 0:
                raise DataError(self._empty_message())
            if position < length:
                return epoch, position
            position -= length
            epoch += 1

    def _empty_message(self) -> str:
        where = ", ".join(str(s) for s in self.source.shards[:3]) or self.source.name
        return (f"dataset {self.source.name!r}: rank {self.rank} of {self.world} gets no samples "
                f"(the data at {where} has fewer samples than ranks, or its shards are empty/unreadable)")

    def epoch_records(self, epoch: int, skip: int = 0) -> Iterator[Record]:
        """This rank's records of `epoch`, after the first `skip` of them."""
        units = self._units(epoch)
        if self.shard_split:
            for unit in units:
                count = self.source.unit_count(unit)
                if skip >= count:
                    skip -= count
                    continue
                for i, record in enumerate(self.source.unit_records(unit, epoch)):
                    if i >= skip:
                        yield record
                skip = 0
            return
        # Sample-level split: global stream index g belongs to rank g % world.
        g = 0
        first = skip * self.world + self.rank  # global index of the first record wanted
        for unit in units:
            count = self.source.unit_count(unit)
            if g + count <= first:
                g += count
                continue
            for record in self.source.unit_records(unit, epoch):
                if g >= first and g % self.world == self.rank:
                    yield record
                g += 1

    def records(self, epoch: int, skip: int, epochs: int | None = None) -> Iterator[tuple[int, Record]]:
        """(epoch, record) from `skip` records into `epoch`, on through later epochs."""
        while epochs is None or epoch < epochs:
            produced = 0
            for record in self.epoch_records(epoch, skip):
                produced += 1
                yield epoch, record
            if produced == 0 and skip == 0:
                raise DataError(self._empty_message())
            epoch, skip = epoch + 1, 0


def parse_json(record: Record, field_name: str) -> Any:
    """Decode a JSON field of a record; undecodable JSON is a skipped sample."""
    try:
        raw = record.read(field_name)
        return json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as err:
        raise SkipSample("undecodable", f"{record.name}: {field_name} is not valid JSON: {err}") from None
