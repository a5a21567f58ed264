"""Reading every layout, robustness to bad samples, determinism, exact resume and rank splits."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tokenizer
from PIL import Image

from flamingo.data import DataError, DatasetConfig, build_loader, make_shapes_dataset
from flamingo.data.convert import convert_to_shards
from flamingo.data.media import decode_video_clip, frame_folder_clip
from flamingo.data.shapes import draw_shape
from flamingo.data.sources import RankStream, Source
from flamingo.model.image_processing import ImageProcessor
from flamingo.model.language_model import add_special_tokens


@pytest.fixture(scope="module")
def tok():
    tokenizer = make_tokenizer()
    eoc, media = add_special_tokens(tokenizer, ["<|endofchunk|>", "<image>"])
    return tokenizer, media, eoc


PROCESSOR = ImageProcessor(16, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return {kind: make_shapes_dataset(root / kind, 10, kind=kind, seed=3, shard_size=3)
            for kind in ("pairs", "interleaved", "video")}


def loader(tok, path, kind="pairs", seed=0, rank=0, world_size=1, start=0, **overrides):
    tokenizer, media, eoc = tok
    config = DatasetConfig(**{"name": kind, "kind": kind, "path": str(path), "batch_size": 4, "frames": 3,
                              **overrides})
    return build_loader(config, tokenizer, media, eoc, PROCESSOR, seed=seed, rank=rank, world_size=world_size,
                        start_position=start)


def texts(tok, batches):
    """The decoded text of every sample of the batches (padding removed)."""
    tokenizer = tok[0]
    out = []
    for batch in batches:
        for ids, mask in zip(batch.input_ids, batch.attention_mask):
            out.append(tokenizer.decode(ids[mask.bool()]))
    return out


def caption_of(text: str) -> str:
    return text.replace("<s>", "").replace("<image>", "").replace("<|endofchunk|>", "").strip()


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        and torch.equal(x.pixel_values, y.pixel_values) and torch.equal(x.attend_next, y.attend_next)
        and torch.equal(x.num_media, y.num_media) for x, y in zip(a, b))


def take(it, n):
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("layout", ["folder", "jsonl", "shards"])
def test_reads_pairs(tok, shapes, layout):
    made = shapes["pairs"]
    path = {"folder": made.folder, "jsonl": made.jsonl, "shards": made.shards}[layout]
    lo = loader(tok, path, epochs=1, augment=False)
    batches = list(lo)
    assert sorted(caption_of(t) for t in texts(tok, batches)) == sorted(made.captions)
    assert lo.stats.records == lo.stats.samples == 10 and not lo.stats.skipped
    assert lo.source.layout == layout
    for b in batches:
        assert b.pixel_values.shape[1:] == (1, 1, 3, 16, 16) and (b.num_media == 1).all()
    # Every caption comes with its own image: the processor output of (one of) the files so captioned.
    for batch in batches:
        for text, pixels in zip(texts(tok, [batch]), batch.pixel_values[:, 0, 0]):
            candidates = [i for i, c in enumerate(made.captions) if c == caption_of(text)]
            assert any(torch.equal(pixels, PROCESSOR(Image.open(made.folder / f"{i:05d}.png"))) for i in candidates)


@pytest.mark.parametrize("layout", ["folder", "jsonl", "shards"])
def test_reads_interleaved(tok, shapes, layout):
    made = shapes["interleaved"]
    path = {"folder": made.folder, "jsonl": made.jsonl, "shards": made.shards}[layout]
    lo = loader(tok, path, kind="interleaved", epochs=1, augment=False, max_tokens=512)
    batches = list(lo)
    assert lo.stats.samples == 10
    got = sorted(texts(tok, batches))
    for text in got:
        assert text.startswith("<s>Some shapes we drew.<|endofchunk|><image>This is ")
    counts = sorted(int(n) for b in batches for n in b.num_media)
    expected = sorted(c.count(",") + 1 for c in made.captions)
    assert counts == expected
    for b in batches:
        assert torch.equal((b.input_ids == tok[1]).sum(1), b.num_media)


def test_reads_mmc4_documents_with_inline_images(tok, tmp_path):
    image = draw_shape("square", "green", 64)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    doc = {"text_list": ["First sentence.", "A green square.", "The end."],
           "image_info": [{"matched_text_index": 1, "image_base64": base64.b64encode(buf.getvalue()).decode()}]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n")
    lo = loader(tok, tmp_path / "docs.jsonl", kind="interleaved", epochs=1, augment=False, p_next=0.0)
    (batch,) = list(lo)
    assert texts(tok, [batch]) == ["<s>First sentence.<|endofchunk|><image>A green square. The end.<|endofchunk|>"]
    assert torch.equal(batch.pixel_values[0, 0, 0], PROCESSOR(image))


@pytest.mark.parametrize("layout", ["folder", "jsonl", "shards", "video_files"])
def test_reads_videos(tok, shapes, layout):
    made = shapes["video"]
    if layout == "video_files":
        assert made.video_files is not None, "PyAV could not encode the test video"
        assert len(list(made.video_files.glob("*.mp4"))) == 10
    path = {"folder": made.folder, "jsonl": made.jsonl, "shards": made.shards, "video_files": made.video_files}[layout]
    lo = loader(tok, path, kind="video", epochs=1, augment=False)
    batches = list(lo)
    assert lo.stats.samples == 10, lo.stats.as_dict()
    assert sorted(caption_of(t) for t in texts(tok, batches)) == sorted(made.captions)
    for b in batches:
        assert b.pixel_values.shape[1:] == (1, 3, 3, 16, 16)


def test_video_file_clip_shows_the_frames_at_the_sampled_times(shapes):
    """PyAV path: the clip decoded from the .mp4 equals the frames of the same times."""
    made = shapes["video"]
    frames = sorted((made.folder / "00004").glob("*.png"))
    for seed in range(4):
        chosen = frame_folder_clip(len(frames), 1.0, 2, 1.0, np.random.default_rng(seed))
        clip = decode_video_clip(made.video_files / "00004.mp4", "v", 2, 1.0, np.random.default_rng(seed))
        assert len(clip) == 2
        for index, image in zip(chosen, clip):
            errors = [np.abs(np.asarray(Image.open(f).convert("RGB"), dtype=float) - np.asarray(image, dtype=float)).mean()
                      for f in frames]
            assert int(np.argmin(errors)) == index and errors[index] < 8, (seed, errors)
    # A clip longer than the video repeats its last frame; 1 FPS on a 4-frame video at 1 FPS.
    clip = decode_video_clip(made.video_files / "00004.mp4", "v", 6, 1.0, np.random.default_rng(0))
    assert len(clip) == 6 and np.array_equal(np.asarray(clip[-1]), np.asarray(clip[-2]))


# ---------------------------------------------------------------------------- robustness
def test_bad_samples_are_skipped_and_counted(tok, tmp_path):
    good = io.BytesIO()
    draw_shape("circle", "red", 64).save(good, format="PNG")
    (tmp_path / "good.png").write_bytes(good.getvalue())
    (tmp_path / "corrupt.png").write_bytes(good.getvalue()[:60])
    lines = [{"image": "good.png", "caption": "a red circle"},
             {"image": "corrupt.png", "caption": "truncated"},
             {"image": "missing.png", "caption": "no file"},
             {"image": "good.png", "caption": "   "},
             {"image": "good.png"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "{not json\n")
    lo = loader(tok, tmp_path / "pairs.jsonl", epochs=1, batch_size=2)
    batches = list(lo)
    assert sum(len(b.input_ids) for b in batches) == 1
    assert lo.stats.records == 6 and lo.stats.samples == 1
    assert dict(lo.stats.skipped) == {"corrupt_image": 1, "missing_image": 1, "empty_caption": 1,
                                      "missing_caption": 1, "undecodable": 1}
    assert "missing.png" in lo.stats.messages["skipped/missing_image"]
    assert lo.position == 6

    docs = [{"texts": [], "images": []}, {"texts": ["  ", None], "images": [None, "good.png"]},
            {"texts": ["only text"], "images": [None]}, {"texts": ["fine", None], "images": [None, "good.png"]},
            {"texts": ["x", None], "images": [None, "corrupt.png"]}, {"wrong": 1}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    lo = loader(tok, tmp_path / "docs.jsonl", kind="interleaved", epochs=1)
    assert sum(len(b.input_ids) for b in lo) == 1
    assert dict(lo.stats.skipped) == {"empty_document": 2, "too_few_images": 2, "undecodable": 1}
    assert dict(lo.stats.images_removed) == {"corrupt": 1}


def test_damaged_shards_and_videos_are_not_fatal(tok, shapes, tmp_path):
    made = shapes["pairs"]
    shards = sorted(Path(made.shards).parent.glob("*.tar"))
    assert len(shards) == 4
    for damage in ("overwritten", "truncated"):
        folder = tmp_path / damage
        folder.mkdir()
        for shard in shards:
            (folder / shard.name).write_bytes(shard.read_bytes())
        target = folder / shards[1].name
        data = target.read_bytes()
        if damage == "overwritten":  # garbage over the header of the second member
            target.write_bytes(data[:1536] + b"\xffgarbage" * 64 + data[1536 + 576:])
        else:
            target.write_bytes(data[: len(data) // 2])
        lo = loader(tok, folder, epochs=1, batch_size=3)
        list(lo)
        assert lo.stats.records == lo.stats.samples + sum(lo.stats.skipped.values())
        assert lo.stats.skipped["corrupt_shard"] == 1, lo.stats.as_dict()
        assert shards[1].name in lo.stats.messages["skipped/corrupt_shard"]
        assert 7 <= lo.stats.samples < 10
        # The damaged stream is still exactly resumable.
        full = loader(tok, folder, seed=2)
        it = iter(full)
        take(it, 2)
        position = full.position
        assert same_batches(take(it, 4), take(iter(loader(tok, folder, seed=2, start=position)), 4))
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (tmp_path / "v" / "a.txt").write_text("broken")
    lo = loader(tok, tmp_path / "v", kind="video", epochs=1)
    assert list(lo) == [] and dict(lo.stats.skipped) == {"corrupt_video": 1}


def test_user_mistakes_raise_data_errors(tok, shapes, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        loader(tok, tmp_path / "nothing")
    with pytest.raises(DataError, match="matches no file"):
        loader(tok, tmp_path / "*.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no pairs samples found: expected image files with captions \(x.jpg \+ x.txt\)"):
        loader(tok, tmp_path / "empty")
    with pytest.raises(DataError, match="got rank=3, world_size=2"):
        loader(tok, shapes["pairs"].folder, rank=3, world_size=2)
    lo = loader(tok, shapes["pairs"].folder, world_size=2)
    with pytest.raises(DataError, match="world_size=4 but this loader has world_size=2"):
        lo.load_state_dict({**lo.state_dict(), "world_size": 4})


# ------------------------------------------------------------------- determinism, resume
@pytest.mark.parametrize("kind,layout", [("pairs", "shards"), ("interleaved", "folder"), ("pairs", "jsonl")])
def test_deterministic_stream(tok, shapes, kind, layout):
    made = shapes[kind]
    path = {"folder": made.folder, "jsonl": made.jsonl, "shards": made.shards}[layout]
    a = take(iter(loader(tok, path, kind=kind, seed=5)), 6)
    b = take(iter(loader(tok, path, kind=kind, seed=5)), 6)
    assert same_batches(a, b)
    threaded = take(iter(loader(tok, path, kind=kind, seed=5, num_workers=2)), 6)
    assert same_batches(a, threaded)
    c = take(iter(loader(tok, path, kind=kind, seed=6)), 6)
    assert not same_batches(a, c)
    # Each epoch has all the samples, in its own order (10 records, batches of 4).
    epoch1, epoch2 = ([caption_of(t) for t in texts(tok, a)[i:i + 10]] for i in (0, 10))
    assert sorted(epoch1) == sorted(epoch2) and len(epoch1) == 10
    assert epoch1 != epoch2


@pytest.mark.parametrize("layout", ["shards", "folder"])
def test_exact_resume_from_a_position(tok, shapes, tmp_path, layout):
    made = shapes["pairs"]
    # Add bad samples so that positions (records) and samples differ: images too small for the
    # filter (they decode, so they also pass the conversion into shards).
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in made.folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"bad{i}.png")
        (folder / f"bad{i}.txt").write_text("bad")
    path = folder
    if layout == "shards":
        convert_to_shards(str(folder), tmp_path / "shards", "pairs", shard_size=4)
        path = tmp_path / "shards"
    full = loader(tok, path, seed=1, world_size=2, rank=1)
    it = iter(full)
    head = take(it, 3)
    state = full.state_dict()
    tail = take(it, 7)  # crosses several epochs of this rank (~6-7 records each)
    assert state["position"] > 12 and state["epoch"] >= 1
    # Restored from the state dict ...
    resumed = loader(tok, path, seed=1, world_size=2, rank=1)
    resumed.load_state_dict(state)
    assert same_batches(take(iter(resumed), 7), tail)
    assert resumed.stats.records == full.stats.records
    # ... or from the bare position (epoch located by counting), with threads.
    started = loader(tok, path, seed=1, world_size=2, rank=1, start=state["position"], num_workers=2)
    assert same_batches(take(iter(started), 7), tail)
    # The whole stream is the same after iterating in pieces.
    again = loader(tok, path, seed=1, world_size=2, rank=1)
    pieces = take(iter(again), 3)
    pieces += take(iter(again), 7)
    assert same_batches(pieces, head + tail)


# ------------------------------------------------------------------------------ rank splits
def unique_pairs(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    draw_shape("circle", "red", 64).save(buf, format="PNG")
    for i in range(n):
        (folder / f"{i:04d}.png").write_bytes(buf.getvalue())
        (folder / f"{i:04d}.txt").write_text(f"item {i}")


@pytest.mark.parametrize("shard_size,world_size", [(3, 3), (3, 2), (20, 3), (1, 4)])
def test_rank_split_covers_everything_once_per_epoch(tok, tmp_path, shard_size, world_size):
    unique_pairs(tmp_path / "src", 17)
    convert_to_shards(str(tmp_path / "src"), tmp_path / "shards", "pairs", shard_size=shard_size, seed=2)
    for path in (tmp_path / "shards", tmp_path / "src"):
        seen = []
        for rank in range(world_size):
            lo = loader(tok, path, seed=4, rank=rank, world_size=world_size, epochs=1, batch_size=2, augment=False)
            seen += [caption_of(t) for t in texts(tok, list(lo))]
        assert sorted(seen) == sorted(f"item {i}" for i in range(17)), (path, shard_size, world_size)
    source = Source([str(tmp_path / "shards")], "pairs", "d", 4, True, 5)
    streams = [RankStream(source, r, world_size) for r in range(world_size)]
    assert all(s.shard_split == (source.num_units >= world_size) for s in streams)
    for epoch in range(3):
        uids = [rec.uid for s in streams for rec in s.epoch_records(epoch)]
        assert len(uids) == len(set(uids)) == 17
        assert sum(s.epoch_length(epoch) for s in streams) == 17
        for s in streams:  # skipping into an epoch lands on the same records
            records = [r.uid for r in s.epoch_records(epoch)]
            assert [r.uid for r in s.epoch_records(epoch, skip=2)] == records[2:]


def test_batches_train_a_flamingo(lm_dir, clip_dir, shapes):
    """The contract end to end: a batch from the loader goes through the model with a loss."""
    from conftest import build_with_vision

    model = build_with_vision(lm_dir("llama"), clip_dir)
    for kind in ("interleaved", "pairs"):
        config = DatasetConfig(name=kind, kind=kind, path=str(shapes[kind].folder), batch_size=3, max_tokens=48)
        loader = build_loader(config, model.tokenizer, model.media_token_id, model.eoc_token_id,
                              model.vision_encoder.image_processor(), seed=0)
        batch = next(iter(loader))
        out = model(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
                    num_media=batch.num_media, labels=batch.labels, attend_next=batch.attend_next)
        assert torch.isfinite(out.loss)


def test_an_endless_stream_of_only_bad_samples_is_an_error(tok, tmp_path):
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"image": "nope.png", "caption": "x"}) + "\n"
                                                for _ in range(5)))
    with pytest.raises(DataError, match=r"no usable sample in a whole epoch .*missing_image"):
        next(iter(loader(tok, tmp_path / "bad.jsonl")))
    lo = loader(tok, tmp_path / "bad.jsonl", epochs=3)
    assert list(lo) == [] and lo.stats.skipped == {"missing_image": 15}
