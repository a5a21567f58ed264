"""Train/eval deduplication (paper A.3.4): planted copies of evaluation photos (resized,
recompressed, slightly cropped, mirrored, exact) are found and attributed to their benchmark,
distinct images are kept, and the filtered shards hold exactly the non-duplicates."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").origin).parent / "data"
EVAL = {"coco": ("astronaut.png", "chelsea.png", "coffee.png"), "vqav2": ("rocket.jpg", "camera.png", "horse.png")}
DISTINCT = ("coins.png", "page.png", "retina.jpg", "brick.png")


def photo(name: str) -> Image.Image:
    image = Image.open(SKIMAGE_DATA / name).convert("RGB")
    return image.resize((image.width // 2, image.height // 2))  # smaller files, same content


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    data = io.BytesIO()
    image.save(data, "JPEG", quality=quality)
    return Image.open(io.BytesIO(data.getvalue())).convert("RGB")


def crop(image: Image.Image, fraction: float = 0.05) -> Image.Image:
    w, h = image.size
    return image.crop((int(w * fraction), int(h * fraction), w - int(w * fraction / 2), h - int(h * fraction / 2)))


PLANTED = {  # training caption -> (benchmark, evaluation file, how the copy was made)
    "resized astronaut": ("coco", "astronaut.png", lambda im: im.resize((im.width * 2 // 3, im.height * 2 // 3))),
    "recompressed cat": ("coco", "chelsea.png", lambda im: jpeg(im, 25)),
    "cropped coffee": ("coco", "coffee.png", crop),
    "mirrored rocket": ("vqav2", "rocket.jpg", ImageOps.mirror),
    "exact camera": ("vqav2", "camera.png", lambda im: im),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Evaluation folders for two benchmarks, and training shards holding the planted copies
    among distinct photos and rendered scenes."""
    from flamingo.data.convert import convert_to_shards
    from flamingo.data.procedural import render, sample_scene

    root = tmp_path_factory.mktemp("dedup")
    for benchmark, names in EVAL.items():
        (root / benchmark / "val").mkdir(parents=True)
        for name in names:
            photo(name).save(root / benchmark / "val" / f"{Path(name).stem}.png")
    folder = root / "train"
    folder.mkdir()
    captions = {}
    for caption, (_, name, make) in PLANTED.items():
        captions[caption] = make(photo(name))
    for name in DISTINCT:
        captions[f"distinct {Path(name).stem}"] = photo(name)
    rng = np.random.default_rng(0)
    for i in range(4):
        captions[f"scene {i}"] = render(sample_scene(rng), size=128)
    for i, (caption, image) in enumerate(captions.items()):
        image.save(folder / f"{i:03d}.jpg" if caption == "recompressed cat" else folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    convert_to_shards(str(folder), root / "shards", "pairs", shard_size=5, shuffle=False)
    return root


def test_planted_duplicates_are_found_and_removed(planted, tmp_path):
    import webdataset as wds

    from flamingo.data.dedup import deduplicate

    benchmarks = {name: str(planted / name) for name in EVAL}
    report = deduplicate(str(planted / "shards"), "pairs", benchmarks, tmp_path / "out")

    def caption(record_name: str) -> str:
        return found_captions[record_name]

    # Which training records were flagged, for which benchmark and evaluation image, and how.
    found_captions = {}
    for shard in sorted((planted / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            found_captions[f"{shard.name}:{sample['__key__']}"] = sample["txt"].decode()
    flagged = {caption(d.train): (name, Path(d.eval).stem, d.match)
               for name, found in report.duplicates.items() for d in found}
    assert set(flagged) == set(PLANTED), flagged
    for text, (benchmark, file, _) in PLANTED.items():
        assert flagged[text][:2] == (benchmark, Path(file).stem)
    assert flagged["cropped coffee"][2] == "embedding"  # the hash misses crops
    assert all(flagged[t][2] == "hash" for t in ("resized astronaut", "recompressed cat", "exact camera",
                                                  "mirrored rocket"))
    assert report.removed == len(PLANTED) and report.kept == len(found_captions) - len(PLANTED)

    # The filtered shards hold exactly the other records, bytes unchanged.
    kept = [sample["txt"].decode() for shard in report.shards
            for sample in wds.WebDataset(str(shard), shardshuffle=False)]
    assert sorted(kept) == sorted(set(found_captions.values()) - set(PLANTED))
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert summary["benchmarks"] == {"coco": {"eval_images": 3, "unreadable_eval_images": 0, "duplicates": 3},
                                     "vqav2": {"eval_images": 3, "unreadable_eval_images": 0, "duplicates": 2}}
    coco = json.loads((tmp_path / "out" / "report" / "coco.json").read_text())
    assert len(coco["duplicates"]) == 3 and "coco: 3 duplicate" in (tmp_path / "out" / "report" / "summary.txt").read_text()

    # Hashes alone: every copy but the crop; the output folder is replaced only when asked.
    from flamingo.data.dedup import DedupConfig
    from flamingo.outputs import OutputExistsError

    with pytest.raises(OutputExistsError):
        deduplicate(str(planted / "shards"), "pairs", benchmarks, tmp_path / "out", DedupConfig(cosine=None))
    hashes_only = deduplicate(str(planted / "shards"), "pairs", benchmarks, tmp_path / "out",
                              DedupConfig(cosine=None), overwrite=True)
    assert {caption(d.train) for found in hashes_only.duplicates.values() for d in found} == \
        set(PLANTED) - {"cropped coffee"}


def test_faiss_and_torch_searches_agree():
    pytest.importorskip("faiss")
    from flamingo.data.dedup import EvaluationIndex, _faiss

    rng = np.random.default_rng(0)
    evals = rng.standard_normal((40, 16)).astype(np.float32)
    evals /= np.linalg.norm(evals, axis=1, keepdims=True)
    queries = evals[[3, 17, 30]] + 0.05 * rng.standard_normal((3, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    plain = EvaluationIndex("x", [], np.zeros(40, dtype=np.uint64), evals)
    faiss = _faiss("faiss", 40, 0)
    indexed = EvaluationIndex("x", [], np.zeros(40, dtype=np.uint64), evals, faiss_index=faiss.IndexFlatIP(16))
    indexed.faiss_index.add(evals)
    (c1, i1), (c2, i2) = plain.nearest_embeddings(queries), indexed.nearest_embeddings(queries)
    assert i1.tolist() == i2.tolist() == [1, 8, 15]  # rows 3, 17, 30 are images 1, 8, 15 (2 rows per image)
    np.testing.assert_allclose(c1, c2, rtol=1e-5)


def interleaved_shard(path: Path, documents: dict[str, list]) -> Path:
    """A shard of interleaved documents: key -> segments, each a text (str), image bytes (a member
    of the sample) or a dict reference (e.g. {"url": ...}); returns the shard."""
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for key, segments in documents.items():
            sample, texts, images = {"__key__": key}, [], []
            for segment in segments:
                if isinstance(segment, str):
                    texts.append(segment)
                    images.append(None)
                    continue
                if isinstance(segment, bytes):
                    member = f"img{len(sample)}.png"
                    sample[member], segment = segment, member
                texts.append(None)
                images.append(segment)
            sample["json"] = json.dumps({"texts": texts, "images": images}).encode()
            writer.write(sample)
    return path


def png(image: Image.Image) -> bytes:
    data = io.BytesIO()
    image.save(data, "PNG")
    return data.getvalue()


def test_every_image_of_a_document_is_checked(planted, tmp_path):
    """An evaluation copy in a document is found whatever else the document holds: a corrupt
    image or an image given only by URL before it does not leave the document unchecked (the
    training loader drops only those images and trains on the copy)."""
    from flamingo.data.dedup import DedupConfig, deduplicate

    copy, other = png(photo("camera.png")), png(photo("coins.png"))
    corrupt = copy[:100]
    shard = interleaved_shard(tmp_path / "docs.tar", {
        "corrupt-first": ["a corrupt image, then the copy", corrupt, copy],
        "url-first": ["an image only by URL, then the copy", {"url": "http://example.com/x.png"}, copy],
        "copy-first": ["the copy, then a corrupt image", copy, corrupt],
        "clean": ["a distinct photo and a corrupt image", other, corrupt]})
    report = deduplicate(str(shard), "interleaved", {"vqav2": str(planted / "vqav2")}, tmp_path / "out",
                         DedupConfig(cosine=None))
    assert sorted(d.train for d in report.duplicates["vqav2"]) == \
        ["docs.tar:copy-first", "docs.tar:corrupt-first", "docs.tar:url-first"]
    assert report.removed == 3 and report.kept == 1 and report.images == 4


def test_unreadable_images_are_reported_as_such(planted, tmp_path):
    """Evaluation images that cannot be read are counted and named; training images that cannot be
    read are reported as not checked (not as records kept: their record may go for another image)."""
    from flamingo.data.dedup import DedupConfig, deduplicate

    evals = tmp_path / "eval"
    evals.mkdir()
    photo("camera.png").save(evals / "camera.png")
    (evals / "empty.png").write_bytes(b"")
    (evals / "cut.png").write_bytes(png(photo("horse.png"))[:200])
    copy = png(photo("camera.png"))
    shard = interleaved_shard(tmp_path / "docs.tar", {"doc": ["the copy, then a corrupt image", copy, copy[:100]]})
    report = deduplicate(str(shard), "interleaved", {"val": str(evals)}, tmp_path / "out", DedupConfig(cosine=None))
    assert report.removed == 1 and report.kept == 0
    assert sorted(Path(f).name for f in report.eval_unreadable["val"]) == ["cut.png", "empty.png"]
    summary = (tmp_path / "out" / "report" / "summary.txt").read_text()
    assert "val: 1 duplicate image(s) of 1 evaluation image" in summary
    assert "2 evaluation image(s) could not be read" in summary and "cut.png" in summary and "empty.png" in summary
    assert "kept unchecked" not in summary and "training images not checked" in summary
    details = json.loads((tmp_path / "out" / "report" / "val.json").read_text())
    assert sorted(Path(f).name for f in details["unreadable_eval_images"]) == ["cut.png", "empty.png"]
    assert "0 bytes" in details["unreadable_eval_images"][str(evals / "empty.png")]
    counts = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert counts["unchecked"] == {"corrupt_image": 1}
    assert counts["benchmarks"]["val"] == {"eval_images": 1, "unreadable_eval_images": 2, "duplicates": 1}


def test_max_pixels_bounds_what_is_decoded(tmp_path, capsys):
    """--max-pixels: larger images (decompression bombs) are not decoded, on either side."""
    from bad_input import run_cli

    from flamingo.cli import main

    evals = tmp_path / "eval"
    evals.mkdir()
    small, large = photo("coins.png"), photo("camera.png")  # 151x192 and 256x256 pixels
    small.save(evals / "coins.png")
    large.save(evals / "camera.png")
    shard = interleaved_shard(tmp_path / "docs.tar", {"doc": ["two copies", png(large), png(small)]})
    args = ["data", "dedup", str(shard), "--kind", "interleaved", "--eval", f"val={evals}", "--hash-only"]
    assert main([*args, "--out", str(tmp_path / "out"), "--max-pixels", "50000"]) == 0
    summary = capsys.readouterr().out
    assert "training images not checked, unreadable (the training loader skips them too): corrupt_image=1" in summary
    assert "val: 1 duplicate image(s) of 1 evaluation image(s)" in summary and "camera.png" in summary
    details = json.loads((tmp_path / "out" / "report" / "val.json").read_text())
    assert "more than max_pixels=50000" in details["unreadable_eval_images"][str(evals / "camera.png")]
    run_cli([*args, "--out", str(tmp_path / "out2"), "--max-pixels", "0"], expect="--max-pixels", watch=[tmp_path])


def pairs_shard(path: Path, pairs: dict[str, tuple[Image.Image, str]]) -> Path:
    """A shard of image-text pairs: key -> (image, caption), written as KEY.png + KEY.txt."""
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for key, (image, caption) in pairs.items():
            writer.write({"__key__": key, "png": png(image), "txt": caption.encode()})
    return path


def test_a_record_cut_by_a_truncated_shard_is_left_out(planted, tmp_path):
    """A shard cut inside its last record's caption: that record is not written without its
    text; the records before it are checked and kept, and the damage is reported."""
    import tarfile

    import webdataset as wds

    from flamingo.data.dedup import DedupConfig, deduplicate

    shard = pairs_shard(tmp_path / "cut.tar", {"a": (photo("coins.png"), "coins"), "b": (photo("page.png"), "page"),
                                              "c": (photo("brick.png"), "brick")})
    with tarfile.open(shard) as tar:
        caption = tar.getmember("c.txt")
    shard.write_bytes(shard.read_bytes()[:caption.offset_data + 2])  # c.png whole, c.txt cut
    report = deduplicate(str(shard), "pairs", {"vqav2": str(planted / "vqav2")}, tmp_path / "out",
                         DedupConfig(cosine=None))
    written = [sample for out in report.shards for sample in wds.WebDataset(str(out), shardshuffle=False)]
    assert [s["txt"] for s in written] == [b"coins", b"page"]
    assert report.records == report.kept == 2 and report.left_out == 1 and len(report.damaged) == 1
    summary = (tmp_path / "out" / "report" / "summary.txt").read_text()
    assert "damaged training shards: 1" in summary and "1 record cut by the damage left out" in summary
    assert "cut.tar" in summary


def test_kept_records_keep_their_keys(planted, tmp_path):
    """The output's records keep their input keys (traceable); two shards reusing a key do not
    merge their records in the output."""
    import webdataset as wds

    from flamingo.data.dedup import DedupConfig, deduplicate

    (tmp_path / "in").mkdir()
    pairs_shard(tmp_path / "in" / "a.tar", {"s-7": (photo("coins.png"), "coins"), "s-9": (photo("page.png"), "page")})
    pairs_shard(tmp_path / "in" / "b.tar", {"s-9": (photo("brick.png"), "brick"), "s-3": (photo("camera.png"), "copy")})
    report = deduplicate(str(tmp_path / "in"), "pairs", {"vqav2": str(planted / "vqav2")}, tmp_path / "out",
                         DedupConfig(cosine=None, shard_size=10))
    assert [d.train for d in report.duplicates["vqav2"]] == ["b.tar:s-3"]
    written = list(wds.WebDataset([str(s) for s in report.shards], shardshuffle=False))
    assert [(s["__key__"], s["txt"]) for s in written] == [("s-7", b"coins"), ("s-9", b"page"), ("s-9", b"brick")]


@pytest.mark.parametrize("radius", [0, 6, 12, 40])
def test_hash_search_is_exact_within_the_radius_in_bounded_memory(radius):
    """The hash index finds the nearest evaluation hash whenever one is within the radius (multi-
    index hashing for small radii, a blocked scan for wide ones), reports none closer where there
    is none, and a search of 64 training hashes against 200k evaluation hashes stays far below the
    [64, 200k] distance matrix (100 MB) of a brute-force search."""
    import tracemalloc

    from flamingo.data.dedup import EvaluationIndex, HashIndex

    rng = np.random.default_rng(radius)
    hashes = rng.integers(0, 2**64, 200_000, dtype=np.uint64)  # rows 2i, 2i + 1: image i and its mirror
    hashes[:5000] = hashes[0]  # a crowded bucket: 2500 copies of one image
    queries = rng.integers(0, 2**64, 64, dtype=np.uint64)
    near = rng.integers(0, len(hashes), 48)
    for i, row in enumerate(near):  # 48 queries at distance 0..radius of some evaluation hash
        queries[i] = hashes[row] ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, i % (radius + 1), replace=False)))
    index = EvaluationIndex("x", [], hashes, None, hash_index=HashIndex(hashes, radius))
    assert (index.hash_index.plan is None) == (radius == 40)
    tracemalloc.start()
    distance, image = index.nearest_hashes(queries)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 30e6, peak
    exact = np.bitwise_count(queries[:, None] ^ hashes[None, :]).astype(np.int64)
    within = exact.min(1) <= radius
    assert within[:48].all()
    assert np.array_equal(distance[within], exact.min(1)[within])
    assert all(exact[q, 2 * image[q]:2 * image[q] + 2].min() == exact[q].min() for q in np.flatnonzero(within))
    assert (distance[~within] > radius).all()
