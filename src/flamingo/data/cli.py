"""`flamingo data`: convert a folder / JSONL file into WebDataset shards, validate a dataset
(counts and bad samples by reason), write the tiny shapes dataset, and remove training images
that duplicate evaluation images.

    flamingo data convert SRC OUT_DIR --kind pairs [--shard-size 1000] [--seed 0] [--no-shuffle]
    flamingo data validate PATH --kind pairs [--json] [--strict]
    flamingo data shapes OUT_DIR --kind interleaved [--n 32] [--seed 0]
    flamingo data clipart OUT_DIR [--n 10000] [--tasks caption,qa,scene,binding,induction]
    flamingo data dedup SHARDS --eval coco=val2014/ --out OUT [--cosine 0.85] [--hash-distance 6]

`add_data_subcommands(subparsers)` registers them on the `flamingo` command's subparsers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flamingo.cli_options import float_range, int_range, positive_int, seed
from flamingo.data.config import KINDS, DataError, DatasetConfig
from flamingo.data.media import IMAGE_EXTS, VIDEO_EXTS, SkipSample, decode_image, decode_video_clip, load_frames
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
from flamingo.errors import UserError
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
    from flamingo.data.processing import parse_document, resolve_media

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
        ext = next((e for e in IMAGE_EXTS if e in record.fields), None)
        if ext is not None:
            name, source = f"{record.name}.{ext}", record.fields[ext]
        elif doc is not None and doc.get("image") is not None:
            name, source = resolve_media(doc["image"], record)
        else:
            raise SkipSample("missing_image", f"{record.name}: no image")
        ext, data = _checked_image(name, source, max_pixels)
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


# ----------------------------------------------------------------------------------- CLI
def _cmd_convert(args: argparse.Namespace) -> None:
    report = convert_to_shards(args.source, args.out, args.kind, shard_size=args.shard_size, prefix=args.prefix,
                               shuffle=not args.no_shuffle, seed=args.seed, frame_folder_fps=args.frame_fps,
                               max_pixels=args.max_pixels, allow_absolute_paths=args.allow_absolute_paths,
                               overwrite=args.overwrite)
    print(report.summary())
    for reason, message in sorted(report.messages.items()):
        print(f"  {reason}: e.g. {message}")
    print(f"shards: {report.shards[0].parent}/{args.prefix}-{{000000..{len(report.shards) - 1:06d}}}.tar")


def _cmd_validate(args: argparse.Namespace) -> None:
    report = validate_data(args.path, args.kind, workers=args.workers, allow_absolute_paths=args.allow_absolute_paths)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    if args.strict and report.bad:
        raise DataError(f"{report.bad} bad sample(s) of {report.stats.records} in {args.path} (--strict)")


def _cmd_shapes(args: argparse.Namespace) -> None:
    from flamingo.data.shapes import make_shapes_dataset, make_shapes_vqa

    if args.kind == "vqa":
        print(f"wrote {args.n} shape images with questions in the VQAv2 format; data config "
              f"{make_shapes_vqa(args.out, args.n, seed=args.seed, overwrite=args.overwrite)}")
        return

    made = make_shapes_dataset(args.out, args.n, kind=args.kind, seed=args.seed, shard_size=args.shard_size,
                               overwrite=args.overwrite)
    print(f"wrote {made.n} {made.kind} samples: folder {made.folder}, JSONL {made.jsonl}, shards {made.shards}"
          + (f", video files {made.video_files}" if made.video_files else ""))


def _cmd_dedup(args: argparse.Namespace) -> None:
    from flamingo.data.dedup import DedupConfig, deduplicate
    from flamingo.model.config import VisionConfig

    benchmarks: dict[str, str] = {}
    for item in args.eval:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in benchmarks:
            raise DataError(f"--eval: expected distinct NAME=PATH (a folder or glob of evaluation images), "
                            f"got {item[:200]!r}")
        benchmarks[name] = path
    kind, _, name_or_path = args.vision.partition(":")
    vision = VisionConfig(kind=kind, name_or_path=name_or_path or VisionConfig.name_or_path)
    config = DedupConfig(hash_distance=args.hash_distance, cosine=None if args.hash_only else args.cosine,
                         batch_size=args.batch_size, search=args.search, shard_size=args.shard_size)
    report = deduplicate(args.train, args.kind, benchmarks, args.out, config, vision, overwrite=args.overwrite)
    print(report.summary())
    print(f"reports: {report.out_dir / 'report'}")


def _add_allow_absolute_paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-absolute-paths", action="store_true",
                        help="let media paths lead outside the dataset folder (absolute paths, '..', symlinks "
                             "leading out); by default such samples are skipped as unsafe_path")


def _cmd_clipart(args: argparse.Namespace) -> None:
    from flamingo.data.clipart import TASKS, write_shards

    tasks = {}
    for item in (args.tasks or ",".join(TASKS)).split(","):
        name, _, weight = item.strip().partition("=")
        try:
            tasks[name] = float(weight or 1.0)
        except ValueError:
            raise DataError(f"--tasks: expected NAME or NAME=WEIGHT items, got {item!r}") from None
    shards = write_shards(args.out, args.n, tasks, seed=args.seed, shard_size=args.shard_size, root=args.root)
    print(f"wrote {args.n} documents to {len(shards)} shard(s) in {args.out}")


def add_data_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `data` (with convert / validate / shapes / clipart / dedup) to the `flamingo` command's subparsers."""
    data = subparsers.add_parser(
        "data", help="convert data to WebDataset shards, validate datasets, make the tiny shapes dataset, "
                     "deduplicate training data against evaluation images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  flamingo data convert captions.jsonl shards/ --kind pairs --shard-size 1000
  flamingo data convert docs/ shards/ --kind interleaved
  flamingo data validate 'shards/*.tar' --kind pairs
  flamingo data shapes tiny/ --kind interleaved --n 64
  flamingo data shapes tiny-vqa/ --kind vqa --n 64    # VQAv2 format + data.yaml (flamingo eval / finetune)
  flamingo data clipart objects/ --n 20000      (first: apt-get install openclipart-png tuxpaint-stamps-default)
  flamingo data dedup 'laion/*.tar' --eval coco=coco/val2014 --eval flickr30k=flickr30k/images --out laion-dedup
layouts:
  pairs        x.jpg + x.txt (folder or shards); JSONL {"image": path, "caption": text}
  interleaved  x.json {"texts": [...], "images": [...]} (OBELICS) or {"text_list", "image_info"} (MMC4)
  video        x.mp4 + x.txt, or a frame folder x/ + x.txt; JSONL {"video": path, "caption", "fps"}""")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    convert = sub.add_parser("convert", help="write a folder or JSONL file as WebDataset tar shards")
    convert.add_argument("source", help="a folder of samples or a .jsonl file")
    convert.add_argument("out", help="output folder for the shards")
    convert.add_argument("--kind", required=True, choices=KINDS)
    convert.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    convert.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    convert.add_argument("--seed", type=seed, default=0, help="seed of the sample order")
    convert.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    convert.add_argument("--frame-fps", type=float_range(0, 1000, low_open=True), default=1.0,
                         help="frame rate of frame folders (videos given as frames), default 1")
    convert.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                         help="skip images with more pixels than this (decompression bombs)")
    _add_allow_absolute_paths(convert)
    convert.add_argument("--overwrite", action="store_true", help="replace existing shards with this prefix")
    convert.set_defaults(func=_cmd_convert)

    validate = sub.add_parser("validate", help="decode every sample; count good and bad samples by reason")
    validate.add_argument("path", help="shards (glob, {a..b} pattern or folder of .tar), a folder, or a .jsonl")
    validate.add_argument("--kind", required=True, choices=KINDS)
    validate.add_argument("--json", action="store_true", help="print a JSON report")
    validate.add_argument("--strict", action="store_true", help="exit with an error if any sample is bad")
    validate.add_argument("--workers", type=int_range(0, 256), default=0, help="decoding threads")
    _add_allow_absolute_paths(validate)
    validate.set_defaults(func=_cmd_validate)

    shapes = sub.add_parser("shapes", help="write the tiny coloured-shapes dataset (folder, JSONL, shards; "
                                           "vqa: VQAv2-format files + data.yaml for eval/finetune)")
    shapes.add_argument("out", help="output folder")
    shapes.add_argument("--kind", required=True, choices=(*KINDS, "vqa"))
    shapes.add_argument("--n", type=int_range(1, 100_000), default=32, help="number of samples (default 32)")
    shapes.add_argument("--seed", type=seed, default=0)
    shapes.add_argument("--shard-size", type=positive_int, default=8)
    shapes.add_argument("--overwrite", action="store_true", help="replace a dataset already written there")
    shapes.set_defaults(func=_cmd_shapes)
    clip = sub.add_parser("clipart", help="write documents about real drawn objects (Open Clip Art, Tux Paint "
                          "stamps; apt-get install openclipart-png tuxpaint-stamps-default) as shards")
    clip.add_argument("out", help="output folder")
    clip.add_argument("--n", type=int, default=10000, help="number of documents (default 10000)")
    clip.add_argument("--tasks", default=None,
                      help="comma-separated NAME[=WEIGHT] of caption, qa, scene, binding, induction (default: all, "
                           "equal weights)")
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--shard-size", type=int, default=1000)
    clip.add_argument("--root", default=None,
                      help="folder holding openclipart/png and tuxpaint/stamps (default $FLAMINGO_CLIPART_ROOT "
                           "or /usr/share)")
    clip.set_defaults(func=_cmd_clipart)

    dedup = sub.add_parser(
        "dedup", help="remove training images that duplicate evaluation images (paper A.3.4): perceptual hashes "
                      "and frozen-encoder embeddings; reports per benchmark + filtered shards")
    dedup.add_argument("train", help="training shards (glob, {a..b} pattern or folder of .tar)")
    dedup.add_argument("--kind", choices=("pairs", "interleaved"), default="pairs",
                       help="pairs (default) or interleaved (a document with any duplicate image is removed)")
    dedup.add_argument("--eval", action="append", required=True, metavar="NAME=PATH",
                       help="a benchmark's images: a folder (searched recursively) or a glob (repeatable)")
    dedup.add_argument("--out", required=True, help="output folder: report/ and shards/")
    dedup.add_argument("--hash-distance", type=int, default=6,
                       help="max Hamming distance of 64-bit pHashes (image or mirror) for a copy (default 6)")
    dedup.add_argument("--cosine", type=float, default=0.85,
                       help="min cosine similarity of encoder embeddings for a near-duplicate (default 0.85)")
    dedup.add_argument("--hash-only", action="store_true", help="perceptual hashes only (no encoder)")
    dedup.add_argument("--vision", default="efficientnet_lite0", metavar="KIND[:NAME_OR_PATH]",
                       help="the frozen encoder: efficientnet_lite0 (default, offline), clip:HUB_ID_OR_DIR, "
                            "siglip:..., timm:NAME, local:DIR (a pretrain-vision output)")
    dedup.add_argument("--search", choices=("auto", "faiss", "torch"), default="auto",
                       help="nearest-neighbour search (auto: faiss-cpu for large benchmarks when installed)")
    dedup.add_argument("--batch-size", type=int, default=64, help="images per chunk (default 64)")
    dedup.add_argument("--shard-size", type=int, default=1000, help="records per output shard (default 1000)")
    dedup.add_argument("--overwrite", action="store_true", help="replace an earlier dedup output folder")
    dedup.set_defaults(func=_cmd_dedup)
    return data


register = add_data_subcommands


def main(argv: list[str] | None = None) -> int:
    """Run `flamingo data ...` on its own (python -m flamingo.data.cli convert ...)."""
    parser = argparse.ArgumentParser(prog="flamingo")
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_subcommands(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"flamingo data: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
