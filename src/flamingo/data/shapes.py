"""A tiny synthetic dataset of coloured shapes ("a red circle") in every supported layout, for
tests and for a CPU-sized training example. Everything is drawn with PIL from a seed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import yaml
from PIL import Image, ImageDraw

from flamingo.data.config import KINDS, DataError
from flamingo.data.convert import convert_to_shards
from flamingo.outputs import OVERWRITE_HINT, OutputExistsError, publish, staging_dir

COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 170), "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
_OUTPUTS = ("folder", "data.jsonl", "shards", "videos")
T = TypeVar("T")


def draw_shape(shape: str, colour: str, size: int = 64, centre: tuple[float, float] | None = None,
               radius: float | None = None, background: tuple[int, int, int] = (245, 245, 240)) -> Image.Image:
    """An RGB image of one filled shape on a light background."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = radius if radius is not None else size * 0.3
    cx, cy = centre if centre is not None else (size / 2, size / 2)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise DataError(f"shape: expected one of {SHAPES}, got {shape!r}")
    return image


@dataclass
class ShapesDataset:
    """Where `make_shapes_dataset` wrote things. `folder`, `jsonl` and `shards` (a glob) hold the
    same samples; `video_files` is a folder of .mp4 + .txt (kind "video", when PyAV can encode)."""

    root: Path
    kind: str
    n: int
    folder: Path
    jsonl: Path
    shards: str
    captions: list[str] = field(default_factory=list)
    video_files: Path | None = None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _random_shape(rng: np.random.Generator) -> tuple[str, str]:
    return SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]


def _shape_image(rng: np.random.Generator, size: int, shape: str, colour: str) -> Image.Image:
    r = size * float(rng.uniform(0.18, 0.32))
    cx, cy = (float(rng.uniform(r, size - r)) for _ in range(2))
    return draw_shape(shape, colour, size, (cx, cy), r)


def write_mp4(path: Path, frames: list[Image.Image], fps: float) -> bool:
    """Encode frames into an MPEG-4 file with PyAV; False if no encoder is available."""
    from fractions import Fraction

    try:
        import av
    except ImportError:
        return False
    try:
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height = frames[0].size
            stream.pix_fmt = "yuv420p"
            for image in frames:
                for packet in stream.encode(av.VideoFrame.from_image(image)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return True
    except Exception:  # noqa: BLE001 - codec missing in this PyAV build
        path.unlink(missing_ok=True)
        return False


def make_shapes_dataset(directory: str | Path, n: int, kind: str = "pairs", seed: int = 0, image_size: int = 64,
                        shard_size: int = 8, frames: int = 4, video_fps: float = 1.0,
                        video_files: bool = True, overwrite: bool = False) -> ShapesDataset:
    """Write `n` samples of `kind` under `directory` as a folder, a JSONL file and shards.

    pairs: folder/00000.png + 00000.txt ("a red circle"); data.jsonl {"image", "caption"}.
    interleaved: folder/00000.json {"texts", "images"} with 2-4 images under folder/images/,
        each followed by its caption; data.jsonl holds the same documents.
    video: folder/00000/frame_000.png ... (`frames` frames at `video_fps`, the shape moving left
        to right) + 00000.txt ("a red circle moving right"); data.jsonl {"video", "caption",
        "fps"}; with video_files, videos/00000.mp4 + .txt encoded with PyAV.
    Shards (`shard_size` samples each) are written by `convert_to_shards` from the folder.
    A dataset already under `directory` is refused unless `overwrite`; everything is written in
    a folder next to `directory` first and moved into place at the end.
    """
    if kind not in KINDS:
        raise DataError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(n, int) or n < 1:
        raise DataError(f"n: expected an integer >= 1, got {n!r}")
    made = _staged_dataset(Path(directory), _OUTPUTS, overwrite, lambda root: _write_shapes(
        root, n, kind, seed, image_size, shard_size, frames, video_fps, video_files))
    target = Path(directory)
    return ShapesDataset(target, kind, n, target / "folder", target / "data.jsonl", str(target / "shards" / "*.tar"),
                         made.captions, target / "videos" if made.video_files else None)


def _staged_dataset(target: Path, parts: tuple[str, ...], overwrite: bool, write: Callable[[Path], T]) -> T:
    """`write(folder)` into a staging folder next to `target`, then its `parts` moved into `target`.
    Refused before anything is written when `target` already holds one of them, unless `overwrite`
    (then a part the new dataset lacks is removed too)."""
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"output folder {target} exists and is not a folder")
    found = [name for name in parts if (target / name).exists()]
    if found and not overwrite:
        raise OutputExistsError(f"output folder {target} already holds a dataset ({', '.join(found)}); "
                                f"{OVERWRITE_HINT}")
    with staging_dir(target) as staged:
        result = write(staged)
        if not target.exists():
            publish(staged, target)
            return result
        for name in parts:
            if (staged / name).exists():
                publish(staged / name, target / name)
            elif (target / name).is_dir():
                shutil.rmtree(target / name)
            elif (target / name).exists():
                (target / name).unlink()
    return result


def _write_shapes(root: Path, n: int, kind: str, seed: int, image_size: int, shard_size: int, frames: int,
                  video_fps: float, video_files: bool) -> ShapesDataset:
    folder = root / "folder"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines: list[dict] = []
    captions: list[str] = []
    videos_dir = None
    for i in range(n):
        key = f"{i:05d}"
        if kind == "pairs":
            shape, colour = _random_shape(rng)
            caption = f"{_article(colour)} {colour} {shape}"
            _shape_image(rng, image_size, shape, colour).save(folder / f"{key}.png")
            (folder / f"{key}.txt").write_text(caption)
            lines.append({"image": f"folder/{key}.png", "caption": caption})
        elif kind == "interleaved":
            (folder / "images").mkdir(exist_ok=True)
            texts: list[str | None] = ["Some shapes we drew."]
            images: list[str | None] = [None]
            parts = []
            for j in range(int(rng.integers(2, 5))):
                shape, colour = _random_shape(rng)
                name = f"images/{key}_{j}.png"
                _shape_image(rng, image_size, shape, colour).save(folder / name)
                texts += [None, f"This is {_article(colour)} {colour} {shape}."]
                images += [name, None]
                parts.append(f"{_article(colour)} {colour} {shape}")
            caption = ", ".join(parts)
            doc = {"texts": texts, "images": images}
            (folder / f"{key}.json").write_text(json.dumps(doc))
            lines.append({"texts": texts, "images": [f"folder/{m}" if m else None for m in images]})
        else:
            shape, colour = _random_shape(rng)
            caption = f"{_article(colour)} {colour} {shape} moving right"
            r = image_size * 0.2
            clip = [draw_shape(shape, colour, image_size, (r + (image_size - 2 * r) * t / max(frames - 1, 1),
                                                           image_size / 2), r) for t in range(frames)]
            (folder / key).mkdir(exist_ok=True)
            for t, image in enumerate(clip):
                image.save(folder / key / f"frame_{t:03d}.png")
            (folder / f"{key}.txt").write_text(caption)
            lines.append({"video": f"folder/{key}", "caption": caption, "fps": video_fps})
            if video_files:
                videos_dir = root / "videos"
                videos_dir.mkdir(exist_ok=True)
                if write_mp4(videos_dir / f"{key}.mp4", clip, video_fps):
                    (videos_dir / f"{key}.txt").write_text(caption)
                else:
                    shutil.rmtree(videos_dir)
                    videos_dir, video_files = None, False
        captions.append(caption)
    jsonl = root / "data.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    shards_dir = root / "shards"
    convert_to_shards(str(folder), shards_dir, kind, shard_size=shard_size, shuffle=False,
                      frame_folder_fps=video_fps)
    return ShapesDataset(root, kind, n, folder, jsonl, str(shards_dir / "*.tar"), captions, videos_dir)


def make_shapes_vqa(directory: str | Path, n: int, seed: int = 0, image_size: int = 64,
                    test_fraction: float = 0.25, overwrite: bool = False) -> Path:
    """Write `n` shape images with a question each in the official VQAv2 format (questions and
    annotations JSON, COCO_<subtype>_<id>.jpg images) split into train and test, plus the
    `data.yaml` that `flamingo eval` / `flamingo finetune` read (task vqav2). Questions: "What
    colour is the <shape>?" or "What shape is this?". Returns the data config's path. Written
    like `make_shapes_dataset` (refused over an existing one unless `overwrite`)."""
    if not isinstance(n, int) or n < 2:
        raise DataError(f"n: expected an integer >= 2, got {n!r}")
    parts = ("train2014", "val2014", "train_questions.json", "train_annotations.json", "test_questions.json",
             "test_annotations.json", "data.yaml")
    _staged_dataset(Path(directory), parts, overwrite,
                    lambda root: _write_shapes_vqa(root, n, seed, image_size, test_fraction))
    return Path(directory) / "data.yaml"


def _write_shapes_vqa(root: Path, n: int, seed: int, image_size: int, test_fraction: float) -> None:
    rng = np.random.default_rng(seed)
    n_test = max(1, int(n * test_fraction))
    splits = {}
    for split, subtype, ids in (("train", "train2014", range(n - n_test)), ("test", "val2014", range(n - n_test, n))):
        (root / subtype).mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for i in ids:
            shape, colour = _random_shape(rng)
            _shape_image(rng, image_size, shape, colour).save(root / subtype / f"COCO_{subtype}_{i:012d}.jpg")
            question, answer = (("What shape is this?", shape) if rng.random() < 0.5
                                else (f"What colour is the {shape}?", colour))
            questions.append({"question_id": i, "image_id": i, "question": question})
            annotations.append({"question_id": i, "image_id": i, "answers": [{"answer": answer}] * 10})
        (root / f"{split}_questions.json").write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
        (root / f"{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))
        splits[split] = {"questions": f"{split}_questions.json", "annotations": f"{split}_annotations.json",
                         "media": subtype}
    (root / "data.yaml").write_text(yaml.safe_dump({"tasks": {"vqav2": splits}}, sort_keys=False))


def make_shapes_shift(directory: str | Path, n: int, seed: int = 0, image_size: int = 64,
                      overwrite: bool = False) -> Path:
    """A synthetic distribution shift in ImageNet's class-folder layout: the procedural scenes'
    training object kinds (`flamingo.data.procedural`) as classes, drawn in their usual style
    (id/train, id/test: task `shapes`) and as ink outlines on ruled or checkered paper, a style and
    background family never rendered in training (sketch/test: task `shapes_sketch`), about `n`
    images per split (the same number per class), with classes.json {folder: class name} and the
    data.yaml that `flamingo eval`, `finetune` and `robustness` read. Returns the data config's
    path. Written like `make_shapes_dataset` (refused over an existing one unless `overwrite`)."""
    from flamingo.data import procedural

    classes = procedural.kinds("train")
    if not isinstance(n, int) or n < len(classes):
        raise DataError(f"n: expected an integer >= {len(classes)} (one image per class), got {n!r}")
    per_class = -(-n // len(classes))

    def write(root: Path) -> None:
        rng = np.random.default_rng(seed)
        for folder, draw in (("id/train", procedural.render), ("id/test", procedural.render),
                             ("sketch/test", procedural.render_sketch)):
            for kind in classes:
                (root / folder / kind).mkdir(parents=True)
                for i in range(per_class):
                    draw(procedural.sample_scene(rng, "train", kind=kind), image_size).save(
                        root / folder / kind / f"{i:05d}.png")
        (root / "classes.json").write_text(json.dumps({kind: kind for kind in classes}))
        split = {"class_names": "classes.json"}
        train = {"media": "id/train", **split}
        tasks = {"shapes": {"test": {"media": "id/test", **split}, "train": train},
                 "shapes_sketch": {"test": {"media": "sketch/test", **split}, "train": dict(train)}}
        (root / "data.yaml").write_text(yaml.safe_dump({"tasks": tasks}, sort_keys=False))

    _staged_dataset(Path(directory), ("id", "sketch", "classes.json", "data.yaml"), overwrite, write)
    return Path(directory) / "data.yaml"
