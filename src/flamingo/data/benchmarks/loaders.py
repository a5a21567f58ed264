"""Loaders for the official annotation formats. Each returns the `Sample`s of one split.

Formats (exactly what is read; anything else is an `EvalDataError` naming file and field):

- `karpathy` (COCO, Flickr30K): Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`:
  {"images": [{"filename", "filepath"?, "split": train|restval|val|test, "sentences": [{"raw"}],
  "cocoid"|"imgid"?}]}. Image = media/filepath/filename. train = train+restval, test = test.
- `vqa` (VQAv2, OK-VQA): questions {"questions": [{"question_id", "image_id", "question"}],
  "data_subtype"?} + annotations {"annotations": [{"question_id", "answers": [{"answer"}]}]}.
  Image = media/media_pattern, default "COCO_{data_subtype}_{image_id:012d}.jpg".
- `textvqa`: TextVQA_0.5.1_{train,val}.json {"data": [{"question_id", "question", "image_id",
  "answers": [str]}]}; image = media/"{image_id}.jpg".
- `vizwiz`: VizWiz {train,val}.json [{"image", "question", "answers": [{"answer"}]}]; image = media/image.
- `hateful_memes`: {train,dev_seen}.jsonl lines {"id", "img", "label": 0|1, "text"}; image = media/img.
- `visdial`: visdial_1.0_{train,val}.json {"data": {"dialogs": [{"image_id", "caption", "dialog":
  [{"question": i, "answer": i, "answer_options": [i x 100], "gt_index"}]}], "questions": [str],
  "answers": [str]}} (+ `relevance`: visdial_1.0_val_dense_annotations.json [{"image_id",
  "round_id" (1-based), "gt_relevance": [100 floats]}]). With relevance, one sample per annotated
  round; without (train), the last round. Image = media/media_pattern, default
  "VisualDialog_val2018_{image_id:012d}.jpg".
- `class_folders` (ImageNet), the ImageNet shifts (`imagenetv2`, `imagenet_r`, `imagenet_sketch`,
  `imagenet_a`, `objectnet`) and ImageNet on a shift's classes (`imagenet_on_r_classes`,
  `imagenet_on_a_classes`, `imagenet_on_objectnet_classes`): see `flamingo.data.benchmarks.imagenet`.
- `video_qa` (MSVD-QA, MSRVTT-QA): JSON [{"video_id", "question", "answer", "id"?}]; video =
  media/media_pattern (MSRVTT "video{video_id}.mp4"; MSVD "{mapped}.avi" with video_map =
  youtube_mapping.txt, lines "NAME vidN", looked up as "vid{video_id}").
- `ivqa`: CSV with columns video_id, start, end, question, answer1..answer5; video =
  media/"{video_id}_{start}_{end}.mp4".
- `nextqa` (open-ended): CSV with columns video, question, answer, qid; video = media/"{mapped}.mp4"
  with video_map = map_vid_vidorID.json ({video: "dir/id"}).
- `star`: STAR_{train,val}.json [{"question_id", "question", "video_id", "start", "end", "answer",
  "choices": [{"choice"}]}]; video = media/"{video_id}.mp4", frames from [start, end].
- `vatex`: vatex_{training,validation}_v1.0.json [{"videoID", "enCap": [str]}]; video = media/"{videoID}.mp4".
- `youcook2`: youcookii_annotations_trainval.json {"database": {id: {"subset": training|validation,
  "annotations": [{"id", "segment": [start, end], "sentence"}]}}}; video = media/"{video_id}.mp4";
  train = training, test = validation.
- `kinetics`: Kinetics-700 CSV with columns label, youtube_id, time_start, time_end; video =
  media/"{label}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4"; classes = sorted labels.
- `rareact`: rareact.csv with columns video_id, start, end, verb, noun, annotation (0 negative,
  1 positive, 2-4 hard negatives); one sample per clip (video_id, start, end), keeping its rows for
  mWAP; video = media/"{video_id}.mp4".
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any
from collections.abc import Callable

from flamingo.data.benchmarks.data_config import SplitPaths
from flamingo.data.benchmarks.imagenet import (
    load_class_folders,
    load_imagenet_a,
    load_imagenet_on_a_classes,
    load_imagenet_on_objectnet_classes,
    load_imagenet_on_r_classes,
    load_imagenet_r,
    load_imagenet_sketch,
    load_imagenetv2,
    load_objectnet,
)
from flamingo.data.benchmarks.samples import EvalDataError, Sample, get, items, read_csv, read_json, read_jsonl

Loader = Callable[[SplitPaths, str, str], list[Sample]]  # (paths, split, "tasks.NAME.SPLIT") -> samples


def _media_file(paths: SplitPaths, where: str, default_pattern: str, record: dict, source: Path,
                what: str) -> Path:
    pattern = paths.media_pattern or default_pattern
    try:
        name = pattern.format(**record)
    except (KeyError, IndexError, ValueError) as err:
        raise EvalDataError(f"{source}: {what}: media_pattern {pattern!r} needs field {err}") from None
    return paths.required("media", where) / name


def _answers(raw: Any, path: Path, where: str) -> list[str]:
    """A list of answer strings or of {"answer": str} records."""
    if not isinstance(raw, list) or not raw:
        raise EvalDataError(f"{path}: {where}: field 'answers' should be a non-empty list")
    return [str(get(a, "answer", path, where) if isinstance(a, dict) else a) for a in raw]


# ----------------------------------------------------------------------------- captions
def load_karpathy(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    wanted = {"train": {"train", "restval"}, "test": {"test"}}[split]
    out = []
    for i, image in enumerate(items(read_json(path, "Karpathy split"), "images", path)):
        at = f"images[{i}]"
        if get(image, "split", path, at, str) not in wanted:
            continue
        name = get(image, "filename", path, at, str)
        refs = [get(s, "raw", path, f"{at}.sentences", str) for s in get(image, "sentences", path, at, list)]
        ident = image.get("cocoid", image.get("imgid", name))
        folder = paths.required("media", where) / image.get("filepath", "")
        out.append(Sample(str(ident), folder / name, answers=refs))
    return out


def load_vatex(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    out = []
    for i, record in enumerate(items(read_json(path, "VATEX annotations"), None, path)):
        at = f"[{i}]"
        vid = get(record, "videoID", path, at, str)
        refs = [str(c) for c in get(record, "enCap", path, at, list)]
        out.append(Sample(vid, _media_file(paths, where, "{videoID}.mp4", record, path, at), answers=refs))
    return out


def load_youcook2(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    database = get(read_json(path, "YouCook2 annotations"), "database", path, "top level", dict)
    subset = {"train": "training", "test": "validation"}[split]
    out = []
    for vid, video in database.items():
        at = f"database.{vid}"
        if get(video, "subset", path, at, str) != subset:
            continue
        for j, seg in enumerate(get(video, "annotations", path, at, list)):
            start, end = get(seg, "segment", path, f"{at}.annotations[{j}]", list)
            file = _media_file(paths, where, "{video_id}.mp4", {"video_id": vid}, path, at)
            out.append(Sample(f"{vid}/{seg.get('id', j)}", file, start=float(start), end=float(end),
                              answers=[get(seg, "sentence", path, f"{at}.annotations[{j}]", str)]))
    return out


# ----------------------------------------------------------------------------------- VQA
def load_vqa(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    qpath, apath = paths.required("questions", where), paths.required("annotations", where)
    questions = read_json(qpath, "VQA questions")
    answers: dict[Any, list[str]] = {}
    for i, a in enumerate(items(read_json(apath, "VQA annotations"), "annotations", apath)):
        answers[get(a, "question_id", apath, f"annotations[{i}]")] = _answers(
            get(a, "answers", apath, f"annotations[{i}]"), apath, f"annotations[{i}]")
    subtype = questions.get("data_subtype", "") if isinstance(questions, dict) else ""
    out = []
    for i, q in enumerate(items(questions, "questions", qpath)):
        at = f"questions[{i}]"
        qid = get(q, "question_id", qpath, at)
        if qid not in answers:
            raise EvalDataError(f"{apath}: annotations: no entry with question_id {qid} (asked in {qpath} {at})")
        record = {"data_subtype": subtype, **q}
        out.append(Sample(str(qid), _media_file(paths, where, "COCO_{data_subtype}_{image_id:012d}.jpg", record,
                                                qpath, at),
                          question=get(q, "question", qpath, at, str), answers=answers[qid]))
    return out


def _qa_list(paths: SplitPaths, where: str, key: str | None, what: str, pattern: str, id_field: str) -> list[Sample]:
    path = paths.required("annotations", where)
    out = []
    for i, record in enumerate(items(read_json(path, what), key, path)):
        at = f"{key or ''}[{i}]"
        out.append(Sample(str(get(record, id_field, path, at)), _media_file(paths, where, pattern, record, path, at),
                          question=get(record, "question", path, at, str),
                          answers=_answers(get(record, "answers", path, at), path, at)))
    return out


def load_textvqa(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    return _qa_list(paths, where, "data", "TextVQA annotations", "{image_id}.jpg", "question_id")


def load_vizwiz(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    return _qa_list(paths, where, None, "VizWiz annotations", "{image}", "image")


def load_hateful_memes(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    out = []
    for i, row in enumerate(read_jsonl(path, "HatefulMemes annotations"), 1):
        at = f"line {i}"
        label = get(row, "label", path, at, int)
        if label not in (0, 1):
            raise EvalDataError(f"{path}: {at}: field 'label' should be 0 or 1, got {label}")
        answer = "yes" if label else "no"
        out.append(Sample(str(get(row, "id", path, at)), _media_file(paths, where, "{img}", row, path, at),
                          answers=[answer], label=answer, extra={"meme_text": get(row, "text", path, at, str)}))
    return out


def load_visdial(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    data = get(read_json(path, "VisDial annotations"), "data", path, "top level", dict)
    questions = get(data, "questions", path, "data", list)
    answers = get(data, "answers", path, "data", list)
    relevance: dict[int, tuple[int, list[float]]] = {}
    if paths.relevance is not None:
        for i, r in enumerate(items(read_json(paths.relevance, "VisDial dense annotations"), None, paths.relevance)):
            at = f"[{i}]"
            relevance[get(r, "image_id", paths.relevance, at, int)] = (
                get(r, "round_id", paths.relevance, at, int), get(r, "gt_relevance", paths.relevance, at, list))

    def text(table: list, index: Any, at: str, field: str) -> str:
        if not isinstance(index, int) or not 0 <= index < len(table):
            raise EvalDataError(f"{path}: {at}: field {field!r} = {index!r} is not an index into data.{field}s")
        return str(table[index])

    out = []
    for i, dialog in enumerate(get(data, "dialogs", path, "data", list)):
        at = f"data.dialogs[{i}]"
        image_id = get(dialog, "image_id", path, at, int)
        rounds = get(dialog, "dialog", path, at, list)
        if paths.relevance is not None and image_id not in relevance:
            continue
        round_id, gt_relevance = relevance.get(image_id, (len(rounds), []))
        if not 1 <= round_id <= len(rounds):
            raise EvalDataError(f"{paths.relevance}: image_id {image_id}: round_id {round_id} outside 1..{len(rounds)}")
        history = [(text(questions, get(r, "question", path, f"{at}.dialog[{k}]"), f"{at}.dialog[{k}]", "question"),
                    text(answers, get(r, "answer", path, f"{at}.dialog[{k}]"), f"{at}.dialog[{k}]", "answer"))
                   for k, r in enumerate(rounds[:round_id])]
        last = rounds[round_id - 1]
        options = [text(answers, o, f"{at}.dialog[{round_id - 1}]", "answer")
                   for o in last.get("answer_options", [])]
        if not options:  # VisDial is scored by ranking the round's answer options
            raise EvalDataError(f"{path}: {at}.dialog[{round_id - 1}]: field 'answer_options' missing or empty")
        gt_index = last.get("gt_index")
        if not isinstance(gt_index, int) or not 0 <= gt_index < len(options):
            raise EvalDataError(f"{path}: {at}.dialog[{round_id - 1}]: field 'gt_index' missing or out of range")
        if gt_relevance and len(gt_relevance) != len(options):
            raise EvalDataError(f"{paths.relevance}: image_id {image_id}: gt_relevance has {len(gt_relevance)} values "
                                f"for {len(options)} answer options")
        question, answer = history[-1]
        file = _media_file(paths, where, "VisualDialog_val2018_{image_id:012d}.jpg", dialog, path, at)
        out.append(Sample(f"{image_id}/{round_id}", file, question=question, answers=[answer], choices=options,
                          label=answer, extra={"caption": get(dialog, "caption", path, at, str),
                                               "history": history[:-1], "gt_index": gt_index,
                                               "relevance": [float(v) for v in gt_relevance]}))
    return out


# --------------------------------------------------------------------------------- video
def _video_map(paths: SplitPaths) -> dict[str, str]:
    """id -> file stem: a JSON object, or text lines "NAME KEY" (MSVD's youtube_mapping.txt)."""
    path = paths.video_map
    if path is None:
        return {}
    if path.suffix == ".json":
        mapping = read_json(path, "video map")
        if not isinstance(mapping, dict):
            raise EvalDataError(f"{path}: expected a JSON object {{id: file name}}")
        return {str(k): str(v) for k, v in mapping.items()}
    if not path.is_file():
        raise EvalDataError(f"{path}: video map file does not exist")
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2:
                raise EvalDataError(f"{path}: line {number}: expected 'NAME KEY'")
            out[parts[1]] = parts[0]
    return out


def _mapped(mapping: dict[str, str], key: str, path: Path, at: str) -> dict[str, str]:
    if not mapping:
        return {}
    if key not in mapping:
        raise EvalDataError(f"{path}: {at}: video {key!r} is not in the video map")
    return {"mapped": mapping[key]}


def load_video_qa(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    mapping = _video_map(paths)
    out = []
    for i, record in enumerate(items(read_json(path, "video QA annotations"), None, path)):
        at = f"[{i}]"
        vid = get(record, "video_id", path, at)
        fields = {**record, **_mapped(mapping, f"vid{vid}", paths.video_map or path, at)}
        default = "{mapped}.avi" if mapping else "video{video_id}.mp4"
        out.append(Sample(str(record.get("id", i)), _media_file(paths, where, default, fields, path, at),
                          question=get(record, "question", path, at, str),
                          answers=[str(get(record, "answer", path, at))]))
    return out


def load_ivqa(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    answer_cols = tuple(f"answer{k}" for k in range(1, 6))
    rows = read_csv(path, "iVQA annotations", ("video_id", "start", "end", "question") + answer_cols)
    out = []
    for i, row in enumerate(rows):
        at = f"row {i + 2}"
        answers = [row[c] for c in answer_cols if row[c]]
        if not answers:
            raise EvalDataError(f"{path}: {at}: fields {', '.join(answer_cols)} are all empty")
        out.append(Sample(f"{row['video_id']}_{row['start']}_{row['end']}",
                          _media_file(paths, where, "{video_id}_{start}_{end}.mp4", row, path, at),
                          question=row["question"], answers=answers))
    return out


def load_nextqa(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    mapping = _video_map(paths)
    out = []
    for i, row in enumerate(read_csv(path, "NextQA annotations", ("video", "question", "answer", "qid"))):
        at = f"row {i + 2}"
        fields = {**row, **_mapped(mapping, row["video"], paths.video_map or path, at)}
        out.append(Sample(f"{row['video']}_{row['qid']}",
                          _media_file(paths, where, "{mapped}.mp4" if mapping else "{video}.mp4", fields, path, at),
                          question=row["question"], answers=[row["answer"]]))
    return out


def load_star(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    out = []
    for i, record in enumerate(items(read_json(path, "STAR annotations"), None, path)):
        at = f"[{i}]"
        choices = [str(get(c, "choice", path, f"{at}.choices")) for c in get(record, "choices", path, at, list)]
        answer = str(get(record, "answer", path, at))
        if answer not in choices:
            raise EvalDataError(f"{path}: {at}: field 'answer' {answer!r} is not one of its choices")
        out.append(Sample(str(get(record, "question_id", path, at)),
                          _media_file(paths, where, "{video_id}.mp4", record, path, at),
                          question=get(record, "question", path, at, str), answers=[answer], choices=choices,
                          label=answer, start=float(get(record, "start", path, at, (int, float))),
                          end=float(get(record, "end", path, at, (int, float)))))
    return out


def load_kinetics(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    out = []
    for i, row in enumerate(read_csv(path, "Kinetics annotations", ("label", "youtube_id", "time_start", "time_end"))):
        at = f"row {i + 2}"
        try:
            fields = {**row, "time_start": int(float(row["time_start"])), "time_end": int(float(row["time_end"]))}
        except ValueError:
            raise EvalDataError(f"{path}: {at}: time_start/time_end should be numbers") from None
        file = _media_file(paths, where, "{label}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4", fields, path, at)
        out.append(Sample(f"{row['youtube_id']}_{fields['time_start']}", file, answers=[row["label"]],
                          label=row["label"]))
    return out


# Third-person forms the spelling rules below get wrong (B.1.5 puts the verb in the third person).
_THIRD_PERSON = {"be": "is", "have": "has", "quiz": "quizzes", "whiz": "whizzes", "gas": "gasses"}
# Nouns whose article the first letter does not tell ("a uniform", "an hour").
_ARTICLE_A = ("uni", "use", "usu", "ute", "eu", "one")
_ARTICLE_AN = ("hour", "honest", "honor", "honour", "heir")


def _third_person(verb: str) -> str:
    low = verb.lower()
    if low in _THIRD_PERSON:
        return _THIRD_PERSON[low]
    if low.endswith(("s", "sh", "ch", "x", "z")) or (low.endswith("o") and low[-2:-1] not in "aeiou"):
        return verb + "es"  # pushes, goes, echoes (but shampoos, videos)
    if low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        return verb[:-1] + "ies"  # carries (but sprays)
    return verb + "s"


def rareact_caption(verb: str, noun: str) -> str:
    """B.1.5: the verb in the third person, an article before the noun ("cut", "onion" -> "cuts an
    onion"). English spelling rules plus a small table of irregular forms ("have" -> "has");
    "an" before a vowel sound, judged by the first letter and a few exceptions ("a uniform",
    "an hour"). A multi-word verb conjugates its first word ("pick up" -> "picks up")."""
    words = verb.split()
    if not words or not noun.strip():
        raise EvalDataError(f"rareact_caption: empty verb or noun in {(verb, noun)!r}")
    low = noun.strip().lower()
    vowel = low[:1] in "aeiou"
    if low.startswith(_ARTICLE_A):
        vowel = False
    elif low.startswith(_ARTICLE_AN):
        vowel = True
    return " ".join([_third_person(words[0]), *words[1:], "an" if vowel else "a", noun.strip()])


def load_rareact(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    path = paths.required("annotations", where)
    rows = read_csv(path, "RareAct annotations", ("video_id", "start", "end", "verb", "noun", "annotation"))
    # One sample per clip; its rows (verb, noun, annotation), duplicates kept, feed mWAP.
    clips: OrderedDict[tuple[str, str, str], list[tuple[str, str, int]]] = OrderedDict()
    captions: dict[tuple[str, str], str] = {}
    for i, row in enumerate(rows):
        at = f"row {i + 2}"
        verb, noun = (row["verb"] or "").strip(), (row["noun"] or "").strip()
        if not verb or not noun:
            raise EvalDataError(f"{path}: {at}: fields 'verb' and 'noun' must not be empty")
        value = (row["annotation"] or "").strip()
        if value not in ("0", "1", "2", "3", "4"):
            raise EvalDataError(f"{path}: {at}: field 'annotation' should be 0-4, got {value!r}")
        captions[(verb, noun)] = rareact_caption(verb, noun)
        clips.setdefault((row["video_id"], row["start"], row["end"]), []).append((verb, noun, int(value)))
    # Candidates in caption order; actions[k] is the (verb, noun) of classes[k].
    actions = sorted(captions, key=lambda a: (captions[a], a))
    classes = [captions[a] for a in actions]
    out = []
    for (vid, start, end), rows in clips.items():
        try:
            times = float(start), float(end)
        except ValueError:
            raise EvalDataError(f"{path}: video {vid}: start/end should be numbers") from None
        positives = list(dict.fromkeys(captions[(v, n)] for v, n, a in rows if a == 1))
        out.append(Sample(f"{vid}_{start}_{end}", _media_file(paths, where, "{video_id}.mp4", {"video_id": vid},
                                                              path, f"video {vid}"),
                          answers=positives, start=times[0], end=times[1],
                          extra={"classes": classes, "actions": actions, "video_id": vid,
                                 "annotations": rows}))
    return out


def class_names_of(samples: list[Sample]) -> list[str]:
    """The candidate classes of a classification split, sorted (deterministic): every label, and every
    class a sample names as a candidate (`extra["classes"]`: the class subset of an ImageNet shift)."""
    names = {s.label for s in samples}
    for subset in {id(s.extra["classes"]): s.extra["classes"] for s in samples if "classes" in s.extra}.values():
        names.update(subset)
    return sorted(names)


LOADERS: dict[str, Loader] = {
    "karpathy": load_karpathy, "vqa": load_vqa, "textvqa": load_textvqa, "vizwiz": load_vizwiz,
    "hateful_memes": load_hateful_memes, "visdial": load_visdial, "class_folders": load_class_folders,
    "video_qa": load_video_qa, "ivqa": load_ivqa, "nextqa": load_nextqa, "star": load_star,
    "vatex": load_vatex, "youcook2": load_youcook2, "kinetics": load_kinetics, "rareact": load_rareact,
    "imagenetv2": load_imagenetv2, "imagenet_r": load_imagenet_r, "imagenet_sketch": load_imagenet_sketch,
    "imagenet_a": load_imagenet_a, "objectnet": load_objectnet,
    "imagenet_on_r_classes": load_imagenet_on_r_classes, "imagenet_on_a_classes": load_imagenet_on_a_classes,
    "imagenet_on_objectnet_classes": load_imagenet_on_objectnet_classes,
}
