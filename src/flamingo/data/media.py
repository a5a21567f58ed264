"""Media for training: decoding images from bytes or files, the paper's image filters (A.3.1),
augmentation (random left/right flips and colour jitter, PIL only), and video clips sampled at a
fixed frame rate from a video file (PyAV) or a folder of frames.

Every problem with the data itself raises `SkipSample(reason, message)`; the loader counts the
reason and goes on.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, UnidentifiedImageError

from flamingo.errors import import_extra
from flamingo.model import image_processing
from flamingo.model.image_processing import ImageProcessingError, to_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VIDEO_EXTS = ("mp4", "avi", "mov", "webm", "mkv", "m4v", "mpg", "mpeg")

MediaSource = bytes | Path


class SkipSample(Exception):
    """This sample (or this image of a document) cannot be used. `reason` names the counter."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason


# --------------------------------------------------------------------------------- images
def decode_image(source: MediaSource, name: str, max_pixels: int) -> Image.Image:
    """Fully decode an image given as bytes or a file path (PIL's verify, then a full load with a
    pixel cap against decompression bombs).

    Raises SkipSample("missing_image") for an absent/empty file and SkipSample("corrupt_image")
    for anything that does not decode (truncated, not an image, decompression bomb).
    """
    if isinstance(source, Path):
        if not source.is_file():
            raise SkipSample("missing_image", f"{name}: image file {source} does not exist")
        try:
            data = source.read_bytes()
        except OSError as err:
            raise SkipSample("missing_image", f"{name}: cannot read image file {source}: {err}") from None
    else:
        data = source
    if not data:
        raise SkipSample("corrupt_image", f"{name}: image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            w, h = image.size
            if w * h > max_pixels:
                raise SkipSample("corrupt_image", f"{name}: image is {w}x{h}, more than max_pixels={max_pixels}")
            if w == 0 or h == 0:
                raise SkipSample("corrupt_image", f"{name}: image has zero size ({w}x{h})")
            image.verify()  # the file's own integrity checks (e.g. PNG checksums); leaves it unusable
            image = Image.open(io.BytesIO(data))
            image.load()
    except SkipSample:
        raise
    except UnidentifiedImageError:
        raise SkipSample("corrupt_image", f"{name}: not a supported image format") from None
    except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, zlib.error, bombs...
        raise SkipSample("corrupt_image", f"{name}: image could not be decoded: {type(err).__name__}: {err}") from None
    return image


def image_problem(image: Image.Image, min_side: int, max_aspect_ratio: float, tolerance: int) -> str | None:
    """The paper's filters (A.3.1): "too_small" (width or height < min_side), "aspect_ratio"
    (longer / shorter side > max_aspect_ratio) or "single_colour"; None for a usable image."""
    w, h = image.size
    if min(w, h) < min_side:
        return "too_small"
    if max(w, h) / min(w, h) > max_aspect_ratio:
        return "aspect_ratio"
    if is_single_colour(image, tolerance):
        return "single_colour"
    return None


def is_single_colour(image: Image.Image, tolerance: int = 2) -> bool:
    """True when every RGB channel spans at most `tolerance` levels (getextrema runs in C)."""
    try:
        rgb = to_rgb(image)
    except ImageProcessingError:
        return False
    return all(hi - lo <= tolerance for lo, hi in rgb.getextrema())


def upright_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """EXIF orientation applied, then 8-bit RGB (transparency over `background`); an image that
    cannot be converted is a skipped sample."""
    try:
        return image_processing.upright_rgb(image, background)
    except ImageProcessingError as err:
        raise SkipSample("corrupt_image", str(err)) from None


@dataclass(frozen=True)
class Augmentation:
    """One draw of the image augmentation; a video's frames all share one draw."""

    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0

    @classmethod
    def draw(cls, rng: np.random.Generator, flip_prob: float, jitter: float) -> "Augmentation":
        flip = bool(rng.random() < flip_prob)
        b, c, s = (float(v) for v in rng.uniform(1 - jitter, 1 + jitter, size=3))
        return cls(flip, b, c, s)

    def __call__(self, image: Image.Image) -> Image.Image:
        """Apply to an RGB image."""
        if self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.brightness != 1.0:
            image = ImageEnhance.Brightness(image).enhance(self.brightness)
        if self.contrast != 1.0:
            image = ImageEnhance.Contrast(image).enhance(self.contrast)
        if self.saturation != 1.0:
            image = ImageEnhance.Color(image).enhance(self.saturation)
        return image


# ---------------------------------------------------------------------------------- video
def clip_times(duration: float | None, frames: int, fps: float, rng: np.random.Generator) -> list[float]:
    """Timestamps (s) of a clip of `frames` frames at `fps`, starting at a random time such that
    the clip fits in the video when it can (else it starts at 0 and the video's last frame is
    repeated past its end)."""
    span = (frames - 1) / fps
    start = 0.0
    if duration is not None and duration > span:
        # The last usable timestamp is just before the end of the video.
        start = float(rng.uniform(0.0, max(0.0, duration - span - 1e-3)))
    return [start + k / fps for k in range(frames)]


def frame_folder_clip(num_frames: int, source_fps: float, frames: int, fps: float,
                      rng: np.random.Generator) -> list[int]:
    """Indices of the frames of a clip in a folder of `num_frames` frames extracted at
    `source_fps` (frame i shows time i / source_fps)."""
    if num_frames < 1:
        raise SkipSample("corrupt_video", "frame folder has no frames")
    times = clip_times(num_frames / source_fps, frames, fps, rng)
    return [min(num_frames - 1, int(math.floor(t * source_fps + 1e-6))) for t in times]


def decode_video_clip(source: MediaSource, name: str, frames: int, fps: float,
                      rng: np.random.Generator) -> list[Image.Image]:
    """Decode a clip of `frames` frames at `fps` from a video file or its bytes with PyAV.

    Each timestamp gets the frame on screen at that time (the last frame whose presentation time
    is <= it). Raises SkipSample("missing_video" / "corrupt_video").
    """
    av = import_extra("av", "video", "reading video files")

    if isinstance(source, Path):
        if not source.is_file():
            raise SkipSample("missing_video", f"{name}: video file {source} does not exist")
        opened: object = str(source)
    else:
        if not source:
            raise SkipSample("corrupt_video", f"{name}: video is empty (0 bytes)")
        opened = io.BytesIO(source)
    try:
        with av.open(opened) as container:
            if not container.streams.video:
                raise SkipSample("corrupt_video", f"{name}: no video stream")
            stream = container.streams.video[0]
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000  # AV_TIME_BASE
            times = clip_times(duration, frames, fps, rng)
            if times[0] > 0 and stream.time_base is not None:
                container.seek(int(times[0] / stream.time_base), stream=stream, backward=True, any_frame=False)
            chosen: list[Image.Image] = []
            previous = None
            rate = float(stream.average_rate) if stream.average_rate else None
            for index, frame in enumerate(container.decode(stream)):
                t = frame.time
                if t is None:
                    t = index / rate if rate else float(index)
                while len(chosen) < frames and times[len(chosen)] < t - 1e-6:
                    chosen.append((previous if previous is not None else frame).to_image())
                if len(chosen) == frames:
                    break
                previous = frame
            if previous is None and not chosen:
                raise SkipSample("corrupt_video", f"{name}: no decodable frames")
            while len(chosen) < frames:  # past the end: repeat the last frame
                chosen.append(previous.to_image() if previous is not None else chosen[-1])
            return chosen
    except SkipSample:
        raise
    except Exception as err:  # noqa: BLE001 - av.error.*, OSError, ...
        raise SkipSample("corrupt_video", f"{name}: video could not be decoded: {type(err).__name__}: {err}") from None


def load_frames(sources: Sequence[tuple[str, MediaSource]], max_pixels: int) -> list[Image.Image]:
    """Decode the chosen frames of a frame folder (a bad frame skips the video as corrupt_video)."""
    out = []
    for name, source in sources:
        try:
            out.append(decode_image(source, name, max_pixels))
        except SkipSample as err:
            raise SkipSample("corrupt_video" if err.reason == "corrupt_image" else "missing_video",
                             err.message) from None
    return out
