"""ImageNet and its shifted test sets, in their official layouts.

Every task reads `class_names`, ImageNet's JSON {wnid: class name}: the shifted sets share
ImageNet's class names, prompts and few-shot protocol, and their `train` split (the support
examples) is ImageNet's train folder, restricted to the test set's classes.

- `class_folders` (ImageNet): media/<folder>/<image files>; every folder needs a class name.
- `imagenetv2` (Recht et al. 2019; any of its three variants): media/<0..999>/<image files>, the
  folder being the class index in the standard order (`IMAGENET_WNIDS`).
- `imagenet_sketch` (Wang et al. 2019): media/<wnid>/<image files>, the 1000 classes.
- `imagenet_r`, `imagenet_a`: media/<wnid>/<image files> with the 200 wnids of the set
  (`IMAGENET_R_WNIDS`, `IMAGENET_A_WNIDS`); the candidates are those 200 classes only.
- `objectnet` (Barbu et al. 2019): media = objectnet-1.0/images/<folder>/<image files>,
  annotations = objectnet-1.0/mappings, the dataset's own mapping files:
  folder_to_objectnet_label.json {folder: ObjectNet label}, objectnet_to_imagenet_1k.json
  {ObjectNet label: "ImageNet name; ImageNet name"}, imagenet_to_label_2012_v2 (line i: the name
  of ImageNet 2012 id i) and pytorch_to_imagenet_2012_id.json {standard index: 2012 id}. Only the
  113 ObjectNet classes mapped to ImageNet classes are evaluated (other folders are skipped), over
  the candidates of every mapped ImageNet class; a prediction is right when it is one of the
  ImageNet classes of the image's ObjectNet class. Each image's 1-pixel red border is cropped
  (the dataset's README asks for it; `Sample.extra["crop_border"]`).

ImageNet on a shift's classes (the ID accuracy that effective robustness pairs with ImageNet-R, -A and
ObjectNet, as Taori et al.'s testbed does: `val-on-imagenet-r-classes` etc.): ImageNet's class
folders (media = ImageNet's val or train folder) restricted to the shift's classes, which are the
candidates; a prediction is right when it is the image's class.
- `imagenet_on_r_classes`, `imagenet_on_a_classes`: the 200 classes of ImageNet-R / ImageNet-A.
- `imagenet_on_objectnet_classes`: the ImageNet classes of ObjectNet's 113 mapped classes, read from
  ObjectNet's mappings folder (annotations), as the `objectnet` task reads it.

A test sample carries `extra["classes"]`, the names of the set's candidate classes, so that the
candidates are the whole subset whatever part of it is loaded. A folder that is not a class of its
set is an error naming it (a misplaced or renamed folder would otherwise score as a wrong class).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flamingo.data.benchmarks.data_config import SplitPaths
from flamingo.data.benchmarks.imagenet_classes import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, IMAGENET_WNIDS
from flamingo.data.benchmarks.samples import EvalDataError, Sample, read_json
from flamingo.data.media import IMAGE_EXTS

_INDEX = {wnid: i for i, wnid in enumerate(IMAGENET_WNIDS)}
_INDEX_NAMES = {str(i): i for i in range(len(IMAGENET_WNIDS))}  # ImageNetV2's folders: "0" ... "999"


def _images(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.suffix.lower().lstrip(".") in IMAGE_EXTS]


def _folders(root: Path, where: str) -> list[Path]:
    if not root.is_dir():
        raise EvalDataError(f"data config: {where}.media: {root} is not a folder of class folders")
    return sorted(p for p in root.iterdir() if p.is_dir())


def _class_names(paths: SplitPaths, where: str) -> tuple[Path, dict[str, str]]:
    path = paths.required("class_names", where)
    names = read_json(path, "class names")
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise EvalDataError(f"{path}: expected a JSON object {{folder: class name}}")
    return path, names


def load_class_folders(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    root = paths.required("media", where)
    names_path, names = _class_names(paths, where)
    out = []
    for folder in _folders(root, where):
        if folder.name not in names:
            raise EvalDataError(f"{names_path}: no class name for folder {folder.name!r} of {root}")
        name = names[folder.name]
        out += [Sample(f"{folder.name}/{image.name}", image, answers=[name], label=name) for image in _images(folder)]
    return out


def _subset_names(names_path: Path, names: dict[str, str], wnids: tuple[str, ...]) -> tuple[str, ...]:
    missing = [w for w in wnids if w not in names]
    if missing:
        raise EvalDataError(f"{names_path}: no class name for ImageNet class(es) {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of the {len(wnids)} this task uses)")
    return tuple(names[w] for w in wnids)


def _wnid_samples(paths: SplitPaths, where: str, wnids: tuple[str, ...], dataset: str, *,
                  others_allowed: bool) -> list[Sample]:
    """Samples of wnid class folders; the candidates are `wnids`. A folder of another ImageNet class
    is skipped when `others_allowed` (ImageNet's train folder for a subset) and an error otherwise."""
    root = paths.required("media", where)
    names_path, names = _class_names(paths, where)
    classes = _subset_names(names_path, names, wnids)
    wanted = set(wnids)
    out = []
    for folder in _folders(root, where):
        wnid = folder.name
        if wnid not in _INDEX:
            raise EvalDataError(f"{root}: folder {wnid!r} is not an ImageNet class (a WordNet id such as n01440764)")
        if wnid not in wanted:
            if others_allowed:
                continue
            raise EvalDataError(f"{root}: folder {wnid} is not one of the {len(wnids)} classes of {dataset}")
        name = names[wnid]
        out += [Sample(f"{wnid}/{image.name}", image, answers=[name], label=name, extra={"classes": classes})
                for image in _images(folder)]
    return out


def _shift_loader(wnids: tuple[str, ...], dataset: str) -> Callable[[SplitPaths, str, str], list[Sample]]:
    def load(paths: SplitPaths, split: str, where: str) -> list[Sample]:
        return _wnid_samples(paths, where, wnids, dataset, others_allowed=split == "train")
    return load


load_imagenet_sketch = _shift_loader(IMAGENET_WNIDS, "ImageNet-Sketch")
load_imagenet_r = _shift_loader(IMAGENET_R_WNIDS, "ImageNet-R")
load_imagenet_a = _shift_loader(IMAGENET_A_WNIDS, "ImageNet-A")


def _on_classes_loader(wnids: tuple[str, ...], dataset: str) -> Callable[[SplitPaths, str, str], list[Sample]]:
    """ImageNet (either split) restricted to a shift's classes: its other class folders are skipped."""
    def load(paths: SplitPaths, split: str, where: str) -> list[Sample]:
        return _wnid_samples(paths, where, wnids, dataset, others_allowed=True)
    return load


load_imagenet_on_r_classes = _on_classes_loader(IMAGENET_R_WNIDS, "ImageNet-R")
load_imagenet_on_a_classes = _on_classes_loader(IMAGENET_A_WNIDS, "ImageNet-A")


def load_imagenetv2(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    if split == "train":  # ImageNet's train folder
        return _wnid_samples(paths, where, IMAGENET_WNIDS, "ImageNet", others_allowed=False)
    root = paths.required("media", where)
    names_path, names = _class_names(paths, where)
    classes = _subset_names(names_path, names, IMAGENET_WNIDS)
    out = []
    for folder in _folders(root, where):
        if folder.name not in _INDEX_NAMES:
            raise EvalDataError(f"{root}: folder {folder.name!r} is not an ImageNetV2 class folder (0 to 999)")
        name = classes[_INDEX_NAMES[folder.name]]
        out += [Sample(f"{folder.name}/{image.name}", image, answers=[name], label=name, extra={"classes": classes})
                for image in _images(folder)]
    return out


def objectnet_classes(mappings: Path) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """({image folder: ObjectNet label}, {image folder: the wnids of its ImageNet classes} for the
    ObjectNet classes that map to ImageNet), read from the dataset's mappings folder (module
    docstring), every step checked."""
    folder_labels = read_json(mappings / "folder_to_objectnet_label.json", "ObjectNet folder labels")
    to_imagenet = read_json(mappings / "objectnet_to_imagenet_1k.json", "ObjectNet to ImageNet mapping")
    index_file = mappings / "pytorch_to_imagenet_2012_id.json"
    standard_to_2012 = read_json(index_file, "ImageNet index mapping")
    for value, path in ((folder_labels, "folder_to_objectnet_label.json"),
                        (to_imagenet, "objectnet_to_imagenet_1k.json")):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise EvalDataError(f"{mappings / path}: expected a JSON object of strings")
    if not isinstance(standard_to_2012, dict) or not all(isinstance(v, int) for v in standard_to_2012.values()):
        raise EvalDataError(f"{index_file}: expected a JSON object {{index: 2012 id}}")
    labels_path = mappings / "imagenet_to_label_2012_v2"
    if not labels_path.is_file():
        raise EvalDataError(f"{labels_path}: ImageNet 2012 labels file does not exist")
    lines = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines()]
    wnid_of_2012 = {}
    for index, id_2012 in standard_to_2012.items():
        if index not in _INDEX_NAMES:
            raise EvalDataError(f"{index_file}: key {index!r} is not a class index 0-999")
        wnid_of_2012[id_2012] = IMAGENET_WNIDS[_INDEX_NAMES[index]]
    wnid_of_name = {}
    for id_2012, name in enumerate(lines):
        if id_2012 in wnid_of_2012:
            wnid_of_name[name] = wnid_of_2012[id_2012]
    folder_of_label = {label: folder for folder, label in folder_labels.items()}
    out = {}
    for label, imagenet_names in to_imagenet.items():
        if label not in folder_of_label:
            raise EvalDataError(f"{mappings / 'objectnet_to_imagenet_1k.json'}: ObjectNet label {label!r} has no "
                                f"folder in folder_to_objectnet_label.json")
        wnids = []
        for name in imagenet_names.split("; "):
            if name not in wnid_of_name:
                raise EvalDataError(f"{mappings / 'objectnet_to_imagenet_1k.json'}: {label!r} maps to {name!r}, "
                                    f"which is no line of imagenet_to_label_2012_v2 with an index in {index_file.name}")
            wnids.append(wnid_of_name[name])
        out[folder_of_label[label]] = tuple(wnids)
    return folder_labels, out


OBJECTNET_BORDER = 1  # pixels of red border around every ObjectNet image


def _objectnet_wnids(folders: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The ImageNet classes of ObjectNet's mapped classes, sorted (the standard order)."""
    return tuple(sorted({w for wnids in folders.values() for w in wnids}))


def load_imagenet_on_objectnet_classes(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    _, folders = objectnet_classes(paths.required("annotations", where))
    return _wnid_samples(paths, where, _objectnet_wnids(folders), "ObjectNet", others_allowed=True)


def load_objectnet(paths: SplitPaths, split: str, where: str) -> list[Sample]:
    if split == "train":  # ImageNet's train folder, restricted to ObjectNet's classes
        return load_imagenet_on_objectnet_classes(paths, split, where)
    mappings = paths.required("annotations", where)
    known, folders = objectnet_classes(mappings)
    subset = _objectnet_wnids(folders)
    root = paths.required("media", where)
    names_path, names = _class_names(paths, where)
    classes = _subset_names(names_path, names, subset)
    out = []
    for folder in _folders(root, where):
        if folder.name not in known:
            raise EvalDataError(f"{root}: folder {folder.name!r} is not in "
                                f"{mappings / 'folder_to_objectnet_label.json'}")
        if folder.name not in folders:  # one of the ObjectNet classes without an ImageNet class
            continue
        accepted = [names[w] for w in folders[folder.name]]
        out += [Sample(f"{folder.name}/{image.name}", image, answers=accepted, label=accepted[0],
                       extra={"classes": classes, "crop_border": OBJECTNET_BORDER,
                              "objectnet_label": known[folder.name]})
                for image in _images(folder)]
    return out
