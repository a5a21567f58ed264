"""RICES (paper A.2): retrieve the support examples whose frozen-vision-encoder features are the
most similar (cosine) to the query's, ordered by increasing similarity so that the most similar
example comes right before the query.

A sample's feature is the frozen encoder's output averaged over its spatial tokens (and frames),
L2-normalised (the contrastive encoder pools its outputs the same way, B.1.3). The support set's
features are computed once and cached on disk as safetensors, keyed by model, task and split; the
file records the support ids, and a cache whose ids differ is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flamingo.data.benchmarks.samples import Sample
from flamingo.data.media import SkipSample
from flamingo.errors import UserError
from flamingo.model.flamingo import Flamingo


@torch.no_grad()
def media_features(model: Flamingo, frames: Sequence[list[Image.Image]]) -> torch.Tensor:
    """[K, D] normalised pooled features of K media (each a list of frames, all the same length)."""
    if model.vision_encoder is None:
        raise UserError("--rices needs the model's vision encoder (this model takes precomputed features)")
    processor = model.vision_encoder.image_processor()
    device = model.perceiver.latents.device
    pixels = torch.stack([processor.preprocess_video(f) for f in frames])  # [K, T, 3, H, W]
    features = model.vision_encoder(pixels[None].to(device))[0]  # [K, T, S, D]
    return torch.nn.functional.normalize(features.float().mean(dim=(1, 2)), dim=-1).cpu()


def model_key(model: Flamingo) -> str:
    """Identifies the frozen vision encoder (the only part the features depend on)."""
    vision = model.config.vision
    spec = json.dumps({"kind": vision.kind, "name_or_path": str(vision.name_or_path),
                       "image_size": model.vision_encoder.image_size if model.vision_encoder else None},
                      sort_keys=True)
    return hashlib.sha1(spec.encode()).hexdigest()[:12]


class SupportIndex:
    """The support set's features; `ids[i]` is the support sample of row i (samples whose media
    could not be read are left out)."""

    def __init__(self, ids: list[str], features: torch.Tensor) -> None:
        self.ids, self.features = ids, features

    @classmethod
    def build(cls, model: Flamingo, support: list[Sample], read: Callable[[Sample], list[Image.Image]],
              cache_file: Path | None, batch_size: int = 32) -> SupportIndex:
        wanted = hashlib.sha1("\n".join(s.id for s in support).encode()).hexdigest()
        if cache_file is not None and cache_file.is_file():
            try:
                with safe_open(str(cache_file), "pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("support") == wanted:
                        return cls(json.loads(meta["ids"]), f.get_tensor("features"))
            except (SafetensorError, OSError, KeyError, ValueError):
                pass  # unreadable or stale: recompute below
        ids, chunks, batch, batch_ids = [], [], [], []

        def flush() -> None:
            if batch:
                chunks.append(media_features(model, batch))
                ids.extend(batch_ids)
                batch.clear()
                batch_ids.clear()

        for sample in support:
            try:
                frames = read(sample)
            except SkipSample:
                continue
            batch.append(frames)
            batch_ids.append(sample.id)
            if len(batch) == batch_size:
                flush()
        flush()
        features = torch.cat(chunks) if chunks else torch.zeros(0, 1)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            save_file({"features": features.contiguous()}, str(tmp),
                      metadata={"support": wanted, "ids": json.dumps(ids)})
            tmp.replace(cache_file)  # atomic: another process never reads half a file
        return cls(ids, features)

    def nearest(self, query: torch.Tensor, k: int) -> list[list[str]]:
        """For each query feature row: the ids of the k most similar support samples, least
        similar first (the most similar ends up right before the query)."""
        k = min(k, len(self.ids))
        similarity = query @ self.features.T  # cosine: both sides are normalised
        top = similarity.topk(k, dim=-1).indices  # most similar first
        return [[self.ids[i] for i in reversed(row.tolist())] for row in top]


def cache_path(cache_dir: Path, model: Flamingo, task: str, split: str) -> Path:
    return cache_dir / f"{model_key(model)}-{task}-{split}.safetensors"
