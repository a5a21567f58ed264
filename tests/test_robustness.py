"""Robustness under distribution shift: the ImageNet shifts' loaders on tiny fixtures in their
official layouts (class indices, subsets and ObjectNet's mapping files checked), effective
robustness on hand-made numbers, and `flamingo robustness` (a WiSE-FT sweep whose endpoints score
what `flamingo eval` gives the two models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from flamingo.data.benchmarks.data_config import SplitPaths
from flamingo.data.benchmarks.imagenet_classes import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, IMAGENET_WNIDS
from flamingo.data.benchmarks.loaders import LOADERS, class_names_of
from flamingo.data.benchmarks.media import VideoSampling, read_media
from flamingo.data.benchmarks.samples import EvalDataError
from flamingo.data.benchmarks.tasks import get_task
from flamingo.evaluation.aggregate import score_records

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
    assert frames[0].size == (10, 10) and {c for _, c in frames[0].getcolors()} == {(0, 0, 255)}  # the red frame is gone
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
