"""The interface through which the generic inference and serving code runs a model of another
family (documented in `flamingo.model.families`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from flamingo.model.flamingo import Flamingo


@dataclass
class EncodedMedia:
    """The media of a batch of prompts as the cross-attention layers take them.

    visual_tokens [B, N, R, D]: R tokens per media slot (zeros in padding slots);
    num_media [B]: real media per prompt (the first num_media slots);
    key_mask [B, N, R] or None: False for visual tokens that tokens with an image must not see
        (Llama 3.2 Vision: the padding tiles of a tiled image; `MediaContext.key_mask`).
    """

    visual_tokens: torch.Tensor
    num_media: torch.Tensor
    key_mask: torch.Tensor | None = None


@dataclass
class ChatMessage:
    """One message of a chat, for `MediaFamily.chat_text`: role "system", "user" or "assistant";
    content: text pieces (str) and `MEDIA` markers, in order (a marker where an image goes)."""

    role: str
    content: list[Any]


MEDIA = object()  # where an image goes in a `ChatMessage`'s content


class MediaFamily(Protocol):
    """What the generic inference and serving code asks a model's family (see the module's text).

    Every method takes the model first. Implemented by `flamingo.model.families.mllama.MLLAMA`
    and, for our own models, by `flamingo.inference.family.FLAMINGO`.
    """

    name: str
    chat_stop_strings: tuple[str, ...]  # stop strings a chat adds (the turn's end is a stop token already)

    def tokenize(self, model: Flamingo, text: str, add_special_tokens: bool) -> list[int]:
        """Prompt text (the model's media token where each image goes) -> token ids, exactly as the
        family's own processor builds them (add_special_tokens: a whole prompt, BOS included;
        without: a continuation of an encoded context)."""

    def preprocess(self, model: Flamingo, frames: Sequence[Any]) -> Any:
        """One media item (its PIL frames: one for an image) -> its preprocessed pixels, in whatever
        form `encode` takes (decoded and preprocessed once, e.g. at the server's door)."""

    def encode(self, model: Flamingo, media: Sequence[Sequence[Any]]) -> EncodedMedia:
        """Per prompt, its preprocessed media in order -> the visual tokens (and key mask) that the
        cross-attention layers need, each media item encoded once."""

    def chat_text(self, model: Flamingo, messages: Sequence[ChatMessage]) -> str:
        """A chat -> the prompt text (media tokens where images go) that asks for the assistant's
        next answer, in the family's own chat format."""
