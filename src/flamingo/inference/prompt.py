"""Interleaved prompts: text and images/videos in order, turned into ids and visual tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from PIL import Image

from flamingo.model.flamingo import Flamingo, FlamingoInputError
from flamingo.model.image_processing import DEFAULT_MAX_PIXELS, load_image

# An image is a PIL image or a path; a video is a list of frames (images or paths).
MediaItem = Union[Image.Image, str, Path, Sequence[Union[Image.Image, str, Path]]]


class PromptError(FlamingoInputError):
    """A prompt that cannot be run: placeholders vs images, length, empty input."""


@dataclass
class Prompt:
    """Text with one media placeholder per media item, and the media as lists of frames."""

    text: str
    media: list[list[Image.Image]] = field(default_factory=list)


def _frames(item: Any, max_pixels: int) -> list[Image.Image]:
    if isinstance(item, Image.Image):
        return [item]
    if isinstance(item, (str, Path)):
        return [load_image(item, max_pixels=max_pixels)]
    if isinstance(item, Sequence) and item and all(isinstance(f, (Image.Image, str, Path)) for f in item):
        return [f if isinstance(f, Image.Image) else load_image(f, max_pixels=max_pixels) for f in item]
    raise PromptError(f"prompt item of type {type(item).__name__}: expected text, a PIL image, an image path "
                      f"or a list of video frames")


def interleaved_prompt(items: Sequence[Any], media_token: str = "<image>",
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> Prompt:
    """Build a prompt from items in order: a `str` is text; a PIL image or a `pathlib.Path` is an
    image; a list of frames (images or paths) is a video. Each media item becomes one placeholder.
    (Paths must be `Path` objects so that a mistyped path is never silently read as text.)"""
    text, media = [], []
    for item in items:
        if isinstance(item, str):
            check_text(item, "prompt text item")
            if media_token in item:
                raise PromptError(f"a text item contains {media_token!r}; in an interleaved list, give the image "
                                  f"itself where it goes (or use text_prompt with placeholders and images)")
            text.append(item)
        else:
            media.append(_frames(item, max_pixels))
            text.append(media_token)
    return Prompt("".join(text), media)


def check_text(text: str, what: str) -> None:
    """Refuse text holding undecodable bytes (Python keeps them as lone surrogates, e.g. from a
    non-UTF-8 command line or terminal), which no tokenizer can encode."""
    if not isinstance(text, str):
        raise PromptError(f"{what}: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PromptError(f"{what}: not valid UTF-8 text (undecodable byte at character {err.start})") from None


def text_prompt(text: str, images: Sequence[MediaItem] = (), media_token: str = "<image>",
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Prompt:
    """A prompt given as text with `<image>` placeholders plus the images, in order."""
    check_text(text, "prompt")
    placeholders = text.count(media_token)
    if placeholders != len(images):
        raise PromptError(f"the prompt has {placeholders} {media_token} placeholder(s) but {len(images)} "
                          f"image(s) were given; put one {media_token} where each image goes")
    return Prompt(text, [_frames(item, max_pixels) for item in images])


# Media encoded per vision-encoder call. On a CPU a few images at a time run faster per image than
# many (their activations stay in the caches: EfficientNet-Lite0 at 224 px, 2 cores, ~38 ms per
# image 4 at a time vs ~58 ms 32 at a time); a GPU wants large batches.
CPU_MEDIA_CHUNK, GPU_MEDIA_CHUNK = 4, 32


def encode_prompt_media(model: Flamingo, prompts: Sequence[Prompt], chunk: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The media of prompts -> visual tokens [B, N_max, R, D] (zeros in padding slots) and media
    counts [B]: each image/video preprocessed, then `encode_pixels`."""
    if model.vision_encoder is None:
        raise PromptError("this model has no vision encoder, so it cannot take images")
    processor = model.vision_encoder.image_processor()
    return encode_pixels(model, [[processor.preprocess_video(frames) for frames in p.media] for p in prompts], chunk)


def encode_pixels(model: Flamingo, pixels: Sequence[Sequence[torch.Tensor]], chunk: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed media (per prompt, one [T, 3, H, W] tensor per image/video) -> visual tokens
    [B, N_max, R, D] (zeros in padding slots) and media counts [B], through `Flamingo.encode_media`.

    Each image/video is encoded once; media with the same number of frames are batched together
    (`chunk` per call; default by device), so images and videos can be mixed in one prompt.
    """
    if model.vision_encoder is None:
        raise PromptError("this model has no vision encoder, so it cannot take images")
    counts = [len(row) for row in pixels]
    slots = max(counts, default=0)
    device = model.perceiver.latents.device
    chunk = chunk or (CPU_MEDIA_CHUNK if device.type == "cpu" else GPU_MEDIA_CHUNK)
    out = torch.zeros(len(pixels), slots, model.config.perceiver.num_latents, model.perceiver.dim, device=device)
    by_frames: dict[int, list[tuple[int, int]]] = {}
    for b, row in enumerate(pixels):
        for j, media in enumerate(row):
            by_frames.setdefault(len(media), []).append((b, j))
    for positions in by_frames.values():
        for start in range(0, len(positions), chunk):
            part = positions[start:start + chunk]
            stacked = torch.stack([pixels[b][j] for b, j in part])
            tokens = model.encode_media(stacked[None].to(device))[0]  # [K, R, D]
            for (b, j), t in zip(part, tokens):
                out[b, j] = t
    return out, torch.tensor(counts, device=device)


def context_length(model: Flamingo) -> int | None:
    """The LM's maximum sequence length, if its config says."""
    config = model.lm.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
