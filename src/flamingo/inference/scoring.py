"""Log-likelihood scoring of candidate completions, for close-ended tasks (paper 2.5, A.2).

Every (prompt, candidate) pair becomes one row continuing the prompt's cached state; all the
candidate tokens of a chunk of rows go through the model in one forward pass, and the
log-probabilities are gathered with tensor ops (no loop over tokens or classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from flamingo.inference.prompt import PromptError
from flamingo.inference.state import FlamingoState
from flamingo.model.flamingo import Flamingo


@dataclass
class CandidateScores:
    """Per prompt and candidate: the summed log-probability of the candidate's tokens, their
    number, and the length-normalised (mean) log-probability. Shape [B, C]; ragged candidate
    lists are padded with -inf scores and 0 tokens."""

    sum_logprob: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def mean_logprob(self) -> torch.Tensor:
        return self.sum_logprob / self.num_tokens.clamp(min=1)


@torch.no_grad()
def score_candidates(model: Flamingo, state: FlamingoState, candidates: Sequence[Sequence[str]] | Sequence[str],
                     *, max_rows: int = 128) -> CandidateScores:
    """Score each candidate continuation of each sequence of `state` (left unchanged).

    candidates: one list per sequence, or one list shared by all sequences (class names).
    """
    batch = state.batch_size
    if candidates and isinstance(candidates[0], str):
        candidates = [list(candidates)] * batch
    if len(candidates) != batch:
        raise PromptError(f"expected one candidate list per prompt ({batch}), got {len(candidates)}")
    token_lists = []
    for b, options in enumerate(candidates):
        if not options:
            raise PromptError(f"prompt {b}: no candidates to score")
        for text in options:
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise PromptError(f"prompt {b}: candidate {text!r} has no tokens")
            token_lists.append((b, ids))

    width = max(len(c) for c in candidates)
    sums = torch.full((batch, width), float("-inf"))
    counts = torch.zeros(batch, width, dtype=torch.long)
    slot = [c for options in candidates for c in range(len(options))]
    for start in range(0, len(token_lists), max_rows):
        chunk = token_lists[start:start + max_rows]
        chunk_sums, chunk_counts = _score_rows(model, state, chunk)
        for i, (b, _) in enumerate(chunk):
            sums[b, slot[start + i]] = chunk_sums[i]
            counts[b, slot[start + i]] = chunk_counts[i]
    return CandidateScores(sums, counts)


def _score_rows(model: Flamingo, state: FlamingoState, rows: list[tuple[int, list[int]]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    device = state.attention_mask.device
    prompt_rows = torch.tensor([b for b, _ in rows], device=device)
    work = state.select_rows(prompt_rows)
    length = max(len(ids) for _, ids in rows)
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([t + [pad] * (length - len(t)) for _, t in rows], device=device)
    real = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for _, t in rows], device=device)
    first_logits = work.next_token_logits  # predicts the first candidate token
    logits = work.step(model, ids, logits_to_keep=length)  # right padding never affects real tokens
    predicting = torch.cat([first_logits[:, None], logits[:, :-1]], dim=1).float()
    logprobs = predicting.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    return (logprobs * real).sum(1).cpu(), real.sum(1).cpu()


@torch.no_grad()
def rank_classes(model: Flamingo, state: FlamingoState, class_names: Sequence[str], *,
                 normalise_length: bool = False, max_rows: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank class names for every sequence of `state`: returns (order [B, C] best first,
    scores [B, C]) by summed (or mean) log-probability."""
    scores = score_candidates(model, state, list(class_names), max_rows=max_rows)
    values = scores.mean_logprob if normalise_length else scores.sum_logprob
    return values.argsort(dim=-1, descending=True), values
