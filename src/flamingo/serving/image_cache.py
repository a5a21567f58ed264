"""The server's image cache: each image's visual tokens (what the vision encoder and the resampler
make of it, with its key mask where the model's family has one), keyed by the sha256 of the image's
bytes, so a request that sends an image again in a new context (another question about it, a new
few-shot set holding it) does not encode it again. The prefix cache keeps whole prompt prefixes
(a few-shot support set, a chat's earlier turns); this one keeps single images, whatever text
surrounds them. Least recently used first out, within its own byte budget; hits, misses,
evictions and bytes in the engine's metrics.

The cross-attention keys and values of the visual tokens are not kept: they are computed per
layer for a whole prompt's media (a few small matrix products), the encoder is what costs.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flamingo.model.families import EncodedMedia, MediaFamily
from flamingo.model.flamingo import Flamingo
from flamingo.serving.metrics import EngineMetrics

# One image of a prompt: the digest of its bytes, and its preprocessed pixels (decoded on demand).
Image = tuple[bytes, Callable[[], Any]]


class ImageCache:
    """Visual tokens by image digest (see the module docstring)."""

    def __init__(self, capacity_bytes: int, metrics: EngineMetrics) -> None:
        self.capacity_bytes = capacity_bytes
        self.metrics = metrics
        self.entries: collections.OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor | None, int]] = \
            collections.OrderedDict()
        self.bytes = 0

    def __contains__(self, digest: bytes) -> bool:  # no LRU update: safe to ask from another thread
        return digest in self.entries

    def put(self, digest: bytes, tokens: torch.Tensor, key_mask: torch.Tensor | None) -> None:
        size = tokens.nbytes + (key_mask.nbytes if key_mask is not None else 0)
        if size > self.capacity_bytes or digest in self.entries:
            return
        while self.bytes + size > self.capacity_bytes:
            _, (_, _, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped
            self.metrics.image_cache_evictions.inc()
        self.entries[digest] = (tokens, key_mask, size)
        self.bytes += size
        self.metrics.image_cache_bytes.set(self.bytes)

    def encode(self, model: Flamingo, family: MediaFamily, rows: Sequence[Sequence[Image]]) -> EncodedMedia:
        """`family.encode` of the rows' images (one row per prompt), the cached ones taken from the
        cache and the others encoded together (each once) and cached."""
        if not any(rows):
            return family.encode(model, [[] for _ in rows])
        found: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        missing: dict[bytes, Callable[[], Any]] = {}
        for digest, pixels in (image for row in rows for image in row):
            entry = self.entries.get(digest)
            if entry is not None:
                self.entries.move_to_end(digest)
                found[digest] = entry[:2]
                self.metrics.image_cache_hits.inc()
            elif digest in missing:
                self.metrics.image_cache_hits.inc()  # the same image twice in one batch: encoded once
            else:
                missing[digest] = pixels
                self.metrics.image_cache_misses.inc()
        if missing:
            encoded = family.encode(model, [[pixels()] for pixels in missing.values()])
            for k, digest in enumerate(missing):
                # Copies: an entry must not keep the whole batch's tensor alive.
                tokens = encoded.visual_tokens[k, 0].clone()
                key_mask = None if encoded.key_mask is None else encoded.key_mask[k, 0].clone()
                found[digest] = (tokens, key_mask)
                self.put(digest, tokens, key_mask)
        first, _ = next(iter(found.values()))
        counts = [len(row) for row in rows]
        visual_tokens = first.new_zeros(len(rows), max(counts), *first.shape)
        masked = any(mask is not None for _, mask in found.values())
        key_mask = torch.zeros(visual_tokens.shape[:3], dtype=torch.bool, device=first.device) if masked else None
        for b, row in enumerate(rows):
            for j, (digest, _) in enumerate(row):
                tokens, mask = found[digest]
                visual_tokens[b, j] = tokens
                if key_mask is not None:
                    key_mask[b, j] = True if mask is None else mask
        return EncodedMedia(visual_tokens, torch.tensor(counts, device=first.device), key_mask)
