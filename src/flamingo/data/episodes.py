"""The few-shot episodes of the offline tasks (`flamingo eval-offline`, the demo): held-out
procedural shapes and colours (`flamingo.data.procedural`) and held-out categories of real drawn
objects (`flamingo.data.clipart`). `make_episode` is a pure function of (task, shots, seed, episode
index), so a table measured on them is reproducible."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from flamingo.config_io import short
from flamingo.data import clipart, procedural
from flamingo.data.sources import keyed_rng
from flamingo.errors import UserError

Episode = tuple[list[procedural.Segment], procedural.Segment, str, list[str]]


@dataclass(frozen=True)
class ProceduralTask:
    name: str
    description: str
    make: Callable[[np.random.Generator, int, int], Episode]  # (rng, image size, shots) -> episode
    needs_clipart: bool = False  # real drawn objects: the clip-art packages must be installed
    same_episodes_as: str | None = None  # a control: that task's episodes (same seeds), altered

    @property
    def episode_key(self) -> int:
        """This task's key of its episodes (a control shares its task's): the sum of the name's
        character codes, an integer key for keyed_rng rather than its CRC32 of the name, because
        the measured tables (docs/embedded.md, assets/embedded/eval-*.json) and the tests' pinned
        episodes were drawn with it."""
        return sum(map(ord, self.same_episodes_as or self.name))


def _grey_support(episode: Episode) -> Episode:
    """The control: every support image replaced by a uniform grey one (the words stay)."""
    support, query, answer, candidates = episode
    for segment in support:
        segment.image = Image.new("RGB", segment.image.size, (128, 128, 128))
    return support, query, answer, candidates


def _copied_query(episode: Episode) -> Episode:
    """The perfect-match control: the query image replaced by the pixels of the first support image
    shown with the answer's word (a query whose word was never shown, as at 0 shots, is kept)."""
    support, query, answer, candidates = episode
    shown = [segment for segment in support if segment.text[1:] and segment.text[1][0] == answer]
    if shown:
        query.image = shown[0].image.copy()
    return support, query, answer, candidates


TASKS: dict[str, ProceduralTask] = {t.name: t for t in [
    ProceduralTask("binding", "2-way: new words bound to held-out object kinds (\"This is a dax.\")",
                   lambda rng, size, shots: procedural.binding_episode(rng, size, "eval", ways=2, shots=shots)),
    ProceduralTask("binding-copy", "control: binding with the query an exact copy of a support image of its "
                   "word (a perfect match)", lambda rng, size, shots: _copied_query(procedural.binding_episode(
                       rng, size, "eval", ways=2, shots=shots)), same_episodes_as="binding"),
    ProceduralTask("binding-colours", "2-way: new words bound to held-out colours",
                   lambda rng, size, shots: procedural.binding_episode(rng, size, "eval", ways=2, shots=shots,
                                                                      by="colour")),
    ProceduralTask("induction", "\"Output: X\", X the colour or the kind (held-out ones), shown only by example; "
                   "6 candidates", lambda rng, size, shots: procedural.induction_episode(rng, size, "eval", shots=shots)),
    ProceduralTask("shape", "perception: \"What shape is this?\" on new scenes of training kinds; 9 candidates",
                   lambda rng, size, shots: procedural.question_episode(rng, size, "train", shots=shots)),
    ProceduralTask("colour", "perception: \"What colour is the X?\" on new scenes of training colours; 9 candidates",
                   lambda rng, size, shots: procedural.question_episode(rng, size, "train", shots=shots,
                                                                        attribute="colour")),
    ProceduralTask("objects-binding", "2-way: new words bound to held-out categories of real drawn objects",
                   lambda rng, size, shots: clipart.binding_episode(clipart.catalogue(), rng, size, "eval", ways=2,
                                                                    shots=shots), needs_clipart=True),
    ProceduralTask("objects-binding-3way", "3-way: new words bound to held-out categories of real drawn objects",
                   lambda rng, size, shots: clipart.binding_episode(clipart.catalogue(), rng, size, "eval", ways=3,
                                                                    shots=shots), needs_clipart=True),
    ProceduralTask("objects-binding-grey", "control: objects-binding with every support image replaced by grey "
                   "(chance expected)", lambda rng, size, shots: _grey_support(clipart.binding_episode(
                       clipart.catalogue(), rng, size, "eval", ways=2, shots=shots)), needs_clipart=True,
                   same_episodes_as="objects-binding"),
    ProceduralTask("objects-binding-copy", "control: objects-binding with the query an exact copy of a support "
                   "image of its word (a perfect match)", lambda rng, size, shots: _copied_query(
                       clipart.binding_episode(clipart.catalogue(), rng, size, "eval", ways=2, shots=shots)),
                   needs_clipart=True, same_episodes_as="objects-binding"),
    ProceduralTask("objects-category", "\"What kind of thing is this?\" (animal, food, plant, ...: 9 candidates) "
                   "about objects of held-out categories", lambda rng, size, shots: clipart.category_episode(
                       clipart.catalogue(), rng, size, "eval", shots=shots), needs_clipart=True),
]}


def episode_items(support: Sequence[procedural.Segment], query: procedural.Segment,
                  end_of_chunk: str = "<|endofchunk|>", images_as_text: bool = False) -> list[Any]:
    """Interleaved prompt items: each support chunk is image, text, <|endofchunk|>; then the query.
    With `images_as_text`, each image is replaced by its true caption ("A small red star. ")."""
    def image(segment: procedural.Segment) -> Any:
        return segment.true_caption() + " " if images_as_text else segment.image

    items: list[Any] = []
    for segment in support:
        items += [image(segment), "".join(piece for piece, _ in segment.text) + end_of_chunk]
    return items + [image(query), "".join(piece for piece, _ in query.text)]


def make_episode(task: str, shots: int, seed: int, index: int, image_size: int = 224) -> Episode:
    if task not in TASKS:
        raise UserError(f"unknown procedural task {short(task)}; expected one of {sorted(TASKS)}")
    rng = keyed_rng(seed, shots, index, TASKS[task].episode_key)
    return TASKS[task].make(rng, image_size, shots)
