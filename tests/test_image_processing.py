"""Image preprocessing: aspect-preserving resize + mean padding, mode conversion, safe loading."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from flamingo.model.image_processing import ImageProcessingError, ImageProcessor, load_image, to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)
Q = 0.6 / 255 / min(CLIP_STD)  # one 8-bit rounding step after normalisation


def processor(size: int = 32) -> ImageProcessor:
    return ImageProcessor(image_size=size, mean=CLIP_MEAN, std=CLIP_STD)


def normalised(rgb) -> torch.Tensor:
    """Expected normalised value of an 8-bit RGB colour, shape [3, 1, 1]."""
    return (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD


# ------------------------------------------------------------------------ resize and padding
def test_wide_image_is_resized_keeping_aspect_and_padded_with_exact_zeros():
    x = processor(32)(Image.new("RGB", (200, 100), (255, 0, 0)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # 200x100 -> 32x16, centred: rows 0-7 and 24-31 are padding
    assert torch.equal(x[:, :8], torch.zeros(3, 8, 32))
    assert torch.equal(x[:, 24:], torch.zeros(3, 8, 32))
    torch.testing.assert_close(x[:, 8:24], normalised((255, 0, 0)).expand(3, 16, 32), atol=1e-6, rtol=0)


def test_tall_image_is_padded_left_and_right_and_small_images_are_upscaled():
    img = Image.new("RGB", (5, 10), (0, 0, 255))  # smaller than image_size: upscaled to 16x32
    x = processor(32)(img)
    assert torch.equal(x[:, :, :8], torch.zeros(3, 32, 8))
    assert torch.equal(x[:, :, 24:], torch.zeros(3, 32, 8))
    torch.testing.assert_close(x[:, :, 8:24], normalised((0, 0, 255)).expand(3, 32, 16), atol=1e-6, rtol=0)


def test_odd_padding_is_centred_and_content_is_not_stretched():
    # left half black, right half white; 3:1 aspect so 33 -> 33x11, padding 11 rows + 11 rows
    a = np.zeros((30, 90, 3), np.uint8)
    a[:, 45:] = 255
    x = processor(33)(Image.fromarray(a))
    assert torch.equal(x[:, :11], torch.zeros(3, 11, 33)) and torch.equal(x[:, 22:], torch.zeros(3, 11, 33))
    content = x[:, 11:22]
    # the black/white edge stays in the middle column: no horizontal distortion
    torch.testing.assert_close(content[:, :, :15], normalised((0, 0, 0)).expand(3, 11, 15), atol=Q, rtol=0)
    torch.testing.assert_close(content[:, :, 18:], normalised((255, 255, 255)).expand(3, 11, 15), atol=Q, rtol=0)


def test_square_image_at_target_size_is_just_normalised():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = processor(16)(Image.fromarray(a))
    expected = (torch.from_numpy(a).permute(2, 0, 1).float() / 255 - MEAN) / STD
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_downscaling_is_antialiased():
    # a 1-pixel checkerboard averages to mid grey when antialiased; a point-sampling resize
    # would alias to black or white
    a = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    x = processor(32)(Image.fromarray(a))
    grey = (torch.full((3, 1, 1), 127.5 / 255) - MEAN) / STD
    torch.testing.assert_close(x[:, 4:-4, 4:-4], grey.expand(3, 24, 24), atol=0.05, rtol=0)


# --------------------------------------------------------------------------- mode conversion
def test_rgba_transparent_pixels_become_the_mean_colour_not_black():
    a = np.zeros((32, 32, 4), np.uint8)
    a[..., 0] = 255  # red everywhere ...
    a[:, 16:, 3] = 255  # ... opaque only on the right half
    x = processor(32)(Image.fromarray(a, "RGBA"))
    assert x[:, :, :16].abs().max() <= Q  # transparent -> mean colour -> ~0 after normalisation
    torch.testing.assert_close(x[:, :, 16:], normalised((255, 0, 0)).expand(3, 32, 16), atol=1e-6, rtol=0)


def test_half_transparent_pixels_blend_with_the_mean_colour():
    x = processor(8)(Image.new("RGBA", (8, 8), (255, 255, 255, 128)))
    mean255 = torch.tensor([round(m * 255) for m in CLIP_MEAN], dtype=torch.float32).view(3, 1, 1)
    blend = (255 * 128 + mean255 * 127) / 255
    expected = (blend / 255 - MEAN) / STD
    torch.testing.assert_close(x, expected.expand(3, 8, 8), atol=2 * Q, rtol=0)


def test_la_image_with_alpha():
    x = processor(8)(Image.new("LA", (8, 8), (0, 0)))
    assert x.abs().max() <= Q


def test_palette_image_with_transparency():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 255, 0] + [0, 0, 255] + [0, 0, 0] * 254)
    img.paste(1, (4, 0, 8, 8))  # right half: palette entry 1 (blue)
    img.info["transparency"] = 0  # entry 0 (green) is transparent
    x = processor(8)(img)
    assert x[:, :, :4].abs().max() <= Q
    torch.testing.assert_close(x[:, :, 4:], normalised((0, 0, 255)).expand(3, 8, 4), atol=1e-6, rtol=0)


def test_palette_image_without_transparency_uses_its_colours():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0] + [10, 200, 30] + [0, 0, 0] * 254)
    torch.testing.assert_close(processor(8)(img), normalised((10, 200, 30)).expand(3, 8, 8), atol=1e-6, rtol=0)


def test_cmyk():
    x = processor(8)(Image.new("CMYK", (8, 8), (0, 255, 255, 0)))  # no cyan, full magenta+yellow = red
    torch.testing.assert_close(x, normalised((255, 0, 0)).expand(3, 8, 8), atol=1e-6, rtol=0)


def test_16bit_gradient_keeps_its_full_range():
    a = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    x = processor(32)(img)
    grey = x * STD + MEAN  # back to [0, 1]
    assert torch.allclose(grey[0], grey[1], atol=1e-6) and torch.allclose(grey[1], grey[2], atol=1e-6)
    row = grey[0, 0]
    expected = torch.from_numpy(np.rint(a[0] / 257.0) / 255).float()
    torch.testing.assert_close(row, expected, atol=1e-6, rtol=0)
    assert row[0] == 0 and row[-1] == 1 and (row.diff() >= 0).all()  # not clipped at 255/65535


def test_16bit_png_file_roundtrip(tmp_path):
    a = np.full((8, 8), 32896, np.uint16)  # 32896 / 257 = 128 exactly
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    x = processor(8)(load_image(path))
    torch.testing.assert_close(x, normalised((128, 128, 128)).expand(3, 8, 8), atol=1e-6, rtol=0)


@pytest.mark.parametrize("values, expected", [
    (np.full((4, 4), 40000, np.int32), 156),  # mode I holding 16-bit data: 40000/257
    (np.full((4, 4), 200, np.int32), 200),  # mode I holding 8-bit data
    (np.full((4, 4), 0.5, np.float32), 128),  # mode F in [0, 1]
])
def test_int32_and_float_modes(values, expected):
    img = Image.fromarray(values)
    assert img.mode in ("I", "F")
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (4, 4, 3) and (rgb == expected).all()


def test_grayscale_and_bilevel():
    x = processor(8)(Image.new("L", (8, 8), 77))
    torch.testing.assert_close(x, normalised((77, 77, 77)).expand(3, 8, 8), atol=1e-6, rtol=0)
    one = Image.new("1", (8, 8), 1)
    torch.testing.assert_close(processor(8)(one), normalised((255, 255, 255)).expand(3, 8, 8), atol=1e-6, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)  # 20 wide, 10 tall: left half red, right half blue
    a[:, :10, 0] = 255
    a[:, 10:, 2] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.png"
    img.save(path, exif=exif.tobytes())
    x = processor(20)(load_image(path))
    # displayed image is 10 wide, 20 tall (left/right padding); the left half went to the top
    assert torch.equal(x[:, :, :5], torch.zeros(3, 20, 5)) and torch.equal(x[:, :, 15:], torch.zeros(3, 20, 5))
    torch.testing.assert_close(x[:, :9, 5:15], normalised((255, 0, 0)).expand(3, 9, 10), atol=1e-6, rtol=0)
    torch.testing.assert_close(x[:, 11:, 5:15], normalised((0, 0, 255)).expand(3, 9, 10), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ batches and videos
def test_video_and_lists():
    frames = [Image.new("RGB", (40, 20), (c, c, c)) for c in (0, 100, 200)]
    p = processor(16)
    video = p.preprocess_video(frames)
    assert video.shape == (3, 3, 16, 16)
    for t, c in enumerate((0, 100, 200)):
        torch.testing.assert_close(video[t, :, 4:12], normalised((c, c, c)).expand(3, 8, 16), atol=1e-6, rtol=0)
    assert torch.equal(p(frames), video)  # a list of images stacks the same way
    assert p(frames[1]).shape == (3, 16, 16)


def test_errors_are_clear():
    p = processor(16)
    with pytest.raises(ImageProcessingError, match="empty video"):
        p.preprocess_video([])
    with pytest.raises(ImageProcessingError, match="expected a PIL.Image.Image, got ndarray"):
        p.preprocess_image(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageProcessingError, match="got ndarray"):
        p(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageProcessingError, match="zero-size image"):
        p(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageProcessingError, match="empty list"):
        p([])
    with pytest.raises(ImageProcessingError, match="list of PIL images"):
        p.preprocess_video(Image.new("RGB", (4, 4)))
    with pytest.raises(ImageProcessingError, match="std"):
        ImageProcessor(16, CLIP_MEAN, (0.5, 0.0, 0.5))
    with pytest.raises(ImageProcessingError, match="image_size"):
        ImageProcessor(0, CLIP_MEAN, CLIP_STD)
    assert issubclass(ImageProcessingError, ValueError)


# ------------------------------------------------------------------------------ load_image
def noise_image(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_load_image_reads_a_valid_file_fully(tmp_path):
    path = tmp_path / "ok.png"
    img = noise_image()
    img.save(path)
    loaded = load_image(str(path))
    assert loaded.size == (64, 64) and np.array_equal(np.asarray(loaded), np.asarray(img))


def test_load_image_missing_empty_and_directory(tmp_path):
    with pytest.raises(ImageProcessingError, match="does not exist") as err:
        load_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(err.value)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageProcessingError, match=r"empty\.png is empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageProcessingError, match="not a regular file"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_truncated(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    buf = io.BytesIO()
    noise_image().save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageProcessingError, match="could not be decoded") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_load_image_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageProcessingError, match="not in a supported image format") as err:
        load_image(path)
    assert "notes.png" in str(err.value)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, followed by a tiny (bogus) IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9000, 30000])  # 81 MP: our 64 MP limit; 900 MP: also PIL's bomb error
def test_load_image_rejects_huge_headers_before_decoding(tmp_path, monkeypatch, side):
    decoded = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or original_load(self))
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))
    with pytest.raises(ImageProcessingError, match="decompression bomb") as err:
        load_image(path)
    assert "bomb.png" in str(err.value)
    assert decoded == []  # rejected from the header alone


def test_load_image_max_pixels_argument(tmp_path):
    path = tmp_path / "small.png"
    noise_image(20).save(path)
    with pytest.raises(ImageProcessingError, match="max_pixels=100"):
        load_image(path, max_pixels=100)
    assert load_image(path, max_pixels=400).size == (20, 20)
