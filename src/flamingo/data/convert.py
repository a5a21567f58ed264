"""Dataset conversion and validation: a folder / JSONL file into WebDataset tar shards (every
media reference confined to the dataset folder, every image decoded and checked before it enters
a shard, written to a staging folder and published atomically), and a full read of a dataset
through the training pipeline counting the good and the bad samples by reason."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flamingo.data.config import KINDS, DataError, DatasetConfig
from flamingo.data.media import VIDEO_EXTS, SkipSample, decode_image, decode_video_clip, load_frames
from flamingo.data.sources import (
    CAPTION_EXTS,
    UNSAFE_FIELD,
    Record,
    confined,
    count_shard_samples,
    frame_files,
    parse_json,
    resolve_paths,
)
from flamingo.model.image_processing import DEFAULT_MAX_PIXELS
from flamingo.outputs import OVERWRITE_HINT, OutputExistsError, publish, staging_dir

_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


# ------------------------------------------------------------------------------- convert
@dataclass
class ConvertReport:
    shards: list[Path] = field(default_factory=list)
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    images_dropped: Counter = field(default_factory=Counter)
    messages: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"wrote {self.written} samples to {len(self.shards)} shard(s)"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        if self.images_dropped:
            text += "; images dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.images_dropped.items()))
        return text


def _read(source: Any, name: str, missing: str) -> bytes:
    if isinstance(source, Path):
        if not source.is_file():
            raise SkipSample(missing, f"{name}: file {source} does not exist")
        return source.read_bytes()
    return source


def _checked_image(name: str, source: Any, max_pixels: int) -> tuple[str, bytes]:
    """(extension, bytes) of an image that decodes completely (see decode_image); the extension
    is that of its actual format."""
    data = _read(source, name, "missing_image")
    image = decode_image(data, name, max_pixels)
    return _FORMATS.get(image.format or "", "jpg"), data


def _checked_video(name: str, source: Any) -> tuple[str, bytes]:
    """(extension, bytes) of a video file whose first frame decodes."""
    data = _read(source, name, "missing_video")
    decode_video_clip(data, name, frames=1, fps=1.0, rng=np.random.default_rng(0))
    suffix = source.suffix.lower().lstrip(".") if isinstance(source, Path) else ""
    return (suffix if suffix in VIDEO_EXTS else "mp4"), data


def _checked_frames(frames: list[tuple[str, Any]], max_pixels: int) -> dict[str, bytes]:
    """Members frame000000.EXT ... of frames (name, file or bytes) that all decode."""
    data = [(name, _read(source, name, "missing_video")) for name, source in frames]
    images = load_frames(data, max_pixels)
    return {f"frame{i:06d}.{_FORMATS.get(image.format or '', 'jpg')}": raw
            for i, (image, (_, raw)) in enumerate(zip(images, data))}


def _caption_of(record: Record, doc: dict | None) -> bytes:
    for ext in CAPTION_EXTS:
        if ext in record.fields:
            return record.read(ext)
    if isinstance(doc, dict):
        for key in ("caption", "text"):
            if isinstance(doc.get(key), str):
                return doc[key].encode("utf-8")
    raise SkipSample("missing_caption", f"{record.name}: no caption (.txt file or 'caption' field)")


def _convert_record(record: Record, kind: str, frame_folder_fps: float, max_pixels: int,
                    dropped: Counter) -> dict[str, bytes]:
    """The members (extension -> bytes) of the shard sample of one folder/JSONL record. Every
    image is decoded first (a video file: its first frame): only valid media enter a shard."""
    from flamingo.data.processing import pair_image, parse_document, resolve_media

    if UNSAFE_FIELD in record.fields:
        raise SkipSample("unsafe_path", str(record.fields[UNSAFE_FIELD]))
    doc = None
    if "jsonl" in record.fields:
        doc = parse_json(record, "jsonl")
        if not isinstance(doc, dict):
            raise SkipSample("undecodable", f"{record.name}: expected a JSON object, got {type(doc).__name__}")
    out: dict[str, bytes] = {}
    if kind == "pairs":
        out["txt"] = _caption_of(record, doc)
        ext, data = _checked_image(*pair_image(record, doc), max_pixels)
        out[ext] = data
        out["json"] = json.dumps({"source": record.name}).encode()
    elif kind == "interleaved":
        if doc is None:
            doc = parse_json(record, "json")
        texts: list[str | None] = []
        images: list[str | None] = []
        for seg_kind, value in parse_document(doc, record.name):
            if seg_kind == "text":
                texts.append(value)
                images.append(None)
                continue
            try:
                ext, data = _checked_image(*resolve_media(value, record), max_pixels)
            except SkipSample as skip:
                dropped[skip.reason] += 1
                continue
            member = f"img{sum(m is not None for m in images)}.{ext}"
            out[member] = data
            texts.append(None)
            images.append(member)
        out["json"] = json.dumps({"texts": texts, "images": images, "source": record.name}).encode()
    else:
        out["txt"] = _caption_of(record, doc)
        fps = frame_folder_fps
        ext = next((e for e in VIDEO_EXTS if e in record.fields), None)
        frame_keys = sorted(k for k in record.fields if k.startswith("frame"))
        if ext is not None:
            ext, data = _checked_video(f"{record.name}.{ext}", record.fields[ext])
            out[ext] = data
        elif frame_keys:
            out.update(_checked_frames([(f"{record.name}.{k}", record.fields[k]) for k in frame_keys], max_pixels))
        elif doc is not None and doc.get("video") is not None:
            name, source = resolve_media(doc["video"], record, "video")
            if isinstance(doc.get("fps"), (int, float)):
                fps = float(doc["fps"])
            if isinstance(source, Path) and source.is_dir():
                files = [confined(f, record, "frame") for f in frame_files(source)]
                if not files:
                    raise SkipSample("missing_video", f"frame folder {source} has no image files")
                out.update(_checked_frames([(str(f), f) for f in files], max_pixels))
            else:
                ext, data = _checked_video(name, source)
                out[ext] = data
        else:
            raise SkipSample("missing_video", f"{record.name}: no video file, frame folder or 'video' field")
        out["json"] = json.dumps({"source": record.name, "fps": fps}).encode()
    return out


def convert_to_shards(source: str, out_dir: str | Path, kind: str, shard_size: int = 1000, prefix: str = "shard",
                      shuffle: bool = True, seed: int = 0, frame_folder_fps: float = 1.0,
                      max_pixels: int = DEFAULT_MAX_PIXELS, allow_absolute_paths: bool = False,
                      overwrite: bool = False) -> ConvertReport:
    """Write the samples of a folder or JSONL file as WebDataset shards OUT_DIR/PREFIX-000000.tar...

    Samples are written in a seeded random order (shuffle=True) so that reading shards in
    order is already well mixed. Every image is decoded before it is copied (bytes unchanged);
    samples whose media are missing, undecodable or outside the dataset folder (unless
    `allow_absolute_paths`) are skipped and counted; interleaved documents lose such images.
    Existing shards with this prefix are refused unless `overwrite`. The shards are written in a
    temporary folder next to OUT_DIR and moved into it at the end: an interrupted conversion
    leaves no shard behind.
    """
    from webdataset import ShardWriter

    from flamingo.data.sources import list_folder, list_jsonl

    if kind not in KINDS:
        raise DataError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"shard_size: expected an integer >= 1, got {shard_size!r}")
    if "/" in prefix or "%" in prefix or not prefix or prefix.startswith("."):
        raise DataError(f"prefix: expected a plain file name prefix, got {prefix[:100]!r}")
    layout, paths = resolve_paths([source])
    if layout == "shards":
        raise DataError(f"{source}: already WebDataset shards; convert reads a folder or a .jsonl file")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output folder {out} exists and is not a folder")
    existing = sorted(out.glob(f"{prefix}-*.tar")) if out.is_dir() else []
    if existing and not overwrite:
        raise OutputExistsError(f"output folder {out} already has shards ({existing[0].name}, ...); "
                                f"choose another folder or --prefix, or {OVERWRITE_HINT}")
    records = (list_folder(paths[0], kind, allow_absolute_paths) if layout == "folder"
               else list_jsonl(paths[0], allow_absolute_paths))
    if shuffle:
        records = [records[int(i)] for i in np.random.default_rng(seed).permutation(len(records))]
    report = ConvertReport()
    with staging_dir(out) as staged:
        with ShardWriter(str(staged / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0, encoder=False,
                         mtime=0) as writer:
            for record in records:
                try:
                    members = _convert_record(record, kind, frame_folder_fps, max_pixels, report.images_dropped)
                except SkipSample as skip:
                    report.skipped[skip.reason] += 1
                    report.messages[skip.reason] = skip.message
                    continue
                writer.write({"__key__": f"{report.written:09d}", **members})
                report.written += 1
        if report.written == 0:
            raise DataError(f"{source}: no sample could be converted ({report.summary()}); "
                            + "; ".join(report.messages.values()))
        written = sorted(staged.glob(f"{prefix}-*.tar"))
        if not out.exists():
            publish(staged, out)
        else:
            for shard in written:
                publish(shard, out / shard.name)
            for old in existing:
                if old.name not in {s.name for s in written}:
                    old.unlink()
    report.shards = [out / shard.name for shard in written]
    return report


# ------------------------------------------------------------------------------ validate
@dataclass
class ValidationReport:
    path: str
    kind: str
    layout: str
    shards: dict[str, int]
    stats: Any  # DataStats

    @property
    def bad(self) -> int:
        return self.stats.records - self.stats.samples

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "layout": self.layout, "shards": self.shards,
                "ok": self.stats.samples, "bad": self.bad, **self.stats.as_dict()}

    def summary(self) -> str:
        lines = [f"{self.path}: {self.kind} data, {self.layout}"
                 + (f", {len(self.shards)} shard(s)" if self.shards else ""),
                 f"  records: {self.stats.records}   ok: {self.stats.samples}   bad: {self.bad}"]
        for reason, count in sorted(self.stats.skipped.items()):
            lines.append(f"  skipped {reason}: {count}   e.g. {self.stats.messages.get('skipped/' + reason, '')}")
        for reason, count in sorted(self.stats.images_removed.items()):
            lines.append(f"  images removed ({reason}): {count}   e.g. "
                         f"{self.stats.messages.get('images_removed/' + reason, '')}")
        return "\n".join(lines)


class _CountingTokenizer:
    """Stands in for a tokenizer when validating: one id per word (ids >= 10)."""

    bos_token_id = None
    pad_token_id = 0

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [[10 + len(w) for w in t.split()] for t in texts]}


def validate_data(path: str | list[str], kind: str, workers: int = 0, **options: Any) -> ValidationReport:
    """Read every sample once (in stored order) through the training pipeline (decoding, filters,
    frame sampling; no augmentation, the whole document as one subsequence) and count the good
    and the bad ones by reason. `options` are further DatasetConfig fields (e.g. min_image_side)."""
    from flamingo.data.loader import FlamingoLoader
    from flamingo.model.image_processing import ImageProcessor

    big = 1 << 30
    config = DatasetConfig(**{"name": "validate", "kind": kind, "path": path, "shuffle": False, "epochs": 1,
                              "augment": False, "max_tokens": big, "max_images": big, "num_workers": workers,
                              "batch_size": 1, **options})
    loader = FlamingoLoader(config, _CountingTokenizer(), 1, 2, ImageProcessor(8, (0.5,) * 3, (0.5,) * 3))
    for _ in loader.samples():
        pass
    shards = {str(p): count_shard_samples(p) for p in loader.source.shards}
    return ValidationReport(str(path), kind, loader.source.layout, shards, loader.stats)
