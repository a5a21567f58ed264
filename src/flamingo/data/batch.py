"""The contract between data processing and training: one processed sample, and a padded batch.

A sample is what the paper's processing (section 2.4, A.3) makes of one document or pair: token
ids with one `<image>` per media item, labels on text tokens only, the media as pixel tensors,
and whether this document uses the "next image" attention of the placement augmentation.
A model of another family may take per-image inputs beside the pixels (`vision_inputs`: Llama 3.2
Vision's tile layout, `Flamingo.encode_tiled_media`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from flamingo.model.flamingo import IGNORE_INDEX


@dataclass
class TrainingSample:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, IGNORE_INDEX where no loss (media tokens, padding, ...)
    media: torch.Tensor  # [N, T, 3, H, W] float (N may be 0), in order of the <image> tokens
    attend_next: bool = False  # A.3.2 image-placement augmentation drawn for this document
    dataset: str = ""  # name of the dataset it came from (per-dataset losses)
    # Per media item, what a family's vision tower takes beside its pixels, [N, ...] each (Llama 3.2
    # Vision: aspect_ratio_ids [N], aspect_ratio_mask [N, T]); empty for ours.
    vision_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] right-padded with the pad id
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    pixel_values: torch.Tensor  # [B, N_max, T, 3, H, W], zeros in padding slots
    num_media: torch.Tensor  # [B]
    attend_next: torch.Tensor  # [B] bool
    vision_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, N_max, ...], zeros in padding slots

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.attention_mask, self.labels, self.pixel_values,
                        self.num_media, self.attend_next)),
                     vision_inputs={k: v.to(device, non_blocking=True) for k, v in self.vision_inputs.items()})

    @property
    def num_tokens(self) -> int:
        """Next-token targets: labelled positions after the first (position 0 is never predicted)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(samples: Sequence[TrainingSample], pad_token_id: int) -> Batch:
    """Right-pad a list of samples into a Batch (vectorised; media slots padded with zeros)."""
    if not samples:
        raise ValueError("collate: no samples")
    lengths = torch.tensor([len(s.input_ids) for s in samples])
    width = int(lengths.max())
    positions = torch.arange(width)
    mask = positions[None, :] < lengths[:, None]
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    input_ids[mask] = torch.cat([s.input_ids for s in samples])
    labels[mask] = torch.cat([s.labels for s in samples])
    counts = torch.tensor([s.media.shape[0] for s in samples])
    frames = {tuple(s.media.shape[1:]) for s in samples if s.media.shape[0]}
    if len(frames) > 1:
        raise ValueError(f"collate: media of different shapes in one batch: {sorted(frames)}")
    shape = frames.pop() if frames else tuple(samples[0].media.shape[1:])
    pixel_values = torch.zeros(len(samples), int(counts.max()), *shape)
    for b, s in enumerate(samples):
        if s.media.shape[0]:
            pixel_values[b, : s.media.shape[0]] = s.media
    return Batch(input_ids, mask.long(), labels, pixel_values, counts,
                 torch.tensor([s.attend_next for s in samples]), _collate_vision_inputs(samples, int(counts.max())))


def _collate_vision_inputs(samples: Sequence[TrainingSample], slots: int) -> dict[str, torch.Tensor]:
    """The samples' `vision_inputs`, [B, slots, ...] each, zeros in padding slots."""
    names = {tuple(sorted(s.vision_inputs)) for s in samples}
    if len(names) > 1:
        raise ValueError(f"collate: samples with different vision inputs in one batch: {sorted(names)}")
    out = {}
    for name in names.pop():
        first = samples[0].vision_inputs[name]
        out[name] = torch.zeros(len(samples), slots, *first.shape[1:], dtype=first.dtype)
        for b, s in enumerate(samples):
            out[name][b, : s.vision_inputs[name].shape[0]] = s.vision_inputs[name]
    return out
