"""Dataset configuration (one entry of a training config's `data:` list) and the data errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from flamingo.config_io import fields_from_dict, short
from flamingo.errors import UserError
from flamingo.model.image_processing import DEFAULT_MAX_PIXELS

KINDS = ("interleaved", "pairs", "video")


class DataError(UserError):
    """A user mistake about data (bad config value, missing path, no samples for a rank, ...).

    Problems *inside* the data (a corrupt image, an undecodable line) are never raised: the sample
    is skipped and counted in the loader's `stats`.
    """


@dataclass
class DatasetConfig:
    """One training dataset and how its samples are processed (paper section 2.4 and A.3).

    name: label of the dataset (per-dataset losses, counters and positions are keyed by it).
    kind: "interleaved" (M3W / MMC4 / OBELICS documents), "pairs" (image-text, ALIGN / LTIP /
        LAION / CC) or "video" (video-text, VTP).
    path: WebDataset shards (a glob "data/*.tar", a brace pattern "data/s-{000000..000009}.tar",
        a folder holding .tar files, or a list of these), a folder of samples, or a .jsonl file.
    weight: lambda_m, this dataset's weight in the summed loss (used by the trainer).
    batch_size: samples per batch of this dataset.
    max_tokens: length of a sample in tokens, BOS included (L = 256 in the paper for M3W);
        interleaved documents are cut to a random subsequence of this length, captions truncated.
    max_images: N, the most images kept per interleaved sample (5 in the paper). The sequence is
        cut just before the (N+1)-th `<image>` token, so text never refers to a dropped image.
    min_images: interleaved samples with fewer images in their subsequence are skipped
        (counted as `too_few_images`); 0 keeps text-only subsequences.
    p_next: probability that a document uses the "next image" attention (A.3.2).
    p_space: probability of prepending a single space to a caption (pairs and video).
    fps / frames: video clips of `frames` frames sampled at `fps` frames per second.
    frame_folder_fps: frame rate at which the frames of a frame folder were extracted (a sample's
        JSON may say otherwise with an "fps" field).
    augment: random horizontal flips and colour jitter of the images (training); off for eval.
    flip_prob: probability of a horizontal flip; color_jitter: brightness, contrast and
        saturation factors are drawn uniformly from [1 - color_jitter, 1 + color_jitter].
    filter_images: drop images with a side < min_image_side, an aspect ratio > max_aspect_ratio
        or a single colour (A.3.1). Interleaved documents lose the image before tokenisation; a
        pair or video sample whose image fails is skipped.
    single_colour_tolerance: an image whose every channel spans at most this many levels (0-255)
        counts as single-colour (tolerates JPEG noise).
    text_separator: joins consecutive text segments of an interleaved document.
    add_bos: start every sample with the tokenizer's BOS token when it has one.
    shuffle: shuffle the sample order every epoch (records of a folder/JSONL fully; shards by
        shard order plus a per-shard buffer of `shuffle_buffer` samples).
    epochs: stop after this many passes over the data (None: an endless stream).
    drop_last: with a finite number of epochs, drop the last incomplete batch.
    num_workers: threads that decode and process samples ahead of the training loop (0: in the
        caller's thread). The output is identical for any number of workers.
    max_pixels: refuse images with more pixels than this (decompression bombs).
    allow_absolute_paths: folder/JSONL datasets only: let media paths lead outside the dataset
        folder (absolute paths, `..`, symlinks leading out); by default such samples are skipped
        as `unsafe_path`.
    """

    name: str
    kind: str
    path: str | list[str]
    weight: float = 1.0
    batch_size: int = 8
    max_tokens: int = 256
    max_images: int = 5
    min_images: int = 1
    p_next: float = 0.5
    p_space: float = 0.5
    fps: float = 1.0
    frames: int = 8
    frame_folder_fps: float = 1.0
    augment: bool = True
    flip_prob: float = 0.5
    color_jitter: float = 0.1
    filter_images: bool = True
    min_image_side: int = 64
    max_aspect_ratio: float = 3.0
    single_colour_tolerance: int = 2
    text_separator: str = " "
    add_bos: bool = True
    shuffle: bool = True
    shuffle_buffer: int = 500
    epochs: int | None = None
    drop_last: bool = False
    num_workers: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_absolute_paths: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        where = f"dataset {short(self.name)}"
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"dataset name: expected a non-empty string, got {short(self.name)}")
        if self.kind not in KINDS:
            raise DataError(f"{where}: kind: expected one of {', '.join(KINDS)}, got {short(self.kind)}")
        paths = [self.path] if isinstance(self.path, str) else self.path
        if not isinstance(paths, (list, tuple)) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise DataError(f"{where}: path: expected a path/glob or a non-empty list of them, got {short(self.path)}")

        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise DataError(f"{where}: {name}: expected {expected}, got {short(getattr(self, name))}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        check("weight", is_num(self.weight) and self.weight >= 0, "a number >= 0")
        check("batch_size", is_int(self.batch_size) and self.batch_size >= 1, "an integer >= 1")
        check("max_tokens", is_int(self.max_tokens) and self.max_tokens >= 4, "an integer >= 4")
        check("max_images", is_int(self.max_images) and self.max_images >= 1, "an integer >= 1")
        check("min_images", is_int(self.min_images) and 0 <= self.min_images <= self.max_images,
              f"an integer between 0 and max_images={self.max_images}")
        for name in ("p_next", "p_space", "flip_prob"):
            check(name, is_num(getattr(self, name)) and 0 <= getattr(self, name) <= 1, "a probability in [0, 1]")
        check("color_jitter", is_num(self.color_jitter) and 0 <= self.color_jitter < 1, "a number in [0, 1)")
        for name in ("fps", "frame_folder_fps"):
            check(name, is_num(getattr(self, name)) and getattr(self, name) > 0, "a number > 0")
        check("frames", is_int(self.frames) and self.frames >= 1, "an integer >= 1")
        check("min_image_side", is_int(self.min_image_side) and self.min_image_side >= 1, "an integer >= 1")
        check("max_aspect_ratio", is_num(self.max_aspect_ratio) and self.max_aspect_ratio >= 1, "a number >= 1")
        check("single_colour_tolerance", is_int(self.single_colour_tolerance) and
              0 <= self.single_colour_tolerance < 255, "an integer in [0, 255)")
        check("shuffle_buffer", is_int(self.shuffle_buffer) and self.shuffle_buffer >= 0, "an integer >= 0")
        check("epochs", self.epochs is None or (is_int(self.epochs) and self.epochs >= 1), "None or an integer >= 1")
        check("num_workers", is_int(self.num_workers) and self.num_workers >= 0, "an integer >= 0")
        check("max_pixels", is_int(self.max_pixels) and self.max_pixels >= 1, "an integer >= 1")
        check("text_separator", isinstance(self.text_separator, str), "a string")
        for name in ("augment", "filter_images", "add_bos", "shuffle", "drop_last", "allow_absolute_paths"):
            check(name, isinstance(getattr(self, name), bool), "true or false")

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    # --------------------------------------------------------------------------- mapping
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DatasetConfig":
        """Build from a mapping (one entry of a YAML config); unknown keys are an error that
        names them and lists the known ones."""
        if not isinstance(values, Mapping):
            raise DataError(f"dataset config: expected a mapping, got {type(values).__name__}")
        label = f"dataset {short(values.get('name', '?'))}"
        missing = [k for k in ("name", "kind", "path") if k not in values]
        if missing:
            raise DataError(f"{label}: missing required field(s) {', '.join(missing)}")
        return cls(**fields_from_dict(cls, dict(values), label, error=DataError))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
