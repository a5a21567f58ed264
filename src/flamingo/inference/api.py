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
from flamingo.model.families import mllama
from flamingo.model.flamingo import Flamingo


def _as_prompt(model: Flamingo, items: Sequence[Any] | Prompt) -> Prompt:
    return items if isinstance(items, Prompt) else interleaved_prompt(items, model.config.media_token)


def generate_text(model: Flamingo, items: Sequence[Any] | Prompt, **options: Any) -> str:
    """Continue one interleaved prompt; options are `GenerationConfig` fields."""
    config = GenerationConfig(**options)
    if getattr(model, "family", None) == mllama.FAMILY:  # its own processor builds the inputs
        return _family_generation(model, items, config).text
    state = encode_prompts(model, [_as_prompt(model, items)], max_new_tokens=config.max_new_tokens)
    return generate(model, state, config)[0].text


def _family_generation(model: Flamingo, items: Sequence[Any], config: GenerationConfig) -> Generation:
    """A model of another family (Llama 3.2 Vision) runs through its own module: greedy only."""
    if config.do_sample or config.num_beams > 1 or isinstance(items, Prompt):
        raise PromptError("a Llama 3.2 Vision model generates greedily from a list of items (text and "
                          "PIL images) for now")
    ids, finish = mllama.generate_ids(model, list(items), max_new_tokens=config.max_new_tokens)
    return Generation(ids, model.tokenizer.decode(ids, skip_special_tokens=True), finish)


class FewShotContext:
    """Support examples encoded once; any number of queries answered from them (paper D.1).

    On a Llama 3.2 Vision model the support examples are kept as items and run again with each
    query (no cached context for that family yet)."""

    def __init__(self, model: Flamingo, items: Sequence[Any] | Prompt) -> None:
        self.model = model
        self.family = getattr(model, "family", None) == mllama.FAMILY
        self.items = list(items) if self.family else None
        self.state: FlamingoState | None = None if self.family else encode_prompts(model, [_as_prompt(model, items)])

    def encode(self, queries: Sequence[Sequence[Any] | Prompt], max_new_tokens: int = 0) -> FlamingoState:
        if self.family:
            raise PromptError("a Llama 3.2 Vision model keeps no encoded context: use generate, score or rank")
        prompts = [_as_prompt(self.model, q) for q in queries]
        return extend(self.model, self.state, prompts, max_new_tokens=max_new_tokens)

    def generate(self, queries: Sequence[Sequence[Any] | Prompt], **options: Any) -> list[Generation]:
        config = GenerationConfig(**options)
        if self.family:
            return [_family_generation(self.model, self.items + list(q), config) for q in queries]
        return generate(self.model, self.encode(queries, config.max_new_tokens), config)

    def score(self, queries: Sequence[Sequence[Any] | Prompt],
              candidates: Sequence[str] | Sequence[Sequence[str]]) -> CandidateScores:
        if self.family:
            lists = [list(candidates)] * len(queries) if candidates and isinstance(candidates[0], str) else candidates
            if len(lists) != len(queries):
                raise PromptError(f"expected one candidate list per query ({len(queries)}), got {len(lists)}")
            width = max(len(c) for c in lists)
            sums, counts = torch.full((len(queries), width), float("-inf")), torch.zeros(len(queries), width,
                                                                                       dtype=torch.long)
            for b, (query, options) in enumerate(zip(queries, lists)):
                row_sums, row_counts = mllama.score_candidates(self.model, self.items + list(query), list(options))
                sums[b, :len(options)], counts[b, :len(options)] = row_sums, row_counts
            return CandidateScores(sums, counts)
        return score_candidates(self.model, self.encode(queries), candidates)

    def rank(self, queries: Sequence[Sequence[Any] | Prompt], class_names: Sequence[str],
             normalise_length: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.family:
            scores = self.score(queries, list(class_names))
            values = scores.mean_logprob if normalise_length else scores.sum_logprob
            return values.argsort(dim=-1, descending=True), values
        return rank_classes(self.model, self.encode(queries), class_names, normalise_length=normalise_length)
