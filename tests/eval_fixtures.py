"""Tiny benchmark datasets in the official annotation formats, written by the tests themselves
(rendered shape images, short MPEG-4 videos via PyAV, small annotation files) plus the data
config that points at them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from flamingo.data.shapes import draw_shape, write_mp4

SHAPES = ["circle", "square", "triangle"]
COLOURS = ["red", "blue", "green", "yellow"]


def _kind(i: int) -> tuple[str, str]:
    return SHAPES[i % len(SHAPES)], COLOURS[(i // len(SHAPES)) % len(COLOURS)]


def image(path: Path, i: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape, colour = _kind(i)
    draw_shape(shape, colour, size).save(path)


def video(path: Path, i: int, frames: int = 4, fps: float = 2.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape, colour = _kind(i)
    shots = [draw_shape(shape, colour, 32, centre=(8 + 4 * k, 16)) for k in range(frames)]
    assert write_mp4(path, shots, fps), "PyAV cannot encode MPEG-4 here"


def caption(i: int) -> str:
    shape, colour = _kind(i)
    return f"a {colour} {shape}"


def write_karpathy(root: Path, train: int = 12, test: int = 6) -> dict:
    images = []
    for i in range(train + test):
        split = "train" if i < train else "test"
        image(root / "images" / "val2014" / f"img{i}.jpg", i)
        images.append({"filepath": "val2014", "filename": f"img{i}.jpg", "split": split, "cocoid": i,
                       "sentences": [{"raw": caption(i)}, {"raw": f"{caption(i)} on white"}]})
    (root / "karpathy.json").write_text(json.dumps({"images": images}))
    split = {"annotations": "karpathy.json", "media": "images"}
    return {"test": split, "train": split}


def write_vqa(root: Path, train: int = 12, test: int = 6) -> dict:
    out = {}
    for split, start, n, sub in (("train", 0, train, "train2014"), ("test", train, test, "val2014")):
        questions, annotations = [], []
        for i in range(start, start + n):
            image(root / sub / f"COCO_{sub}_{i:012d}.jpg", i)
            shape, colour = _kind(i)
            questions.append({"question_id": i, "image_id": i, "question": f"what colour is the {shape}?"})
            annotations.append({"question_id": i, "image_id": i,
                                "answers": [{"answer": colour}] * 8 + [{"answer": "dark"}] * 2})
        (root / f"{split}_q.json").write_text(json.dumps({"data_subtype": sub, "questions": questions}))
        (root / f"{split}_a.json").write_text(json.dumps({"annotations": annotations}))
        out[split] = {"questions": f"{split}_q.json", "annotations": f"{split}_a.json", "media": sub}
    return out


def write_hateful_memes(root: Path, n: int = 16) -> dict:
    lines = []
    for i in range(n):
        image(root / "img" / f"{i:05d}.png", i)
        lines.append(json.dumps({"id": i, "img": f"img/{i:05d}.png", "label": i % 2, "text": caption(i)}))
    (root / "dev.jsonl").write_text("\n".join(lines) + "\n")
    return {"test": {"annotations": "dev.jsonl", "media": "."}}


def write_vqa_in_words(root: Path, train: int = 4, test: int = 2) -> dict:
    """`write_vqa` with questions and answers in words of the family tests' tiny word-level
    tokenizers ("t40 t41", "t70"), so that no token is unknown to them."""
    out = write_vqa(root, train, test)
    for split in ("train", "test"):
        questions = json.loads((root / f"{split}_q.json").read_text())
        for q in questions["questions"]:
            q["question"] = f"t{40 + q['question_id'] % 20} t{41 + q['question_id'] % 20}"
        (root / f"{split}_q.json").write_text(json.dumps(questions))
        answers = json.loads((root / f"{split}_a.json").read_text())
        for a in answers["annotations"]:
            a["answers"] = [{"answer": f"t{70 + a['question_id'] % 20}"}] * 10
        (root / f"{split}_a.json").write_text(json.dumps(answers))
    return out


def write_imagenet(root: Path, per_class_train: int = 3, per_class_test: int = 2) -> dict:
    names = {}
    out = {}
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        for c, (shape, colour) in enumerate([("circle", "red"), ("square", "blue"), ("triangle", "green")]):
            folder = f"n0000{c}"
            names[folder] = f"{colour} {shape}"
            for k in range(count):
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                draw_shape(shape, colour, 40, centre=(14 + 3 * k, 20)).save(root / split / folder / f"{k}.JPEG")
        out[split] = {"media": split, "class_names": "classes.json"}
    (root / "classes.json").write_text(json.dumps(names))
    return out


def write_video_qa(root: Path, train: int = 6, test: int = 4) -> dict:
    out = {}
    for split, start, n in (("train", 0, train), ("test", train, test)):
        records = []
        for i in range(start, start + n):
            video(root / "videos" / f"video{i}.mp4", i)
            shape, colour = _kind(i)
            records.append({"video_id": i, "id": i, "question": f"what colour is the {shape}?", "answer": colour})
        (root / f"{split}_qa.json").write_text(json.dumps(records))
        out[split] = {"annotations": f"{split}_qa.json", "media": "videos"}
    return out


def write_kinetics(root: Path, per_class: int = 2) -> dict:
    out = {}
    for split in ("train", "test"):
        rows = []
        for c, label in enumerate(["drawing circles", "painting squares"]):
            for k in range(per_class):
                vid = f"{split}{c}{k}"
                video(root / "videos" / label / f"{vid}_000001_000003.mp4", c * 3)
                rows.append({"label": label, "youtube_id": vid, "time_start": 1, "time_end": 3, "split": split})
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        out[split] = {"annotations": f"{split}.csv", "media": "videos"}
    return out


def write_data_config(path: Path, tasks: dict[str, tuple[Path, dict]]) -> Path:
    """tasks: name -> (the folder the writer wrote into, the splits it returned with relative paths)."""
    absolute = {name: {split: {k: (v if k == "media_pattern" else str(folder / v)) for k, v in paths.items()}
                       for split, paths in splits.items()}
                for name, (folder, splits) in tasks.items()}
    path.write_text(yaml.safe_dump({"tasks": absolute}))
    return path
