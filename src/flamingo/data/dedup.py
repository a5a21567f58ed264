"""Removing training images that duplicate evaluation images (paper A.3.4).

The paper deduplicated its image-text training sets (ALIGN, LTIP) against the images of its
benchmarks with a trained visual encoder and an approximate nearest-neighbour search. Here two
detectors run side by side:

- perceptual hashes (`imagehash.phash`, 64 bits) catch exact and near-exact copies (resized,
  recompressed); an evaluation image is hashed as is and mirrored, so flipped copies match too;
  the hashes within the Hamming distance are found by multi-index hashing (`HashIndex`, exact);
- frozen-encoder embeddings (any of our vision encoders, spatial features mean-pooled,
  L2-normalised) catch near-duplicates the hash misses (crops); a training image whose cosine
  similarity to an evaluation image (or its mirror) reaches the threshold is a duplicate. The
  nearest neighbour is found with faiss (`pip install faiss-cpu`) for large evaluation sets, with
  a torch matrix product otherwise or when faiss is not installed; both are exact searches.

Everything streams: evaluation images are hashed and embedded in chunks and only their hashes and
embeddings are kept (2 x 8 bytes + 2 x D floats each); training records are read, checked and
written chunk by chunk, so millions of training images never sit in memory. The training data
are WebDataset shards (`flamingo data convert` writes a folder or JSONL file as shards).

Outputs in OUT: report/BENCHMARK.json (every duplicate: the training record and image, the
evaluation image, which detector fired, the Hamming distance and the cosine similarity),
report/summary.json and report/summary.txt, and shards/shard-NNNNNN.tar: the training records
without the duplicates, under their input keys, members copied byte for byte (a record whose key
equals the previous one's starts a new shard, so the two stay apart). OUT is built in a temporary
folder and renamed into place at the end, so an interrupted run leaves no partial output.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from flamingo.data.config import DataError
from flamingo.errors import import_extra
from flamingo.data.media import IMAGE_EXTS, SkipSample, decode_image
from flamingo.data.processing import pair_image, parse_document, record_document, resolve_media
from flamingo.data.sources import CORRUPT_FIELD, Record, iter_shard, resolve_paths
from flamingo.model.config import VisionConfig
from flamingo.model.image_processing import DEFAULT_MAX_PIXELS
from flamingo.outputs import check_output_dir, publish, staging_dir

DEDUP_KINDS = ("pairs", "interleaved")


@dataclass
class DedupConfig:
    """hash_distance: a training image whose 64-bit pHash is within this Hamming distance of an
        evaluation image's (or its mirror's) is a duplicate (resized / recompressed copies: 0-5).
    cosine: ... or whose embedding has at least this cosine similarity with one (crops); the
        right value depends on the encoder: with EfficientNet-Lite0, slight crops and flips score
        >= 0.83 and distinct photos <= 0.5. None: hashes only (no encoder is loaded).
    batch_size: images hashed and embedded per chunk.
    search: of the embeddings: "auto" (faiss when installed and an evaluation set has >=
        faiss_min_rows embeddings), "faiss" or "torch" (hashes: always HashIndex).
    shard_size: records per output shard.
    max_pixels: images with more pixels are not decoded (decompression bombs) and count as unreadable;
        an evaluation image over it goes unchecked, so keep it >= the training data's max_pixels."""

    hash_distance: int = 6
    cosine: float | None = 0.85
    batch_size: int = 64
    search: Literal["auto", "faiss", "torch"] = "auto"
    faiss_min_rows: int = 8192
    shard_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not (isinstance(self.hash_distance, int) and 0 <= self.hash_distance <= 64):
            raise DataError(f"hash_distance: expected an integer in 0..64, got {self.hash_distance!r}")
        if self.cosine is not None and not -1 <= self.cosine <= 1:
            raise DataError(f"cosine: expected a number in [-1, 1] or None, got {self.cosine!r}")
        if self.batch_size < 1 or self.shard_size < 1 or self.max_pixels < 1:
            raise DataError(f"batch_size / shard_size / max_pixels: expected integers >= 1, got {self.batch_size}, "
                            f"{self.shard_size}, {self.max_pixels}")
        if self.search not in ("auto", "faiss", "torch"):
            raise DataError(f"search: expected auto, faiss or torch, got {self.search!r}")


# ------------------------------------------------------------------------------- features
def phash64(image: Image.Image) -> np.uint64:
    imagehash = import_extra("imagehash", "dedup", "flamingo data dedup")
    return np.uint64(int(str(imagehash.phash(image)), 16))


class Embedder:
    """A frozen vision encoder's mean-pooled, L2-normalised features of PIL images."""

    def __init__(self, vision: VisionConfig) -> None:
        from flamingo.model.vision import build_vision_encoder

        self.encoder = build_vision_encoder(vision)
        self.processor = self.encoder.image_processor()

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        pixels = torch.stack([self.processor.preprocess_image(image) for image in images])
        features = self.encoder.encode(pixels).float().mean(1)
        return F.normalize(features, dim=-1).numpy()


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- hash search
class HashIndex:
    """Exact search of 64-bit hashes for the nearest one within `radius` bits of each query.

    Multi-index hashing (Norouzi et al., 2012): the hashes are cut into `tables` substrings of
    `bits` bits; a hash within `radius` of a query differs from it in at most `flips` =
    ceil((radius + 1) / tables) - 1 bits of at least one substring (pigeonhole), so looking up each
    table's buckets at the query's substring with up to `flips` bits flipped finds it. A table is
    the hashes sorted by their substring plus bucket offsets (numpy: faiss's IndexBinaryMultiHash
    took 6x longer per query on 2M hashes, its IndexBinaryFlat 80x; benchmarks/dedup_index.py).
    Where the radius is too wide for that to beat a scan, the search is a popcount over blocks of
    hashes. Either way a search holds at most about `budget` candidates (~40 bytes each) at a time."""

    def __init__(self, hashes: np.ndarray, radius: int, budget: int = 1 << 20) -> None:
        self.hashes, self.radius, self.budget = np.ascontiguousarray(hashes, dtype=np.uint64), radius, budget
        self.plan = self._plan(len(self.hashes), radius)
        self.tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (rows, their hashes, bucket offsets)
        if self.plan is not None:
            tables, bits, flips = self.plan
            self.flip_masks = np.array([sum(1 << b for b in combo) for n in range(flips + 1)
                                        for combo in itertools.combinations(range(bits), n)], dtype=np.uint64)
            for table in range(tables):
                keys = self._keys(self.hashes, table)
                rows = np.argsort(keys, kind="stable")
                offsets = np.searchsorted(keys[rows], np.arange((1 << bits) + 1, dtype=np.uint64))
                self.tables.append((rows, self.hashes[rows], offsets))

    @staticmethod
    def _plan(rows: int, radius: int) -> tuple[int, int, int] | None:
        """(tables, bits, flips) of the cheapest multi-index hashing, or None where a scan is cheaper.
        Cost per query: a scan reads every hash; a table costs a few hash reads per probe plus its
        candidates (bucket size rows / 2**bits). bits <= 22 keeps each table's offsets <= 32 MB."""
        best, plan = float(rows), None
        for tables in range(3, 65):
            bits = 64 // tables
            flips = -(-(radius + 1) // tables) - 1
            probes = sum(math.comb(bits, n) for n in range(flips + 1))
            cost = 8 * tables * probes * (1 + rows / 2**bits)
            if bits <= 22 and 2**bits <= 4 * rows and cost < best:  # offsets no sparser than the hashes
                best, plan = cost, (tables, bits, flips)
        return plan

    def _keys(self, hashes: np.ndarray, table: int) -> np.ndarray:
        bits = self.plan[1]
        return (hashes >> np.uint64(table * bits)) & np.uint64((1 << bits) - 1)

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Hamming distance, row) of the nearest hash per query: exact where within the radius;
        otherwise the distance is above the radius (65 and row -1 when nothing was near)."""
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        best = np.full(len(queries), 65, dtype=np.int64)
        row = np.full(len(queries), -1, dtype=np.int64)
        if self.plan is None:
            block = max(1, self.budget // max(len(queries), 1))
            for start in range(0, len(self.hashes), block):
                distance = np.bitwise_count(queries[:, None] ^ self.hashes[None, start:start + block])
                self._keep(best, row, np.arange(len(queries)), distance.min(1), distance.argmin(1) + start)
            return best, row
        for table, (rows, hashes, offsets) in enumerate(self.tables):
            probes = (self._keys(queries, table)[:, None] ^ self.flip_masks[None, :]).astype(np.int64)  # [Q, P]
            starts, counts = offsets[probes], offsets[probes + 1] - offsets[probes]
            per_query = counts.sum(1)
            ends = np.cumsum(per_query)
            first = 0
            while first < len(queries):  # groups of queries with at most `budget` candidates
                done = int(ends[first - 1]) if first else 0
                last = max(first + 1, int(np.searchsorted(ends, done + self.budget, "right")))
                self._search_group(queries, slice(first, last), starts, counts, per_query, rows, hashes, best, row)
                first = last
        return best, row

    def _search_group(self, queries: np.ndarray, group: slice, starts: np.ndarray, counts: np.ndarray,
                      per_query: np.ndarray, rows: np.ndarray, hashes: np.ndarray, best: np.ndarray,
                      row: np.ndarray) -> None:
        """Check the candidates of one table's buckets for a group of queries."""
        lengths, firsts = counts[group].ravel(), starts[group].ravel()
        total = int(lengths.sum())
        if not total:
            return
        which = np.arange(len(queries))[group]
        owner = np.repeat(which, per_query[group])
        # positions of the candidates: the bucket ranges [start, start + length) laid end to end
        position = np.repeat(firsts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
        distance = np.bitwise_count(hashes[position] ^ queries[owner]).astype(np.int64)
        found = per_query[group] > 0
        segments = (np.cumsum(per_query[group]) - per_query[group])[found]
        # the nearest candidate of each query: the minimum of (distance, candidate) packed in one int64
        nearest = np.minimum.reduceat((distance << 32) | np.arange(total), segments)
        self._keep(best, row, which[found], nearest >> 32, rows[position[nearest & 0xFFFFFFFF]])

    @staticmethod
    def _keep(best: np.ndarray, row: np.ndarray, which: np.ndarray, distance: np.ndarray, found: np.ndarray) -> None:
        closer = distance < best[which]
        best[which[closer]], row[which[closer]] = distance[closer], found[closer]


# ------------------------------------------------------------------------- evaluation side
def evaluation_images(path: str) -> list[Path]:
    """The image files of a benchmark: a folder (searched recursively) or a glob pattern."""
    root = Path(path)
    if root.is_dir():
        files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS]
    else:
        files = [Path(p) for p in glob.glob(path, recursive=True)
                 if Path(p).is_file() and Path(p).suffix.lower().lstrip(".") in IMAGE_EXTS]
    if not files:
        raise DataError(f"evaluation images {path!r}: no image files ({', '.join(IMAGE_EXTS)}) in that folder or "
                        f"matching that pattern")
    return sorted(files)


@dataclass
class EvaluationIndex:
    """Hashes and embeddings of one benchmark's images; row 2i is image i, row 2i+1 its mirror."""

    name: str
    files: list[Path]
    hashes: np.ndarray  # [2N] uint64
    embeddings: np.ndarray | None  # [2N, D] float32
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> why it could not be read
    faiss_index: Any = None
    hash_index: HashIndex | None = None  # built for one radius (index_benchmark)

    def nearest_hashes(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Hamming distance, image index) of the closest evaluation hash within the index's radius,
        per query; a distance above the radius means none is that close."""
        distance, row = self.hash_index.search(hashes)
        return distance, row // 2

    def hash_distance(self, query: np.uint64, image: int) -> int:
        """Hamming distance between a hash and evaluation image `image` (or its mirror)."""
        return int(np.bitwise_count(query ^ self.hashes[2 * image:2 * image + 2]).min())

    def nearest_embeddings(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarity, image index) of the closest evaluation embedding, per query."""
        if self.faiss_index is not None:
            similarity, index = self.faiss_index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)
            return similarity[:, 0], index[:, 0] // 2
        similarity = torch.from_numpy(embeddings) @ torch.from_numpy(self.embeddings).T
        best, index = similarity.max(1)
        return best.numpy(), index.numpy() // 2


def _faiss(wanted: str, rows: int, min_rows: int) -> Any:
    if wanted == "torch" or (wanted == "auto" and rows < min_rows):
        return None
    try:
        import faiss
    except ImportError:
        if wanted == "faiss":
            raise DataError("search: faiss was asked for but is not installed (pip install faiss-cpu)") from None
        return None
    return faiss


def index_benchmark(name: str, files: list[Path], config: DedupConfig, embedder: Embedder | None) -> EvaluationIndex:
    """Hash (and embed) every image of a benchmark, chunk by chunk, with its mirror."""
    kept: list[Path] = []
    hashes: list[np.uint64] = []
    embeddings: list[np.ndarray] = []
    unreadable: dict[str, str] = {}
    for chunk in _chunks(iter(files), config.batch_size):
        images = []
        for file in chunk:
            try:
                image = decode_image(file, str(file), config.max_pixels).convert("RGB")
            except SkipSample as skip:
                unreadable[str(file)] = skip.message
                continue
            mirror = ImageOps.mirror(image)
            images += [image, mirror]
            hashes += [phash64(image), phash64(mirror)]
            kept.append(file)
        if embedder is not None and images:
            embeddings.append(embedder(images))
    if not kept:
        raise DataError(f"benchmark {name!r}: none of its {len(files)} image files could be decoded "
                        f"(e.g. {str(files[0])[:200]})")
    index = EvaluationIndex(name, kept, np.array(hashes, dtype=np.uint64),
                            np.concatenate(embeddings).astype(np.float32) if embeddings else None, unreadable)
    index.hash_index = HashIndex(index.hashes, config.hash_distance)
    if index.embeddings is not None:
        faiss = _faiss(config.search, len(index.embeddings), config.faiss_min_rows)
        if faiss is not None:
            index.faiss_index = faiss.IndexFlatIP(index.embeddings.shape[1])
            index.faiss_index.add(index.embeddings)
    return index


# --------------------------------------------------------------------------- training side
def training_records(paths: list[str], report: "DedupReport") -> Iterator[tuple[str, Record]]:
    """(key, record) of a training set's shards in stored order, one shard at a time. The damage of
    a damaged shard is reported, and the record it cut short left out (counted in `left_out`)."""
    layout, files = resolve_paths(paths)
    if layout != "shards":
        raise DataError(f"training data {paths[0]!r}: expected WebDataset shards, got a {layout}; convert it first "
                        f"with `flamingo data convert`")

    def damaged(reason: str, message: str) -> None:
        report.damaged.append(message)

    for unit, shard in enumerate(files):
        for record in iter_shard(shard, unit, damaged):
            if CORRUPT_FIELD in record.fields:
                report.left_out += 1
            else:
                yield record.name.removeprefix(f"{shard.name}:"), record


def image_refs(record: Record, kind: str) -> list[Any]:
    """The references of every image of a shard record, in order (a pair's record is its own
    reference); SkipSample when an interleaved record's document cannot be read."""
    if kind == "pairs":
        return [None]
    return [value for seg_kind, value in parse_document(record_document(record), record.name) if seg_kind == "image"]


def load_image(record: Record, kind: str, ref: Any, max_pixels: int) -> tuple[str, Image.Image]:
    """(name, RGB image) of one image of a record; SkipSample when it cannot be read (not a
    member, only a URL, corrupt), as the training loader would skip it."""
    name, source = pair_image(record, None) if kind == "pairs" else resolve_media(ref, record)
    return name, decode_image(source, name, max_pixels).convert("RGB")


# ----------------------------------------------------------------------------------- report
@dataclass
class Duplicate:
    train: str  # the training record
    image: str  # its image that duplicates
    eval: str  # the evaluation image file
    match: str  # "hash" (exact / near-exact copy) or "embedding" (near-duplicate)
    hash_distance: int  # to that evaluation image or its mirror
    cosine: float | None  # to the nearest evaluation embedding


@dataclass
class DedupReport:
    out_dir: Path
    records: int = 0  # training records read
    images: int = 0  # training images checked
    removed: int = 0  # records dropped (one duplicate image is enough)
    kept: int = 0
    # training images (or documents) that could not be read, by reason: nothing to check, and the
    # training loader skips them too; their records stay unless another image is a duplicate
    unchecked: Counter = field(default_factory=Counter)
    damaged: list[str] = field(default_factory=list)  # what was wrong with each damaged shard
    left_out: int = 0  # records cut short by a shard's damage: neither checked nor written
    duplicates: dict[str, list[Duplicate]] = field(default_factory=dict)  # by benchmark
    eval_images: dict[str, int] = field(default_factory=dict)  # evaluation images read, by benchmark
    eval_unreadable: dict[str, dict[str, str]] = field(default_factory=dict)  # by benchmark: file -> why
    shards: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"training records: {self.records} ({self.images} images checked); removed {self.removed}, "
                 f"kept {self.kept} in {len(self.shards)} shard(s) under {self.out_dir / 'shards'}"]
        if self.unchecked:
            lines.append("training images not checked, unreadable (the training loader skips them too): "
                         + ", ".join(f"{k}={v}" for k, v in sorted(self.unchecked.items())))
        if self.damaged:
            lines.append(f"damaged training shards: {len(self.damaged)} (their readable records were checked; "
                         f"{self.left_out} record{'s' * (self.left_out != 1)} cut by the damage left out), "
                         f"e.g. {self.damaged[0][:300]}")
        for name, found in self.duplicates.items():
            by = Counter(d.match for d in found)
            line = (f"{name}: {len(found)} duplicate image(s) of {self.eval_images[name]} evaluation image(s) "
                    f"(hash {by['hash']}, embedding {by['embedding']})")
            if unreadable := self.eval_unreadable.get(name):
                files = ", ".join(sorted(unreadable)[:5]) + (", ..." if len(unreadable) > 5 else "")
                line += (f"; {len(unreadable)} evaluation image(s) could not be read and were not compared: {files} "
                         f"(all in {name}.json)")
            lines.append(line)
        return "\n".join(lines)


def deduplicate(train_paths: str | list[str], kind: str, benchmarks: dict[str, str], out_dir: str | Path,
                config: DedupConfig | None = None, vision: VisionConfig | None = None,
                overwrite: bool = False) -> DedupReport:
    """Find the training images (WebDataset shards) that duplicate images of `benchmarks`
    ({name: folder or glob of image files}) and write the reports and the filtered shards into
    `out_dir` (see the module docstring). `vision` is the frozen encoder of the embedding detector
    (default: EfficientNet-Lite0); an existing `out_dir` is replaced only with `overwrite`."""
    from webdataset import ShardWriter

    config = config or DedupConfig()
    if kind not in DEDUP_KINDS:
        raise DataError(f"kind: expected one of {', '.join(DEDUP_KINDS)}, got {kind!r}")
    if not benchmarks:
        raise DataError("benchmarks: expected at least one NAME=PATH of evaluation images")
    out = check_output_dir(out_dir, overwrite, "dedup output folder", ours=("report", "shards"))
    paths = [train_paths] if isinstance(train_paths, str) else list(train_paths)
    resolve_paths(paths)  # bad training and evaluation paths are reported before the encoder loads
    files = {name: evaluation_images(path) for name, path in benchmarks.items()}
    embedder = Embedder(vision or VisionConfig(kind="efficientnet_lite0")) if config.cosine is not None else None
    indexes = [index_benchmark(name, found, config, embedder) for name, found in files.items()]
    report = DedupReport(out, duplicates={i.name: [] for i in indexes},
                         eval_images={i.name: len(i.files) for i in indexes},
                         eval_unreadable={i.name: i.unreadable for i in indexes})
    with staging_dir(out) as staged:
        (staged / "shards").mkdir()
        with ShardWriter(str(staged / "shards" / "shard-%06d.tar"), maxcount=config.shard_size, verbose=0,
                         encoder=False, mtime=0) as writer:
            last_key = None
            for chunk in _chunks(training_records(paths, report), config.batch_size):
                flagged = _check_chunk([record for _, record in chunk], kind, indexes, config, embedder, report)
                for (key, record), duplicate in zip(chunk, flagged):
                    if duplicate:
                        report.removed += 1
                        continue
                    if key == last_key:  # two input shards reuse a key: readers would merge neighbours
                        writer.next_stream()
                    writer.write({"__key__": key, **record.fields})
                    report.kept, last_key = report.kept + 1, key
        if not report.records:  # an empty output would look like a clean result
            why = report.damaged[0].splitlines()[0][:300] if report.damaged else "the shards hold no records"
            raise DataError(f"training data {', '.join(paths)[:300]}: no training record could be read ({why})")
        report.shards = [out / "shards" / p.name for p in sorted((staged / "shards").glob("shard-*.tar"))]
        _write_reports(report, staged / "report", config, vision)
        publish(staged, out)
    return report


def _check_chunk(records: list[Record], kind: str, indexes: list[EvaluationIndex], config: DedupConfig,
                 embedder: Embedder | None, report: DedupReport) -> list[bool]:
    """Which records of a chunk hold a duplicate image; duplicates are added to the report."""
    report.records += len(records)
    owners: list[int] = []
    names: list[str] = []
    images: list[Image.Image] = []
    for i, record in enumerate(records):
        try:
            refs = image_refs(record, kind)
        except SkipSample as skip:
            report.unchecked[skip.reason] += 1
            continue
        # Every image that decodes is checked: the training loader drops only the unreadable
        # images of a document and trains on the rest.
        for ref in refs:
            try:
                name, image = load_image(record, kind, ref, config.max_pixels)
            except SkipSample as skip:
                report.unchecked[skip.reason] += 1
                continue
            images.append(image)
            owners.append(i)
            names.append(name)
    flagged = [False] * len(records)
    if not images:
        return flagged
    report.images += len(images)
    hashes = np.array([phash64(image) for image in images], dtype=np.uint64)
    embeddings = embedder(images) if embedder is not None else None
    for index in indexes:
        distance, by_hash = index.nearest_hashes(hashes)
        cosine, by_embedding = (index.nearest_embeddings(embeddings) if embeddings is not None
                                else (np.full(len(images), np.nan), by_hash))
        for j in range(len(images)):
            hash_hit = distance[j] <= config.hash_distance
            embedding_hit = config.cosine is not None and cosine[j] >= config.cosine
            if not (hash_hit or embedding_hit):
                continue
            image = by_hash[j] if hash_hit else by_embedding[j]
            report.duplicates[index.name].append(Duplicate(
                records[owners[j]].name, names[j], str(index.files[image]), "hash" if hash_hit else "embedding",
                index.hash_distance(hashes[j], image), None if np.isnan(cosine[j]) else round(float(cosine[j]), 4)))
            flagged[owners[j]] = True
    return flagged


def _write_reports(report: DedupReport, folder: Path, config: DedupConfig, vision: VisionConfig | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"hash_distance": config.hash_distance, "cosine": config.cosine,
                "encoder": asdict(vision or VisionConfig(kind="efficientnet_lite0")) if config.cosine is not None else None}
    for name, found in report.duplicates.items():
        (folder / f"{name}.json").write_text(json.dumps({
            "benchmark": name, "eval_images": report.eval_images[name], "settings": settings,
            "unreadable_eval_images": report.eval_unreadable[name], "duplicates": [asdict(d) for d in found]}, indent=1))
    (folder / "summary.json").write_text(json.dumps({
        "records": report.records, "images": report.images, "removed": report.removed, "kept": report.kept,
        "unchecked": dict(report.unchecked), "damaged_shards": report.damaged, "left_out": report.left_out,
        "shards": [str(p) for p in report.shards], "settings": settings,
        "benchmarks": {name: {"eval_images": report.eval_images[name],
                              "unreadable_eval_images": len(report.eval_unreadable[name]), "duplicates": len(found)}
                       for name, found in report.duplicates.items()}}, indent=1))
    (folder / "summary.txt").write_text(report.summary() + "\n")
