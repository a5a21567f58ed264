"""In-memory generated datasets: coloured shapes with captions (smoke tests and tiny CPU runs), the
procedural scenes/episodes of `flamingo.data.procedural` (the embedded default's training), and the
same kinds of documents over real drawn objects (`flamingo.data.clipart`).

Each sample is `[BOS] <image>a red circle<|endofchunk|>` (or several such chunks, one per image),
its image a filled shape of that colour drawn with PIL at a random position and size. The
caption's colour and shape words can only be predicted from the image, so a model that learns
to use its cross-attention drives the loss well below that of the text alone.

Samples are a pure function of (seed, dataset name, sample index); batches are sharded so that
`world_size` ranks of `batch_size` each see exactly the samples one process sees with
`batch_size * world_size`, and the position (micro-batches consumed) is the whole state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from flamingo.data.batch import IGNORE_INDEX, Batch, TrainingSample, collate
from flamingo.data import clipart
from flamingo.data.procedural import Segment, training_document
from flamingo.data.shapes import COLOURS as DATA_COLOURS
from flamingo.data.shapes import SHAPES, draw_shape
from flamingo.data.sources import keyed_rng
from flamingo.model.config import ConfigError

# The four colours and three shapes of the in-memory set (a subset of flamingo.data.shapes').
COLOURS = {c: DATA_COLOURS[c] for c in ("red", "green", "blue", "yellow")}
OPTIONS = {"synthetic_shapes": ("images_per_sample",), "procedural": ("tasks", "image_size"),
           "clipart": ("tasks", "image_size", "root")}


def random_shape_image(shape: str, colour: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A shape of random size and position (the renderer is flamingo.data.shapes.draw_shape)."""
    radius = size * rng.uniform(0.2, 0.35)
    centre = tuple(size / 2 + rng.uniform(-0.12, 0.12) * size for _ in range(2))
    return draw_shape(shape, colour, size, centre=centre, radius=radius)


class InMemorySource:
    """Endless batches of generated samples for one rank (the `BatchSource` protocol).

    Subclasses define `sample(index)`, a pure function of (seed, dataset name, index): its
    random numbers come from `rng(index)`."""

    def __init__(self, name: str, tokenizer: Any, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.name, self.batch_size = name, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)
        self.position = 0  # micro-batches of this rank consumed

    def rng(self, *keys: int) -> np.random.Generator:
        """The generator of (seed, dataset name, *keys), e.g. of one sample index."""
        return keyed_rng(self.seed, self.name, *keys)

    def sample(self, index: int) -> TrainingSample:
        raise NotImplementedError

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
            raise ConfigError(f"dataset {self.name!r}: the saved position is for rank {state.get('rank')} of "
                             f"{state.get('world_size')}, not rank {self.rank} of {self.world_size}")
        self.position = int(state["position"])


class ShapesSource(InMemorySource):
    """"a red circle" captions of single shapes (or several such chunks per sample)."""

    def __init__(self, name: str, tokenizer: Any, media_token_id: int, eoc_token_id: int, image_processor: Any,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 images_per_sample: int = 1) -> None:
        if not isinstance(images_per_sample, int) or images_per_sample < 1:
            raise ConfigError(f"dataset {name!r}: images_per_sample: expected an integer >= 1, "
                              f"got {images_per_sample!r}")
        super().__init__(name, tokenizer, batch_size, seed, rank, world_size)
        self.images_per_sample = images_per_sample
        self.processor = image_processor
        self.media_token_id, self.eoc_token_id = media_token_id, eoc_token_id
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = [bos] if bos is not None else []
        self.captions = {(c, s): tokenizer(f"a {c} {s}", add_special_tokens=False)["input_ids"]
                         for c in COLOURS for s in SHAPES}

    def sample(self, index: int) -> TrainingSample:
        rng = self.rng(index)
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


class ProceduralSource(InMemorySource):
    """Documents of `flamingo.data.procedural` (captions, QA, binding and task-induction
    episodes), mixed by `tasks` weights; the loss falls on the target pieces and the
    <|endofchunk|> after them only."""

    known_tasks: tuple[str, ...] = ("caption", "qa", "binding", "induction")

    def __init__(self, name: str, tokenizer: Any, media_token_id: int, eoc_token_id: int, image_processor: Any,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 tasks: dict[str, float] | None = None, image_size: int = 224) -> None:
        tasks = tasks or {"caption": 1.0}
        known = self.known_tasks
        if not isinstance(tasks, dict) or not tasks or any(t not in known or not isinstance(w, (int, float)) or w <= 0
                                                          for t, w in tasks.items()):
            raise ConfigError(f"dataset {name!r}: tasks: expected a mapping of some of {list(known)} to positive "
                              f"weights, got {tasks!r}")
        super().__init__(name, tokenizer, batch_size, seed, rank, world_size)
        self.tokenizer, self.processor, self.image_size = tokenizer, image_processor, image_size
        self.media_token_id, self.eoc_token_id = media_token_id, eoc_token_id
        self.task_names = list(tasks)
        weights = np.array([tasks[t] for t in self.task_names], dtype=np.float64)
        self.task_probs = weights / weights.sum()
        # What the tokenizer puts in front of a text (a BOS or nothing), as at inference.
        self.prefix = tokenizer("", add_special_tokens=True)["input_ids"]

    def document(self, task: str, rng: np.random.Generator) -> list[Segment]:
        return training_document(task, rng, self.image_size)

    def sample(self, index: int) -> TrainingSample:
        rng = self.rng(index)
        task = self.task_names[int(rng.choice(len(self.task_names), p=self.task_probs))]
        ids, targets, images = list(self.prefix), [False] * len(self.prefix), []
        for segment in self.document(task, rng):
            if segment.image is not None:
                images.append(self.processor(segment.image))
                ids.append(self.media_token_id)
                targets.append(False)
            for piece, is_target in segment.text:
                piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                targets += [is_target] * len(piece_ids)
            ids.append(self.eoc_token_id)
            targets.append(bool(segment.text) and segment.text[-1][1])  # learn to stop after an answer
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = input_ids.masked_fill(~torch.tensor(targets), IGNORE_INDEX)
        media = torch.stack(images)[:, None] if images else torch.zeros(0, 1, 3, self.image_size, self.image_size)
        return TrainingSample(input_ids, labels, media, attend_next=False, dataset=self.name)


class ClipartSource(ProceduralSource):
    """Documents of `flamingo.data.clipart` (real drawn objects of the training categories:
    captions, QA, multi-object scenes, binding and induction episodes), mixed by `tasks`
    weights; `root` is where the clip-art packages are (default: $FLAMINGO_CLIPART_ROOT or
    /usr/share)."""

    known_tasks = clipart.TASKS

    def __init__(self, *args: Any, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.catalogue = clipart.catalogue(root)

    def document(self, task: str, rng: np.random.Generator) -> list[Segment]:
        return clipart.training_document(self.catalogue, task, rng, self.image_size)
