"""Reading a sample's image or video frames for evaluation, with a bounded cache.

A missing or undecodable file raises `SkipSample` (from the data pipeline): the runner counts it
and goes on (a long run is not lost to one bad file).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image, ImageOps

from flamingo.data.benchmarks.samples import Sample
from flamingo.data.media import SkipSample, decode_image, decode_video_clip
from flamingo.model.image_processing import DEFAULT_MAX_PIXELS


class _FixedStart:
    """`decode_video_clip` draws a training clip's start with `rng.uniform(low, high)`; evaluation
    wants a fixed start, so it passes this in place of the generator (clamped the same way)."""

    def __init__(self, start: float) -> None:
        self.start = start

    def uniform(self, low: float, high: float) -> float:
        return min(max(self.start, low), high)


@dataclass
class VideoSampling:
    frames: int = 30  # paper: 30 frames at 3 FPS at inference
    fps: float = 3.0


def clip_start(sample: Sample, sampling: VideoSampling) -> float:
    """Start of the clip: centred in the sample's [start, end] segment when it is longer than the
    clip, else at the segment's start (0 for a whole video)."""
    start = sample.start or 0.0
    span = (sampling.frames - 1) / sampling.fps
    if sample.end is not None and sample.end - start > span:
        return start + (sample.end - start - span) / 2
    return start


def read_media(sample: Sample, video: bool, sampling: VideoSampling,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """The sample's frames: one for an image, `sampling.frames` for a video."""
    if sample.media is None:
        raise SkipSample("no_media", f"sample {sample.id} has no media")
    if video:
        return decode_video_clip(sample.media, sample.id, sampling.frames, sampling.fps,
                                 _FixedStart(clip_start(sample, sampling)))  # type: ignore[arg-type]
    # As decoded: the model's image processor applies the EXIF orientation and composites any
    # transparency over its mean colour, as training does.
    image = decode_image(sample.media, sample.id, max_pixels)
    border = sample.extra.get("crop_border", 0)  # ObjectNet's red frame
    return [ImageOps.crop(image, border) if border else image]


class MediaCache:
    """Frames by sample id, least recently used dropped first (support examples recur across
    shots and trials; queries are read once). Failures are cached too, so a missing support
    image is reported once."""

    def __init__(self, video: bool, sampling: VideoSampling, capacity: int = 256) -> None:
        self.video, self.sampling, self.capacity = video, sampling, capacity
        self._items: OrderedDict[str, list[Image.Image] | SkipSample] = OrderedDict()
        self.failed: set[str] = set()  # ids whose media could not be read (reported in the results)

    def get(self, sample: Sample) -> list[Image.Image]:
        """Frames, or raises SkipSample."""
        if sample.id in self._items:
            self._items.move_to_end(sample.id)
            value = self._items[sample.id]
        else:
            try:
                value = read_media(sample, self.video, self.sampling)
            except SkipSample as err:
                value = err
                self.failed.add(sample.id)
            self._items[sample.id] = value
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        if isinstance(value, SkipSample):
            raise value
        return value

    def ok(self, sample: Sample) -> bool:
        try:
            self.get(sample)
            return True
        except SkipSample:
            return False
