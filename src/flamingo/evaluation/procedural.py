"""Few-shot learning measured on held-out procedural tasks (the embedded default's evaluation).

Each task draws episodes from `flamingo.data.procedural` on its held-out split — object kinds,
colours and made-up words never used in training — and asks the model to pick the answer among
the episode's candidates by log-likelihood (paper 2.5, close-ended). With k shots the prompt
holds k support chunks before the query; with 0 it holds the query alone, so 0-shot accuracy is
what the model knows without examples (chance, for made-up words). Two perception tasks (shape,
colour: questions about new scenes of training kinds and colours) show how well the bridge reads
images at all. With `images_as_text` every image is replaced by its true caption and the episode
is scored by the frozen LM alone: what the LM itself does with the same examples in text.

Episodes are a pure function of (task, shots, seed, episode index), so a table is reproducible;
all episodes of one shot count are scored in batched forward passes.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from flamingo.config_io import short
from flamingo.data import clipart, procedural
from flamingo.errors import UserError
from flamingo.inference.prompt import interleaved_prompt
from flamingo.inference.scoring import score_candidates
from flamingo.inference.state import encode_prompts
from flamingo.model.flamingo import Flamingo

Episode = tuple[list[procedural.Segment], procedural.Segment, str, list[str]]


@dataclass(frozen=True)
class ProceduralTask:
    name: str
    description: str
    make: Callable[[np.random.Generator, int, int], Episode]  # (rng, image size, shots) -> episode
    needs_clipart: bool = False  # real drawn objects: the clip-art packages must be installed
    same_episodes_as: str | None = None  # a control: that task's episodes (same seeds), altered


def _grey_support(episode: Episode) -> Episode:
    """The control: every support image replaced by a uniform grey one (the words stay)."""
    support, query, answer, candidates = episode
    for segment in support:
        segment.image = Image.new("RGB", segment.image.size, (128, 128, 128))
    return support, query, answer, candidates


TASKS: dict[str, ProceduralTask] = {t.name: t for t in [
    ProceduralTask("binding", "2-way: new words bound to held-out object kinds (\"This is a dax.\")",
                   lambda rng, size, shots: procedural.binding_episode(rng, size, "eval", ways=2, shots=shots)),
    ProceduralTask("binding-colours", "2-way: new words bound to held-out colours",
                   lambda rng, size, shots: procedural.binding_episode(rng, size, "eval", ways=2, shots=shots,
                                                                      by="colour")),
    ProceduralTask("induction", "\"Output: X\", X the colour or the kind (held-out ones), shown only by example; "
                   "6 candidates", lambda rng, size, shots: procedural.induction_episode(rng, size, "eval", shots=shots)),
    ProceduralTask("shape", "perception: \"What shape is this?\" on new scenes of training kinds; 9 candidates",
                   lambda rng, size, shots: procedural.question_episode(rng, size, "train", shots=shots)),
    ProceduralTask("colour", "perception: \"What colour is the X?\" on new scenes of training colours; 9 candidates",
                   lambda rng, size, shots: procedural.question_episode(rng, size, "train", shots=shots,
                                                                        attribute="colour")),
    ProceduralTask("objects-binding", "2-way: new words bound to held-out categories of real drawn objects",
                   lambda rng, size, shots: clipart.binding_episode(clipart.catalogue(), rng, size, "eval", ways=2,
                                                                    shots=shots), needs_clipart=True),
    ProceduralTask("objects-binding-3way", "3-way: new words bound to held-out categories of real drawn objects",
                   lambda rng, size, shots: clipart.binding_episode(clipart.catalogue(), rng, size, "eval", ways=3,
                                                                    shots=shots), needs_clipart=True),
    ProceduralTask("objects-binding-grey", "control: objects-binding with every support image replaced by grey "
                   "(chance expected)", lambda rng, size, shots: _grey_support(clipart.binding_episode(
                       clipart.catalogue(), rng, size, "eval", ways=2, shots=shots)), needs_clipart=True,
                   same_episodes_as="objects-binding"),
    ProceduralTask("objects-category", "\"What kind of thing is this?\" (animal, food, plant, ...: 9 candidates) "
                   "about objects of held-out categories", lambda rng, size, shots: clipart.category_episode(
                       clipart.catalogue(), rng, size, "eval", shots=shots), needs_clipart=True),
]}


def episode_items(support: Sequence[procedural.Segment], query: procedural.Segment,
                  end_of_chunk: str = "<|endofchunk|>", images_as_text: bool = False) -> list[Any]:
    """Interleaved prompt items: each support chunk is image, text, <|endofchunk|>; then the query.
    With `images_as_text`, each image is replaced by its true caption ("A small red star. ")."""
    def image(segment: procedural.Segment) -> Any:
        return segment.true_caption() + " " if images_as_text else segment.image

    items: list[Any] = []
    for segment in support:
        items += [image(segment), "".join(piece for piece, _ in segment.text) + end_of_chunk]
    return items + [image(query), "".join(piece for piece, _ in query.text)]


def make_episode(task: str, shots: int, seed: int, index: int, image_size: int = 224) -> Episode:
    if task not in TASKS:
        raise UserError(f"unknown procedural task {short(task)}; expected one of {sorted(TASKS)}")
    rng = np.random.default_rng([seed, shots, index, sum(map(ord, TASKS[task].same_episodes_as or task))])
    return TASKS[task].make(rng, image_size, shots)


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
