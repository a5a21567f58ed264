"""Log-likelihood scoring of candidate completions, for close-ended tasks (paper 2.5, A.2).

Every (prompt, candidate) pair becomes one row continuing the prompt's cached state; all the
candidate tokens of a chunk of rows go through the model in one forward pass, and the
log-probabilities are gathered with tensor ops (no loop over tokens or classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from flamingo.inference.prompt import PromptError
from flamingo.inference.state import FlamingoState
from flamingo.model.flamingo import Flamingo


@dataclass
class CandidateScores:
    """Per prompt and candidate: the summed log-probability of the candidate's tokens, their
    number, the length-normalised (mean) log-probability, and (when computed) whether greedy
    decoding would produce the candidate's tokens. Shape [B, C]; ragged candidate lists are
    padded with -inf scores, 0 tokens and False."""

    sum_logprob: torch.Tensor
    num_tokens: torch.Tensor
    greedy: torch.Tensor | None = None

    @property
    def mean_logprob(self) -> torch.Tensor:
        return self.sum_logprob / self.num_tokens.clamp(min=1)


@torch.no_grad()
def score_candidates(model: Flamingo, state: FlamingoState, candidates: Sequence[Sequence[str]] | Sequence[str],
                     *, max_rows: int = 128, before_step: Callable[[], None] | None = None) -> CandidateScores:
    """Score each candidate continuation of each sequence of `state` (left unchanged).

    candidates: one list per sequence, or one list shared by all sequences (class names).

    A candidate's first token is scored from the prompt's own next-token prediction (no forward
    pass); the others need the candidate fed up to its last-but-one token. Candidates are
    grouped by that length (no padding), and each forward pass takes up to `max_rows` of them,
    by whole prompts where possible so that a prompt's rows share its visual tokens and
    cross-attention keys/values. `before_step()` runs before each of those passes (e.g. to
    abandon the scoring by raising when a server stops).
    """
    batch = state.batch_size
    if candidates and isinstance(candidates[0], str):
        candidates = [list(candidates)] * batch
    if len(candidates) != batch:
        raise PromptError(f"expected one candidate list per prompt ({batch}), got {len(candidates)}")
    if max_rows < 1:
        raise PromptError(f"max_rows: expected an integer >= 1, got {max_rows!r}")
    tokenized: dict[str, list[int]] = {}
    entries = []  # (prompt, slot, ids)
    for b, options in enumerate(candidates):
        if not options:
            raise PromptError(f"prompt {b}: no candidates to score")
        for c, text in enumerate(options):
            if text not in tokenized:
                tokenized[text] = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = tokenized[text]
            if not ids:
                raise PromptError(f"prompt {b}: candidate {text!r} has no tokens")
            entries.append((b, c, ids))

    width = max(len(c) for c in candidates)
    sums = torch.full((batch, width), float("-inf"))
    counts = torch.zeros(batch, width, dtype=torch.long)
    prompt_index = torch.tensor([b for b, _, _ in entries])
    slot_index = torch.tensor([c for _, c, _ in entries])
    counts[prompt_index, slot_index] = torch.tensor([len(ids) for _, _, ids in entries])
    first = state.next_token_logits.float().log_softmax(-1).cpu()  # [B, V]
    first_ids = torch.tensor([ids[0] for _, _, ids in entries])
    sums[prompt_index, slot_index] = first[prompt_index, first_ids]
    greedy = torch.zeros(batch, width, dtype=torch.bool)
    greedy[prompt_index, slot_index] = first.argmax(-1)[prompt_index] == first_ids

    by_length: dict[int, list[tuple[int, int, list[int]]]] = {}
    for entry in entries:
        if len(entry[2]) > 1:
            by_length.setdefault(len(entry[2]), []).append(entry)
    for group in by_length.values():
        for chunk in _chunks(group, max_rows):
            if before_step is not None:
                before_step()
            rest, rest_greedy = _score_rows(model, state, chunk)
            where = (torch.tensor([b for b, _, _ in chunk]), torch.tensor([c for _, c, _ in chunk]))
            sums.index_put_(where, rest, accumulate=True)
            greedy[where] &= rest_greedy
    return CandidateScores(sums, counts, greedy)


def _chunks(group: list[tuple[int, int, list[int]]], max_rows: int) -> list[list[tuple[int, int, list[int]]]]:
    """Split rows (in prompt order) into chunks of at most `max_rows`, by whole prompts where
    they fit; a prompt with more rows than that is split evenly on its own."""
    runs: list[list[tuple[int, int, list[int]]]] = []
    for entry in group:
        if runs and runs[-1][0][0] == entry[0]:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    chunks: list[list[tuple[int, int, list[int]]]] = []
    current: list[tuple[int, int, list[int]]] = []
    for run in runs:
        if len(run) > max_rows:
            if current:
                chunks.append(current)
                current = []
            pieces = -(-len(run) // max_rows)
            size = -(-len(run) // pieces)
            chunks += [run[i:i + size] for i in range(0, len(run), size)]
        elif len(current) + len(run) > max_rows:
            chunks.append(current)
            current = list(run)
        else:
            current += run
    if current:
        chunks.append(current)
    return chunks


def _score_rows(model: Flamingo, state: FlamingoState, rows: list[tuple[int, int, list[int]]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of tokens 2.. of candidates of one length, one forward pass, and
    whether each of those tokens is the most likely one."""
    device = state.attention_mask.device
    work = state.select_rows(torch.tensor([b for b, _, _ in rows], device=device), keep_logits=False)
    ids = torch.tensor([t for _, _, t in rows], device=device)  # [R, n], all of one length
    logits = work.step(model, ids[:, :-1], logits_to_keep=ids.shape[1] - 1)
    logprobs = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return logprobs.sum(1).cpu(), (logits.argmax(-1) == ids[:, 1:]).all(1).cpu()


@torch.no_grad()
def rank_classes(model: Flamingo, state: FlamingoState, class_names: Sequence[str], *,
                 normalise_length: bool = False, max_rows: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank class names for every sequence of `state`: returns (order [B, C] best first,
    scores [B, C]) by summed (or mean) log-probability."""
    scores = score_candidates(model, state, list(class_names), max_rows=max_rows)
    values = scores.mean_logprob if normalise_length else scores.sum_logprob
    return values.argsort(dim=-1, descending=True), values
