"""Few-shot learning measured on held-out procedural tasks (the embedded default's evaluation).

Each task (`flamingo.data.episodes`) draws episodes from `flamingo.data.procedural` on its
held-out split — object kinds, colours and made-up words never used in training — and asks the
model to pick the answer among the episode's candidates by log-likelihood (paper 2.5,
close-ended). With k shots the prompt holds k support chunks before the query; with 0 it holds
the query alone, so 0-shot accuracy is what the model knows without examples (chance, for
made-up words). Two perception tasks (shape, colour: questions about new scenes of training kinds
and colours) show how well the bridge reads images at all. With `images_as_text` every image is
replaced by its true caption and the episode is scored by the frozen LM alone: what the LM itself
does with the same examples in text.

Episodes are a pure function of (task, shots, seed, episode index), so a table is reproducible;
all episodes of one shot count are scored in batched forward passes.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from flamingo.data import clipart
from flamingo.data.episodes import episode_items, make_episode
from flamingo.inference.prompt import interleaved_prompt
from flamingo.inference.scoring import score_candidates
from flamingo.inference.state import encode_prompts
from flamingo.model.flamingo import Flamingo


@torch.no_grad()
def episode_accuracy(model: Flamingo, task: str, shots: int, seed: int, episodes: int,
                     batch_size: int = 16, images_as_text: bool = False) -> float:
    """Fraction of episodes whose answer scores highest among its candidates (summed log-prob)."""
    correct = 0
    for start in range(0, episodes, batch_size):
        batch = [make_episode(task, shots, seed, i) for i in range(start, min(start + batch_size, episodes))]
        prompts = [interleaved_prompt(episode_items(s, q, model.config.end_of_chunk_token, images_as_text),
                                      model.config.media_token)
                   for s, q, _, _ in batch]
        state = encode_prompts(model, prompts)
        scores = score_candidates(model, state, [candidates for _, _, _, candidates in batch])
        best = scores.sum_logprob.argmax(1).tolist()
        correct += sum(candidates[b] == answer for b, (_, _, answer, candidates) in zip(best, batch))
    return correct / episodes


@dataclass
class ShotsResult:
    task: str
    shots: int
    accuracies: list[float]  # one per seed

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def evaluate(model: Flamingo, tasks: Sequence[str], shots: Sequence[int], seeds: Sequence[int], episodes: int,
             progress: Callable[[str], None] | None = None, images_as_text: bool = False) -> list[ShotsResult]:
    results = []
    for task in tasks:
        for k in shots:
            accs = [episode_accuracy(model, task, k, seed, episodes, images_as_text=images_as_text) for seed in seeds]
            results.append(ShotsResult(task, k, accs))
            if progress:
                progress(f"{task} {k}-shot: {100 * results[-1].mean:.1f}%")
    return results


def format_table(results: Sequence[ShotsResult]) -> str:
    """A markdown table: one row per task, one column per shot count (mean ± std over seeds, %)."""
    shots = sorted({r.shots for r in results})
    tasks = list(dict.fromkeys(r.task for r in results))
    def cell_text(r: ShotsResult) -> str:  # no spread to show from a single seed
        return f"{100 * r.mean:.1f}" + (f" ± {100 * r.std:.1f}" if len(r.accuracies) > 1 else "")

    cell = {(r.task, r.shots): cell_text(r) for r in results}
    lines = ["| task | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    lines += [f"| {t} | " + " | ".join(cell.get((t, k), "") for k in shots) + " |" for t in tasks]
    return "\n".join(lines)


@dataclass
class CaptionResult:
    cider: float | None  # None without java (pycocoevalcap's tokenizer runs a JVM)
    names_coarse: float  # fraction of captions that name the object's coarse category
    examples: list[dict[str, str]]  # per object: path, coarse category, caption, references


@torch.no_grad()
def caption_objects(model: Flamingo, count: int, seed: int = 0, max_new_tokens: int = 12) -> CaptionResult:
    """Zero-shot captions of `count` held-out objects (shown alone on white), greedy, scored by
    CIDEr against the stamp caption and "A drawing of a <category>.", and by whether they name
    the object's coarse category (`flamingo.data.clipart.coarse_vocabulary`)."""
    from flamingo.evaluation.metrics import cider, postprocess_caption_generation
    from flamingo.inference.api import generate_text

    found = clipart.catalogue()
    vocabulary = clipart.coarse_vocabulary(found)
    examples = []
    for item in clipart.held_out_items(found, count, seed):
        text = generate_text(model, [clipart.show_object(item)], max_new_tokens=max_new_tokens)
        text = postprocess_caption_generation(text)
        references = list(dict.fromkeys([item.caption, f"A drawing of {clipart.with_article(item.category.name)}."]))
        examples.append({"path": str(item.path), "category": item.category.name, "coarse": item.category.coarse,
                         "caption": text, "references": references})
    score = cider({str(i): e["caption"] for i, e in enumerate(examples)},
                  {str(i): e["references"] for i, e in enumerate(examples)}) if shutil.which("java") else None
    named = statistics.fmean(clipart.names_coarse_category(e["caption"], e["coarse"], vocabulary) for e in examples)
    return CaptionResult(score, named, examples)
