"""Running one benchmark: demos per query (random, zero-shot, RICES), prompts, OOC checks,
open-ended beam search and close-ended log-likelihood ranking, one record per query.

Speed: queries that share their demos (random demos in "shared" mode: one draw per trial) share
one encoded context (`encode_prompts` once, then `extend` per batch of queries: paper D.1, cost
linear in the number of shots); a context is encoded once per (shots, trial, demo order). Queries
with demos of their own (RICES, "per_query" mode) are batched as full prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from flamingo.data.benchmarks.loaders import class_names_of
from flamingo.data.benchmarks.media import MediaCache, VideoSampling, read_media
from flamingo.data.benchmarks.samples import EvalDataError, Sample
from flamingo.data.benchmarks.tasks import TaskSpec
from flamingo.data.media import SkipSample
from flamingo.data.sources import keyed_rng
from flamingo.evaluation import metrics as M
from flamingo.evaluation.records import RecordWriter, record_key
from flamingo.evaluation.rices import SupportIndex, media_features
from flamingo.evaluation.settings import EvalSettings
from flamingo.evaluation.subsets import Subsets
from flamingo.inference.generation import GenerationConfig, generate
from flamingo.inference.prompt import Prompt, context_length, interleaved_prompt
from flamingo.inference.scoring import score_candidates
from flamingo.inference.state import FlamingoState, encode_prompts, extend
from flamingo.model.flamingo import Flamingo

EOC = "<|endofchunk|>"


@dataclass
class _Row:
    """One prompt to run: query `query` (index in the batch) with demos `demos` in that order."""

    query: int
    demos: tuple[Sample, ...]
    text_only: bool  # zero-shot: the demos' images are removed


class TaskEvaluator:
    def __init__(self, model: Flamingo, task: TaskSpec, subsets: Subsets, settings: EvalSettings, *,
                 rank: int = 0, world: int = 1, progress: bool = True) -> None:
        self.model, self.task, self.settings = model, task, settings
        self.support, self.queries = subsets.support, subsets.query
        self.rank, self.world, self.progress = rank, world, progress
        self.classes = class_names_of(self.support + self.queries) if task.kind == "classification" else []
        self.sampling = VideoSampling(settings.video_frames, settings.video_fps)
        self.media = MediaCache(task.video, self.sampling)
        self.limit = settings.max_prompt_tokens or context_length(model)
        self.max_new_tokens = settings.max_new_tokens or task.max_new_tokens
        self.index: SupportIndex | None = None
        self._support_by_id = {s.id: s for s in self.support}
        self._contexts: OrderedDict[tuple, FlamingoState] = OrderedDict()
        self.trial_info: dict[tuple[int, int], dict[str, Any]] = {}

    # ------------------------------------------------------------------------------ plan
    def plan(self) -> list[tuple[int, int]]:
        """(shots, trial) pairs to evaluate."""
        pairs = []
        for shots in self.settings.shots:
            if self.task.zero_shot_only and shots > 0:
                continue
            trials = 1 if (self.settings.rices and shots > 0) else self.settings.trials
            pairs += [(shots, t) for t in range(trials)]
        return pairs

    def build_index(self, cache_file: Any) -> None:
        self.index = SupportIndex.build(self.model, self.support, self.media.get, cache_file)

    def my_queries(self) -> list[Sample]:
        return self.queries[self.rank::self.world]

    # ----------------------------------------------------------------------------- demos
    def _random_demos(self, shots: int, trial: int, query: Sample | None) -> list[Sample]:
        """`shots` support examples with readable media, in random order (a seeded permutation);
        zero-shot: `zero_shot_examples` examples whose images are not used."""
        keys: list[int | str] = [self.settings.seed, self.task.name, "demos", shots, trial]
        if query is not None:
            keys.append(query.id)
        order = keyed_rng(*keys).permutation(len(self.support))
        wanted = shots or self.settings.zero_shot_examples
        chosen = []
        for i in order:
            if shots == 0 or self.media.ok(self.support[i]):  # zero-shot examples show no image
                chosen.append(self.support[i])
                if len(chosen) == wanted:
                    return chosen
        raise EvalDataError(f"task {self.task.name}: {wanted} support examples needed but only {len(chosen)} of "
                            f"{len(self.support)} are usable (media missing or unreadable)")

    def shared_demos(self, shots: int, trial: int) -> list[Sample]:
        demos = self._random_demos(shots, trial, None)
        self.trial_info[(shots, trial)] = {"demo_ids": [d.id for d in demos],
                                           "seed_keys": [self.settings.seed, self.task.name, "demos", shots, trial]}
        return demos

    def _variants(self, demos: list[Sample], shots: int, trial: int, query: Sample | None) -> list[tuple[Sample, ...]]:
        """The demo orders to run: the order itself, plus for close-ended ensembling
        `ensemble_size - 1` seeded random permutations of it (A.2)."""
        out = [tuple(demos)]
        if self.settings.ensemble and not self.task.open_ended and shots > 0:
            keys: list[int | str] = [self.settings.seed, self.task.name, "ensemble", shots, trial]
            if query is not None:
                keys.append(query.id)
            rng = keyed_rng(*keys)
            out += [tuple(demos[i] for i in rng.permutation(len(demos))) for _ in range(self.settings.ensemble_size - 1)]
        return out

    # ---------------------------------------------------------------------------- prompts
    def _context_items(self, demos: Sequence[Sample], text_only: bool) -> list[Any]:
        items: list[Any] = []
        for d in demos:
            if not text_only:
                items.append(self.media.get(d))
            items.append(self.task.demo_text(d) + self.model.config.end_of_chunk_token)
        return items

    def _num_tokens(self, text: str, special: bool) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _context_text(self, demos: Sequence[Sample], text_only: bool) -> str:
        image = "" if text_only else self.model.config.media_token
        eoc = self.model.config.end_of_chunk_token  # <|endofchunk|>; Llama 3.2 Vision: <|eot_id|>
        return "".join(image + self.task.demo_text(d) + eoc for d in demos)

    def _room_needed(self, query: Sample) -> int:
        """Tokens after the query text: new tokens (open-ended) or the longest candidate."""
        if self.task.open_ended:
            return self.max_new_tokens
        return max(self._num_tokens(c, False) for c in self.task.candidates(query, self.classes))

    # -------------------------------------------------------------------------------- run
    def run(self, done: set[tuple[int, int, str]], writer: RecordWriter) -> None:
        queries = self.my_queries()
        size = self.settings.batch_size
        pairs = self.plan()
        total = sum(1 for _ in pairs for _ in range(0, len(queries), size))
        with tqdm(total=total, desc=f"eval {self.task.name}", disable=not self.progress or self.rank != 0,
                  unit="batch") as bar:
            for shots, trial in pairs:
                self._contexts.clear()
                shared = None
                if self.settings.demo_mode == "shared" and not (self.settings.rices and shots > 0):
                    shared = self.shared_demos(shots, trial)
                # Batches are fixed slices of this rank's queries, and a batch with any missing
                # record is recomputed whole: a resumed run computes exactly what it would have.
                for start in range(0, len(queries), size):
                    batch = queries[start:start + size]
                    if any(record_key(shots, trial, q.id) not in done for q in batch):
                        records = self.run_batch(shots, trial, batch, shared)
                        writer.write([r for r in records if record_key(shots, trial, r["id"]) not in done])
                    bar.update(1)

    def run_batch(self, shots: int, trial: int, batch: list[Sample], shared: list[Sample] | None) -> list[dict]:
        base = {"shots": shots, "trial": trial}
        records: dict[int, dict] = {}
        frames: dict[int, list[Image.Image]] = {}
        for i, q in enumerate(batch):
            try:
                frames[i] = read_media(q, self.task.video, self.sampling)
            except SkipSample as err:
                records[i] = {**base, "id": q.id, "status": "missing", "reason": err.reason, "message": err.message}
        live = sorted(frames)
        demos: dict[int, list[Sample]] = {}
        if shots > 0 and self.settings.rices and live:
            assert self.index is not None, "build_index first"
            neighbours = self.index.nearest(media_features(self.model, [frames[i] for i in live]), shots)
            demos = {i: [self._support_by_id[n] for n in ids] for i, ids in zip(live, neighbours)}
        else:
            for i in live:
                demos[i] = shared if shared is not None else self._random_demos(shots, trial, batch[i])

        rows: list[_Row] = []
        for i in live:
            query_ids = self.settings.demo_mode == "per_query" or self.settings.rices
            for order in self._variants(demos[i], shots, trial, batch[i] if query_ids else None):
                rows.append(_Row(i, order, text_only=shots == 0))
        rows = self._drop_out_of_context(rows, batch, records, base)
        outputs = self._run_rows(rows, batch, frames)
        records.update(self._records(rows, outputs, batch, base, records))
        return [records[i] for i in sorted(records)]

    def _drop_out_of_context(self, rows: list[_Row], batch: list[Sample], records: dict[int, dict],
                             base: dict) -> list[_Row]:
        """Rows whose prompt does not fit the LM's context: their query gets an "ooc" record."""
        if self.limit is None:
            return rows
        lengths: dict[tuple, int] = {}
        keep = []
        for row in rows:
            key = (tuple(d.id for d in row.demos), row.text_only)
            if key not in lengths:
                lengths[key] = self._num_tokens(self._context_text(row.demos, row.text_only), True)
            q = batch[row.query]
            total = (lengths[key] + self._num_tokens(self.model.config.media_token + self.task.query_text(q), False)
                     + self._room_needed(q))
            if total > self.limit:
                records[row.query] = {**base, "id": q.id, "status": "ooc", "prompt_tokens": total,
                                      "limit": self.limit}
            else:
                keep.append(row)
        return [r for r in keep if r.query not in records]

    def _query_prompt(self, frames: list[Image.Image], query: Sample) -> Prompt:
        return interleaved_prompt([frames, self.task.query_text(query)], self.model.config.media_token)

    def _run_rows(self, rows: list[_Row], batch: list[Sample], frames: dict[int, list[Image.Image]]) -> list[Any]:
        """Each row's output (generated text or candidate scores), in row order."""
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for n, row in enumerate(rows):
            groups.setdefault((tuple(d.id for d in row.demos), row.text_only), []).append(n)
        outputs: list[Any] = [None] * len(rows)
        singles: list[int] = []
        for key, members in groups.items():
            shared = self.settings.demo_mode == "shared" and not (self.settings.rices and not rows[members[0]].text_only)
            if len(members) == 1 and not shared:
                singles += members
                continue
            context = self._context(key, rows[members[0]])
            state = extend(self.model, context, [self._query_prompt(frames[rows[n].query], batch[rows[n].query])
                                                 for n in members], max_new_tokens=self._max_new())
            for n, out in zip(members, self._predict(state, [batch[rows[n].query] for n in members])):
                outputs[n] = out
        if singles:
            prompts = []
            for n in singles:
                row = rows[n]
                items = self._context_items(row.demos, row.text_only) + [frames[row.query],
                                                                         self.task.query_text(batch[row.query])]
                prompts.append(interleaved_prompt(items, self.model.config.media_token))
            state = encode_prompts(self.model, prompts, max_new_tokens=self._max_new())
            for n, out in zip(singles, self._predict(state, [batch[rows[n].query] for n in singles])):
                outputs[n] = out
        return outputs

    def _max_new(self) -> int:
        return self.max_new_tokens if self.task.open_ended else 0

    def _context(self, key: tuple, row: _Row) -> FlamingoState:
        """The encoded demos of `key`, kept for the rest of this (shots, trial)."""
        if key not in self._contexts:
            prompt = interleaved_prompt(self._context_items(row.demos, row.text_only), self.model.config.media_token)
            self._contexts[key] = encode_prompts(self.model, [prompt])
            while len(self._contexts) > max(1, self.settings.ensemble_size):
                self._contexts.popitem(last=False)
        return self._contexts[key]

    def _predict(self, state: FlamingoState, queries: list[Sample]) -> list[Any]:
        if self.task.open_ended:
            config = GenerationConfig(max_new_tokens=self.max_new_tokens, num_beams=self.settings.num_beams,
                                      length_penalty=self.settings.length_penalty)
            return [g.text for g in generate(self.model, state, config)]
        candidates = [self.task.candidates(q, self.classes) for q in queries]
        scores = score_candidates(self.model, state, candidates)
        values = scores.mean_logprob if self.settings.length_normalize else scores.sum_logprob
        return [values[i, :len(c)].tolist() for i, c in enumerate(candidates)]

    def _records(self, rows: list[_Row], outputs: list[Any], batch: list[Sample], base: dict,
                 existing: dict[int, dict]) -> dict[int, dict]:
        by_query: dict[int, list[Any]] = {}
        for row, out in zip(rows, outputs):
            by_query.setdefault(row.query, []).append(out)
        records = {}
        for i, outs in by_query.items():
            if i in existing:
                continue
            q = batch[i]
            record: dict[str, Any] = {**base, "id": q.id, "status": "ok"}
            if self.task.open_ended:
                raw = outs[0]
                post = M.postprocess_caption_generation if self.task.kind == "caption" else M.postprocess_vqa_generation
                record.update(generation=raw, prediction=post(raw))
            else:
                # Ensembling: the log-likelihood of each candidate averaged over the demo orders.
                scores = torch.tensor(outs, dtype=torch.float64).mean(0)
                names = [c[1:] for c in self.task.candidates(q, self.classes)]
                order = scores.argsort(descending=True, stable=True).tolist()
                record["ranked"] = [names[j] for j in order[:5]]
                if self.task.kind != "classification":  # small candidate sets: keep every score
                    record["scores"] = scores.tolist()
            records[i] = record
        return records
