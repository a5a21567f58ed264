"""Loaders of the official annotation formats and the data config: what they read, and one clear
error naming the file and the field for everything they cannot use."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import eval_fixtures as F
from flamingo.evaluation.aggregate import score_records
from flamingo.data.benchmarks.data_config import SplitPaths, load_data_config
from flamingo.data.benchmarks.loaders import LOADERS, rareact_caption
from flamingo.data.benchmarks.samples import EvalDataError, Sample
from flamingo.data.benchmarks.tasks import TASKS, get_task


def _csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def test_karpathy_splits_and_paths(tmp_path):
    splits = F.write_karpathy(tmp_path, train=3, test=2)
    paths = SplitPaths(annotations=tmp_path / splits["test"]["annotations"], media=tmp_path / "images")
    train, test = LOADERS["karpathy"](paths, "train", "x"), LOADERS["karpathy"](paths, "test", "x")
    assert [s.id for s in train] == ["0", "1", "2"] and [s.id for s in test] == ["3", "4"]
    assert test[0].media == tmp_path / "images" / "val2014" / "img3.jpg" and test[0].media.is_file()
    assert test[0].answers == [F.caption(3), F.caption(3) + " on white"]


def test_vqa_joins_questions_and_annotations(tmp_path):
    splits = F.write_vqa(tmp_path, train=2, test=2)
    s = splits["test"]
    paths = SplitPaths(questions=tmp_path / s["questions"], annotations=tmp_path / s["annotations"],
                       media=tmp_path / s["media"])
    samples = LOADERS["vqa"](paths, "test", "x")
    assert samples[0].media.name == "COCO_val2014_000000000002.jpg" and samples[0].media.is_file()
    assert len(samples[0].answers) == 10 and samples[0].question.startswith("what colour")


def test_textvqa_vizwiz_hateful_memes(tmp_path):
    _json(tmp_path / "t.json", {"data": [{"question_id": 7, "question": "what is written?", "image_id": "ab12",
                                          "answers": ["stop"] * 10}]})
    (t,) = LOADERS["textvqa"](SplitPaths(annotations=tmp_path / "t.json", media=tmp_path), "test", "x")
    assert (t.id, t.media.name, t.answers[0]) == ("7", "ab12.jpg", "stop")
    _json(tmp_path / "v.json", [{"image": "VizWiz_val_00000001.jpg", "question": "what is this?",
                                 "answers": [{"answer": "a can", "answer_confidence": "yes"}] * 10}])
    (v,) = LOADERS["vizwiz"](SplitPaths(annotations=tmp_path / "v.json", media=tmp_path), "test", "x")
    assert (v.media.name, v.answers[0]) == ("VizWiz_val_00000001.jpg", "a can")
    F.write_hateful_memes(tmp_path / "hm", n=2)
    memes = LOADERS["hateful_memes"](SplitPaths(annotations=tmp_path / "hm" / "dev.jsonl", media=tmp_path / "hm"),
                                     "test", "x")
    assert [m.label for m in memes] == ["no", "yes"] and memes[1].extra["meme_text"] == F.caption(1)
    assert get_task("hatefulmemes").query_text(memes[1]) == (
        f'is an image with written: "{F.caption(1)}" on it. Is it hateful? Answer:')


def test_visdial_dense_round_and_prompt(tmp_path):
    data = {"data": {"questions": ["is it red", "is it big"], "answers": ["yes", "no", "maybe"],
                     "dialogs": [{"image_id": 5, "caption": "a red ball",
                                  "dialog": [{"question": 0, "answer": 0, "answer_options": [0, 1, 2], "gt_index": 0},
                                             {"question": 1, "answer": 1, "answer_options": [2, 1, 0], "gt_index": 1}]}]}}
    _json(tmp_path / "d.json", data)
    _json(tmp_path / "dense.json", [{"image_id": 5, "round_id": 2, "gt_relevance": [0.0, 1.0, 0.5]}])
    (s,) = LOADERS["visdial"](SplitPaths(annotations=tmp_path / "d.json", relevance=tmp_path / "dense.json",
                                         media=tmp_path), "test", "x")
    assert s.choices == ["maybe", "no", "yes"] and s.label == "no" and s.extra["relevance"] == [0.0, 1.0, 0.5]
    assert s.media.name == "VisualDialog_val2018_000000000005.jpg"
    # B.1.5: the caption prepended without a prompt, earlier rounds as Question/Answer.
    assert get_task("visdial").query_text(s) == "a red ball. Question: is it red Answer: yes. Question: is it big Answer:"


@pytest.mark.parametrize("last_round, field", [({"question": 1, "answer": 1}, "answer_options"),
                                               ({"question": 1, "answer": 1, "answer_options": [2, 1]}, "gt_index")])
def test_visdial_rounds_without_options_are_refused(tmp_path, last_round, field):
    """VisDial is scored by ranking the round's options (NDCG, MRR): a round without them, or
    without the index of the right one, is a data error naming the field, not a KeyError later."""
    data = {"data": {"questions": ["is it red", "is it big"], "answers": ["yes", "no", "maybe"],
                     "dialogs": [{"image_id": 5, "caption": "a red ball", "dialog": [last_round]}]}}
    _json(tmp_path / "d.json", data)
    with pytest.raises(EvalDataError, match=rf"dialog\[0\]: field '{field}'"):
        LOADERS["visdial"](SplitPaths(annotations=tmp_path / "d.json", media=tmp_path), "test", "x")


def test_class_folders(tmp_path):
    F.write_imagenet(tmp_path, per_class_train=2, per_class_test=1)
    samples = LOADERS["class_folders"](SplitPaths(media=tmp_path / "train", class_names=tmp_path / "classes.json"),
                                       "train", "x")
    assert [s.label for s in samples] == ["red circle"] * 2 + ["blue square"] * 2 + ["green triangle"] * 2


def test_video_formats(tmp_path):
    _json(tmp_path / "msrvtt.json", [{"video_id": 7010, "id": 1, "question": "who runs?", "answer": "man"}])
    (m,) = LOADERS["video_qa"](SplitPaths(annotations=tmp_path / "msrvtt.json", media=tmp_path), "test", "x")
    assert m.media.name == "video7010.mp4"
    _json(tmp_path / "msvd.json", [{"video_id": 3, "id": 1, "question": "what is cut?", "answer": "onion"}])
    (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid3\n")
    (d,) = LOADERS["video_qa"](SplitPaths(annotations=tmp_path / "msvd.json", media=tmp_path,
                                          video_map=tmp_path / "youtube_mapping.txt"), "test", "x")
    assert d.media.name == "-4wsuPCjDBc_5_15.avi"
    _csv(tmp_path / "ivqa.csv", [{"video_id": "abc", "start": 3, "end": 9, "question": "what tool?",
                                  "answer1": "knife", "answer2": "knife", "answer3": "blade", "answer4": "", "answer5": ""}])
    (i,) = LOADERS["ivqa"](SplitPaths(annotations=tmp_path / "ivqa.csv", media=tmp_path), "test", "x")
    assert (i.media.name, i.answers) == ("abc_3_9.mp4", ["knife", "knife", "blade"])
    _csv(tmp_path / "nextqa.csv", [{"video": "42", "question": "why?", "answer": "to eat", "qid": 0, "type": "CW"}])
    _json(tmp_path / "map.json", {"42": "0001/42"})
    (n,) = LOADERS["nextqa"](SplitPaths(annotations=tmp_path / "nextqa.csv", media=tmp_path,
                                        video_map=tmp_path / "map.json"), "test", "x")
    assert n.media == tmp_path / "0001/42.mp4"
    _json(tmp_path / "star.json", [{"question_id": "q1", "question": "what did they do?", "video_id": "V1",
                                    "start": 1.5, "end": 6.0, "answer": "sat",
                                    "choices": [{"choice": "ran"}, {"choice": "sat"}]}])
    (st,) = LOADERS["star"](SplitPaths(annotations=tmp_path / "star.json", media=tmp_path), "test", "x")
    assert (st.choices, st.label, st.start, st.end) == (["ran", "sat"], "sat", 1.5, 6.0)
    _json(tmp_path / "vatex.json", [{"videoID": "Ab_000001_000011", "enCap": ["a man cooks", "cooking"]}])
    (va,) = LOADERS["vatex"](SplitPaths(annotations=tmp_path / "vatex.json", media=tmp_path), "test", "x")
    assert va.media.name == "Ab_000001_000011.mp4" and len(va.answers) == 2
    _json(tmp_path / "yc2.json", {"database": {"v1": {"subset": "validation", "annotations": [
        {"id": 0, "segment": [2, 8], "sentence": "cut the onion"}]}, "v2": {"subset": "training", "annotations": []}}})
    (yc,) = LOADERS["youcook2"](SplitPaths(annotations=tmp_path / "yc2.json", media=tmp_path), "test", "x")
    assert (yc.id, yc.start, yc.end, yc.answers) == ("v1/0", 2.0, 8.0, ["cut the onion"])
    F.write_kinetics(tmp_path / "k", per_class=1)
    kin = LOADERS["kinetics"](SplitPaths(annotations=tmp_path / "k" / "test.csv", media=tmp_path / "k" / "videos"),
                              "test", "x")
    assert kin[0].media.is_file() and kin[0].label == "drawing circles"
    _csv(tmp_path / "rareact.csv", [
        {"id": 0, "video_id": "r1", "start": 0, "end": 4, "verb": "cut", "noun": "onion", "annotation": 1},
        {"id": 1, "video_id": "r1", "start": 0, "end": 4, "verb": "wash", "noun": "phone", "annotation": 2}])
    (ra,) = LOADERS["rareact"](SplitPaths(annotations=tmp_path / "rareact.csv", media=tmp_path), "test", "x")
    assert ra.answers == ["cuts an onion"] and ra.extra["classes"] == ["cuts an onion", "washes a phone"]
    # The clip keeps its rows for mWAP; actions[k] is the (verb, noun) of classes[k].
    assert ra.extra["annotations"] == [("cut", "onion", 1), ("wash", "phone", 2)] and ra.extra["video_id"] == "r1"
    assert ra.extra["actions"] == [("cut", "onion"), ("wash", "phone")]


def test_rareact_caption_rule():
    assert rareact_caption("carry", "box") == "carries a box"
    assert rareact_caption("push", "apple") == "pushes an apple"
    # RareAct's own verbs: regular spelling rules.
    got = [rareact_caption(v, n) for v, n in [("spray", "door"), ("microwave", "phone"), ("deseed", "pepper"),
                                              ("wash", "oven"), ("weigh", "egg"), ("hammer", "phone")]]
    assert got == ["sprays a door", "microwaves a phone", "deseeds a pepper", "washes an oven", "weighs an egg",
                   "hammers a phone"]
    # Irregular forms and the "o" rule: consonant + o takes -es, vowel + o only -s.
    assert [rareact_caption(v, "cup") for v in ("have", "be", "do", "go", "echo", "shampoo", "video", "quiz")] == [
        "has a cup", "is a cup", "does a cup", "goes a cup", "echoes a cup", "shampoos a cup", "videos a cup",
        "quizzes a cup"]
    assert rareact_caption("pick up", "egg") == "picks up an egg"  # multi-word verbs conjugate the verb
    # The article follows the sound, not only the first letter.
    assert [rareact_caption("hold", n) for n in ("umbrella", "utensil", "unicorn", "hourglass", "hammer")] == [
        "holds an umbrella", "holds a utensil", "holds a unicorn", "holds an hourglass", "holds a hammer"]
    clip = Sample("x", None, answers=["cuts an onion"])
    assert get_task("rareact").demo_text(clip) == "Caption: a person cuts an onion"


def test_every_task_has_a_loader_and_template():
    for task in TASKS.values():
        assert task.loader in LOADERS
        assert "{answer}" in task.template


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("content, message", [
    (None, "Karpathy split file does not exist"),
    ("{not json", "is not valid JSON"),
    ('{"pictures": []}', "top level: missing field 'images'"),
    ('{"images": [{"split": "test", "sentences": []}]}', "images[0]: missing field 'filename'"),
    ('{"images": [{"split": "test", "filename": "a.jpg", "sentences": "a cat"}]}',
     "images[0]: field 'sentences' should be list"),
])
def test_bad_karpathy_file_names_file_and_field(tmp_path, content, message):
    path = tmp_path / "karpathy.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EvalDataError) as err:
        LOADERS["karpathy"](SplitPaths(annotations=path, media=tmp_path), "test", "tasks.coco.test")
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_ivqa_and_rareact_rows(tmp_path):
    _csv(tmp_path / "i.csv", [{"video_id": "a", "start": 0, "end": 5, "question": "what?", "answer1": "",
                               "answer2": "", "answer3": "", "answer4": "", "answer5": ""}])
    with pytest.raises(EvalDataError, match=r"i\.csv: row 2: fields answer1, .*answer5 are all empty"):
        LOADERS["ivqa"](SplitPaths(annotations=tmp_path / "i.csv", media=tmp_path), "test", "x")
    row = {"id": 0, "video_id": "r1", "start": 0, "end": 4, "verb": "cut", "noun": "onion", "annotation": 1}
    _csv(tmp_path / "r.csv", [row, {**row, "annotation": "yes"}])
    with pytest.raises(EvalDataError, match=r"r\.csv: row 3: field 'annotation' should be 0-4, got 'yes'"):
        LOADERS["rareact"](SplitPaths(annotations=tmp_path / "r.csv", media=tmp_path), "test", "x")
    _csv(tmp_path / "r.csv", [{**row, "noun": " "}])
    with pytest.raises(EvalDataError, match=r"r\.csv: row 2: fields 'verb' and 'noun' must not be empty"):
        LOADERS["rareact"](SplitPaths(annotations=tmp_path / "r.csv", media=tmp_path), "test", "x")


def test_ivqa_and_rareact_scores_use_their_official_metrics(tmp_path):
    # iVQA: min(1, votes / 2) per question, not VQA accuracy.
    _csv(tmp_path / "ivqa.csv", [
        {"video_id": "a", "start": 0, "end": 5, "question": "what tool?", "answer1": "knife", "answer2": "knife",
         "answer3": "blade", "answer4": "knife", "answer5": "saw"},
        {"video_id": "b", "start": 2, "end": 9, "question": "what food?", "answer1": "egg", "answer2": "bread",
         "answer3": "egg", "answer4": "toast", "answer5": "toast"}])
    samples = LOADERS["ivqa"](SplitPaths(annotations=tmp_path / "ivqa.csv", media=tmp_path), "test", "x")
    predictions = {"a_0_5": "Blade", "b_2_9": "an egg"}  # 1 vote -> 1/2; 2 votes -> 1
    records = [{"id": s.id, "status": "ok", "prediction": predictions[s.id]} for s in samples]
    ivqa = get_task("ivqa")
    assert ivqa.metric == "iVQA accuracy"
    assert score_records(ivqa, records, {s.id: s for s in samples}) == {"iVQA accuracy": pytest.approx(75.0)}

    # RareAct: the mWAP of the metric tests' hand-computed case, each row its own clip.
    from test_eval_metrics import RAREACT_ACTIONS, RAREACT_MWAP, RAREACT_ROWS, RAREACT_SCORES

    _csv(tmp_path / "rareact.csv", [
        {"id": i, "video_id": r.video_id, "start": 10 * i, "end": 10 * i + 10, "class_id": 0, "verb": r.verb,
         "noun": r.noun, "annotation": r.annotation} for i, r in enumerate(RAREACT_ROWS)])
    clips = LOADERS["rareact"](SplitPaths(annotations=tmp_path / "rareact.csv", media=tmp_path), "test", "x")
    records = []
    for i, clip in enumerate(clips):  # candidate scores in the task's class order
        column = {a: RAREACT_SCORES[i][k] for k, a in enumerate(RAREACT_ACTIONS)}
        records.append({"id": clip.id, "status": "ok", "scores": [column[a] for a in clip.extra["actions"]]})
    records.append({"id": "gone", "status": "missing"})
    rareact = get_task("rareact")
    assert rareact.metric == "mWAP"
    assert rareact.candidates(clips[0], [])[:2] == [" cuts a phone", " cuts an onion"]
    got = score_records(rareact, records, {c.id: c for c in clips})
    assert got == {"mWAP": pytest.approx(100 * RAREACT_MWAP)}


def test_bad_vqa_and_csv_and_jsonl(tmp_path):
    _json(tmp_path / "q.json", {"questions": [{"question_id": 1, "image_id": 1, "question": "?"}]})
    _json(tmp_path / "a.json", {"annotations": [{"question_id": 2, "answers": [{"answer": "x"}]}]})
    with pytest.raises(EvalDataError, match=r"a\.json: annotations: no entry with question_id 1"):
        LOADERS["vqa"](SplitPaths(questions=tmp_path / "q.json", annotations=tmp_path / "a.json", media=tmp_path),
                       "test", "x")
    _csv(tmp_path / "k.csv", [{"label": "a", "youtube_id": "b"}])
    with pytest.raises(EvalDataError, match=r"k\.csv: Kinetics annotations has no column\(s\) time_start, time_end"):
        LOADERS["kinetics"](SplitPaths(annotations=tmp_path / "k.csv", media=tmp_path), "test", "x")
    (tmp_path / "m.jsonl").write_text('{"id": 1, "img": "a.png", "label": 3, "text": "t"}\n')
    with pytest.raises(EvalDataError, match=r"m\.jsonl: line 1: field 'label' should be 0 or 1"):
        LOADERS["hateful_memes"](SplitPaths(annotations=tmp_path / "m.jsonl", media=tmp_path), "test", "x")
    with pytest.raises(EvalDataError, match=r"data config: tasks\.vqav2\.test\.questions is required"):
        LOADERS["vqa"](SplitPaths(annotations=tmp_path / "a.json"), "test", "tasks.vqav2.test")


def test_unknown_task_and_bad_data_config(tmp_path):
    with pytest.raises(EvalDataError, match="unknown task 'cocoa'; known tasks: coco, flickr30k"):
        get_task("cocoa")
    bad = tmp_path / "d.yaml"
    bad.write_text("tasks:\n  coco:\n    test: {annotation: x.json}\n")
    with pytest.raises(EvalDataError, match=r"d\.yaml: tasks\.coco\.test: unknown field\(s\) \['annotation'\]"):
        load_data_config(bad)
    bad.write_text("tasks:\n  coco:\n    train: {annotations: x.json}\n")
    with pytest.raises(EvalDataError, match=r"tasks\.coco: expected a mapping with a 'test' split"):
        load_data_config(bad)
    bad.write_text("root: data\ntasks:\n  coco:\n    test: {annotations: x.json}\n")
    config = load_data_config(bad)
    assert config.task("coco").test.annotations == tmp_path / "data" / "x.json"
    with pytest.raises(EvalDataError, match=r"d\.yaml: tasks: no entry for task 'vqav2' \(it has: coco\)"):
        config.task("vqav2")


def test_a_field_the_task_does_not_read_is_an_error(tmp_path):
    from flamingo.evaluation.settings import EvalSettings
    from flamingo.evaluation.suite import load_subsets

    (tmp_path / "d.yaml").write_text("tasks:\n  coco:\n    test: {annotations: k.json, media: img, questions: q.json}\n")
    with pytest.raises(EvalDataError, match=r"d\.yaml: tasks\.coco\.test: task coco does not read questions "
                                             r"\(it reads: annotations, media\)"):
        load_subsets(get_task("coco"), load_data_config(tmp_path / "d.yaml"), EvalSettings())


def test_example_data_config_covers_every_task_with_fields_it_reads():
    from dataclasses import fields as dc_fields

    from flamingo.data.benchmarks.data_config import SplitPaths

    config = load_data_config(Path(__file__).parents[1] / "configs" / "eval" / "data.example.yaml")
    assert set(config.tasks) == set(TASKS)
    for name, entry in config.tasks.items():
        for split in (entry.test, entry.train):
            if split is not None:
                used = {f.name for f in dc_fields(SplitPaths) if getattr(split, f.name) is not None}
                assert used <= set(TASKS[name].fields), name
