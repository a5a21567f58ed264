"""The evaluation protocol: B.1.4 subsets, zero-shot prompts, random demos, RICES ordering and its
feature cache, ensembling, OOC, and that the cached few-shot context gives exactly what the full
prompt gives."""

from __future__ import annotations

import pytest
import torch

import eval_fixtures as F
from flamingo.data.benchmarks.data_config import SplitPaths
from flamingo.data.benchmarks.loaders import LOADERS
from flamingo.data.benchmarks.media import read_media
from flamingo.evaluation.records import RecordWriter
from flamingo.evaluation.rices import SupportIndex, media_features
from flamingo.evaluation.runner import EOC, TaskEvaluator
from flamingo.data.benchmarks.samples import Sample
from flamingo.evaluation.settings import EvalSettings
from flamingo.evaluation.subsets import Subsets, make_subsets
from flamingo.data.benchmarks.tasks import get_task
from flamingo.inference import GenerationConfig, encode_prompts, generate, interleaved_prompt, score_candidates


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    F.write_karpathy(root, train=10, test=5)
    paths = SplitPaths(annotations=root / "karpathy.json", media=root / "images")
    return LOADERS["karpathy"](paths, "train", "x"), LOADERS["karpathy"](paths, "test", "x")


@pytest.fixture(scope="module")
def memes(tmp_path_factory):
    root = tmp_path_factory.mktemp("hm")
    F.write_hateful_memes(root, n=10)
    return LOADERS["hateful_memes"](SplitPaths(annotations=root / "dev.jsonl", media=root), "test", "x")


def _run(evaluator: TaskEvaluator, tmp_path, name="t") -> list[dict]:
    import json

    writer = RecordWriter(tmp_path, name, 0)
    evaluator.run(set(), writer)
    writer.close()
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


def _full_prompt(model, task, demos, query, text_only=False):
    items = []
    for d in demos:
        if not text_only:
            items.append(read_media(d, False, None))
        items.append(task.demo_text(d) + EOC)
    return interleaved_prompt(items + [read_media(query, False, None), task.query_text(query)],
                              model.config.media_token)


# ----------------------------------------------------------------------------- subsets
def test_subsets_are_disjoint_deterministic_and_sized():
    train = [Sample(str(i), None, answers=["x"]) for i in range(100)]
    test = [Sample(f"t{i}", None, answers=["x"]) for i in range(30)]
    task = get_task("vqav2")
    kw = dict(support_size=20, support_per_class=2, query_per_class=1, seed=3)
    val = make_subsets(task, train, test, split="validation", query_size=25, **kw)
    tst = make_subsets(task, train, test, split="test", query_size=None, **kw)
    ids = lambda xs: {s.id for s in xs}  # noqa: E731
    assert len(val.support) == len(tst.support) == 20 and len(val.query) == 25
    assert not ids(val.support) & ids(tst.support) and not ids(val.query) & (ids(val.support) | ids(tst.support))
    assert tst.query == test  # the official split, whole
    again = make_subsets(task, train, test, split="validation", query_size=25, **kw)
    assert [s.id for s in again.support] == [s.id for s in val.support]
    other = make_subsets(task, train, test, split="validation", query_size=25, **{**kw, "seed": 4})
    assert [s.id for s in other.support] != [s.id for s in val.support]
    assert len(make_subsets(task, train, test, split="test", query_size=7, **kw).query) == 7


def test_a_zero_shot_only_task_without_train_split_holds_out_only_its_text_examples():
    test = [Sample(f"t{i}", None, answers=["x"]) for i in range(30)]
    sub = make_subsets(get_task("rareact"), None, test, split="test", support_size=2048, support_per_class=0,
                       query_size=None, query_per_class=0, seed=0, zero_shot_examples=2)
    assert len(sub.support) == 2 and len(sub.query) == 28
    assert not {s.id for s in sub.support} & {s.id for s in sub.query}
    assert "2 support samples held out" in sub.notes[0]


def test_classification_subsets_are_per_class():
    train = [Sample(f"{c}{i}", None, label=c) for c in "abc" for i in range(10)]
    sub = make_subsets(get_task("imagenet"), train, train[:3], split="validation", support_size=0,
                       support_per_class=3, query_size=None, query_per_class=2, seed=0)
    assert sorted(s.label for s in sub.support) == list("aaabbbccc")
    assert sorted(s.label for s in sub.query) == list("aabbcc")


# ------------------------------------------------------------------------------ prompts
def test_zero_shot_uses_two_text_only_examples(model, coco, tmp_path):
    train, test = coco
    task = get_task("coco")
    settings = EvalSettings(shots=[0], trials=1, batch_size=8, max_new_tokens=4)
    ev = TaskEvaluator(model, task, Subsets(train, test), settings, progress=False)
    demos = ev.shared_demos(0, 0)
    assert len(demos) == 2
    items = ev._context_items(demos, text_only=True)
    assert items == [f"Output: {demos[0].answers[0]}{EOC}", f"Output: {demos[1].answers[0]}{EOC}"]
    records = _run(ev, tmp_path)
    # The record equals a plain beam search on the whole zero-shot prompt (no images before the query).
    prompt = _full_prompt(model, task, demos, test[0], text_only=True)
    assert prompt.text.startswith("Output:") and prompt.text.count(model.config.media_token) == 1
    config = GenerationConfig(max_new_tokens=4, num_beams=3, length_penalty=0.0)
    expected = generate(model, encode_prompts(model, [prompt], max_new_tokens=4), config)[0].text
    assert records[0]["generation"] == expected


def test_random_demos_shared_and_cached_context_equals_full_prompt(model, coco, tmp_path):
    train, test = coco
    task = get_task("coco")
    settings = EvalSettings(shots=[3], trials=2, batch_size=2, max_new_tokens=5)
    ev = TaskEvaluator(model, task, Subsets(train, test), settings, progress=False)
    first, second = ev.shared_demos(3, 0), ev.shared_demos(3, 1)
    assert len({d.id for d in first}) == 3 and [d.id for d in first] != [d.id for d in second]
    assert [d.id for d in ev.shared_demos(3, 0)] == [d.id for d in first]  # seeded
    records = _run(ev, tmp_path)
    assert [(r["trial"], r["id"]) for r in records] == [(t, q.id) for t in (0, 1) for q in test]
    config = GenerationConfig(max_new_tokens=5, num_beams=3, length_penalty=0.0)
    for q, record in zip(test, records):
        state = encode_prompts(model, [_full_prompt(model, task, first, q)], max_new_tokens=5)
        assert record["generation"] == generate(model, state, config)[0].text


def test_close_ended_scores_and_ensemble_average(model, memes, tmp_path):
    task = get_task("hatefulmemes")
    support, queries = memes[:6], memes[6:8]
    settings = EvalSettings(shots=[2], trials=1, ensemble=True, ensemble_size=3)
    ev = TaskEvaluator(model, task, Subsets(support, queries), settings, progress=False)
    demos = ev.shared_demos(2, 0)
    variants = ev._variants(demos, 2, 0, None)
    assert len(variants) == 3 and all(sorted(d.id for d in v) == sorted(d.id for d in demos) for v in variants)
    records = _run(ev, tmp_path)
    for q, record in zip(queries, records):
        per_order = [score_candidates(model, encode_prompts(model, [_full_prompt(model, task, v, q)]),
                                      [" yes", " no"]).sum_logprob[0] for v in variants]
        expected = torch.stack(per_order).double().mean(0)
        assert torch.allclose(torch.tensor(record["scores"], dtype=torch.float64), expected, atol=1e-4)
        assert record["ranked"] == (["yes", "no"] if expected[0] >= expected[1] else ["no", "yes"])


def test_prompt_longer_than_the_context_is_ooc(model, coco, tmp_path):
    from flamingo.evaluation.report import summarize

    train, test = coco
    settings = EvalSettings(shots=[0, 4], trials=1, max_new_tokens=4, max_prompt_tokens=40)
    ev = TaskEvaluator(model, get_task("coco"), Subsets(train, test), settings, progress=False)
    records = _run(ev, tmp_path)
    statuses = {(r["shots"], r["status"]) for r in records}
    assert statuses == {(0, "ok"), (4, "ooc")}
    summary = summarize(get_task("coco"), records, test, ev.plan(), ev.trial_info, [], len(train))
    assert summary["shots"]["4"]["mean"] == "OOC" and isinstance(summary["shots"]["0"]["mean"], dict)


# ------------------------------------------------------------------------------- RICES
def test_rices_orders_by_increasing_similarity():
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.2]]), dim=-1)
    index = SupportIndex(["a", "b", "c", "d"], features)
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1]]), dim=-1)
    assert index.nearest(query, 3) == [["c", "a", "d"]]  # most similar ("d") right before the query


def test_rices_picks_the_identical_image_last_and_caches_features(model, coco, tmp_path, monkeypatch):
    train, test = coco
    twin = Sample("twin", test[0].media, answers=["the same picture"])
    support = train + [twin]
    settings = EvalSettings(shots=[2], trials=1, rices=True, max_new_tokens=3)
    ev = TaskEvaluator(model, get_task("coco"), Subsets(support, test[:1]), settings, progress=False)
    cache = tmp_path / "cache" / "f.safetensors"
    ev.build_index(cache)
    assert cache.is_file() and ev.index.ids == [s.id for s in support]
    query = media_features(model, [read_media(test[0], False, None)])
    assert ev.index.nearest(query, 2)[0][-1] == "twin"
    # Built again: read from the cache, the encoder is not run.
    import flamingo.evaluation.rices as rices

    monkeypatch.setattr(rices, "media_features", lambda *a: pytest.fail("recomputed despite the cache"))
    again = TaskEvaluator(model, get_task("coco"), Subsets(support, test[:1]), settings, progress=False)
    again.build_index(cache)
    assert again.index.ids == ev.index.ids and torch.equal(again.index.features, ev.index.features)
