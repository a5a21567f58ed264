"""The high-level API: interleaved items in, text (or scores) out.

    text = generate_text(model, [image, "An image of"], num_beams=3)
    support = FewShotContext(model, [cat, "Output: a cat.<|endofchunk|>", dog, "Output: a dog.<|endofchunk|>"])
    answers = support.generate([[bird, "Output:"], [fish, "Output:"]], num_beams=3)
    order, scores = support.rank([[bird, "Output:"]], ["a cat", "a dog", "a bird"])

Items: a `str` is text, a PIL image or `pathlib.Path` is an image, a list of frames is a video.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from flamingo.inference.generation import Generation, GenerationConfig, generate
from flamingo.inference.prompt import Prompt, PromptError, interleaved_prompt
from flamingo.inference.scoring import CandidateScores, rank_classes, score_candidates
from flamingo.inference.state import FlamingoState, encode_prompts, extend
from flamingo.model.flamingo import Flamingo


def _as_prompt(model: Flamingo, items: Sequence[Any] | Prompt) -> Prompt:
    return items if isinstance(items, Prompt) else interleaved_prompt(items, model.config.media_token)


def generate_text(model: Flamingo, items: Sequence[Any] | Prompt, **options: Any) -> str:
    """Continue one interleaved prompt; options are `GenerationConfig` fields."""
    config = GenerationConfig(**options)
    state = encode_prompts(model, [_as_prompt(model, items)], max_new_tokens=config.max_new_tokens)
    return generate(model, state, config)[0].text


class FewShotContext:
    """Support examples encoded once; any number of queries answered from them (paper D.1)."""

    def __init__(self, model: Flamingo, items: Sequence[Any] | Prompt) -> None:
        self.model = model
        prompt = _as_prompt(model, items)
        if not model.config.cross_attention.zero_attention_without_media and not prompt.text.startswith(
                model.config.media_token):
            # Such text sees every image of the prompt, the queries' too: it cannot be encoded without them.
            raise PromptError(f"on this model text before the first image attends to every image of the prompt, so "
                              f"the support examples must start with an image to be encoded once for all queries")
        self.state = encode_prompts(model, [prompt])

    def encode(self, queries: Sequence[Sequence[Any] | Prompt], max_new_tokens: int = 0) -> FlamingoState:
        prompts = [_as_prompt(self.model, q) for q in queries]
        return extend(self.model, self.state, prompts, max_new_tokens=max_new_tokens)

    def generate(self, queries: Sequence[Sequence[Any] | Prompt], **options: Any) -> list[Generation]:
        config = GenerationConfig(**options)
        return generate(self.model, self.encode(queries, config.max_new_tokens), config)

    def score(self, queries: Sequence[Sequence[Any] | Prompt],
              candidates: Sequence[str] | Sequence[Sequence[str]]) -> CandidateScores:
        return score_candidates(self.model, self.encode(queries), candidates)

    def rank(self, queries: Sequence[Sequence[Any] | Prompt], class_names: Sequence[str],
             normalise_length: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return rank_classes(self.model, self.encode(queries), class_names, normalise_length=normalise_length)
