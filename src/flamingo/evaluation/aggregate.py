"""Per-trial scores from the per-sample prediction records (the metrics live in `metrics.py`).

A record is one JSON line of the predictions file: {"shots", "trial", "id", "status" ("ok",
"ooc", "missing"), and for "ok": "prediction" (open-ended, post-processed; "generation" raw) or
"scores" (close-ended: one log-likelihood per candidate, in candidate order) and "ranked" (the
top-5 candidates)}. Scores are percentages, as the paper reports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flamingo.data.benchmarks.samples import Sample
from flamingo.data.benchmarks.tasks import TaskSpec
from flamingo.evaluation import metrics as M


def _softmax_first(pair: Sequence[float]) -> float:
    top = max(pair)
    exp = [math.exp(v - top) for v in pair]
    return exp[0] / sum(exp)


def score_records(task: TaskSpec, records: list[dict], samples: dict[str, Sample]) -> dict[str, float]:
    """The task's metrics over the "ok" records of one (shots, trial): {name: value in %}.
    The first entry is the primary metric (`task.metric`)."""
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return {}
    refs = [samples[r["id"]] for r in ok]
    if task.kind == "caption":
        value = M.cider({r["id"]: r["prediction"] for r in ok}, {s.id: s.answers for s in refs})
        return {task.metric: 100 * value}
    if task.kind == "vqa":
        if task.name == "nextqa":
            values = [M.wups(r["prediction"], s.answers[0], 0.0) for r, s in zip(ok, refs)]
            return {task.metric: 100 * sum(values) / len(values)}
        accuracy = {"okvqa": M.okvqa_accuracy, "ivqa": M.ivqa_accuracy}.get(task.name, M.vqa_accuracy)
        values = [accuracy(r["prediction"], s.answers) for r, s in zip(ok, refs)]
        return {task.metric: 100 * sum(values) / len(values)}
    if task.kind == "binary":
        p_yes = [_softmax_first(r["scores"]) for r in ok]
        labels = [int(s.label == "yes") for s in refs]
        return {task.metric: 100 * M.roc_auc(p_yes, labels)}
    if task.kind in ("classification", "choice"):
        # A classification sample may accept several classes (ObjectNet: each ImageNet class of its class).
        ranked = [r["ranked"] for r in ok]
        targets = [s.answers if task.kind == "classification" else s.label for s in refs]
        out = {"top-1": 100 * M.topk_accuracy(ranked, targets, 1)}
        if task.kind == "classification":
            out["top-5"] = 100 * M.topk_accuracy(ranked, targets, 5)
        return out
    if task.kind == "visdial":
        with_relevance = [(r, s) for r, s in zip(ok, refs) if any(s.extra["relevance"])]
        out = {}
        if with_relevance:
            ndcg = [M.visdial_ndcg(r["scores"], s.extra["relevance"]) for r, s in with_relevance]
            out["NDCG"] = 100 * sum(ndcg) / len(ndcg)
        ranks = [1 + sum(v > r["scores"][s.extra["gt_index"]] for v in r["scores"]) for r, s in zip(ok, refs)]
        out["MRR"] = 100 * M.mean_reciprocal_rank(ranks)
        return out
    if task.kind == "retrieval":  # RareAct: mWAP over the annotation rows of the scored clips
        rows, row_scores = [], []
        for r, s in zip(ok, refs):  # a clip's scores stand for each of its rows (as the official matrix)
            for verb, noun, annotation in s.extra["annotations"]:
                rows.append(M.RareActRow(s.extra["video_id"], verb, noun, annotation))
                row_scores.append(r["scores"])
        if not any(row.annotation == 1 for row in rows):
            return {}
        return {task.metric: 100 * M.rareact_mwap(row_scores, rows, refs[0].extra["actions"])}
    raise ValueError(f"task {task.name}: no scoring for kind {task.kind!r}")
