"""Hash search of `flamingo data dedup`: the multi-index hashing of `HashIndex` vs the brute-force
search it replaced (every training hash against every evaluation hash, a [chunk, 2N] matrix).

Data: N evaluation images (default 1M; 2N hashes with their mirrors) and T training images
(default 100k), 64-bit hashes drawn uniformly at random (seed 0); 1% of the training hashes are
planted copies of evaluation hashes with 0..radius bits flipped. Both methods search in chunks of
--batch-size training hashes (the tool's default chunk, 64), as `flamingo data dedup` does.

- Ours: `HashIndex(hashes, radius)` (built once, timed) and `search` over all T training hashes.
- Peer: the earlier `EvaluationIndex.nearest_hashes` (`np.bitwise_count(q[:, None] ^ e[None, :])`,
  argmin), in this process, on the first --peer-queries training hashes only (at 1M x 100k it
  would take over an hour); its time per training hash is compared with ours.
- With --faiss (faiss-cpu installed): faiss's IndexBinaryMultiHash (the same tables, bits and
  flips) and IndexBinaryFlat on the same subset, for reference.

Checked: on the subset, ours and the peer give the same distance wherever it is within the
radius, and ours finds every planted copy. Memory: tracemalloc's peak (numpy's allocations) during
one chunk's search, and the index's size.

    python benchmarks/dedup_index.py [--eval 1000000] [--train 100000] [--radius 6] [--peer-queries 1024]

The last line is `hash search speedup vs brute force: X.Xx` (peer / ours, seconds per training hash).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from flamingo.data.dedup import HashIndex


def brute_force(queries: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The search `flamingo data dedup` used before the index (per chunk of training hashes)."""
    distances = np.bitwise_count(queries[:, None] ^ hashes[None, :])
    best = distances.argmin(1)
    return distances[np.arange(len(queries)), best].astype(np.int64), best


def chunked(search, queries: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray, float]:
    start = time.perf_counter()
    parts = [search(queries[i:i + batch]) for i in range(0, len(queries), batch)]
    seconds = time.perf_counter() - start
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), seconds


def peak_bytes(search, queries: np.ndarray) -> int:
    tracemalloc.start()
    search(queries)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", type=int, default=1_000_000, help="evaluation images (2 hashes each)")
    parser.add_argument("--train", type=int, default=100_000, help="training images")
    parser.add_argument("--radius", type=int, default=6, help="--hash-distance (default 6)")
    parser.add_argument("--batch-size", type=int, default=64, help="training hashes per search (default 64)")
    parser.add_argument("--peer-queries", type=int, default=1024, help="training hashes the peer searches")
    parser.add_argument("--faiss", action="store_true", help="also time faiss's binary indexes on the subset")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64, 2 * args.eval, dtype=np.uint64)
    queries = rng.integers(0, 2**64, args.train, dtype=np.uint64)
    planted = np.arange(0, args.train, 100)  # 1%: copies with 0..radius bits flipped
    sources = rng.integers(0, len(hashes), len(planted))
    for i, source in zip(planted, sources):
        flips = rng.choice(64, int(rng.integers(0, args.radius + 1)), replace=False)
        queries[i] = hashes[source] ^ np.uint64(sum(1 << int(b) for b in flips))
    print(f"{args.eval:,} evaluation images ({len(hashes):,} hashes with mirrors) x {args.train:,} training "
          f"images, radius {args.radius}, chunks of {args.batch_size}")

    start = time.perf_counter()
    index = HashIndex(hashes, args.radius)
    build = time.perf_counter() - start
    size = sum(rows.nbytes + table.nbytes + offsets.nbytes for rows, table, offsets in index.tables)
    distance, row, ours = chunked(index.search, queries, args.batch_size)
    assert (distance[planted] <= args.radius).all(), "a planted copy was missed"
    ours_peak = peak_bytes(index.search, queries[:args.batch_size])
    print(f"ours: plan (tables, bits, flips) {index.plan}; built in {build:.1f} s ({size / 2**20:.0f} MiB); "
          f"searched {args.train:,} in {ours:.1f} s = {ours / args.train * 1e6:.0f} us per training hash; "
          f"peak {ours_peak / 2**20:.1f} MiB per chunk; {(distance <= args.radius).sum():,} within the radius")

    subset = queries[:args.peer_queries]
    peer_distance, _, peer = chunked(lambda q: brute_force(q, hashes), subset, args.batch_size)
    within = peer_distance <= args.radius
    assert np.array_equal(distance[:len(subset)][within], peer_distance[within]), "ours and the peer disagree"
    assert (distance[:len(subset)][~within] > args.radius).all(), "ours reports a near hash the peer does not"
    peer_peak = peak_bytes(lambda q: brute_force(q, hashes), subset[:args.batch_size])
    per_peer = peer / len(subset)
    print(f"peer (brute force): {len(subset):,} in {peer:.1f} s = {per_peer * 1e6:.0f} us per training hash "
          f"(all {args.train:,}: ~{per_peer * args.train / 60:.0f} min); peak {peer_peak / 2**20:.1f} MiB per chunk; "
          f"same distances within the radius")

    if args.faiss:
        import faiss

        codes = lambda h: np.ascontiguousarray(h).view(np.uint8).reshape(-1, 8)  # noqa: E731
        tables, bits, flips = index.plan or (1, 64, 0)
        for name, made in (("IndexBinaryMultiHash", lambda: faiss.IndexBinaryMultiHash(64, tables, bits)),
                           ("IndexBinaryFlat", lambda: faiss.IndexBinaryFlat(64))):
            start = time.perf_counter()
            found = made()
            if name == "IndexBinaryMultiHash":
                found.nflip = flips
            found.add(codes(hashes))
            built = time.perf_counter() - start
            got, _, seconds = chunked(lambda q: found.search(codes(q), 1), subset, args.batch_size)
            assert np.array_equal(got[:, 0][within], peer_distance[within])
            print(f"faiss {name}: built in {built:.1f} s; {seconds / len(subset) * 1e6:.0f} us per training hash")

    print(f"hash search speedup vs brute force: {per_peer / (ours / args.train):.1f}x")


if __name__ == "__main__":
    main()
