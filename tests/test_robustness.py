"""Robustness under distribution shift: the ImageNet shifts' loaders on tiny fixtures in their
official layouts (class indices, subsets and ObjectNet's mapping files checked), ImageNet on a
shift's classes, effective robustness on hand-made numbers (each shift against its paired ID
accuracy), the fits on a table in the layout of Taori et al.'s testbed, and `flamingo robustness`
(a WiSE-FT sweep whose endpoints score what `flamingo eval` gives the two models; --fit-from on
ImageNet-layout fixtures)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flamingo.data.benchmarks.data_config import SplitPaths
from flamingo.data.benchmarks.imagenet_classes import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, IMAGENET_WNIDS
from flamingo.data.benchmarks.loaders import LOADERS, class_names_of
from flamingo.data.benchmarks.media import VideoSampling, read_media
from flamingo.data.benchmarks.samples import EvalDataError
from flamingo.cli import main
from flamingo.data.benchmarks.tasks import get_task
from flamingo.data.shapes import make_shapes_shift
from flamingo.evaluation.aggregate import score_records
from flamingo.errors import UserError
from flamingo.evaluation.robustness import (
    TESTBED_COLUMNS,
    LinearFit,
    ModelSpec,
    effective_robustness,
    fit_from_testbed,
    logit,
    summarize,
    wilson_interval,
)

# The same subsets as class indices in WiSE-FT's code (mlfoundations/wise-ft, src/datasets/imagenet_r.py and
# imagenet_a.py): a second source for the wnid lists, which are transcribed from the datasets' own repositories.
R_INDICES = [
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105, 107, 113,
    122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187, 195, 199, 203, 207,
    208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289,
    291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337, 338, 340, 341, 344,
    347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414, 425, 428, 430, 435, 437,
    441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594,
    596, 609, 613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815, 820,
    824, 833, 847, 852, 866, 875, 883, 889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951,
    953, 954, 957, 963, 965, 967, 980, 981, 983, 988]
A_INDICES = [
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105, 107, 108,
    110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298, 301, 306, 307,
    308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386,
    397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483,
    486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589, 606,
    607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758,
    763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845,
    847, 850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954,
    956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988]
# A few classes whose index every ImageNet user knows (the standard order is the sorted wnids).
KNOWN = {"n01440764": (0, "tench"), "n01443537": (1, "goldfish"), "n02708093": (409, "analog clock"),
         "n03196217": (530, "digital clock"), "n07753592": (954, "banana"), "n15075141": (999, "toilet tissue")}


def class_names() -> dict[str, str]:
    return {w: KNOWN[w][1] if w in KNOWN else f"class {i}" for i, w in enumerate(IMAGENET_WNIDS)}


def picture(path: Path, colour: str = "blue", size: int = 12, border: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), colour)
    if border:
        frame = Image.new("RGB", (size + 2, size + 2), border)
        frame.paste(image, (1, 1))
        image = frame
    image.save(path)


@pytest.fixture
def names_file(tmp_path):
    path = tmp_path / "class_names.json"
    path.write_text(json.dumps(class_names()))
    return path


def load(task: str, split: str = "test", **paths) -> list:
    return LOADERS[get_task(task).loader](SplitPaths(**paths), split, f"tasks.{task}.{split}")


# ----------------------------------------------------------------------------------- class lists
def test_class_lists_are_imagenets_standard_order_and_the_published_subsets():
    assert len(IMAGENET_WNIDS) == len(set(IMAGENET_WNIDS)) == 1000 and list(IMAGENET_WNIDS) == sorted(IMAGENET_WNIDS)
    assert {w: IMAGENET_WNIDS.index(w) for w in KNOWN} == {w: i for w, (i, _) in KNOWN.items()}
    assert [IMAGENET_WNIDS[i] for i in R_INDICES] == list(IMAGENET_R_WNIDS)
    assert [IMAGENET_WNIDS[i] for i in A_INDICES] == list(IMAGENET_A_WNIDS)


# ------------------------------------------------------------------------------------- loaders
def test_imagenetv2_folders_are_class_indices(tmp_path, names_file):
    for folder in ("0", "1", "999"):
        picture(tmp_path / "v2" / folder / "a.jpeg")
    samples = load("imagenetv2", media=tmp_path / "v2", class_names=names_file)
    assert [(s.id, s.label) for s in samples] == [("0/a.jpeg", "tench"), ("1/a.jpeg", "goldfish"),
                                                  ("999/a.jpeg", "toilet tissue")]
    assert class_names_of(samples[:1]) == sorted(class_names().values())  # candidates: all 1000 classes
    for bad in ("1000", "01", "n01440764"):
        (tmp_path / "v2" / bad).mkdir()
        with pytest.raises(EvalDataError, match=f"folder '{bad}' is not an ImageNetV2 class folder"):
            load("imagenetv2", media=tmp_path / "v2", class_names=names_file)
        (tmp_path / "v2" / bad).rmdir()


@pytest.mark.parametrize("task,subset,inside,outside", [
    ("imagenet_r", IMAGENET_R_WNIDS, "n01443537", "n01440764"),
    ("imagenet_a", IMAGENET_A_WNIDS, "n01498041", "n01443537"),
])
def test_200_class_subsets(tmp_path, names_file, task, subset, inside, outside):
    picture(tmp_path / task / inside / "x.jpg")
    (tmp_path / task / "README.txt").write_text("not a class")  # ImageNet-A ships one beside its folders
    samples = load(task, media=tmp_path / task, class_names=names_file)
    assert [s.id for s in samples] == [f"{inside}/x.jpg"] and samples[0].label == class_names()[inside]
    names = class_names()
    assert class_names_of(samples) == sorted(names[w] for w in subset) and len(class_names_of(samples)) == 200
    picture(tmp_path / task / outside / "y.jpg")
    with pytest.raises(EvalDataError, match=f"folder {outside} is not one of the 200 classes"):
        load(task, media=tmp_path / task, class_names=names_file)
    # The support examples come from ImageNet's train folder, restricted to the subset.
    for wnid in (inside, outside):
        picture(tmp_path / "train" / wnid / "t.JPEG")
    train = load(task, "train", media=tmp_path / "train", class_names=names_file)
    assert [s.id for s in train] == [f"{inside}/t.JPEG"]


def test_imagenet_sketch_and_bad_class_names(tmp_path, names_file):
    picture(tmp_path / "sketch" / "n15075141" / "s.JPEG")
    samples = load("imagenet_sketch", media=tmp_path / "sketch", class_names=names_file)
    assert samples[0].label == "toilet tissue" and len(class_names_of(samples)) == 1000
    (tmp_path / "sketch" / "toilet").mkdir()
    with pytest.raises(EvalDataError, match="folder 'toilet' is not an ImageNet class"):
        load("imagenet_sketch", media=tmp_path / "sketch", class_names=names_file)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"n15075141": "toilet tissue"}))
    with pytest.raises(EvalDataError, match="no class name for ImageNet class"):
        load("imagenet_r", media=tmp_path / "sketch", class_names=partial)


def write_objectnet(root: Path) -> Path:
    """ObjectNet's mappings folder with its four files; the 2012 ids are a permutation of the standard
    indices (index i is 2012 id (7 i + 3) mod 1000), so mixing the two orders maps to wrong classes."""
    mappings = root / "mappings"
    mappings.mkdir(parents=True)
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"alarm_clock": "Alarm clock", "banana": "Banana", "air_freshener": "Air freshener"}))
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Alarm clock": "analog clock; digital clock", "Banana": "banana"}))
    to_2012 = {i: (7 * i + 3) % 1000 for i in range(1000)}
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): j for i, j in to_2012.items()}))
    lines = [f"label {j}" for j in range(1000)]
    for wnid, (index, name) in KNOWN.items():
        lines[to_2012[index]] = name
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    picture(root / "images" / "alarm_clock" / "a.png", "blue", 10, border="red")
    picture(root / "images" / "banana" / "b.png", "yellow", 10, border="red")
    picture(root / "images" / "air_freshener" / "c.png", "green", 10, border="red")  # not an ImageNet class
    return root


def test_objectnet_mapping_files_subset_and_border(tmp_path, names_file):
    root = write_objectnet(tmp_path / "objectnet")
    paths = {"media": root / "images", "annotations": root / "mappings", "class_names": names_file}
    samples = load("objectnet", **paths)
    assert [(s.id, s.answers) for s in samples] == [("alarm_clock/a.png", ["analog clock", "digital clock"]),
                                                   ("banana/b.png", ["banana"])]
    assert class_names_of(samples) == ["analog clock", "banana", "digital clock"]
    frames = read_media(samples[0], False, VideoSampling())
    # The 12-pixel image without its red frame: 10 pixels of blue.
    assert frames[0].size == (10, 10) and {c for _, c in frames[0].getcolors()} == {(0, 0, 255)}
    # Either ImageNet class of "Alarm clock" is right; another candidate is not.
    task = get_task("objectnet")
    records = [{"id": s.id, "status": "ok", "ranked": ranked} for s, ranked in
               zip(samples, (["digital clock", "banana"], ["analog clock", "banana"]))]
    assert score_records(task, records, {s.id: s for s in samples}) == {"top-1": 50.0, "top-5": 100.0}
    train = root / "train"
    for wnid in ("n02708093", "n01440764"):
        picture(train / wnid / "t.JPEG")
    assert [s.id for s in load("objectnet", "train", **{**paths, "media": train})] == ["n02708093/t.JPEG"]
    (root / "images" / "mystery").mkdir()
    with pytest.raises(EvalDataError, match="folder 'mystery' is not in"):
        load("objectnet", **paths)


def test_objectnet_refuses_a_name_outside_its_imagenet_labels(tmp_path, names_file):
    root = write_objectnet(tmp_path / "objectnet")
    (root / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Banana": "plantain"}))
    with pytest.raises(EvalDataError, match="'Banana' maps to 'plantain'"):
        load("objectnet", media=root / "images", annotations=root / "mappings", class_names=names_file)


def test_imagenet_on_a_shifts_classes(tmp_path, names_file):
    """The ID side of ImageNet-R/-A/ObjectNet's effective robustness: ImageNet's folders of the shift's
    classes only, ranked among those classes (ObjectNet's read from its mapping files)."""
    for wnid in ("n01443537", "n01440764", "n02708093", "n07753592"):  # goldfish (R), tench, analog clock, banana
        picture(tmp_path / "val" / wnid / "v.JPEG")
    paths = {"media": tmp_path / "val", "class_names": names_file}
    samples = load("imagenet_on_r_classes", **paths)
    assert [s.id for s in samples] == ["n01443537/v.JPEG", "n07753592/v.JPEG"]
    assert class_names_of(samples) == sorted(class_names()[w] for w in IMAGENET_R_WNIDS)
    assert [s.id for s in load("imagenet_on_a_classes", **paths)] == ["n07753592/v.JPEG"]  # banana is in A, not 1
    root = write_objectnet(tmp_path / "objectnet")
    samples = load("imagenet_on_objectnet_classes", **paths, annotations=root / "mappings")
    assert [(s.id, s.answers) for s in samples] == [("n02708093/v.JPEG", ["analog clock"]),
                                                   ("n07753592/v.JPEG", ["banana"])]  # its own class only
    assert class_names_of(samples) == ["analog clock", "banana", "digital clock"]


# ------------------------------------------------------------------------------- the measures
def test_effective_robustness_is_the_distance_above_the_logit_fit():
    # logit(0.7613) = ln(0.7613 / 0.2387) = 1.15983; 0.9 * 1.15983 - 0.5 = 0.54385; sigmoid -> 0.632705
    fit = LinearFit(slope=0.9, intercept=-0.5)
    assert fit.predict(76.13) == pytest.approx(63.2705, abs=1e-3)
    assert effective_robustness(76.13, 70.0, fit) == pytest.approx(70.0 - 63.2705, abs=1e-3)
    assert effective_robustness(40.0, 40.0, LinearFit(1.0, 0.0)) == pytest.approx(0.0, abs=1e-12)  # y = x
    assert wilson_interval(19, 24) == pytest.approx((59.53, 90.76), abs=0.01)  # the standard Wilson interval


def test_summary_averages_the_shifts_and_their_effective_robustness():
    def cell(accuracy, ok):
        return {"shots": {"0": {"mean": {"top-1": accuracy}, "trials": [{"ok": ok, "scores": {"top-1": accuracy}}]}}}

    results = {"tasks": {"imagenet": cell(50.0, 10), "imagenetv2": cell(40.0, 10), "imagenet_r": cell(30.0, 20)}}
    fits = {"imagenetv2": LinearFit(1.0, 0.0), "imagenet_r": LinearFit(1.0, math.log(0.25))}  # r: odds / 4 -> 20%
    row = summarize(ModelSpec("m", lambda: None), results, "imagenet", ["imagenetv2", "imagenet_r"], 0, fits)
    assert row["id"]["accuracy"] == 50.0 and row["id"]["correct"] == 5 and row["ood_average"] == 35.0
    assert row["ood"]["imagenetv2"]["effective_robustness"] == pytest.approx(-10.0)
    assert row["ood"]["imagenet_r"]["predicted"] == pytest.approx(20.0)
    assert row["effective_robustness_average"] == pytest.approx((-10.0 + 10.0) / 2)
    row = summarize(ModelSpec("m", lambda: None), results, "imagenet", ["imagenetv2", "imagenet_r"], 0,
                    {"imagenetv2": fits["imagenetv2"]})
    assert row["ood"]["imagenet_r"]["effective_robustness"] is None and row["effective_robustness_average"] is None


def test_fit_predicts_the_lines_limit_at_0_and_100():
    assert LinearFit(1.2, -0.5).predict(100.0) == 100.0 and LinearFit(1.2, -0.5).predict(0.0) == 0.0
    assert LinearFit(-1.0, 0.0).predict(100.0) == 0.0
    assert LinearFit(0.0, 0.0).predict(0.0) == pytest.approx(50.0)


def test_shifts_on_a_class_subset_are_predicted_from_imagenet_on_those_classes():
    def cell(accuracy, ok=10):
        return {"shots": {"0": {"mean": {"top-1": accuracy}, "trials": [{"ok": ok, "scores": {"top-1": accuracy}}]}}}

    results = {"tasks": {"imagenet": cell(80.0), "imagenet_on_r_classes": cell(90.0), "imagenet_r": cell(50.0),
                         "imagenetv2": cell(70.0)}}
    identity = LinearFit(1.0, 0.0)
    row = summarize(ModelSpec("m", lambda: None), results, "imagenet", ["imagenet_r", "imagenetv2"], 0,
                    {"imagenet_r": identity, "imagenetv2": identity},
                    {"imagenet_r": "imagenet_on_r_classes", "imagenetv2": "imagenet"})
    assert row["ood"]["imagenet_r"]["id_task"] == "imagenet_on_r_classes"
    assert row["ood"]["imagenet_r"]["predicted"] == pytest.approx(90.0)  # not ImageNet's 80
    assert row["ood"]["imagenetv2"]["predicted"] == pytest.approx(80.0)
    assert row["paired_id"]["imagenet_on_r_classes"]["accuracy"] == 90.0
    assert row["ood_average_predicted"] == pytest.approx(85.0)
    assert row["effective_robustness_average"] == pytest.approx(60.0 - 85.0)


# ------------------------------------------------------------------- fits on the testbed's table
# Made-up lines per shift; the standard models lie exactly on them, against the ID column the shift is paired with.
LINES = {"imagenetv2": (0.9, -0.4), "imagenet_sketch": (1.1, -1.3), "imagenet_r": (0.8, -0.9),
         "imagenet_a": (1.6, -3.0), "objectnet": (1.2, -1.0)}
ID_COLUMNS = {"val": 0.0, "val-on-imagenet-r-classes": 6.0, "val-on-imagenet-a-classes": -8.0,
              "val-on-objectnet-classes": 3.0}  # offsets from val, so a wrong ID column leaves the line


def on_line(task: str, id_accuracy: float, above: float = 0.0) -> float:
    slope, intercept = LINES[task]
    return 100 / (1 + math.exp(-(slope * logit(id_accuracy / 100) + intercept))) + above


def made_up_testbed() -> dict[str, dict[str, float | str]]:
    """{model: {column: accuracy}}: four standard models on the lines (std-4 without ObjectNet), two above."""
    rows = {}
    for name, val, above in (("std-1", 56.0, 0), ("std-2", 64.5, 0), ("std-3", 71.0, 0), ("std-4", 79.25, 0),
                             ("robust-1", 60.0, 9.0), ("robust-2", 75.0, 7.0)):
        row: dict[str, float | str] = {"greyscale": val - 1, **{c: val + d for c, d in ID_COLUMNS.items()}}
        for task, (ood_column, id_column) in TESTBED_COLUMNS.items():
            row[ood_column] = on_line(task, row[id_column], above)
        rows[name] = row
    rows["std-4"]["objectnet-1.0-beta"] = rows["std-4"]["val-on-objectnet-classes"] = ""  # not evaluated
    return rows


def write_testbed(path: Path, rows: dict, drop: str | None = None) -> Path:
    columns = sorted({c for row in rows.values() for c in row} - {drop})
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["model", *columns])
        out.writerows([name, *[repr(row[c]) if isinstance(row[c], float) else row[c] for c in columns]]
                      for name, row in rows.items())
    return path


def test_fits_from_the_testbed_table_recover_the_lines_of_the_listed_models(tmp_path):
    table = write_testbed(tmp_path / "robustness_top1s.csv", made_up_testbed())
    standard = tmp_path / "standard.txt"
    standard.write_text("# the standard models\nstd-1\nstd-2\n\nstd-3\nstd-4\n")
    fits = fit_from_testbed(table, models_file=standard)
    assert list(fits) == ["imagenetv2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet"]
    digest = hashlib.sha256(table.read_bytes()).hexdigest()
    for task, (slope, intercept) in LINES.items():
        assert fits[task].slope == pytest.approx(slope, abs=1e-9), task
        assert fits[task].intercept == pytest.approx(intercept, abs=1e-9), task
        assert f"robustness_top1s.csv sha256 {digest}" in fits[task].source
        assert f"over {3 if task == 'objectnet' else 4} models: the models listed in standard.txt" in fits[task].source
    assert "logit(imagenet-r) on logit(val-on-imagenet-r-classes)" in fits["imagenet_r"].source
    # Without the list, every row: the models above the lines pull them up, and the source says so.
    every = fit_from_testbed(table, ["imagenet_r"])
    assert list(every) == ["imagenet_r"]
    assert every["imagenet_r"].predict(70.0) > fits["imagenet_r"].predict(70.0) + 1
    assert "over 6 models: every model of robustness_top1s.csv" in every["imagenet_r"].source


@pytest.mark.parametrize("change, message", [
    ("drop:val-on-objectnet-classes", "no column 'val-on-objectnet-classes', which the objectnet fit needs"),
    ("drop:model", "no 'model' column"),
    ("cell:std-2:imagenet-r:n/a", "line 3 (model 'std-2'), column 'imagenet-r': 'n/a' is not a number"),
    ("cell:std-3:val:100", "line 4 (model 'std-3'), column 'val': accuracy 100 is not strictly between 0 and 100"),
    ("cell:std-1:imagenet-a:0.0", "column 'imagenet-a': accuracy 0 is not strictly between 0 and 100"),
    ("models:std-1,std-2,std-4", "objectnet: 2 model(s) of the models listed in models.txt"),  # std-4: no ObjectNet
    ("models:std-1,std-9", "model list"),
])
def test_a_bad_testbed_table_is_refused_naming_file_column_and_row(tmp_path, change, message):
    rows, drop, models = made_up_testbed(), None, None
    kind, _, rest = change.partition(":")
    if kind == "drop":
        drop = rest
    elif kind == "cell":
        model, column, value = rest.split(":")
        rows[model][column] = value
    else:
        models = tmp_path / "models.txt"
        models.write_text("\n".join(rest.split(",")) + "\n")
    if drop == "model":
        path = tmp_path / "t.csv"
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([["name", "val"], ["std-1", "50"]])
    else:
        path = write_testbed(tmp_path / "t.csv", rows, drop)
    with pytest.raises(UserError, match="t.csv|models.txt") as err:
        fit_from_testbed(path, models_file=models)
    assert message in str(err.value)
    if "std-4" in rest:
        assert "have both 'val-on-objectnet-classes' and 'objectnet-1.0-beta'; a fit needs at least 3" in str(err.value)
    if "std-9" in rest:
        assert "1 name(s) are no model of" in str(err.value) and "std-9" in str(err.value)


# ------------------------------------------------------------------------- flamingo robustness
@pytest.fixture(scope="module")
def sweep(tmp_path_factory, lm_dir, clip_dir):
    """Two saved tiny models (a base and a 'fine-tuned' one with other gates) and the synthetic shift."""
    from conftest import build_with_vision, randomize_gates

    from flamingo.model.weights import save_pretrained

    root = tmp_path_factory.mktemp("robustness")
    for name, gates in (("base", 0.3), ("tuned", 0.9)):
        model = build_with_vision(lm_dir("llama"), clip_dir)
        randomize_gates(model, gates)
        save_pretrained(model, root / name)
    data = make_shapes_shift(root / "shift", 18, image_size=40)
    return root, data


@pytest.mark.usefixtures("one_torch_thread")
def test_sweep_endpoints_score_what_flamingo_eval_gives_the_two_models(sweep, capsys):
    root, data = sweep
    common = ["--data", str(data), "--shots", "0", "--trials", "1", "--batch-size", "6", "--no-progress"]
    assert main(["robustness", "--wise", str(root / "base"), str(root / "tuned"), "--alphas", "0:1:0.5", "--force",
                 "--id", "shapes", "--ood", "shapes_sketch", "--fit", "shapes_sketch=1,-0.5", "--out",
                 str(root / "wise"), *common]) == 0
    table = capsys.readouterr().out
    assert "| wise-ft alpha=0.5 | 0.5 |" in table and "ER shapes_sketch" in table
    report = json.loads((root / "wise" / "robustness.json").read_text())
    assert [m["alpha"] for m in report["models"]] == [0.0, 0.5, 1.0]
    assert not (root / "wise" / "wise-ft-models").exists()  # the sweep's model folders are removed
    assert (root / "wise" / "robustness.png").stat().st_size > 1000
    def ranked(path: Path) -> list:
        return [json.loads(line)["ranked"] for line in path.read_text().splitlines()]

    endpoints = [ranked(root / "wise" / "evals" / f"wise-ft_alpha={a}" / "predictions" / "shapes_sketch.jsonl")
                 for a in (0, 1)]
    assert endpoints[0] != endpoints[1]  # the two models differ, so a swapped endpoint would be caught
    for alpha, model in ((0.0, "base"), (1.0, "tuned")):
        out = root / f"eval-{model}"
        assert main(["eval", "--model", str(root / model), "--task", "shapes,shapes_sketch", "--out", str(out),
                     "--no-card", *common]) == 0
        evaluated = json.loads((out / "results.json").read_text())["tasks"]
        row = next(m for m in report["models"] if m["alpha"] == alpha)
        assert row["id"]["accuracy"] == evaluated["shapes"]["shots"]["0"]["mean"]["top-1"]
        assert row["ood"]["shapes_sketch"]["accuracy"] == evaluated["shapes_sketch"]["shots"]["0"]["mean"]["top-1"]
        for task in ("shapes", "shapes_sketch"):  # the same ranking of every query, not just the same score
            ours = (root / "wise" / "evals" / f"wise-ft_alpha={alpha:g}" / "predictions" / f"{task}.jsonl")
            theirs = out / "predictions" / f"{task}.jsonl"
            assert ranked(ours) == ranked(theirs)
        fit_prediction = LinearFit(1, -0.5).predict(row["id"]["accuracy"])
        assert row["ood"]["shapes_sketch"]["effective_robustness"] == pytest.approx(
            row["ood"]["shapes_sketch"]["accuracy"] - fit_prediction)


@pytest.mark.usefixtures("one_torch_thread")
def test_fit_from_the_testbed_pairs_each_shift_with_imagenet_on_its_classes(sweep, tmp_path, names_file, capsys):
    root, _ = sweep
    val = tmp_path / "imagenet" / "val"
    # goldfish: R only; n01498041: R and A; analog clock: ObjectNet only; banana: R, A and ObjectNet; tench: none.
    for wnid, colour in (("n01443537", "orange"), ("n01498041", "grey"), ("n02708093", "white"),
                         ("n07753592", "yellow"), ("n01440764", "green")):
        picture(val / wnid / "a.JPEG", colour, 24)
        for n in range(2):  # the zero-shot prompt's text-only examples come from the train split
            picture(tmp_path / "imagenet" / "train" / wnid / f"t{n}.JPEG", colour, 24)
    picture(tmp_path / "r" / "n01443537" / "r.jpg", "orange", 24)
    picture(tmp_path / "a" / "n07753592" / "a.jpg", "yellow", 24)
    picture(tmp_path / "v2" / "0" / "v.jpeg", "green", 24)
    objectnet = write_objectnet(tmp_path / "objectnet")
    names, mappings = str(names_file), str(objectnet / "mappings")
    train = {"media": str(tmp_path / "imagenet" / "train"), "class_names": names}
    data = tmp_path / "data.yaml"
    data.write_text(json.dumps({"tasks": {
        "imagenet": {"test": {"media": str(val), "class_names": names}, "train": train},
        "imagenetv2": {"test": {"media": str(tmp_path / "v2"), "class_names": names}, "train": train},
        "imagenet_r": {"test": {"media": str(tmp_path / "r"), "class_names": names}, "train": train},
        "imagenet_a": {"test": {"media": str(tmp_path / "a"), "class_names": names}, "train": train},
        "objectnet": {"test": {"media": str(objectnet / "images"), "annotations": mappings, "class_names": names},
                      "train": {**train, "annotations": mappings}}}}))
    table = write_testbed(tmp_path / "robustness_top1s.csv", made_up_testbed())
    standard = tmp_path / "standard.txt"
    standard.write_text("std-1\nstd-2\nstd-3\nstd-4\n")
    out = tmp_path / "out"
    assert main(["robustness", "--model", str(root / "base"), "--data", str(data), "--out", str(out),
                 "--fit-from", str(table), "--fit-models", str(standard), "--batch-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "over the models of --fit-models" in printed and "imagenet_r: slope 0.8000, intercept -0.9000" in printed
    assert "| imagenet_on_r_classes (ID) |" in printed
    report = json.loads((out / "robustness.json").read_text())
    assert report["id_pairs"] == {"imagenetv2": "imagenet", "imagenet_r": "imagenet_on_r_classes",
                                  "imagenet_a": "imagenet_on_a_classes", "objectnet": "imagenet_on_objectnet_classes"}
    (predictions,) = (out / "evals").glob("*/predictions")  # the one model's flamingo eval output
    r_names = {class_names()[w] for w in IMAGENET_R_WNIDS}
    records = [json.loads(line) for line in (predictions / "imagenet_on_r_classes.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["n01443537/a.JPEG", "n01498041/a.JPEG", "n07753592/a.JPEG"]
    assert all(set(r["ranked"]) <= r_names and len(r["ranked"]) == 5 for r in records)  # ranked among R's classes
    records = [json.loads(line) for line in (predictions / "imagenet_on_objectnet_classes.jsonl").read_text()
               .splitlines()]
    assert sorted(r["id"] for r in records) == ["n02708093/a.JPEG", "n07753592/a.JPEG"]
    fits = fit_from_testbed(table, list(report["ood_tasks"]), standard)
    row = report["models"][0]
    for task, paired in report["id_pairs"].items():
        assert report["fits"][task]["source"] == fits[task].source
        id_accuracy = row["id"]["accuracy"] if paired == "imagenet" else row["paired_id"][paired]["accuracy"]
        assert row["ood"][task]["predicted"] == pytest.approx(fits[task].predict(id_accuracy))
    assert (out / "robustness.png").stat().st_size > 1000


def test_bad_robustness_options_are_one_line_errors(sweep, capsys):
    root, data = sweep
    base = ["robustness", "--data", str(data), "--out", str(root / "x")]
    for argv, message in [
        (base, "give the models to compare"),
        (base + ["--wise", "a", "b"], "--wise needs --alphas"),
        (base + ["--model", "embedded"], "no ImageNet shift"),
        (base + ["--model", "embedded", "--id", "shapes", "--ood", "coco"], "coco is not a classification task"),
        (base + ["--model", "embedded", "--id", "shapes", "--ood", "shapes_sketch", "--fit", "shapes=1,0"],
         "a fit is given for shapes"),
        (base + ["--model", "embedded", "--fit-models", "standard.txt"], "--fit-models names the models of"),
        (base + ["--model", "embedded", "--id", "shapes", "--ood", "shapes_sketch", "--fit-from", "t.csv"],
         "--fit-from: the testbed's lines are fitted against ImageNet accuracies; the ID task is shapes"),
        (base + ["--model", "embedded", "--ood", "shapes_sketch", "--fit-from", "t.csv"],
         "none of which is an OOD task of this run"),
        (base + ["--model", "embedded", "--ood", "imagenet_r", "--fit-from", "missing.csv"],
         "testbed table missing.csv: cannot be read"),
    ]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--wise", "a", "b", "--alphas", "0:2:0.5"])
    assert "distinct alphas in [0, 1]" in capsys.readouterr().err


def test_the_synthetic_shift_dataset(tmp_path):
    from flamingo.data import procedural
    from flamingo.evaluation import load_data_config
    from flamingo.evaluation.suite import load_subsets
    from flamingo.evaluation.settings import EvalSettings
    from flamingo.outputs import OutputExistsError

    data = load_data_config(make_shapes_shift(tmp_path / "shift", 10, image_size=32))
    kinds = sorted(procedural.kinds("train"))
    for task in ("shapes", "shapes_sketch"):
        subsets = load_subsets(get_task(task), data, EvalSettings(shots=[0]))
        assert sorted({s.label for s in subsets.query}) == kinds and len(subsets.query) == 2 * len(kinds)
        assert all("id/train" in str(s.media) for s in subsets.support)  # demos from the fine-tuning style
    scene = procedural.sample_scene(np.random.default_rng(0), "train", kind="star")
    assert procedural.render_sketch(scene, 32).tobytes() == procedural.render_sketch(scene, 32).tobytes()
    with pytest.raises(OutputExistsError):
        make_shapes_shift(tmp_path / "shift", 10)
