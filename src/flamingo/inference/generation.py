"""Decoding from a `FlamingoState`: greedy, sampling (temperature, top-k, top-p), beam search
with length penalty; stops at `<|endofchunk|>`, EOS or user stop strings; streams text.

The images were encoded once when the state was made, the LM keeps its KV cache, and each
cross-attention layer computed the keys/values of the visual tokens once; beams of a sample share
them (they index the sample's media row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from flamingo.config_io import MAX_SEED, check_fields
from flamingo.inference.state import FlamingoState
from flamingo.model.flamingo import Flamingo, FlamingoInputError


MAX_BEAMS = 64
MAX_NEW_TOKENS = 1 << 16


class GenerationConfigError(FlamingoInputError):
    """A decoding option is out of range or options do not combine."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 20
    num_beams: int = 1  # > 1: beam search (the paper evaluates open-ended tasks with 3)
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1: no nucleus filtering
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_at_end_of_chunk: bool = True  # also stops at EOS

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise GenerationConfigError(message)

        self.stop_strings = tuple(self.stop_strings) if isinstance(self.stop_strings, (list, tuple)) else self.stop_strings
        check_fields(self, "generation config", error=GenerationConfigError)
        check(1 <= self.max_new_tokens <= MAX_NEW_TOKENS,
              f"max_new_tokens: expected an integer in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        check(1 <= self.num_beams <= MAX_BEAMS, f"num_beams: expected an integer in 1..{MAX_BEAMS}, got {self.num_beams}")
        check(math.isfinite(self.length_penalty), f"length_penalty: expected a finite number, got {self.length_penalty}")
        check(0 < self.temperature < math.inf, f"temperature: expected > 0 and finite, got {self.temperature}")
        check(self.top_k >= 0, f"top_k: expected an integer >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p: expected a value in (0, 1], got {self.top_p}")
        check(self.seed is None or 0 <= self.seed <= MAX_SEED,
              f"seed: expected an integer in 0..{MAX_SEED} or none, got {self.seed}")
        check(not (self.do_sample and self.num_beams > 1),
              "do_sample with num_beams > 1: choose sampling or beam search")
        check(all(self.stop_strings), "stop_strings: expected non-empty strings, got an empty one")


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, without the stop token
    text: str  # decoded, cut before any stop string
    finish_reason: str  # "stop_token", "stop_string" or "length"
    score: float | None = None  # beam search: the length-penalised log-probability


TokenCallback = Callable[[int, str], None]  # (row, new text)


def stop_token_ids(model: Flamingo, config: GenerationConfig) -> set[int]:
    if not config.stop_at_end_of_chunk:
        return set()
    eos = model.tokenizer.eos_token_id
    return {model.eoc_token_id} | ({eos} if eos is not None else set())


def _filtered_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    logits = logits.float() / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= config.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _stop_string_cut(text: str, stops: tuple[str, ...]) -> int | None:
    cuts = [text.find(s) for s in stops if s in text]
    return min(cuts) if cuts else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could be the start of a stop string: it is
    not streamed until it is known not to be one."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


@torch.no_grad()
def generate(model: Flamingo, state: FlamingoState, config: GenerationConfig | None = None,
             on_text: TokenCallback | None = None) -> list[Generation]:
    """Continue every sequence of `state` (which is left unchanged); one result per sequence.

    on_text(row, text) streams the new text of each row as it is decoded (greedy and sampling).
    """
    config = config or GenerationConfig()
    if config.num_beams > 1:
        if on_text is not None:
            raise GenerationConfigError("streaming works with greedy decoding and sampling, not beam search")
        return [best[0] for best in beam_search(model, state, config)]
    return _sample_or_greedy(model, state, config, on_text)


def choose_next_tokens(logits: torch.Tensor, config: GenerationConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of logits [B, V]: argmax, or a draw (temperature, top-k,
    top-p) when config.do_sample."""
    if not config.do_sample:
        return logits.argmax(-1)
    probs = _filtered_logits(logits, config).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def sampling_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """A generator seeded from config.seed (a random seed when None); None for greedy decoding."""
    if not config.do_sample:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    return generator


class SequenceDecoder:
    """The text side of decoding one sequence: collects its tokens, ends it at a stop token, a
    stop string or max_new_tokens (then `result` is set), and tells which new text may be shown.
    Text that could be the start of a stop string, or an incomplete UTF-8 character, is held back
    until the next tokens decide."""

    def __init__(self, model: Flamingo, config: GenerationConfig, stream: bool = False) -> None:
        self.tokenizer = model.tokenizer
        self.stop_ids = stop_token_ids(model, config)
        self.stop_strings = config.stop_strings
        self.max_new_tokens = config.max_new_tokens
        self.stream = stream
        self.ids: list[int] = []
        self.result: Generation | None = None
        self.streamed = 0  # characters of text already shown

    def add(self, token: int) -> str:
        """Take the next token; return the newly visible text ("" when not streaming)."""
        if token in self.stop_ids:
            self.result = Generation(self.ids, self.tokenizer.decode(self.ids), "stop_token")
            return self._shown(self.result.text)
        self.ids.append(token)
        last = len(self.ids) == self.max_new_tokens
        if not self.stop_strings and not self.stream:  # decoding every step costs time: only when needed
            if last:
                self.result = Generation(self.ids, self.tokenizer.decode(self.ids), "length")
            return ""
        text = self.tokenizer.decode(self.ids)
        cut = _stop_string_cut(text, self.stop_strings)
        if cut is not None:
            self.result = Generation(self.ids, text[:cut], "stop_string")
        elif last:
            self.result = Generation(self.ids, text, "length")
        if self.result is not None:
            return self._shown(self.result.text)
        held = max(_held_back(text, self.stop_strings), len(text) - len(text.rstrip("\ufffd")))
        return self._shown(text[:len(text) - held])

    def _shown(self, visible: str) -> str:
        if not self.stream:
            return ""
        shown = visible[self.streamed:]
        self.streamed = max(self.streamed, len(visible))
        return shown


def _sample_or_greedy(model: Flamingo, state: FlamingoState, config: GenerationConfig,
                      on_text: TokenCallback | None) -> list[Generation]:
    work = state.repeat_rows(1)  # the caller's state stays as it was
    generator = sampling_generator(config, work.next_token_logits.device)
    decoders = [SequenceDecoder(model, config, stream=on_text is not None) for _ in range(work.batch_size)]
    pad = model.tokenizer.pad_token_id
    for step in range(config.max_new_tokens):
        chosen = choose_next_tokens(work.next_token_logits, config, generator)
        for row, token in enumerate(chosen.tolist()):
            if decoders[row].result is None:
                shown = decoders[row].add(token)
                if shown and on_text is not None:
                    on_text(row, shown)
        if all(d.result is not None for d in decoders):
            break
        finished = torch.tensor([d.result is not None for d in decoders], device=chosen.device)
        work.step(model, chosen.masked_fill(finished, pad)[:, None])
    return [d.result for d in decoders]  # every sequence ends by max_new_tokens


@dataclass
class _Hypothesis:
    score: float
    token_ids: list[int]
    reason: str
    text: str | None = None  # known only when cut at a stop string; decoded at the end otherwise


@torch.no_grad()
def beam_search(model: Flamingo, state: FlamingoState, config: GenerationConfig,
                num_return: int = 1, before_step: Callable[[], None] | None = None) -> list[list[Generation]]:
    """Beam search from every sequence of `state` (left unchanged): per sequence, its best
    `num_return` (<= num_beams) hypotheses, best first. `before_step()` runs before every step
    (e.g. to abandon the search by raising when a server stops)."""
    if not 1 <= num_return <= config.num_beams:
        raise GenerationConfigError(f"num_return: expected 1 to num_beams ({config.num_beams}), got {num_return!r}")
    width, samples = config.num_beams, state.batch_size
    work = state.repeat_rows(width)  # row = sample * width + beam; beams share the sample's media
    stops = stop_token_ids(model, config)
    vocab = work.next_token_logits.shape[-1]
    device = work.next_token_logits.device
    # Only the first beam of each sample is live at the start, so the first step picks distinct tokens.
    beam_scores = torch.full((samples, width), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    beam_ids: list[list[int]] = [[] for _ in range(samples * width)]
    finished: list[list[_Hypothesis]] = [[] for _ in range(samples)]
    done = [False] * samples
    pad = model.tokenizer.pad_token_id

    def penalised(score: float, length: int) -> float:
        return score / (max(length, 1) ** config.length_penalty)

    for step in range(config.max_new_tokens):
        if before_step is not None:
            before_step()
        logprobs = work.next_token_logits.float().log_softmax(-1).view(samples, width, vocab)
        candidates = (beam_scores[..., None] + logprobs).view(samples, width * vocab)
        top_scores, top_index = candidates.topk(2 * width, dim=-1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        next_rows, next_tokens, next_scores, next_ids = [], [], [], []
        last_step = step == config.max_new_tokens - 1
        for s in range(samples):
            chosen = 0
            for score, flat in zip(top_scores[s], top_index[s]):
                if done[s] or chosen == width:
                    break
                if score == float("-inf"):
                    continue
                beam, token = divmod(flat, vocab)
                row = s * width + beam
                if token in stops:
                    hyp = beam_ids[row]
                    finished[s].append(_Hypothesis(penalised(score, len(hyp) + 1), hyp, "stop_token"))
                    continue
                new_ids = beam_ids[row] + [token]
                if config.stop_strings:  # decoding every candidate costs time: only when needed
                    text = model.tokenizer.decode(new_ids)
                    cut = _stop_string_cut(text, config.stop_strings)
                    if cut is not None:
                        finished[s].append(_Hypothesis(penalised(score, len(new_ids)), new_ids, "stop_string",
                                                       text[:cut]))
                        continue
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
                next_ids.append(new_ids)
                chosen += 1
            if not done[s]:
                alive = next_scores[len(next_scores) - chosen:]
                if last_step:
                    for score, ids in zip(alive, next_ids[len(next_ids) - chosen:]):
                        finished[s].append(_Hypothesis(penalised(score, len(ids)), ids, "length"))
                # Done when `width` hypotheses are finished and no live beam can beat the worst.
                if len(finished[s]) >= width:
                    worst = sorted(h.score for h in finished[s])[-width]
                    if not alive or penalised(max(alive), step + 1) <= worst:
                        done[s] = True
            # keep the row structure: pad a finished sample's beams with dead copies
            while chosen < width:
                next_rows.append(s * width)
                next_tokens.append(pad)
                next_scores.append(float("-inf"))
                next_ids.append(list(beam_ids[s * width]))
                chosen += 1
        if all(done) or last_step:
            break
        rows = torch.tensor(next_rows, device=device)
        beam_scores = torch.tensor(next_scores, device=device).view(samples, width)
        beam_ids = next_ids
        work.reorder(rows)
        work.step(model, torch.tensor(next_tokens, device=device)[:, None])

    results = []
    for s in range(samples):
        ranked = sorted(finished[s], key=lambda h: h.score, reverse=True)[:num_return] or [
            _Hypothesis(float("-inf"), beam_ids[s * width], "length")]
        results.append([Generation(h.token_ids, h.text if h.text is not None else model.tokenizer.decode(h.token_ids),
                                   h.reason, h.score) for h in ranked])
    return results
