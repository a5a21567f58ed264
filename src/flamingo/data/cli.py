"""`flamingo data`: convert a folder / JSONL file into WebDataset shards, validate a dataset
(counts and bad samples by reason), write the tiny shapes dataset, and remove training images
that duplicate evaluation images.

    flamingo data convert SRC OUT_DIR --kind pairs [--shard-size 1000] [--seed 0] [--no-shuffle]
    flamingo data validate PATH --kind pairs [--json] [--strict]
    flamingo data shapes OUT_DIR --kind interleaved [--n 32] [--seed 0]
    flamingo data clipart OUT_DIR [--n 10000] [--tasks caption,qa,scene,binding,induction]
    flamingo data clipart OUT_DIR --kind pairs [--split eval]
    flamingo data dedup SHARDS --eval coco=val2014/ --out OUT [--cosine 0.85] [--hash-distance 6]

`register(subparsers)` registers them on the `flamingo` command's subparsers.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from flamingo.cli_options import float_range, int_range, positive_int, seed
from flamingo.data.config import KINDS, DataError
from flamingo.data.convert import convert_to_shards, validate_data
from flamingo.model.image_processing import DEFAULT_MAX_PIXELS


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
    from flamingo.data.shapes import make_shapes_dataset, make_shapes_shift, make_shapes_vqa

    if args.kind == "shift":
        print(f"wrote a synthetic distribution shift (classes: procedural shapes; ID: their usual style, OOD: "
              f"ink outlines on paper), about {args.n} images per split; data config "
              f"{make_shapes_shift(args.out, args.n, seed=args.seed, overwrite=args.overwrite)}")
        return
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
    from flamingo.errors import import_extra

    import_extra("imagehash", "dedup", "flamingo data dedup")  # before any work
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
                         batch_size=args.batch_size, search=args.search, shard_size=args.shard_size,
                         max_pixels=args.max_pixels)
    report = deduplicate(args.train, args.kind, benchmarks, args.out, config, vision, overwrite=args.overwrite)
    print(report.summary())
    print(f"reports: {report.out_dir / 'report'}")


def _add_allow_absolute_paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-absolute-paths", action="store_true",
                        help="let media paths lead outside the dataset folder (absolute paths, '..', symlinks "
                             "leading out); by default such samples are skipped as unsafe_path")


def _cmd_clipart(args: argparse.Namespace) -> None:
    from flamingo.data.clipart import TASKS, write_shards

    if args.kind == "pairs" and args.tasks:
        raise DataError("--tasks: only with --kind documents (pairs are one object and its caption each)")
    if args.kind == "documents" and args.split != "train":
        raise DataError(f"--split {args.split}: only with --kind pairs (documents are over the training categories)")
    tasks = None  # pairs have none
    if args.kind == "documents":
        tasks = {}
        for item in (args.tasks or ",".join(TASKS)).split(","):
            name, _, weight = item.strip().partition("=")
            try:
                tasks[name] = float(weight or 1.0)
            except ValueError:
                raise DataError(f"--tasks: expected NAME or NAME=WEIGHT items, got {item!r}") from None
    shards = write_shards(args.out, args.n, tasks, seed=args.seed, shard_size=args.shard_size, root=args.root,
                          overwrite=args.overwrite, kind=args.kind, split=args.split)
    what = "documents" if args.kind == "documents" else f"{args.split} pairs"
    print(f"wrote {args.n} {what} to {len(shards)} shard(s) in {args.out}")


def register(subparsers: Any) -> argparse.ArgumentParser:
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
  flamingo data clipart object-pairs/ --kind pairs --n 16000   # for flamingo pretrain-vision
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
                                           "vqa: VQAv2-format files + data.yaml for eval/finetune; shift: "
                                           "class folders in two styles + data.yaml for robustness)")
    shapes.add_argument("out", help="output folder")
    shapes.add_argument("--kind", required=True, choices=(*KINDS, "vqa", "shift"))
    shapes.add_argument("--n", type=int_range(1, 100_000), default=32, help="number of samples (default 32)")
    shapes.add_argument("--seed", type=seed, default=0)
    shapes.add_argument("--shard-size", type=positive_int, default=8)
    shapes.add_argument("--overwrite", action="store_true", help="replace a dataset already written there")
    shapes.set_defaults(func=_cmd_shapes)
    clip = sub.add_parser("clipart", help="write documents about real drawn objects (Open Clip Art, Tux Paint "
                          "stamps; apt-get install openclipart-png tuxpaint-stamps-default) as shards")
    clip.add_argument("out", help="output folder")
    clip.add_argument("--n", type=positive_int, default=10000, help="number of documents (default 10000)")
    clip.add_argument("--tasks", default=None,
                      help="comma-separated NAME[=WEIGHT] of caption, qa, scene, binding, induction (default: all, "
                           "equal weights)")
    clip.add_argument("--kind", choices=("documents", "pairs"), default="documents",
                      help="documents (default): interleaved training documents of the tasks; pairs: one object on a "
                           "background + a caption naming it and its coarse category, for flamingo pretrain-vision")
    clip.add_argument("--split", choices=("train", "eval"), default="train",
                      help="pairs only: train (default) or eval, the held-out categories (to watch, never to train on)")
    clip.add_argument("--seed", type=seed, default=0)
    clip.add_argument("--shard-size", type=positive_int, default=1000)
    clip.add_argument("--root", default=None,
                      help="folder holding openclipart/png and tuxpaint/stamps (default $FLAMINGO_CLIPART_ROOT "
                           "or /usr/share)")
    clip.add_argument("--overwrite", action="store_true", help="replace clipart shards already written there")
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
                       help="nearest-neighbour search of the embeddings (auto: faiss-cpu for large benchmarks when "
                            "installed)")
    dedup.add_argument("--batch-size", type=int, default=64, help="images per chunk (default 64)")
    dedup.add_argument("--shard-size", type=int, default=1000, help="records per output shard (default 1000)")
    dedup.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                       help="images with more pixels are not decoded (decompression bombs) and are reported as "
                            f"unreadable; keep it >= the training config's max_pixels (default {DEFAULT_MAX_PIXELS})")
    dedup.add_argument("--overwrite", action="store_true", help="replace an earlier dedup output folder")
    dedup.set_defaults(func=_cmd_dedup)
    return data

