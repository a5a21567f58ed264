"""The family interface as the generic inference and serving code uses it
(`flamingo.model.families` documents it): `family_io(model)` is the model's family, or `FLAMINGO`,
this package's implementation for our own models (the paper's prompts and dialogue format)."""

from __future__ import annotations

from typing import Any, Sequence

from flamingo.inference.prompt import Prompt, PromptError, encode_pixels
from flamingo.model.families import MEDIA, ChatMessage, EncodedMedia, MediaFamily, media_family
from flamingo.model.flamingo import Flamingo

DIALOGUE_PROMPT = ("This is a conversation between a human, User, and an intelligent visual AI, Flamingo. "
                   "User sends images, and Flamingo describes them.\n")
DIALOGUE_STOP_STRINGS = ("\nUser:", "User:")  # the model would go on to write the user's next turn


def dialogue_text(messages: Sequence[ChatMessage], media_token: str, end_of_chunk: str) -> str:
    """The paper's dialogue prompt (B.1.6) of a chat, ready for Flamingo's answer:

        <preamble>User: <image>What is this?\\nFlamingo: A cat.<|endofchunk|>\\nUser: And this?\\nFlamingo:

    System messages (which come first) replace the preamble."""
    system, turns = [], []
    for message in messages:
        text = "".join(media_token if part is MEDIA else part for part in message.content)
        if message.role == "system":
            system.append(text.strip())
        elif message.role == "assistant":
            turns.append(f"Flamingo: {text.strip()}{end_of_chunk}\n")
        else:
            turns.append(f"User: {text}\n")
    preamble = "\n".join(system) + "\n" if system else DIALOGUE_PROMPT
    return preamble + "".join(turns) + "Flamingo:"


class FlamingoFamily:
    """`MediaFamily` for our own models: the LM's tokenizer as it is, the vision encoder's image
    processor (images and videos), `encode_pixels`, the paper's dialogue format."""

    name = "flamingo"
    chat_stop_strings = DIALOGUE_STOP_STRINGS

    def tokenize(self, model: Flamingo, text: str, add_special_tokens: bool) -> list[int]:
        return model.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def preprocess(self, model: Flamingo, frames: Sequence[Any]) -> Any:
        if model.vision_encoder is None:
            raise PromptError("this model has no vision encoder, so it cannot take images")
        return model.vision_encoder.image_processor().preprocess_video(list(frames))

    def encode(self, model: Flamingo, media: Sequence[Sequence[Any]], chunk: int | None = None) -> EncodedMedia:
        return EncodedMedia(*encode_pixels(model, media, chunk))

    def chat_text(self, model: Flamingo, messages: Sequence[ChatMessage]) -> str:
        return dialogue_text(messages, model.config.media_token, model.config.end_of_chunk_token)


FLAMINGO = FlamingoFamily()


def family_io(model: Flamingo) -> MediaFamily:
    """The interface the generic code runs `model` through."""
    return media_family(model) or FLAMINGO


def encode_media_of(model: Flamingo, prompts: Sequence[Prompt]) -> EncodedMedia:
    """The media of prompts, each item preprocessed and encoded once by the model's family."""
    family = family_io(model)
    return family.encode(model, [[family.preprocess(model, frames) for frames in p.media] for p in prompts])
