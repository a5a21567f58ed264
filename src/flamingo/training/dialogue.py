"""The `kind: dialogue` dataset of a training config: chats about generated images, in exactly the
format the chat path serves our models with (the paper's dialogue prompt, B.1.6;
`flamingo.inference.family.dialogue_text`, which `flamingo chat` and `flamingo serve` use):

    [BOS] <preamble>User: <image>Describe this image.\\nFlamingo: A small striped red star.<|endofchunk|>
    \\nUser: What colour is the star?\\nFlamingo: Red.<|endofchunk|>

The loss falls on the assistant turns only (" A small striped red star." and its <|endofchunk|>,
which ends the reply at inference): each prompt before an answer is the chat path's prompt for
that turn, token for token. Images come from `flamingo.data.procedural` (scenes of the training
kinds and colours) and, with `images: {clipart: w}`, `flamingo.data.clipart` (objects of the
training categories); a conversation is one to three turns: an open question ("What is in this
image?") answered by the image's caption, or a question about it (colour, shape, kind of thing),
and sometimes a second image ("And this?")."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from flamingo.data import clipart, procedural
from flamingo.data.batch import IGNORE_INDEX, TrainingSample
from flamingo.data.synthetic import InMemorySource
from flamingo.inference.family import dialogue_text
from flamingo.model.config import ConfigError
from flamingo.model.families import MEDIA, ChatMessage

DIALOGUE_OPTIONS = ("images", "image_size", "root")
IMAGE_KINDS = ("procedural", "clipart")
OPEN_QUESTIONS = ("What is in this image?", "Describe this image.", "Describe this image in detail.",
                  "What do you see?", "What is this?", "What is shown in this picture?")
NEXT_IMAGE = ("And this?", "What about this one?", "And this image?")


def _sentence(answer: str) -> str:
    answer = answer.strip()
    return answer[0].upper() + answer[1:] + ("" if answer.endswith(".") else ".")


def conversation(rng: np.random.Generator, draw: Callable[[np.random.Generator], tuple[Image.Image, str, Any]]
                 ) -> tuple[list[ChatMessage], list[Image.Image]]:
    """A chat of one to three turns about images `draw(rng)` gives as (image, caption, question
    maker: rng -> (question, answer)); messages alternate user / assistant, ending with the
    assistant's."""
    image, caption, question = draw(rng)
    images = [image]
    if rng.random() < 0.7:
        first = (OPEN_QUESTIONS[int(rng.integers(len(OPEN_QUESTIONS)))], caption)
    else:
        first = question(rng)
    messages = [ChatMessage("user", [MEDIA, first[0]]), ChatMessage("assistant", [_sentence(first[1])])]
    if rng.random() < 0.5:  # a follow-up about the same image: it still sees it (the latest image before it)
        follow = question(rng)
        messages += [ChatMessage("user", [follow[0]]), ChatMessage("assistant", [_sentence(follow[1])])]
    if rng.random() < 0.25:  # a new image in the same chat
        image, caption, _ = draw(rng)
        images.append(image)
        messages += [ChatMessage("user", [MEDIA, NEXT_IMAGE[int(rng.integers(len(NEXT_IMAGE)))]]),
                     ChatMessage("assistant", [_sentence(caption)])]
    return messages, images


class DialogueSource(InMemorySource):
    """Chats about procedural (and clip-art) images in the dialogue format (module docstring),
    mixed by `images` weights; samples are a pure function of (seed, name, index)."""

    def __init__(self, name: str, tokenizer: Any, media_token: str, end_of_chunk: str, media_token_id: int,
                 eoc_token_id: int, image_processor: Any, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, images: dict[str, float] | None = None, image_size: int = 224,
                 root: str | None = None) -> None:
        images = images or {"procedural": 1.0}
        if not isinstance(images, dict) or not images or any(
                k not in IMAGE_KINDS or not isinstance(w, (int, float)) or w <= 0 for k, w in images.items()):
            raise ConfigError(f"dataset {name!r}: images: expected a mapping of some of {list(IMAGE_KINDS)} to "
                              f"positive weights, got {images!r}")
        super().__init__(name, tokenizer, batch_size, seed, rank, world_size)
        self.tokenizer, self.processor, self.image_size = tokenizer, image_processor, image_size
        self.media_token, self.end_of_chunk = media_token, end_of_chunk
        self.media_token_id, self.eoc_token_id = media_token_id, eoc_token_id
        self.kinds = list(images)
        weights = np.array([images[k] for k in self.kinds], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.catalogue = clipart.catalogue(root) if "clipart" in images else None

    def draw(self, kind: str) -> Callable[[np.random.Generator], tuple[Image.Image, str, Any]]:
        size = self.image_size
        if kind == "procedural":
            def scene(rng: np.random.Generator) -> tuple[Image.Image, str, Any]:
                drawn = procedural.sample_scene(rng, count=1 + int(rng.integers(3)) if rng.random() < 0.3 else 1)
                return (procedural.render(drawn, size), procedural.describe(drawn),
                        lambda r: procedural.question_answer(drawn, r))
            return scene

        def thing(rng: np.random.Generator) -> tuple[Image.Image, str, Any]:
            segment, item = clipart.object_segment(self.catalogue, rng, size, "train")
            return segment.image, item.caption, lambda r: clipart.question_answer(item, r)
        return thing

    def chat(self, index: int) -> tuple[list[ChatMessage], list[Image.Image]]:
        """Sample `index`'s conversation (messages and images)."""
        rng = self.rng(index)
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.probs))]
        return conversation(rng, self.draw(kind))

    def sample(self, index: int) -> TrainingSample:
        messages, images = self.chat(index)
        ids, targets = [], []
        for turn in range(1, len(messages), 2):
            prompt = dialogue_text(messages[:turn], self.media_token, self.end_of_chunk)
            # What the chat path tokenizes for this turn: the text so far, of which `ids` is the start
            # (up to the last answer's <|endofchunk|>, a special token, so the rest tokenizes alone).
            done = dialogue_text(messages[:turn - 1], self.media_token, self.end_of_chunk)[:-len("\nFlamingo:")] \
                if turn > 1 else ""
            ids += self.tokenizer(prompt[len(done):], add_special_tokens=turn == 1)["input_ids"]
            targets += [False] * (len(ids) - len(targets))
            answer = self.tokenizer(" " + messages[turn].content[0], add_special_tokens=False)["input_ids"]
            ids += [*answer, self.eoc_token_id]
            targets += [True] * (len(answer) + 1)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = input_ids.masked_fill(~torch.tensor(targets), IGNORE_INDEX)
        media = torch.stack([self.processor(image) for image in images])[:, None]
        return TrainingSample(input_ids, labels, media, attend_next=False, dataset=self.name)


def dialogue_source(spec: Any, model: Any, image_processor: Any, seed: int, rank: int,
                    world_size: int) -> DialogueSource:
    """The `kind: dialogue` dataset of a training config (see `flamingo.training.data`)."""
    unknown = sorted(set(spec.options) - set(DIALOGUE_OPTIONS), key=str)
    if unknown:
        raise ConfigError(f"dataset {spec.name!r} (kind dialogue): unknown field(s) {unknown}; expected some of "
                          f"{['name', 'kind', 'weight', 'batch_size', *DIALOGUE_OPTIONS]}")
    return DialogueSource(spec.name, model.tokenizer, model.config.media_token, model.config.end_of_chunk_token,
                          model.media_token_id, model.eoc_token_id, image_processor, spec.batch_size, seed=seed,
                          rank=rank, world_size=world_size, **spec.options)
