"""Image preprocessing for the frozen vision encoder (PIL + numpy + torch, no torchvision).

Every image becomes a square `image_size` x `image_size` tensor: the image is resized with its
aspect ratio kept so that its longer side is `image_size` (bicubic, antialiased), normalised with
the encoder's mean/std, then centred on a canvas padded with the mean colour, i.e. with exact zeros
after normalisation, so no content is cropped away (a caption may well be about the image's edge).
A video is a list of frames and becomes a [T, 3, H, W] tensor.

`load_image` opens files defensively (missing, empty, truncated, unsupported, decompression bombs)
and raises `ImageProcessingError` naming the file, so a data loader can skip or report bad samples.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from flamingo.errors import UserError

DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels: far above any training image, far below a bomb
_EXIF_ORIENTATION = 0x0112


class ImageProcessingError(UserError):
    """An image cannot be loaded or preprocessed; the message names the problem (and the file)."""


@dataclass
class ImageProcessor:
    """Turns PIL images / videos into normalised pixel tensors for a `VisionEncoder`.

    image_size: side of the square output.
    mean / std: per-channel normalisation of the [0, 1] RGB values.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1:
            raise ImageProcessingError(f"image_size must be a positive integer, got {self.image_size!r}")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ImageProcessingError(f"mean and std need 3 values (R, G, B), got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ImageProcessingError(f"std values must be > 0, got {self.std}")

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """One PIL image -> [3, H, W]; a list of images (or a video's frames) -> [N, 3, H, W]."""
        if isinstance(images, Image.Image):
            return self.preprocess_image(images)
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ImageProcessingError("expected at least one image, got an empty list")
            return torch.stack([self.preprocess_image(img) for img in images])
        raise ImageProcessingError(
            f"expected a PIL.Image.Image or a list of them, got {type(images).__name__}")

    def preprocess_video(self, frames: Sequence[Image.Image]) -> torch.Tensor:
        """A video given as its frames (PIL images) -> [T, 3, H, W]."""
        if isinstance(frames, Image.Image) or not isinstance(frames, (list, tuple)):
            raise ImageProcessingError(
                f"expected a video as a list of PIL images (its frames), got {type(frames).__name__}")
        if len(frames) == 0:
            raise ImageProcessingError("empty video: expected at least one frame, got 0")
        return torch.stack([self.preprocess_image(frame) for frame in frames])

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """One PIL image of any mode -> normalised float tensor [3, image_size, image_size]."""
        if not isinstance(image, Image.Image):
            raise ImageProcessingError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        if image.width == 0 or image.height == 0:
            raise ImageProcessingError(f"zero-size image ({image.width}x{image.height}, mode {image.mode})")
        rgb = upright_rgb(image, background=self._mean_rgb8())

        # Longer side -> image_size; Pillow's resize filters are antialiased when downscaling.
        w, h = rgb.size
        scale = self.image_size / max(w, h)
        new_w, new_h = max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))
        if (new_w, new_h) != (w, h):
            rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)

        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        x = (x - mean) / std
        # Pad after normalising: zeros here are exactly the mean colour, with no uint8 rounding.
        pad_w, pad_h = self.image_size - new_w, self.image_size - new_h
        left, top = pad_w // 2, pad_h // 2
        x = F.pad(x, (left, pad_w - left, top, pad_h - top), value=0.0)
        return x.contiguous()

    def _mean_rgb8(self) -> tuple[int, int, int]:
        return tuple(int(round(min(max(m, 0.0), 1.0) * 255)) for m in self.mean)  # type: ignore[return-value]


# --------------------------------------------------------------------------- mode conversion
def upright_rgb(image: Image.Image, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """EXIF orientation applied, then 8-bit RGB (transparency composited over `background`)."""
    return to_rgb(_apply_exif_orientation(image), background=background)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    Transparency is composited over `background` (the processor passes its mean colour, so
    transparent areas look like padding rather than black). 16/32-bit integer and float images
    are rescaled to 8 bit instead of being clipped at 255 as `Image.convert` would.
    """
    mode = image.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(image))).convert("RGB")
    if mode == "P":  # palette: may carry transparency in its palette or in a tRNS entry
        has_alpha = "transparency" in image.info or (image.palette is not None and image.palette.mode == "RGBA")
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    try:
        if has_alpha:
            if mode == "La":  # premultiplied; Pillow has no direct La -> RGBA
                image = image.convert("LA")
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image if mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageProcessingError(f"cannot convert an image of mode {mode!r} to RGB: {err}") from None


def _high_depth_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map a single-channel >8-bit image to uint8 by rescaling its value range (never clipping).

    uint16 data (PNG/TIFF 16-bit) spans 0..65535 -> divide by 257. Modes "I" (int32) and "F"
    (float32) do not record their nominal range, so it is inferred: [0, 1] floats are unit
    range, values within [0, 255] are already 8-bit, within [0, 65535] are 16-bit, anything else
    is min-max rescaled.
    """
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        scaled = a.astype(np.float64) / 257.0
    else:
        is_float = a.dtype.kind == "f"
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if is_float and lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = a
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = a / 257.0
        else:  # negative or beyond 16 bit: stretch the value range
            scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip a photo as its EXIF Orientation tag says (cameras store the sensor's pixels)."""
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (None, 1):
            return image
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - corrupt EXIF metadata should not discard the pixels
        return image


# ------------------------------------------------------------------------------- file loading
def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file, raising `ImageProcessingError` (naming the file) for
    missing, empty, truncated, corrupt or unsupported files and for images of more than
    `max_pixels` pixels. The pixel count is read from the header before anything is decoded, so
    decompression bombs are rejected cheaply.

    Note: PIL's own limit (`PIL.Image.MAX_IMAGE_PIXELS`, ~89 MP) also applies; to accept images
    larger than that, raise it as well as `max_pixels`.
    """
    path = Path(path)
    if not path.exists():
        raise ImageProcessingError(f"image file {path} does not exist")
    if not path.is_file():
        raise ImageProcessingError(f"image path {path} is not a regular file")
    if path.stat().st_size == 0:
        raise ImageProcessingError(f"image file {path} is empty (0 bytes)")
    with open(path, "rb") as f:
        return _decode_checked(f, f"image file {path}", max_pixels)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """`load_image` for encoded bytes (an upload, a data URL): the same checks, the message names
    the image by `name` (e.g. "messages[0].content[1]")."""
    if not data:
        raise ImageProcessingError(f"{name} is empty (0 bytes)")
    return _decode_checked(io.BytesIO(data), name, max_pixels)


def _decode_checked(stream: BinaryIO, what: str, max_pixels: int) -> Image.Image:
    """Decode an image from an open binary stream; `what` names it in error messages."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)  # lazy: reads the header only
            w, h = image.size
            if w * h > max_pixels:
                raise ImageProcessingError(
                    f"{what} is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels} "
                    "(possible decompression bomb)")
            if w == 0 or h == 0:
                raise ImageProcessingError(f"{what} has zero size ({w}x{h})")
            image.load()  # decode now, inside the try, so truncated/corrupt data fails here
    except ImageProcessingError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageProcessingError(f"{what} is too large (possible decompression bomb): {err}") from None
    except UnidentifiedImageError:
        raise ImageProcessingError(f"{what} is not in a supported image format") from None
    except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, zlib.error, ...
        raise ImageProcessingError(
            f"{what} could not be decoded (truncated or corrupt?): {type(err).__name__}: {err}") from None
    return image
