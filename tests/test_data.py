"""Data processing units (paper section 2.4 / A.3) and the `flamingo data` command."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tokenizer
from PIL import Image

from flamingo.data import DataError, DatasetConfig, collate, make_shapes_dataset
from flamingo.data.batch import IGNORE_INDEX
from flamingo.cli import main as flamingo_main
from flamingo.data.cli import register as add_data_subcommands
from flamingo.data.convert import convert_to_shards, validate_data
from flamingo.data.media import Augmentation, image_problem
from flamingo.data.processing import (
    SampleProcessor,
    TextEncoder,
    interleaved_ids,
    make_labels,
    maybe_prepend_space,
    pair_ids,
    sample_subsequence,
)
from flamingo.data.shapes import draw_shape
from flamingo.data.sources import Record
from flamingo.model.image_processing import ImageProcessor
from flamingo.model.language_model import add_special_tokens
from flamingo.outputs import OutputExistsError

MEDIA, EOC = 1000, 1001


@pytest.fixture(scope="module")
def tok():
    tokenizer = make_tokenizer()
    eoc, media = add_special_tokens(tokenizer, ["<|endofchunk|>", "<image>"])
    return tokenizer, media, eoc


@pytest.fixture(scope="module")
def processor():
    return ImageProcessor(16, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def shape_png(shape="circle", colour="red", size=64, width=None):
    image = draw_shape(shape, colour, size)
    if width is not None:
        image = image.resize((width, size))
    return png(image)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header announces width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def bad_checksum_png() -> bytes:
    """A PNG whose pixels decode but whose IDAT checksum is wrong: only PIL's verify notices."""
    data = bytearray(shape_png())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start:start + 4])[0]
    data[start + 8 + length + 3] ^= 0xFF  # the last byte of the chunk's CRC
    return bytes(data)


def make_processor(tok, processor, **overrides):
    tokenizer, media, eoc = tok
    config = DatasetConfig(**{"name": "t", "kind": "interleaved", "path": "unused", **overrides})
    return SampleProcessor(config, TextEncoder(tokenizer, media, eoc, config.add_bos), processor)


def doc_record(texts, images, members, uid=(0, 0)):
    fields = {"json": json.dumps({"texts": texts, "images": images}).encode(), **members}
    return Record(uid, f"doc{uid[1]}", fields, None)


# --------------------------------------------------------------------------- subsequences
def random_document(rng):
    """Pieces: text runs, and images (None) each followed by a marker token 2000 + image index."""
    pieces, k = [], 0
    for _ in range(int(rng.integers(1, 12))):
        if rng.random() < 0.4:
            pieces += [None, [2000 + k]]
            k += 1
        else:
            pieces.append([int(t) for t in rng.integers(3, 900, size=int(rng.integers(1, 40)))])
    return pieces, k


def test_subsequence_keeps_images_and_tokens_aligned_over_many_seeds():
    for seed in range(500):
        rng = np.random.default_rng(seed)
        pieces, n_images = random_document(rng)
        ids = interleaved_ids(pieces, MEDIA, EOC)
        length, max_images = int(rng.integers(2, 60)), int(rng.integers(1, 6))
        window, first, count = sample_subsequence(ids, MEDIA, length, max_images, rng)
        media_positions = (window == MEDIA).nonzero().flatten().tolist()
        assert len(media_positions) == count <= max_images
        assert 0 <= first and first + count <= n_images
        assert len(window) <= length
        # The window is a contiguous slice of the document...
        text = ids.tolist()
        starts = [i for i in range(len(text) - len(window) + 1) if text[i:i + len(window)] == window.tolist()]
        assert starts, seed
        # ... and its j-th <image> is image first + j of the document (its marker follows it).
        for j, pos in enumerate(media_positions):
            if pos + 1 < len(window):
                assert int(window[pos + 1]) == 2000 + first + j, seed
        # Shorter than `length` only when the document is, or when cut before an extra image.
        if len(window) < min(length, len(ids)):
            rest = ids[starts[0] + len(window):]
            assert int(rest[0]) == MEDIA and count == max_images, seed


def test_subsequence_stops_before_the_image_after_max_images():
    pieces = [None, [5], None, [6], None, [7], None, [8]]
    ids = interleaved_ids(pieces, MEDIA, EOC)
    window, first, count = sample_subsequence(ids, MEDIA, 100, 2, np.random.default_rng(0))
    assert (first, count) == (0, 2)
    # EOC IMG 5 EOC IMG 6 EOC | IMG 7 ...: the EOC closing the last kept chunk stays.
    assert window.tolist() == [EOC, MEDIA, 5, EOC, MEDIA, 6, EOC]


def test_subsequence_is_uniformly_placed_and_whole_when_short():
    ids = torch.arange(10, 30)
    starts = {int(sample_subsequence(ids, MEDIA, 5, 5, np.random.default_rng(s))[0][0]) for s in range(300)}
    assert starts == set(range(10, 26))  # every start 0..15 occurs
    window, first, count = sample_subsequence(ids, MEDIA, 50, 5, np.random.default_rng(0))
    assert torch.equal(window, ids) and (first, count) == (0, 0)


def test_end_of_chunk_before_each_image_and_at_the_end(tok, processor):
    tokenizer, media, eoc = tok
    assert interleaved_ids([[5, 6], None, [7], None, None, [8]], MEDIA, EOC).tolist() == \
        [5, 6, EOC, MEDIA, 7, EOC, MEDIA, EOC, MEDIA, 8, EOC]
    proc = make_processor(tok, processor, augment=False, p_next=0.0)
    record = doc_record([None, "a red circle", None, "two green squares"], ["a.png", None, "b.png", None],
                        {"a.png": shape_png(), "b.png": shape_png("square", "green")})
    out = proc(record, np.random.default_rng(0))
    ids = out.sample.input_ids.tolist()
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == eoc
    image_positions = [i for i, t in enumerate(ids) if t == media]
    assert len(image_positions) == 2 and all(ids[i - 1] == eoc for i in image_positions)
    assert ids.count(eoc) == 3  # one before each image, one at the end
    assert tokenizer.decode(ids) == ("<s><|endofchunk|><image>a red circle<|endofchunk|><image>two green squares"
                                     "<|endofchunk|>")


def test_literal_special_token_text_never_becomes_a_media_token(tok, processor):
    proc = make_processor(tok, processor, augment=False)
    record = doc_record(["look <image> here <|endofchunk|>", None], [None, "a.png"], {"a.png": shape_png()})
    sample = proc(record, np.random.default_rng(0)).sample
    assert int((sample.input_ids == tok[1]).sum()) == sample.media.shape[0] == 1


def test_processed_documents_keep_alignment_over_many_seeds(tok, processor):
    """Over many windows: as many images as <image> tokens, and each image is the one the
    document put at that place (each image is followed by a text naming it)."""
    tokenizer, media, eoc = tok
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "red", "blue"]
    shapes = ["circle", "square", "triangle"]
    members = {f"{i}.png": shape_png(shapes[i % 3], colours[i]) for i in range(8)}
    pixels = {i: processor(Image.open(io.BytesIO(members[f"{i}.png"]))) for i in range(8)}
    texts, images = [], []
    for i in range(8):
        texts += [None, f"picture {i} " + "the quick brown fox jumps over the lazy dog " * (i % 3 + 1)]
        images += [f"{i}.png", None]
    record = doc_record(texts, images, members)
    proc = make_processor(tok, processor, augment=False, max_tokens=40, max_images=3, min_images=0)
    seen_firsts = set()
    for seed in range(60):
        sample = proc(record, np.random.default_rng(seed)).sample
        n = int((sample.input_ids == media).sum())
        assert n == sample.media.shape[0] <= 3
        assert len(sample.input_ids) <= 40
        chunks = tokenizer.decode(sample.input_ids).split("<image>")[1:]
        for j, chunk in enumerate(chunks):
            if chunk.startswith("picture "):
                k = int(chunk.split()[1])
                assert torch.equal(sample.media[j, 0], pixels[k]), (seed, j, k)
                seen_firsts.add(k)
    assert len(seen_firsts) >= 6  # windows really move over the document


def test_clip_times():
    from flamingo.data.media import clip_times

    starts = set()
    for seed in range(50):
        times = clip_times(10.0, 8, 1.0, np.random.default_rng(seed))
        assert np.allclose(np.diff(times), 1.0) and 0 <= times[0] and times[-1] < 10.0
        starts.add(round(times[0], 3))
    assert len(starts) > 40  # a random start in [0, 3)
    assert clip_times(3.0, 8, 1.0, np.random.default_rng(0)) == [float(k) for k in range(8)]  # too short: from 0
    assert np.allclose(clip_times(None, 4, 2.0, np.random.default_rng(0)), [0, 0.5, 1.0, 1.5])


# ------------------------------------------------------------------------- augmentation
def test_image_placement_augmentation_rate_and_flag(tok, processor):
    record = doc_record(["hello", None], [None, "a.png"], {"a.png": shape_png()})
    for p, low, high in ((0.5, 0.42, 0.58), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)):
        proc = make_processor(tok, processor, augment=False, p_next=p)
        flags = [proc(record, np.random.default_rng(s)).sample.attend_next for s in range(400)]
        assert low <= np.mean(flags) <= high, (p, np.mean(flags))
    proc = make_processor(tok, processor, augment=False, p_next=0.5)
    samples = [proc(record, np.random.default_rng(s)).sample for s in range(8)]
    batch = collate(samples, 0)
    assert batch.attend_next.tolist() == [s.attend_next for s in samples]
    assert batch.attend_next.dtype == torch.bool and 0 < batch.attend_next.sum() < 8


def test_space_prepended_to_captions_about_half_the_time(tok, processor):
    assert maybe_prepend_space("  a red circle ", 1.0, np.random.default_rng(0)) == " a red circle"
    assert maybe_prepend_space("  a red circle ", 0.0, np.random.default_rng(0)) == "a red circle"
    tokenizer, media, eoc = tok
    with_space = tokenizer(" a red circle", add_special_tokens=False)["input_ids"]
    without = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert with_space != without
    proc = make_processor(tok, processor, kind="pairs", augment=False)
    record = Record((0, 0), "p", {"png": shape_png(), "txt": b"a red circle"}, None)
    spaced = []
    for s in range(300):
        ids = proc(record, np.random.default_rng(s)).sample.input_ids.tolist()
        assert ids[:2] == [tokenizer.bos_token_id, media] and ids[-1] == eoc
        assert ids[2:-1] in (with_space, without)
        spaced.append(ids[2:-1] == with_space)
    assert 0.42 <= np.mean(spaced) <= 0.58


def test_image_augmentation_flips_and_jitters_mildly(tok, processor):
    image = draw_shape("triangle", "blue", 64, centre=(20, 32), radius=12)
    assert Augmentation(flip=True)(image).getpixel((43, 32)) == image.getpixel((20, 32))
    jittered = np.asarray(Augmentation(False, 1.1, 0.9, 1.1)(image), dtype=float)
    diff = np.abs(jittered - np.asarray(image, dtype=float))
    assert 0 < diff.mean() < 20
    draws = [Augmentation.draw(np.random.default_rng(s), 0.5, 0.1) for s in range(200)]
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6
    assert all(0.9 <= d.brightness <= 1.1 and 0.9 <= d.contrast <= 1.1 and 0.9 <= d.saturation <= 1.1 for d in draws)
    # In the pipeline: augment=False gives exactly the image processor's output.
    record = Record((0, 0), "p", {"png": png(image), "txt": b"a blue triangle"}, None)
    plain = make_processor(tok, processor, kind="pairs", augment=False)(record, np.random.default_rng(0)).sample
    assert torch.equal(plain.media[0, 0], processor(image))
    augmented = [make_processor(tok, processor, kind="pairs")(record, np.random.default_rng(s)).sample.media
                 for s in range(6)]
    assert any(not torch.allclose(a, plain.media) for a in augmented)


# -------------------------------------------------------------------------------- filters
def test_image_filters():
    good = draw_shape("circle", "red", 64)
    assert image_problem(good, 64, 3.0, 2) is None
    assert image_problem(good.resize((63, 100)), 64, 3.0, 2) == "too_small"
    assert image_problem(good.resize((100, 40)), 64, 3.0, 2) == "too_small"
    assert image_problem(good.resize((193, 64)), 64, 3.0, 2) == "aspect_ratio"
    assert image_problem(good.resize((64, 193)), 64, 3.0, 2) == "aspect_ratio"
    assert image_problem(good.resize((192, 64)), 64, 3.0, 2) is None  # exactly 3:1 is allowed
    assert image_problem(Image.new("RGB", (80, 80), (10, 200, 30)), 64, 3.0, 2) == "single_colour"
    assert image_problem(Image.new("L", (80, 80), 7), 64, 3.0, 2) == "single_colour"
    dot = Image.new("RGB", (80, 80), (10, 200, 30))
    dot.putpixel((5, 5), (255, 255, 255))
    assert image_problem(dot, 64, 3.0, 2) is None


def test_filtered_images_are_removed_from_documents_before_tokenisation(tok, processor):
    members = {"good1.png": shape_png(), "small.png": shape_png(size=40), "wide.png": shape_png(width=256),
               "flat.png": png(Image.new("RGB", (80, 80), (0, 0, 255))), "good2.png": shape_png("square"),
               "broken.png": b"not an image at all"}
    names = list(members) + ["absent.png"]
    texts, images = [], []
    for name in names:
        texts += [None, f"text after {name}"]
        images += [name, None]
    proc = make_processor(tok, processor, augment=False, p_next=0.0)
    out = proc(doc_record(texts, images, members), np.random.default_rng(0))
    assert out.sample is not None and out.sample.media.shape[0] == 2
    assert int((out.sample.input_ids == tok[1]).sum()) == 2
    assert dict(out.images_removed) == {"too_small": 1, "aspect_ratio": 1, "single_colour": 1, "corrupt": 1,
                                        "missing": 1}
    # The kept images are good1 and good2, in order.
    expected = torch.stack([processor(Image.open(io.BytesIO(members[n]))) for n in ("good1.png", "good2.png")])
    assert torch.equal(out.sample.media[:, 0], expected)
    # A pair whose image fails a filter is skipped with the filter as reason.
    pair = make_processor(tok, processor, kind="pairs")
    skipped = pair(Record((0, 0), "p", {"png": members["flat.png"], "txt": b"blue"}, None), np.random.default_rng(0))
    assert skipped.sample is None and skipped.reason == "image_single_colour"


# --------------------------------------------------------------------------------- labels
def test_labels_ignore_media_tokens_and_keep_end_of_chunk():
    ids = torch.tensor([1, EOC, MEDIA, 5, 6, EOC, MEDIA, 7, EOC])
    labels = make_labels(ids, MEDIA)
    assert labels.tolist() == [IGNORE_INDEX, EOC, IGNORE_INDEX, 5, 6, EOC, IGNORE_INDEX, 7, EOC]
    batch = make_labels(torch.stack([ids, ids]), MEDIA)
    assert torch.equal(batch[1], labels)


def test_pair_tokens_labels_and_padding(tok, processor):
    tokenizer, media, eoc = tok
    assert pair_ids([5, 6, 7], MEDIA, EOC, 1, 100).tolist() == [1, MEDIA, 5, 6, 7, EOC]
    assert pair_ids([5, 6, 7], MEDIA, EOC, None, 4).tolist() == [MEDIA, 5, 6, 7]
    proc = make_processor(tok, processor, kind="pairs", augment=False, p_space=0.0)
    short = proc(Record((0, 0), "a", {"png": shape_png(), "txt": b"red"}, None), np.random.default_rng(0)).sample
    long = proc(Record((0, 1), "b", {"png": shape_png(), "txt": b"a red circle on a blue background"}, None),
                np.random.default_rng(0)).sample
    batch = collate([short, long], tokenizer.pad_token_id)
    for row, sample in enumerate((short, long)):
        n = len(sample.input_ids)
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        real = batch.labels[row, :n]
        ids = batch.input_ids[row, :n]
        assert (real[ids == media] == IGNORE_INDEX).all()
        assert real[-1] == eoc  # the model must learn to end the caption
        assert torch.equal(real[2:], ids[2:])
    assert batch.num_tokens == (len(short.input_ids) - 2) + (len(long.input_ids) - 2)


def test_no_bos_when_the_tokenizer_has_none_or_add_bos_is_off(tok, processor):
    proc = make_processor(tok, processor, kind="pairs", add_bos=False, augment=False)
    sample = proc(Record((0, 0), "a", {"png": shape_png(), "txt": b"red"}, None), np.random.default_rng(0)).sample
    assert int(sample.input_ids[0]) == tok[1]


def test_processing_is_a_function_of_the_generator(tok, processor):
    members = {f"{i}.png": shape_png() for i in range(3)}
    record = doc_record([None, "one two three four five", None, "six", None, "seven"],
                        ["0.png", None, "1.png", None, "2.png", None], members)
    proc = make_processor(tok, processor, max_tokens=8, min_images=0)
    a = proc(record, np.random.default_rng([1, 2, 3]))
    b = proc(record, np.random.default_rng([1, 2, 3]))
    assert torch.equal(a.sample.input_ids, b.sample.input_ids) and torch.equal(a.sample.media, b.sample.media)
    others = [proc(record, np.random.default_rng([1, 2, s])).sample for s in range(4, 12)]
    assert any(not torch.equal(o.input_ids, a.sample.input_ids) or o.media.shape != a.sample.media.shape
               or not torch.equal(o.media, a.sample.media) for o in others)


# ---------------------------------------------------------------------------------- config
def test_config_errors_name_the_field():
    with pytest.raises(DataError, match="kind: expected one of interleaved, pairs, video, got 'images'"):
        DatasetConfig(name="x", kind="images", path="p")
    with pytest.raises(DataError, match="p_next: expected a probability"):
        DatasetConfig(name="x", kind="pairs", path="p", p_next=1.5)
    with pytest.raises(DataError, match=r"unknown field\(s\) \['batchsize'\]"):
        DatasetConfig.from_dict({"name": "x", "kind": "pairs", "path": "p", "batchsize": 3})
    with pytest.raises(DataError, match="missing required field"):
        DatasetConfig.from_dict({"name": "x", "kind": "pairs"})
    config = DatasetConfig.from_dict({"name": "x", "kind": "video", "path": ["a", "b"], "frames": 4})
    assert config.to_dict()["frames"] == 4 and config.paths == ["a", "b"]


# ------------------------------------------------------------------------------------ CLI
def write_bad_pairs(folder: Path):
    """A pairs folder: 5 good pairs, a corrupt image, a caption-less image."""
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"{i:03d}.png").write_bytes(shape_png(["circle", "square", "triangle"][i % 3]))
        (folder / f"{i:03d}.txt").write_text(f"shape number {i}")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (folder / "bad.txt").write_text("a corrupt image")
    (folder / "nocap.png").write_bytes(shape_png())


def test_convert_and_validate_counts(tmp_path):
    write_bad_pairs(tmp_path / "src")
    report = convert_to_shards(str(tmp_path / "src"), tmp_path / "shards", "pairs", shard_size=3)
    # Images are decoded before they enter a shard: the corrupt one is skipped and counted.
    assert report.written == 5 and dict(report.skipped) == {"missing_caption": 1, "corrupt_image": 1}
    assert "bad.jpg" in report.messages["corrupt_image"]
    assert [p.name for p in report.shards] == ["shard-000000.tar", "shard-000001.tar"]
    checked = validate_data(str(tmp_path / "shards" / "*.tar"), "pairs")
    assert checked.layout == "shards" and sorted(checked.shards.values()) == [2, 3]
    assert (checked.stats.records, checked.stats.samples, dict(checked.stats.skipped)) == (5, 5, {})
    folder = validate_data(str(tmp_path / "src"), "pairs")
    assert (folder.stats.records, folder.stats.samples) == (7, 5)
    assert dict(folder.stats.skipped) == {"corrupt_image": 1, "missing_caption": 1}
    assert "bad.jpg" in folder.stats.messages["skipped/corrupt_image"]
    with pytest.raises(OutputExistsError, match="already has shards"):
        convert_to_shards(str(tmp_path / "src"), tmp_path / "shards", "pairs")


def test_data_command_line(tmp_path, capsys):
    import argparse

    write_bad_pairs(tmp_path / "src")
    assert flamingo_main(["data", "convert", str(tmp_path / "src"), str(tmp_path / "out"), "--kind", "pairs",
                      "--shard-size", "4"]) == 0
    assert "wrote 5 samples to 2 shard(s); skipped: corrupt_image=1, missing_caption=1" in capsys.readouterr().out
    assert flamingo_main(["data", "validate", str(tmp_path / "out"), "--kind", "pairs", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["records"], report["ok"], report["bad"], report["skipped"]) == (5, 5, 0, {})
    assert flamingo_main(["data", "validate", str(tmp_path / "src"), "--kind", "pairs", "--strict"]) == 2
    assert "2 bad sample(s) of 7" in capsys.readouterr().err
    assert flamingo_main(["data", "validate", str(tmp_path / "nowhere"), "--kind", "pairs"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # Registered on another program's subparsers (as flamingo's cli.py does).
    parser = argparse.ArgumentParser(prog="flamingo")
    add_data_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "shapes", str(tmp_path / "tiny"), "--kind", "pairs", "--n", "3"])
    args.func(args)
    assert len(list((tmp_path / "tiny" / "folder").glob("*.png"))) == 3


def test_shapes_dataset_layouts(tmp_path):
    made = make_shapes_dataset(tmp_path / "i", 3, kind="interleaved", seed=0)
    docs = sorted(made.folder.glob("*.json"))
    assert len(docs) == 3 and len(made.jsonl.read_text().splitlines()) == 3
    for doc in docs:
        images = [m for m in json.loads(doc.read_text())["images"] if m]
        assert 2 <= len(images) <= 4 and all((made.folder / m).is_file() for m in images)
    again = make_shapes_dataset(tmp_path / "j", 3, kind="interleaved", seed=0)
    assert again.captions == made.captions
    assert (made.folder / "images" / "00000_0.png").read_bytes() == (again.folder / "images" / "00000_0.png").read_bytes()


# ----------------------------------------------------------------- media outside the dataset
def write_escaping_pairs(root: Path, outside: Path) -> Path:
    """A pairs JSONL under `root` with one good sample and four that reach files outside it: an
    absolute path, a `..` path, a symlinked folder and a symlinked file (all to valid images)."""
    outside.mkdir(parents=True)
    (outside / "secret.png").write_bytes(shape_png("square"))
    (root / "images").mkdir(parents=True)
    (root / "images" / "good.png").write_bytes(shape_png())
    (root / "images" / "link.png").symlink_to(outside / "secret.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    refs = ["images/good.png", str(outside / "secret.png"), f"../{outside.name}/secret.png",
            "linked/secret.png", "images/link.png"]
    lines = [json.dumps({"image": ref, "caption": f"sample {i}"}) for i, ref in enumerate(refs)]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl"


def test_media_outside_the_dataset_folder_are_refused_unless_allowed(tmp_path):
    jsonl = write_escaping_pairs(tmp_path / "ds", tmp_path / "elsewhere")
    report = convert_to_shards(str(jsonl), tmp_path / "shards", "pairs", shuffle=False)
    assert report.written == 1 and dict(report.skipped) == {"unsafe_path": 4}
    assert "--allow-absolute-paths" in report.messages["unsafe_path"]
    checked = validate_data(str(jsonl), "pairs")
    assert (checked.stats.samples, dict(checked.stats.skipped)) == (1, {"unsafe_path": 4})

    allowed = convert_to_shards(str(jsonl), tmp_path / "all", "pairs", allow_absolute_paths=True)
    assert allowed.written == 5 and not allowed.skipped
    assert validate_data(str(jsonl), "pairs", allow_absolute_paths=True).stats.samples == 5


def test_folder_files_linking_outside_and_document_images_outside_are_skipped(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(shape_png("square"))
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "ok.png").write_bytes(shape_png())
    (pairs / "ok.txt").write_text("fine")
    (pairs / "leak.png").symlink_to(outside / "secret.png")
    (pairs / "leak.txt").write_text("a file from elsewhere")
    report = convert_to_shards(str(pairs), tmp_path / "a", "pairs")
    assert report.written == 1 and dict(report.skipped) == {"unsafe_path": 1}
    assert "leak.png" in report.messages["unsafe_path"]

    docs = tmp_path / "docs"
    (docs / "images").mkdir(parents=True)
    (docs / "images" / "ok.png").write_bytes(shape_png())
    doc = {"texts": ["Look:", None, None, "the end"], "images": [None, "images/ok.png", str(outside / "secret.png"), None]}
    (docs / "d.json").write_text(json.dumps(doc))
    report = convert_to_shards(str(docs), tmp_path / "b", "interleaved")
    assert report.written == 1 and dict(report.images_dropped) == {"unsafe_path": 1}
    members = tarfile.open(report.shards[0]).getnames()
    assert sorted(m.split(".", 1)[1] for m in members) == ["img0.png", "json"]


def test_convert_decodes_every_image_and_skips_the_bad_ones(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad = {"truncated": shape_png()[:200], "bomb": bomb_png(), "checksum": bad_checksum_png(),
           "text": b"not an image at all", "empty": b""}
    for name, data in {"good": shape_png(), **bad}.items():
        (src / f"{name}.png").write_bytes(data)
        (src / f"{name}.txt").write_text(name)
    report = convert_to_shards(str(src), tmp_path / "out", "pairs")
    assert report.written == 1 and dict(report.skipped) == {"corrupt_image": len(bad)}
    with pytest.raises(DataError, match="no sample could be converted.*max_pixels=100"):
        convert_to_shards(str(src), tmp_path / "small", "pairs", max_pixels=100, shuffle=False)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_an_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    from flamingo.data import convert as data_convert

    write_bad_pairs(tmp_path / "src")
    convert = data_convert._convert_record
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return convert(*args, **kwargs)

    monkeypatch.setattr(data_convert, "_convert_record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_to_shards(str(tmp_path / "src"), tmp_path / "out", "pairs", shard_size=1)
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["src"]
    monkeypatch.undo()
    assert convert_to_shards(str(tmp_path / "src"), tmp_path / "out", "pairs").written == 5


def test_convert_into_a_folder_with_shards_needs_overwrite(tmp_path):
    write_bad_pairs(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = convert_to_shards(str(tmp_path / "src"), out, "pairs", shard_size=2)
    assert [p.name for p in first.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        convert_to_shards(str(tmp_path / "src"), out, "pairs", shard_size=5)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = convert_to_shards(str(tmp_path / "src"), out, "pairs", shard_size=5, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shard-000000.tar"]
    assert again.shards == [out / "shard-000000.tar"] and validate_data(str(out), "pairs").stats.samples == 5


def test_shapes_into_an_existing_dataset_is_refused_before_writing_anything(tmp_path):
    first = make_shapes_dataset(tmp_path / "ds", 3, kind="pairs", seed=0)
    files = {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        make_shapes_dataset(tmp_path / "ds", 5, kind="interleaved", seed=1)
    assert {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()} == files
    assert sorted(os.listdir(tmp_path)) == ["ds"]
    again = make_shapes_dataset(tmp_path / "ds", 5, kind="interleaved", seed=1, overwrite=True)
    assert len(list(again.folder.glob("*.json"))) == 5 and not list(again.folder.glob("*.png"))
    assert again.captions != first.captions and sorted(os.listdir(tmp_path)) == ["ds"]

