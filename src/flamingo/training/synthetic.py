"""An in-memory dataset of coloured shapes with captions, for smoke tests and tiny CPU runs.

Each sample is `[BOS] <image>a red circle<|endofchunk|>` (or several such chunks, one per image),
its image a filled shape of that colour drawn with PIL at a random position and size. The
caption's colour and shape words can only be predicted from the image, so a model that learns
to use its cross-attention drives the loss well below that of the text alone.

Samples are a pure function of (seed, dataset name, sample index); batches are sharded so that
`world_size` ranks of `batch_size` each see exactly the samples one process sees with
`batch_size * world_size`, and the position (micro-batches consumed) is the whole state.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from flamingo.data.batch import IGNORE_INDEX, Batch, TrainingSample, collate
from flamingo.data.shapes import COLOURS as DATA_COLOURS
from flamingo.data.shapes import SHAPES, draw_shape
from flamingo.model.config import ConfigError

# The four colours and three shapes of the in-memory set (a subset of flamingo.data.shapes').
COLOURS = {c: DATA_COLOURS[c] for c in ("red", "green", "blue", "yellow")}
OPTIONS = ("images_per_sample",)


def random_shape_image(shape: str, colour: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A shape of random size and position (the renderer is flamingo.data.shapes.draw_shape)."""
    radius = size * rng.uniform(0.2, 0.35)
    centre = tuple(size / 2 + rng.uniform(-0.12, 0.12) * size for _ in range(2))
    return draw_shape(shape, colour, size, centre=centre, radius=radius)


class ShapesSource:
    """Endless batches of shape/caption samples for one rank (the `BatchSource` protocol)."""

    def __init__(self, name: str, tokenizer: Any, media_token_id: int, eoc_token_id: int, image_processor: Any,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 images_per_sample: int = 1) -> None:
        if not isinstance(images_per_sample, int) or images_per_sample < 1:
            raise ConfigError(f"dataset {name!r}: images_per_sample: expected an integer >= 1, "
                              f"got {images_per_sample!r}")
        self.name, self.batch_size = name, batch_size
        self.rank, self.world_size = rank, world_size
        self.images_per_sample = images_per_sample
        self.seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32
        self.processor = image_processor
        self.media_token_id, self.eoc_token_id = media_token_id, eoc_token_id
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = [bos] if bos is not None else []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)
        self.captions = {(c, s): tokenizer(f"a {c} {s}", add_special_tokens=False)["input_ids"]
                         for c in COLOURS for s in SHAPES}
        self.position = 0  # micro-batches of this rank consumed

    def sample(self, index: int) -> TrainingSample:
        rng = np.random.default_rng([self.seed, index])
        ids = list(self.prefix)
        images = []
        for _ in range(self.images_per_sample):
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            images.append(self.processor(random_shape_image(shape, colour, 64, rng)))
            ids += [self.media_token_id, *self.captions[(colour, shape)], self.eoc_token_id]
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = input_ids.masked_fill(input_ids == self.media_token_id, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX
        media = torch.stack(images)[:, None]  # [N, T=1, 3, H, W]
        return TrainingSample(input_ids, labels, media, attend_next=False, dataset=self.name)

    def batch(self, position: int) -> Batch:
        first = (position * self.world_size + self.rank) * self.batch_size
        return collate([self.sample(first + i) for i in range(self.batch_size)], self.pad_token_id)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.batch(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("rank", self.rank), state.get("world_size", self.world_size)) != (self.rank, self.world_size):
            raise ValueError(f"dataset {self.name!r}: the saved position is for rank {state.get('rank')} of "
                             f"{state.get('world_size')}, not rank {self.rank} of {self.world_size}")
        self.position = int(state["position"])
