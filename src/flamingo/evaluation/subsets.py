"""Support and query subsets (paper B.1.4) and the random choice of demos.

From the training split, one seeded permutation gives three disjoint subsets: validation support,
test support (support_size each; classification: support_per_class per class) and validation
query (the task's size; classification: query_per_class per class). The test query set is the
official evaluation split (optionally subsampled with the same seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field


from flamingo.data.benchmarks.samples import EvalDataError, Sample
from flamingo.data.benchmarks.tasks import TaskSpec
from flamingo.data.sources import keyed_rng


@dataclass
class Subsets:
    support: list[Sample]
    query: list[Sample]
    notes: list[str] = field(default_factory=list)


def _per_class(samples: list[Sample], support: int, query: int, seed: int,
               notes: list[str]) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Disjoint per-class draws: validation support, test support (`support` per class each) and
    validation query (`query` per class). A class too small for that gets smaller support parts."""
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    parts: tuple[list[Sample], list[Sample], list[Sample]] = ([], [], [])
    shrunk = 0
    for name in sorted(by_class):
        members = by_class[name]
        order = keyed_rng(seed, "per-class", name).permutation(len(members))
        each = min(support, max(1, (len(members) - query) // 2))
        shrunk += each < support
        bounds = [0, each, 2 * each, 2 * each + query]
        for part, lo, hi in zip(parts, bounds, bounds[1:]):
            part += [members[j] for j in order[lo:hi]]
    if shrunk:
        notes.append(f"{shrunk} class(es) too small for {support} support samples per class: support parts shrunk")
    return parts


def make_subsets(task: TaskSpec, train: list[Sample] | None, test: list[Sample], *, split: str,
                 support_size: int, support_per_class: int, query_size: int | None, query_per_class: int,
                 seed: int, zero_shot_examples: int = 2) -> Subsets:
    """Support and query samples for `split` ("test" or "validation"). A zero-shot-only task
    (RareAct) needs no more support than its zero-shot prompt's text-only examples: without a
    train split, only those are held out of the evaluation split."""
    notes: list[str] = []
    if task.zero_shot_only:
        support_size = min(support_size, zero_shot_examples)
    if split not in ("test", "validation"):
        raise EvalDataError(f"split: expected 'test' or 'validation', got {split!r}")
    if train is None:
        if split == "validation":
            raise EvalDataError(f"task {task.name}: the validation split needs a 'train' split in the data config")
        # Only the evaluation split: hold part of it out as support (recorded in the results).
        order = keyed_rng(seed, task.name, "test-only").permutation(len(test))
        size = min(support_size, len(test) // 2)
        support = [test[i] for i in order[:size]]
        query = [test[i] for i in sorted(order[size:])]
        notes.append(f"no train split: {size} support samples held out of the test split")
        return Subsets(support, _subsample(query, query_size, seed, task.name), notes)
    if not train:
        raise EvalDataError(f"task {task.name}: the train split has no samples")

    if task.per_class:
        val_support, test_support, val_query = _per_class(
            train, support_per_class, query_per_class if split == "validation" else 0, seed, notes)
    else:
        n = len(train)
        size = support_size
        val_size = (query_size or task.val_query_size or 0) if split == "validation" else 0
        if 2 * size + val_size > n:
            size = max(1, (n - val_size) // 2)
            notes.append(f"train split has {n} samples: support subsets shrunk to {size}")
        order = keyed_rng(seed, task.name, "subsets").permutation(n)
        val_support = [train[i] for i in order[:size]]
        test_support = [train[i] for i in order[size:2 * size]]
        val_query = [train[i] for i in order[2 * size:2 * size + val_size]]
    if split == "validation":
        return Subsets(val_support, val_query, notes)
    return Subsets(test_support, _subsample(test, query_size, seed, task.name), notes)


def _subsample(samples: list[Sample], size: int | None, seed: int, name: str) -> list[Sample]:
    if size is None or size >= len(samples):
        return samples
    keep = sorted(keyed_rng(seed, name, "query").choice(len(samples), size, replace=False))
    return [samples[i] for i in keep]
