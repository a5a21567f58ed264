"""Deterministic, resumable loaders of `Batch`es.

`build_loader(config, tokenizer, media_token_id, eoc_token_id, image_processor, seed, rank,
world_size, start_position)` gives a `FlamingoLoader`: iterating it yields `Batch`es of
`config.batch_size` samples; `position` counts the records (raw samples, skipped ones included)
of this rank's stream consumed by the batches yielded so far, and `state_dict()` /
`load_state_dict()` save and restore it with the skip counters. A loader started at the
position saved after k batches yields exactly the batches an uninterrupted run yields after its
k-th, because the order of the records depends only on (seed, dataset name, epoch, rank,
world_size) and each record is processed with a generator derived from (seed, dataset name,
epoch, record id), never from global random state.

Several datasets are stepped side by side (the paper accumulates the gradients of all datasets at
every update) by the trainer (flamingo.training.data), one loader per dataset.

Processing runs in the iterating thread, or in `config.num_workers` threads ahead of it (PIL and
PyAV release the GIL while decoding); the output is the same either way.
"""

from __future__ import annotations

import collections
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from flamingo.data.batch import Batch, TrainingSample, collate
from flamingo.data.config import DataError, DatasetConfig
from flamingo.data.processing import FamilyInputs, Outcome, SampleProcessor, TextEncoder
from flamingo.data.sources import RankStream, Record, Source, keyed_rng

STATE_VERSION = 1


@dataclass
class DataStats:
    """Counters of one dataset: records read, samples made, records skipped by reason, images
    removed from interleaved documents by reason (with the last message of each reason).
    records == samples + sum(skipped.values()) always."""

    records: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    images_removed: Counter = field(default_factory=Counter)
    messages: dict[str, str] = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        self.records += 1
        if outcome.sample is not None:
            self.samples += 1
        else:
            self.skipped[outcome.reason] += 1
            self.messages[f"skipped/{outcome.reason}"] = outcome.message or ""
        self.images_removed.update(outcome.images_removed)
        for reason, message in outcome.removed_messages.items():
            self.messages[f"images_removed/{reason}"] = message

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "samples": self.samples, "skipped": dict(sorted(self.skipped.items())),
                "images_removed": dict(sorted(self.images_removed.items())), "messages": dict(self.messages)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataStats":
        return cls(int(d.get("records", 0)), int(d.get("samples", 0)), Counter(d.get("skipped", {})),
                   Counter(d.get("images_removed", {})), dict(d.get("messages", {})))

    def summary(self) -> str:
        parts = [f"{self.records} records", f"{self.samples} samples"]
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
        if self.images_removed:
            parts.append("images removed: " + ", ".join(f"{k}={v}" for k, v in sorted(self.images_removed.items())))
        return "; ".join(parts)


class FlamingoLoader:
    """Batches of one dataset for one rank; see the module docstring."""

    def __init__(self, config: DatasetConfig, tokenizer: Any, media_token_id: int, eoc_token_id: int,
                 image_processor: Any, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_position: int = 0, family: FamilyInputs | None = None) -> None:
        if not isinstance(config, DatasetConfig):
            raise DataError(f"build_loader: expected a DatasetConfig, got {type(config).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise DataError(f"seed: expected an integer, got {seed!r}")
        self.config, self.seed = config, seed
        self.source = Source(config.paths, config.kind, config.name, seed, config.shuffle, config.shuffle_buffer,
                             config.allow_absolute_paths)
        self.stream = RankStream(self.source, rank, world_size)
        self.encoder = TextEncoder(tokenizer, media_token_id, eoc_token_id, config.add_bos)
        self.processor = SampleProcessor(config, self.encoder, image_processor, family)
        self.stats = DataStats()
        self._position = 0
        self._cursor: tuple[int, int] | None = (0, 0)  # (epoch, records into it) of `position`
        self.seek(start_position)

    # -------------------------------------------------------------------------- position
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def position(self) -> int:
        """Records of this rank's stream consumed by the batches (or samples) yielded so far."""
        return self._position

    def seek(self, position: int) -> None:
        """Continue from `position` records into this rank's stream."""
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise DataError(f"dataset {self.name!r}: start position must be an integer >= 0, got {position!r}")
        self._position = position
        self._cursor = (0, 0) if position == 0 else None  # located lazily (may count shard samples)

    def state_dict(self) -> dict[str, Any]:
        epoch, into = self._locate()
        return {"version": STATE_VERSION, "dataset": self.name, "seed": self.seed, "rank": self.stream.rank,
                "world_size": self.stream.world, "position": self._position, "epoch": epoch,
                "epoch_position": into, "stats": self.stats.as_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`. The seed, rank and world size must be those it was saved
        with (a stream of another split is another stream)."""
        if not isinstance(state, Mapping) or "position" not in state:
            raise DataError(f"dataset {self.name!r}: expected a loader state_dict with a 'position', got {state!r:.100}")
        for key, mine in (("dataset", self.name), ("seed", self.seed), ("rank", self.stream.rank),
                          ("world_size", self.stream.world)):
            if key in state and state[key] != mine:
                raise DataError(f"dataset {self.name!r}: the saved loader state has {key}={state[key]!r} but this "
                                f"loader has {key}={mine!r}; resume with the same seed, rank and world size")
        self.seek(int(state["position"]))
        if "epoch" in state and "epoch_position" in state:
            self._cursor = (int(state["epoch"]), int(state["epoch_position"]))
        self.stats = DataStats.from_dict(state.get("stats", {}))

    def _locate(self) -> tuple[int, int]:
        if self._cursor is None:
            self._cursor = self.stream.locate(self._position, self.config.epochs)
        return self._cursor

    # ------------------------------------------------------------------------- iteration
    def _records(self) -> Iterator[tuple[int, Record]]:
        epoch, into = self._locate()
        return self.stream.records(epoch, into, self.config.epochs)

    def _process(self, item: tuple[int, Record]) -> tuple[int, Outcome]:
        epoch, record = item
        return epoch, self.processor(record, keyed_rng(self.seed, self.name, epoch, *record.uid))

    def _outcomes(self) -> Iterator[tuple[int, Outcome]]:
        """(epoch, outcome) per record in stream order; an endless stream that has gone a whole
        epoch without a usable sample raises DataError instead of spinning forever."""
        dry, limits = 0, {}
        for epoch, outcome in self._processed():
            dry = dry + 1 if outcome.sample is None else 0
            if dry >= 64 and self.config.epochs is None:
                if epoch not in limits:
                    limits[epoch] = self.stream.epoch_length(epoch) + (self.stream.epoch_length(epoch - 1) if epoch else 0)
                if dry > limits[epoch]:
                    raise DataError(f"dataset {self.name!r}: no usable sample in a whole epoch of rank {self.stream.rank} "
                                    f"({dry} records in a row skipped); last: {outcome.reason}: {outcome.message}")
            yield epoch, outcome

    def _processed(self) -> Iterator[tuple[int, Outcome]]:
        """(epoch, outcome) per record in stream order, processed ahead by worker threads."""
        records = self._records()
        workers = self.config.num_workers
        if workers == 0:
            for item in records:
                yield self._process(item)
            return
        ahead: collections.deque[Future] = collections.deque()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"data-{self.name}") as pool:
            try:
                for item in records:
                    ahead.append(pool.submit(self._process, item))
                    if len(ahead) >= 2 * workers + self.config.batch_size:
                        yield ahead.popleft().result()
                while ahead:
                    yield ahead.popleft().result()
            finally:
                for f in ahead:
                    f.cancel()

    def samples(self) -> Iterator[TrainingSample]:
        """The processed samples one by one (position and stats advance per sample)."""
        for epoch, outcome in self._outcomes():
            self._advance(epoch, outcome)
            if outcome.sample is not None:
                yield outcome.sample

    def _advance(self, epoch: int, outcome: Outcome) -> None:
        self.stats.add(outcome)
        self._position += 1
        cursor_epoch, into = self._cursor if self._cursor is not None else (epoch, 0)
        self._cursor = (epoch, into + 1) if cursor_epoch == epoch else (epoch, 1)

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current position on. Position and stats advance when a batch is
        yielded, so a state_dict() taken between batches resumes right after the last one."""
        pending: list[tuple[int, Outcome]] = []
        full = 0
        for epoch, outcome in self._outcomes():
            pending.append((epoch, outcome))
            full += outcome.sample is not None
            if full == self.config.batch_size:
                yield self._emit(pending)
                pending, full = [], 0
        if full and not self.config.drop_last:
            yield self._emit(pending)
        elif pending:  # trailing skipped records (or a dropped partial batch) are consumed too
            for epoch, outcome in pending:
                self._advance(epoch, outcome)

    def _emit(self, pending: list[tuple[int, Outcome]]) -> Batch:
        for epoch, outcome in pending:
            self._advance(epoch, outcome)
        return collate([o.sample for _, o in pending if o.sample is not None], self.encoder.pad_token_id)

    def __repr__(self) -> str:
        return (f"FlamingoLoader({self.name!r}, kind={self.config.kind}, layout={self.source.layout}, "
                f"rank={self.stream.rank}/{self.stream.world}, position={self._position})")


def build_loader(config: DatasetConfig | Mapping[str, Any], tokenizer: Any, media_token_id: int,
                 eoc_token_id: int, image_processor: Any, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_position: int = 0, family: FamilyInputs | None = None) -> FlamingoLoader:
    """A loader of `Batch`es of one dataset for one rank (see `FlamingoLoader`); `family`: the
    inputs of a model of another family (pairs only: `SampleProcessor.pair`)."""
    if isinstance(config, Mapping):
        config = DatasetConfig.from_dict(config)
    return FlamingoLoader(config, tokenizer, media_token_id, eoc_token_id, image_processor,
                          seed=seed, rank=rank, world_size=world_size, start_position=start_position,
                          family=family)
