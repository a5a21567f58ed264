"""The engine's forward passes, over `FlamingoState`s, from the token ids and pixels the input
processor made:

- prefill: the prompts of the joining requests; those with a cacheable prefix continue it (the
  prefix cache: the state after a prompt's last chunk boundary, kept in an LRU bounded by bytes;
  a missed prefix continues the longest cached prefix of itself, if any, e.g. a chat's previous
  turn), all of them in one forward pass whatever their prefixes; the others are encoded together.
  A miss that continues no cached prefix is encoded whole in one pass and the prefix's state is
  taken from that pass (`encode_ids_and_prefix`; for families whose states carry masks, the
  prefix is encoded, stored, then extended); by causal attention a hit computes the same;
- the decode batch: every running sequence's next token is chosen (greedy or sampled) and fed,
  one step for all of them; requests join it after their prefill (`FlamingoState.concat`) and
  leave it when they end;
- beam search and ranking, a batch of their own each, with a callback between their forward
  passes (the scheduler lets the decode batch go on there).
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from flamingo.inference.generation import (
    GenerationConfig,
    SequenceDecoder,
    beam_search,
    choose_next_tokens,
    sampling_generator,
)
from flamingo.inference.family import family_io
from flamingo.inference.scoring import score_candidates
from flamingo.inference.state import (
    FlamingoState,
    encode_ids,
    encode_ids_and_prefix,
    extend_contexts_ids,
    prefix_from_one_pass,
)
from flamingo.model.families import EncodedMedia
from flamingo.model.flamingo import Flamingo
from flamingo.serving.image_cache import ImageCache
from flamingo.serving.input_processor import ProcessedPrompt
from flamingo.serving.metrics import EngineMetrics
from flamingo.serving.output_processor import OutputProcessor
from flamingo.serving.request import EngineStopped, Job

MAX_CHAINED_CUTS = 8  # a missed prefix looks for a cached shorter one at its last few cuts
RANK_TOKENS_PER_PASS = 128  # candidate tokens per forward pass of a ranking, between decode steps (measured:
# benchmarks/serve_rank_ttft.py, chat TTFT during a 1049-token ranking: max 29 s at 512, 17 s at 128)


class Cancelled(Exception):
    """Raised inside a beam search or ranking whose client went away."""


class PrefixCache:
    """Encoded prompt prefixes (batch-1 states, never modified), least recently used first out,
    within a byte budget; chats' prefixes (their earlier turns) within a budget of their own, so
    that long chats never push out few-shot support sets."""

    def __init__(self, capacity_bytes: int, metrics: EngineMetrics, chat_capacity_bytes: int = 0) -> None:
        self.capacity = {False: capacity_bytes, True: chat_capacity_bytes}  # by whether a chat's
        self.metrics = metrics
        self.entries: collections.OrderedDict[str, tuple[FlamingoState, int, bool]] = collections.OrderedDict()
        self.used = {False: 0, True: 0}

    @property
    def bytes(self) -> int:
        return self.used[False] + self.used[True]

    def __contains__(self, key: str) -> bool:  # no LRU update: safe to ask from another thread
        return key in self.entries

    def get(self, key: str) -> FlamingoState | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, state: FlamingoState, chat: bool = False) -> None:
        size = state.nbytes()
        if size > self.capacity[chat] or key in self.entries:
            return
        while self.used[chat] + size > self.capacity[chat]:
            dropped = next(k for k, entry in self.entries.items() if entry[2] == chat)  # its pool's oldest
            self.used[chat] -= self.entries.pop(dropped)[1]
            self.metrics.prefix_cache_evictions.inc()
        self.entries[key] = (state, size, chat)
        self.used[chat] += size
        self.metrics.prefix_cache_bytes.set(self.bytes)


@dataclass
class Sequence:
    """One choice of a job in the decode batch."""

    job: Job
    choice: int
    config: GenerationConfig
    decoder: SequenceDecoder
    generator: torch.Generator | None


class ModelRunner:
    """Runs the model for the engine thread; holds the decode batch (`state`, `running`, and
    `pending`: each running sequence's chosen and streamed token, not yet fed)."""

    def __init__(self, model: Flamingo, cache: PrefixCache, output: OutputProcessor, metrics: EngineMetrics,
                 stopping: Callable[[], bool], images: ImageCache | None = None) -> None:
        self.model, self.cache, self.output, self.metrics, self.stopping = model, cache, output, metrics, stopping
        self.images = images
        self.family = family_io(model)
        self.one_pass_prefix = prefix_from_one_pass(model)
        self.state: FlamingoState | None = None  # the decode batch: one row per running sequence
        self.joined: list[FlamingoState] = []  # rows admitted since the last step, appended to it then
        self.running: list[Sequence] = []
        self.pending: torch.Tensor | None = None

    # ------------------------------------------------------------------ prefill
    def encode(self, prompts: list[ProcessedPrompt], start: int = 0, stop: int | None = None) -> FlamingoState:
        """The prompts (from token position `start` to `stop`) encoded from scratch, together."""
        rows = [prompt.ids[start:stop] for prompt in prompts]
        media = self.media([(prompt, start, len(prompt.ids) if stop is None else stop) for prompt in prompts])
        return encode_ids(self.model, rows, media.visual_tokens, media.num_media, media.key_mask)

    def extend(self, contexts: list[FlamingoState], groups: list[list[tuple[ProcessedPrompt, int, int]]]
               ) -> FlamingoState:
        """Each context continued with its group's prompts (each from token position start to stop)."""
        parts = [part for group in groups for part in group]
        media = self.media(parts)
        return extend_contexts_ids(self.model, contexts, [len(group) for group in groups],
                                   [prompt.ids[start:stop] for prompt, start, stop in parts],
                                   media.visual_tokens, media.num_media, media.key_mask)

    def media(self, parts: list[tuple[ProcessedPrompt, int, int]]) -> EncodedMedia:
        """The encoded images of each prompt between token positions start and stop (through the
        image cache when the engine has one)."""
        if self.images is None:
            return self.family.encode(self.model, [prompt.pixels(start, stop) for prompt, start, stop in parts])
        rows = [[(prompt.digests[i], functools.partial(prompt.image, i))
                 for i in range(prompt.media_before[start], prompt.media_before[stop])]
                for prompt, start, stop in parts]
        return self.images.encode(self.model, self.family, rows)

    def prefill(self, jobs: list[Job]) -> tuple[FlamingoState, list[Job]]:
        """Prefill the prompts of `jobs`: one row each, in the returned order. Prompts with a
        cached (or cacheable) prefix continue it, all of them in one forward pass whatever their
        prefixes; the others are encoded together."""
        plain = [job for job in jobs if job.prompt.split is None]
        by_prefix: dict[str, list[Job]] = {}
        for job in jobs:
            if job.prompt.split is not None:
                by_prefix.setdefault(job.prompt.key(job.prompt.split), []).append(job)
        states, order = [], []
        if plain:
            states.append(self.encode([job.prompt for job in plain]))
            order += plain
        contexts, extended = [], []
        for key, group in by_prefix.items():
            context = self.cache.get(key)
            if context is None:
                if self.stopping():  # each miss takes a while (its images, its text): stop between them
                    raise EngineStopped("the server is shutting down: the request was cancelled")
                self.metrics.prefix_cache_misses.inc()
                whole, context = self.encode_prefix(group[0].prompt)
                self.cache.put(key, context, group[0].prompt.chat)
                self.metrics.prefix_cache_hits.inc(len(group) - 1)
                if whole is not None:  # the first prompt is done: it continues no context
                    states.append(whole)
                    order.append(group[0])
                    group = group[1:]
            else:
                self.metrics.prefix_cache_hits.inc(len(group))
            if group:
                contexts.append(context)
                extended.append(group)
        if contexts:
            states.append(self.extend(contexts, [[(job.prompt, job.prompt.split, len(job.prompt.ids))
                                                  for job in group] for group in extended]))
            order += [job for group in extended for job in group]
        return FlamingoState.concat(states), order

    def encode_prefix(self, prompt: ProcessedPrompt) -> tuple[FlamingoState | None, FlamingoState]:
        """The state after a prompt's prefix that is not cached: the longest cached prefix of it
        (at an earlier cut: e.g. the chat up to the previous reply) continued with the rest, else
        the prefix encoded from scratch; where the model allows (`prefix_from_one_pass`), the whole
        prompt is encoded in one pass and the prefix's state taken from it (one LM pass, not two):
        then the whole prompt's state comes first, else None."""
        cuts = [cut for cut in prompt.cuts if cut < prompt.split]
        for cut in reversed(cuts[-MAX_CHAINED_CUTS:]):
            context = self.cache.get(prompt.key(cut))
            if context is not None:
                return None, self.extend([context], [[(prompt, cut, prompt.split)]])
        if self.one_pass_prefix:
            media = self.media([(prompt, 0, len(prompt.ids))])
            if media.key_mask is None:
                return encode_ids_and_prefix(self.model, prompt.ids, media.visual_tokens, media.num_media,
                                             prompt.split)
        return None, self.encode([prompt], 0, prompt.split)

    # ------------------------------------------------------------------ the decode batch
    def admit(self, jobs: list[Job]) -> None:
        """Prefill the joining jobs' prompts (one row per choice), choose (and stream) their
        first tokens, and add those that go on to the decode batch."""
        state, order = self.prefill(jobs)
        if any(job.params.n > 1 for job in order):
            rows = [row for row, job in enumerate(order) for _ in range(job.params.n)]
            state = state.select_rows(torch.tensor(rows, device=state.attention_mask.device))
        device = state.next_token_logits.device
        sequences = []
        for job in order:
            for choice in range(job.params.n):
                config = job.params.generation_config(choice)
                sequences.append(Sequence(job, choice, config, self.output.decoder(config),
                                          sampling_generator(config, device)))
        state, sequences, tokens = self.choose(state, sequences)
        if sequences:
            self.joined.append(state)
            self.running += sequences
            self.pending = tokens if self.pending is None else torch.cat([self.pending, tokens])

    def decode(self) -> None:
        """Feed every running sequence its chosen token, then choose (and stream) the next ones."""
        if self.joined:  # one concatenation for every admission since the last step (each copies the batch)
            self.state = FlamingoState.concat(([self.state] if self.state is not None else []) + self.joined)
            self.joined = []
        self.state.step(self.model, self.pending[:, None])
        self.state, self.running, self.pending = self.choose(self.state, self.running)

    def clear(self) -> None:
        """Drop the decode batch (after a failed step: its requests have ended with the error)."""
        self.state, self.joined, self.running, self.pending = None, [], [], None

    def choose(self, state: FlamingoState, sequences: list[Sequence]
               ) -> tuple[FlamingoState | None, list[Sequence], torch.Tensor | None]:
        """Choose every sequence's next token from the state's logits and stream it; drop the
        sequences that ended or were cancelled. Returns the state, sequences and chosen tokens
        of the others (the tokens still to be fed)."""
        logits = state.next_token_logits
        tokens = logits.argmax(-1)
        for row, sequence in enumerate(sequences):
            if sequence.generator is not None:
                tokens[row] = choose_next_tokens(logits[row:row + 1], sequence.config, sequence.generator)[0]
        keep = [row for row, (sequence, token) in enumerate(zip(sequences, tokens.tolist()))
                if not sequence.job.cancelled
                and not self.output.token(sequence.job, sequence.choice, sequence.decoder, token)]
        if not keep:
            return None, [], None
        if len(keep) < len(sequences):
            state = state.select_rows(torch.tensor(keep, device=tokens.device)).without_leading_padding()
        return state, [sequences[row] for row in keep], tokens[keep]

    # ------------------------------------------------------------------ batches of their own
    def run_alone(self, job: Job, between_passes: Callable[[], None]) -> None:
        """A ranking or beam search job, as a batch of its own: `between_passes` runs between its
        forward passes (the decode batch goes on), and it is abandoned there when the engine
        stops or the client goes away. A ranking's passes hold about RANK_TOKENS_PER_PASS
        candidate tokens each, so that the decode batch is never held up long."""
        def check() -> None:
            if self.stopping():
                raise EngineStopped("the server is shutting down: the request was cancelled")
            if job.cancelled:
                raise Cancelled
            between_passes()

        state, _ = self.prefill([job])
        try:
            if job.candidates is not None:
                scores = score_candidates(self.model, state, [job.candidates], before_step=check,
                                          max_rows=max(1, RANK_TOKENS_PER_PASS // max(job.candidate_tokens)))
                self.output.scores(job, scores.sum_logprob[0].tolist())
                return
            results = beam_search(self.model, state, job.params.generation_config(), num_return=job.params.n,
                                  before_step=check)[0]
        except Cancelled:  # nobody is listening
            return
        self.output.results(job, results)
