"""The `kind: task` dataset of a training config: a benchmark's train split (read by the loaders
of `flamingo.data.benchmarks`, the data config of `flamingo eval`) as training batches, each
sample written exactly as a demo of the few-shot prompt:

    [BOS] <image>Question: {question} Answer: {answer}<|endofchunk|>

with the loss on " {answer}<|endofchunk|>" only (see `flamingo.training.finetune`, which trains on
it). For a model of another family (`flamingo.model.families`) the same demo text, in its media and
end-of-chunk tokens, becomes exactly what its processor builds for it (`MediaFamily.tokenize` and
`preprocess`, as its few-shot prompts at evaluation), e.g.

    Llama 3.2 Vision: <|image|><|begin_of_text|>Question: {question} Answer: {answer}<|eot_id|>
    IDEFICS:          <s><fake_token_around_image><image><fake_token_around_image>Question: ...

over the image's aspect-ratio tiles (Llama 3.2 Vision) or its processor's pixels (IDEFICS); the loss
on the tokens after the query's, never on a media or special token but the end of chunk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flamingo.data.batch import IGNORE_INDEX, TrainingSample
from flamingo.data.benchmarks.data_config import load_data_config
from flamingo.data.benchmarks.loaders import LOADERS
from flamingo.data.benchmarks.media import VideoSampling, read_media
from flamingo.data.benchmarks.tasks import get_task
from flamingo.data.loader import DataStats
from flamingo.data.media import SkipSample
from flamingo.data.processing import FamilyInputs, Outcome
from flamingo.data.synthetic import InMemorySource
from flamingo.model.config import ConfigError
from flamingo.model.families import FAMILIES

TASK_OPTIONS = ("task", "data", "max_tokens", "video_frames", "video_fps")
# Samples tried in place of one that cannot be used (unreadable media, too long) before giving up.
MAX_REPLACEMENTS = 64


class TaskSource(InMemorySource):
    """Training batches of a benchmark's train split, in the evaluation's prompt format (module docstring).

    Sample `index` is sample `permutation_e[index mod n]` of epoch e = index // n, the
    permutation seeded by (seed, dataset name, e): a pure function of the index, so batches are
    sharded over ranks and resumed exactly as the other in-memory sources. A sample whose media
    cannot be read, or longer than `max_tokens`, is replaced by the next one of the stream and
    counted in `stats` (by reason).
    """

    def __init__(self, name: str, tokenizer: Any, media_token_id: int, eoc_token_id: int, image_processor: Any,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, *, task: str,
                 data: str, max_tokens: int = 512, video_frames: int = 8,
                 video_fps: float = 1.0, family_model: Any = None) -> None:
        super().__init__(name, tokenizer, batch_size, seed, rank, world_size)
        where = f"dataset {name!r}"
        self.task = get_task(task)
        if self.task.zero_shot_only or self.task.kind == "retrieval":
            raise ConfigError(f"{where}: task {task!r} is evaluated zero-shot only; it has no training format")
        if not (isinstance(max_tokens, int) and max_tokens >= 4):
            raise ConfigError(f"{where}: max_tokens: expected an integer >= 4, got {max_tokens!r}")
        if not (isinstance(video_frames, int) and video_frames >= 1 and video_fps > 0):
            raise ConfigError(f"{where}: video_frames / video_fps: expected an integer >= 1 and a number > 0, "
                              f"got {video_frames!r} / {video_fps!r}")
        # A model of another family: samples in its processor's format.
        self.family = FamilyInputs(family_model) if family_model is not None else None
        if family_model is not None and self.task.video:
            raise ConfigError(f"{where}: task {task!r} is a video task, and a {FAMILIES[family_model.family]} "
                              f"model takes images only")
        paths = load_data_config(data).task(task).train
        if paths is None:
            raise ConfigError(f"{data}: tasks.{task} has no train split to fine-tune on")
        self.samples = LOADERS[self.task.loader](paths, "train", f"tasks.{task}.train")
        if not self.samples:
            raise ConfigError(f"{data}: tasks.{task}.train holds no samples")
        self.tokenizer, self.processor = tokenizer, image_processor
        self.media_token_id, self.eoc_token_id = media_token_id, eoc_token_id
        self.max_tokens = max_tokens
        self.sampling = VideoSampling(video_frames, float(video_fps))
        # What the tokenizer puts in front of a prompt (a BOS or nothing), as at inference.
        self.prefix = tokenizer("", add_special_tokens=True)["input_ids"]
        self.stats = DataStats()
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.arange(0))

    def _text_ids(self, text: str) -> list[int]:
        special = (self.media_token_id, self.eoc_token_id)  # only this code places those tokens
        return [t for t in self.tokenizer(text, add_special_tokens=False)["input_ids"] if t not in special]

    def _answer(self, sample: Any, rng: np.random.Generator) -> str:
        """Captions: one reference drawn at random (each is a correct target); other tasks: the
        answer a demo shows (the label, the most frequent VQA answer)."""
        if self.task.kind == "caption" and sample.answers:
            return sample.answers[int(rng.integers(len(sample.answers)))]
        return self.task.demo_answer(sample)

    def build(self, sample: Any, rng: np.random.Generator) -> TrainingSample:
        """One evaluation sample as a training sample; raises SkipSample."""
        if self.family is not None:
            return self._build_for_family(sample, rng)
        query = self._text_ids(self.task.query_text(sample))
        answer = self._text_ids(" " + self._answer(sample, rng)) + [self.eoc_token_id]
        head = [*self.prefix, self.media_token_id, *query]
        if len(head) + len(answer) > self.max_tokens:
            raise SkipSample("too_long", f"sample {sample.id}: {len(head) + len(answer)} tokens > max_tokens "
                                         f"{self.max_tokens}")
        frames = read_media(sample, self.task.video, self.sampling)
        pixels = self.processor.preprocess_video(frames)[None]  # [N=1, T, 3, H, W]
        input_ids = torch.tensor(head + answer, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[len(head):] = input_ids[len(head):]
        return TrainingSample(input_ids, labels, pixels, attend_next=False, dataset=self.name)

    def _build_for_family(self, sample: Any, rng: np.random.Generator) -> TrainingSample:
        """`build` for a model of another family (module docstring); raises SkipSample."""
        fam = self.family
        head = fam.media_token + fam.clean(self.task.query_text(sample))
        ids = fam.tokenize(f"{head} {fam.clean(self._answer(sample, rng))}{fam.eoc_token}")
        if len(ids) > self.max_tokens:
            raise SkipSample("too_long", f"sample {sample.id}: {len(ids)} tokens > max_tokens {self.max_tokens}")
        query = fam.tokenize(head)
        start = next((i for i, (a, b) in enumerate(zip(ids, query)) if a != b), min(len(ids), len(query)))
        pixels, vision_inputs = fam.media(read_media(sample, self.task.video, self.sampling))
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = fam.labels(input_ids)
        labels[:start] = IGNORE_INDEX
        return TrainingSample(input_ids, labels, pixels, attend_next=False, dataset=self.name,
                              vision_inputs=vision_inputs)

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, self.rng(epoch).permutation(len(self.samples)))
        return self._epoch_order[1]

    def sample(self, index: int) -> TrainingSample:
        n = len(self.samples)
        for offset in range(MAX_REPLACEMENTS):
            epoch, slot = divmod(index + offset, n)
            order = self._order(epoch)
            rng = self.rng(epoch, slot)
            try:
                out = self.build(self.samples[int(order[slot])], rng)
            except SkipSample as err:
                self.stats.add(Outcome(reason=err.reason, message=err.message))
                continue
            self.stats.add(Outcome(sample=out))
            return out
        raise ConfigError(f"dataset {self.name!r}: {MAX_REPLACEMENTS} samples in a row could not be used "
                          f"({self.stats.summary()}; last: {'; '.join(self.stats.messages.values())[:300]})")


def task_source(spec: Any, model: Any, image_processor: Any, seed: int, rank: int, world_size: int) -> TaskSource:
    """The `kind: task` dataset of a training config (see `flamingo.training.data`); for a model of
    another family (`model.family`) in its processor's format (image_processor unused)."""
    unknown = sorted(set(spec.options) - set(TASK_OPTIONS))
    missing = [k for k in ("task", "data") if k not in spec.options]
    if unknown or missing:
        raise ConfigError(f"dataset {spec.name!r} (kind task): unknown field(s) {unknown}, missing {missing}; "
                          f"expected name, kind, weight, batch_size, {', '.join(TASK_OPTIONS)} (task and data "
                          f"required)")
    return TaskSource(spec.name, model.tokenizer, model.media_token_id, model.eoc_token_id, image_processor,
                      spec.batch_size, seed=seed, rank=rank, world_size=world_size,
                      family_model=model if getattr(model, "family", None) else None, **spec.options)
