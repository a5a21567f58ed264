"""Real drawn objects with labels, offline: Debian's Open Clip Art (`openclipart-png`, ~8,000 PNGs in
a category tree) and Tux Paint stamps (`tuxpaint-stamps-default`, ~800 PNGs, each with an English
caption such as "A beaver."). Install them first:

    apt-get install openclipart-png tuxpaint-stamps-default

The folders are the labels: `CATEGORIES` maps folders of both packages onto object categories
("bird", "fruit", "boat", ...), each in a coarse category ("animal", "food", "vehicle", ...);
images in other folders (icons, flags, arrows, ...) are not used. `HELD_OUT` categories never
appear in training: evaluation binds new words to them and asks for their coarse category.

From the catalogue, documents of `flamingo.data.procedural.Segment`s, like the procedural ones:
- caption: one object on a background, its stamp caption ("A beaver.") or "A drawing of a bird.";
- qa: "What is this?" / "What kind of thing is this?" (the coarse category) / "What kind of
  animal is this?";
- scene: two or three objects side by side, "a bird, a car and a flower";
- binding: new words bound to object categories inside the prompt ("This is a dax.");
- instance: the same with each word bound to one drawing, shown anew each time (matching what is seen);
- induction: "Output: X", X the object's category or its coarse category, shown only by example.
Backgrounds are the procedural ones (plain, gradient, noise) or crops of scikit-image's texture
photos. Everything is a pure function of the numpy Generator passed in and the installed files.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from flamingo.data.procedural import (Scene, Segment, Split, answered_episode, render,
                                      word_binding_episode)
from flamingo.data.sources import keyed_rng
from flamingo.errors import UserError
from flamingo.outputs import check_output_dir, publish, staging_dir

INSTALL = "apt-get install openclipart-png tuxpaint-stamps-default"
ROOT_ENV = "FLAMINGO_CLIPART_ROOT"  # where share/ lives: <root>/openclipart/png, <root>/tuxpaint/stamps
DEFAULT_ROOT = "/usr/share"
PACKAGES = {"openclipart": "openclipart/png", "tuxpaint": "tuxpaint/stamps"}
COARSE = ("animal", "food", "plant", "vehicle", "clothing", "instrument", "building", "tool", "person")


class ClipartError(UserError):
    """The clip-art packages are missing or hold no usable image."""


@dataclass(frozen=True)
class Category:
    name: str  # "bird"
    coarse: str  # "animal"
    openclipart: tuple[str, ...] = ()  # folders under openclipart/png, with their subfolders
    tuxpaint: tuple[str, ...] = ()  # folders under tuxpaint/stamps, with their subfolders
    held_out: bool = False


CATEGORIES: tuple[Category, ...] = (
    Category("bird", "animal", ("animals/birds",), ("animals/birds",)),
    Category("fish", "animal", ("animals/fish",), ("animals/fish", "animals/shellfish")),
    Category("insect", "animal", ("animals/bugs",), ("animals/insects",), held_out=True),
    Category("dog", "animal", ("animals/mammals/dogs",), ("animals/mammals/dogs",)),
    Category("cat", "animal", ("animals/mammals/housecats", "animals/mammals/big_cats"), ("animals/mammals/cats",)),
    Category("bear", "animal", ("animals/mammals/bears",), ("animals/mammals/bears",)),
    Category("horse", "animal", ("animals/mammals/horses",), ("animals/mammals/equines",), held_out=True),
    Category("dinosaur", "animal", ("animals/dinosaurs",), ("animals/dinosaur",)),
    Category("mammal", "animal", ("animals/mammals",), ("animals/mammals", "animals/marsupials")),
    Category("fruit", "food", ("food/fruit",), ("food/fruit",)),
    Category("vegetable", "food", ("food/vegetables",), ("food/vegetables",), held_out=True),
    Category("dessert", "food", ("food/desserts",), ("food/dessert",)),
    Category("drink", "food", ("food/beverages",)),
    Category("bread", "food", ("food/breads_and_carbs",)),
    Category("flower", "plant", ("plants/flowers",), ("plants/flowers",)),
    Category("tree", "plant", ("plants/trees",), ("plants/trees",), held_out=True),
    Category("plant", "plant", ("plants",), ("plants",)),
    Category("car", "vehicle", ("transportation/vehicles",), ("vehicles/auto", "vehicles/race", "vehicles/emergency")),
    Category("boat", "vehicle", ("transportation/boating",), ("vehicles/ship",), held_out=True),
    Category("train", "vehicle", (), ("vehicles/locomotive", "vehicles/masstransit")),
    Category("hat", "clothing", ("people/clothing/hats",), ("clothes/hats",), held_out=True),
    Category("garment", "clothing", ("people/clothing",), ("clothes",)),
    Category("musical instrument", "instrument", ("recreation/music",), ("hobbies/music",)),
    Category("house", "building", ("buildings/homes",), ("town/houses",)),
    Category("tool", "tool", ("tools",), ("household/tools",)),
    Category("person", "person", ("people",), ("people",)),
)
# Subfolders of mapped folders that hold something else (body parts, smileys, weapons, ...).
EXCLUDED = {"openclipart": ("people/bodypart", "people/smilies", "people/clothing/pantyhose", "people/clothing/jewelry",
                            "tools/weapons", "tools/toys"),
            "tuxpaint": ("people/body_parts", "people/cartoon", "clothes/armor")}
HELD_OUT = tuple(c.name for c in CATEGORIES if c.held_out)
BACKGROUND_PHOTOS = ("brick.png", "grass.png", "gravel.png", "page.png", "text.png", "hubble_deep_field.jpg")


@dataclass(frozen=True)
class ClipartItem:
    path: Path
    category: Category
    stamp_caption: str | None = None  # a Tux Paint stamp's English caption, when it is a plain description

    @property
    def name(self) -> str:
        """What the object is, with its article: "a beaver" (short stamp captions) or "a bird"."""
        caption = self.stamp_caption
        if caption and len(caption.split()) <= 4 and re.match(r"^An? [a-z]", caption) and caption.endswith("."):
            return caption[0].lower() + caption[1:-1]
        return with_article(self.category.name)

    @property
    def caption(self) -> str:
        return self.stamp_caption or f"A drawing of {with_article(self.category.name)}."


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _stamp_caption(txt: Path) -> str | None:
    """The English first line of a stamp's .txt, kept when it reads as a plain description."""
    try:
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    if re.match(r"^(A|An|The|Some|Two|Three) [^!?|=]{1,70}\.$", first) and len(first.split()) <= 10:
        return first
    return None


MAX_PIXELS = 4096 * 4096  # a few clip-art PNGs are posters of 100+ megapixels: not worth decoding


def _usable(path: Path) -> bool:
    """Whether the PNG's header reads and its size is reasonable (the pixels are decoded later)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return 16 <= min(image.size) and image.width * image.height <= MAX_PIXELS
    except (OSError, SyntaxError, ValueError):
        return False


def _category_of(package: str, folder: str) -> Category | None:
    """The category of a folder: its longest mapped prefix (an excluded prefix maps to None)."""
    best: tuple[int, Category | None] = (-1, None)
    for category in CATEGORIES:
        for prefix in getattr(category, package):
            if (folder == prefix or folder.startswith(prefix + "/")) and len(prefix) > best[0]:
                best = (len(prefix), category)
    for prefix in EXCLUDED[package]:
        if (folder == prefix or folder.startswith(prefix + "/")) and len(prefix) > best[0]:
            best = (len(prefix), None)
    return best[1]


class ClipartCatalogue:
    """The labelled images found under a root (see `ROOT_ENV`), by category."""

    def __init__(self, items: Sequence[ClipartItem], root: Path) -> None:
        self.root = root
        self.items = list(items)
        self.by_category: dict[str, list[ClipartItem]] = {}
        for item in self.items:
            self.by_category.setdefault(item.category.name, []).append(item)
        self.categories = {c.name: c for c in CATEGORIES if c.name in self.by_category}

    @classmethod
    def scan(cls, root: str | Path) -> ClipartCatalogue:
        root = Path(root)
        items: list[ClipartItem] = []
        found = []
        for package, sub in PACKAGES.items():
            base = root / sub
            if not base.is_dir():
                continue
            found.append(package)
            for path in sorted(base.rglob("*.png")):
                category = _category_of(package, path.parent.relative_to(base).as_posix())
                if category is not None and _usable(path):
                    txt = path.with_suffix(".txt")
                    caption = _stamp_caption(txt) if package == "tuxpaint" and txt.is_file() else None
                    items.append(ClipartItem(path, category, caption))
        if not found:
            raise ClipartError(f"no clip-art packages under {root} (expected {root / PACKAGES['openclipart']} or "
                               f"{root / PACKAGES['tuxpaint']}); install them: {INSTALL} (or set {ROOT_ENV})")
        catalogue = cls(items, root)
        missing = [c for split in ("train", "eval") for c in [catalogue.names(split)] if len(c) < 2]
        if missing:
            raise ClipartError(f"the clip-art under {root} has too few labelled categories (train: "
                               f"{len(catalogue.names('train'))}, held-out: {len(catalogue.names('eval'))}; need 2 "
                               f"each); install the full packages: {INSTALL}")
        return catalogue

    def names(self, split: Split) -> tuple[str, ...]:
        """Category names of the split (held-out ones for "eval")."""
        return tuple(n for n, c in self.categories.items() if c.held_out == (split == "eval"))

    def coarse(self, split: Split) -> tuple[str, ...]:
        used = {self.categories[n].coarse for n in self.names(split)}
        return tuple(c for c in COARSE if c in used)

    def pick(self, rng: np.random.Generator, split: Split, category: str | None = None) -> ClipartItem:
        category = category or self.names(split)[int(rng.integers(len(self.names(split))))]
        pool = self.by_category[category]
        return pool[int(rng.integers(len(pool)))]


def catalogue(root: str | Path | None = None) -> ClipartCatalogue:
    """The catalogue under `root` (default: $FLAMINGO_CLIPART_ROOT, else /usr/share), scanned once."""
    return _scan_cached(str(Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).resolve()))


@functools.lru_cache(maxsize=4)
def _scan_cached(root: str) -> ClipartCatalogue:
    return ClipartCatalogue.scan(root)


@functools.lru_cache(maxsize=4096)
def object_image(path: Path, max_side: int = 192) -> Image.Image:
    """The object as RGBA, its longer side at most `max_side` (cached: decoding dominates)."""
    with Image.open(path) as image:
        image = image.convert("RGBA")
    image.thumbnail((max_side, max_side))
    return image


def package_photos(names: Sequence[str]) -> dict[str, Image.Image]:
    """Real photos from scikit-image's data folder, found without importing the package
    (empty when it is not installed)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return {Path(n).stem: Image.open(folder / n).convert("RGB") for n in names if (folder / n).is_file()}


@functools.lru_cache(maxsize=1)
def _texture_photos() -> tuple[Image.Image, ...]:
    return tuple(package_photos(BACKGROUND_PHOTOS).values())


def background(rng: np.random.Generator, size: int, photos: bool = True) -> Image.Image:
    """A procedural background (plain, gradient or noise, random colour) or, a third of the time
    when scikit-image is installed, a random crop of one of its texture photos."""
    textures = _texture_photos() if photos else ()
    if textures and rng.random() < 1 / 3:
        photo = textures[int(rng.integers(len(textures)))]
        side = int(min(photo.size) * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(photo.width - side + 1)), int(rng.integers(photo.height - side + 1))
        return photo.crop((x, y, x + side, y + side)).resize((size, size))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    style = ("plain", "plain", "gradient", "noise")[int(rng.integers(4))]
    return render(Scene((), colour, style, int(rng.integers(2**31))), size)


def compose(objects: Sequence[Image.Image], rng: np.random.Generator, size: int,
            backdrop: Image.Image | None = None) -> Image.Image:
    """Paste the RGBA objects side by side (random scale, height and mirroring) on the backdrop."""
    image = (backdrop if backdrop is not None else background(rng, size)).convert("RGB").copy()
    slot = size / len(objects)
    for i, obj in enumerate(objects):
        scale = float(rng.uniform(0.6, 0.95)) * min(slot / obj.width, size / obj.height)
        obj = obj.resize((max(1, int(obj.width * scale)), max(1, int(obj.height * scale))))
        if rng.random() < 0.5:
            obj = ImageOps.mirror(obj)
        x = int(i * slot + rng.uniform(0, max(0.0, slot - obj.width)))
        y = int(rng.uniform(0, max(0.0, size - obj.height)))
        image.paste(obj, (x, y), obj)
    return image


def object_segment(catalogue: ClipartCatalogue, rng: np.random.Generator, size: int, split: Split,
                   category: str | None = None) -> tuple[Segment, ClipartItem]:
    """One object of the split (of `category` when given) on a background; text empty."""
    item = catalogue.pick(rng, split, category)
    return Segment(compose([object_image(item.path)], rng, size), [], caption=item.caption), item


# -------------------------------------------------------------------------------- documents
def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def question_answer(item: ClipartItem, rng: np.random.Generator) -> tuple[str, str]:
    coarse = item.category.coarse
    choices = [("What is this?", f" {item.name}"), ("What kind of thing is this?", f" {coarse}")]
    if coarse not in ("person", "tool", "instrument"):
        choices.append((f"What kind of {coarse} is this?", f" {with_article(item.category.name)}"))
    return choices[int(rng.integers(len(choices)))]


def caption_document(catalogue: ClipartCatalogue, rng: np.random.Generator, size: int,
                     split: Split = "train") -> list[Segment]:
    segment, item = object_segment(catalogue, rng, size, split)
    segment.text = [(item.caption, True)]
    return [segment]


def qa_document(catalogue: ClipartCatalogue, rng: np.random.Generator, size: int,
                split: Split = "train") -> list[Segment]:
    segment, item = object_segment(catalogue, rng, size, split)
    question, answer = question_answer(item, rng)
    segment.text = [(f"Question: {question} Answer:", False), (answer, True)]
    return [segment]


def scene_document(catalogue: ClipartCatalogue, rng: np.random.Generator, size: int,
                   split: Split = "train") -> list[Segment]:
    """Two or three objects of different categories, captioned left to right."""
    names = catalogue.names(split)
    chosen = [names[int(i)] for i in rng.choice(len(names), size=2 + int(rng.integers(2)), replace=False)]
    items = [catalogue.pick(rng, split, c) for c in chosen]
    caption = _join([item.name for item in items])
    image = compose([object_image(item.path) for item in items], rng, size)
    return [Segment(image, [(caption[0].upper() + caption[1:] + ".", True)], caption=caption + ".")]


def binding_episode(catalogue: ClipartCatalogue, rng: np.random.Generator, size: int, split: Split = "train", *,
                    ways: int = 2, shots: int = 4) -> tuple[list[Segment], Segment, str, list[str]]:
    """New made-up words bound to object categories ("This is a dax."): support, query, answer,
    candidates (see `flamingo.data.procedural.word_binding_episode`)."""
    names = catalogue.names(split)
    categories = [names[int(i)] for i in rng.choice(len(names), size=ways, replace=False)]
    return word_binding_episode(rng, categories, split, shots,
                                lambda category: object_segment(catalogue, rng, size, split, category)[0])


def instance_binding_episode(catalogue: ClipartCatalogue, rng: np.random.Generator, size: int,
                             split: Split = "train", *, ways: int = 2, shots: int = 4
                             ) -> tuple[list[Segment], Segment, str, list[str]]:
    """New words bound to individual drawings, not categories: each way is one object of the
    split (two may share a category), composed anew (background, scale, side) every time it is
    shown, the query included. What it trains is matching what is seen, which holds for any
    object, rather than recognising the training categories."""
    pool = [item for name in catalogue.names(split) for item in catalogue.by_category[name]]
    chosen = [pool[int(i)] for i in rng.choice(len(pool), size=ways, replace=False)]

    def draw(way: str) -> Segment:
        item = chosen[int(way)]
        return Segment(compose([object_image(item.path)], rng, size), [], caption=item.caption)

    return word_binding_episode(rng, [str(i) for i in range(ways)], split, shots, draw)


def induction_episode(catalogue: ClipartCatalogue, rng: np.random.Generator, size: int, split: Split = "train", *,
                      shots: int = 4, attribute: Literal["category", "coarse"] | None = None,
                      ) -> tuple[list[Segment], Segment, str, list[str]]:
    """"Output: X", X the object's category or its coarse category (fixed per episode, shown only
    by example); candidates: every category and coarse category of the split."""
    attribute = attribute or ("category", "coarse")[int(rng.integers(2))]

    def draw() -> tuple[Segment, str, str]:
        segment, item = object_segment(catalogue, rng, size, split)
        return segment, "Output:", f" {item.category.name if attribute == 'category' else item.category.coarse}"

    support, query, answer = answered_episode(shots, draw)
    return support, query, answer, [f" {w}" for w in (*catalogue.names(split), *catalogue.coarse(split))]


def category_episode(catalogue: ClipartCatalogue, rng: np.random.Generator, size: int, split: Split = "eval", *,
                     shots: int = 4) -> tuple[list[Segment], Segment, str, list[str]]:
    """"What kind of thing is this?" about objects of the split, answered by the coarse category
    (every coarse category is a candidate)."""
    def draw() -> tuple[Segment, str, str]:
        segment, item = object_segment(catalogue, rng, size, split)
        return segment, "Question: What kind of thing is this? Answer:", f" {item.category.coarse}"

    support, query, answer = answered_episode(shots, draw)
    return support, query, answer, [f" {c}" for c in COARSE]


TASKS = ("caption", "qa", "scene", "binding", "instance", "induction")


def pair(catalogue: ClipartCatalogue, rng: np.random.Generator, size: int, split: Split = "train"
         ) -> tuple[Image.Image, str]:
    """One object of the split on a background and a caption naming it and its coarse category
    ("A beaver. An animal."): an image-text pair for contrastive pretraining of the vision encoder."""
    segment, item = object_segment(catalogue, rng, size, split)
    return segment.image, f"{item.caption} {with_article(item.category.coarse).capitalize()}."


def training_document(catalogue: ClipartCatalogue, task: str, rng: np.random.Generator, size: int) -> list[Segment]:
    """One training document of `task` (caption | qa | scene | binding | instance | induction) over
    the training categories; episode queries become ordinary chunks with their answers as targets."""
    if task == "caption":
        return caption_document(catalogue, rng, size)
    if task == "qa":
        return qa_document(catalogue, rng, size)
    if task == "scene":
        return scene_document(catalogue, rng, size)
    if task in ("binding", "instance", "induction"):
        if task in ("binding", "instance"):
            episode = binding_episode if task == "binding" else instance_binding_episode
            support, query, answer, _ = episode(catalogue, rng, size, ways=2 + int(rng.integers(2)),
                                                shots=3 + int(rng.integers(5)))
        else:
            support, query, answer, _ = induction_episode(catalogue, rng, size, shots=2 + int(rng.integers(4)))
        query.text.append((answer, True))
        return [*support, query]
    raise ValueError(f"unknown clipart task {task!r}; expected one of {TASKS}")


# ------------------------------------------------------------------------------ evaluation
def coarse_vocabulary(catalogue: ClipartCatalogue) -> dict[str, set[str]]:
    """Words that name each coarse category: its name, its categories' names and the nouns of
    its objects' names ("beaver"), singular and plural; words shared by two are dropped."""
    words: dict[str, set[str]] = {c: {c, c + "s"} for c in COARSE}
    for category in CATEGORIES:
        words[category.coarse] |= set(category.name.split()[-1:])
    for item in catalogue.items:
        words[item.category.coarse].add(item.name.split()[-1].lower())
    for vocab in words.values():
        vocab |= {w + ("es" if w.endswith(("s", "x", "sh", "ch")) else "s") for w in vocab}
    shared = {w for c, v in words.items() for w in v if any(w in o for d, o in words.items() if d != c)}
    return {c: v - shared for c, v in words.items()}


def names_coarse_category(text: str, coarse: str, vocabulary: dict[str, set[str]]) -> bool:
    return bool(set(re.findall(r"[a-z]+", text.lower())) & vocabulary[coarse])


def held_out_items(catalogue: ClipartCatalogue, n: int, seed: int = 0) -> list[ClipartItem]:
    """`n` held-out objects, spread evenly over the held-out categories (seeded)."""
    rng = np.random.default_rng(seed)
    pools = [list(catalogue.by_category[c]) for c in catalogue.names("eval")]
    for pool in pools:
        rng.shuffle(pool)
    chosen = [pool[i] for i in range(max(map(len, pools))) for pool in pools if i < len(pool)]
    return chosen[:n]


def show_object(item: ClipartItem, size: int = 224) -> Image.Image:
    """The object alone, centred on white (the fixed view used for captioning evaluation)."""
    obj = object_image(item.path)
    scale = 0.85 * size / max(obj.size)
    obj = obj.resize((max(1, int(obj.width * scale)), max(1, int(obj.height * scale))))
    image = Image.new("RGB", (size, size), (255, 255, 255))
    image.paste(obj, ((size - obj.width) // 2, (size - obj.height) // 2), obj)
    return image


# ---------------------------------------------------------------------------------- shards
def write_shards(out_dir: str | Path, n: int, tasks: dict[str, float] | None = None, seed: int = 0,
                 shard_size: int = 1000, image_size: int = 224, root: str | Path | None = None,
                 overwrite: bool = False, kind: Literal["documents", "pairs"] = "documents",
                 split: Split = "train") -> list[Path]:
    """Write `n` samples as WebDataset shards OUT_DIR/clipart-000000.tar...

    - kind "documents": training documents (tasks mixed by weight), per sample img0.png, img1.png,
      ... and a json {"texts", "images", "source": task} that `flamingo data validate --kind
      interleaved` and the training pipeline read (the loss then falls on all text, not only on
      the answers). Always over the training categories.
    - kind "pairs": image-text pairs of the `split` (`pair`), per sample a .jpg and a .txt, for
      `flamingo pretrain-vision` (`--kind pairs` data); split "eval" gives held-out pairs to watch.

    A non-empty OUT_DIR is refused unless `overwrite` (and then only one holding clipart shards);
    the shards are written to a staging folder that replaces OUT_DIR when all are written."""
    if kind not in ("documents", "pairs") or split not in ("train", "eval"):
        raise ClipartError(f"kind and split: expected documents|pairs and train|eval, got {kind!r} and {split!r}")
    if kind == "pairs" and tasks is not None:
        raise ClipartError("tasks: pairs have no tasks (each is one object and its caption)")
    if kind == "documents" and split != "train":
        raise ClipartError(f"split: documents are over the training categories only, got {split!r} (held-out "
                           f"pairs: kind pairs)")
    tasks = tasks or {t: 1.0 for t in TASKS}
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks or not all(0 < w < math.inf for w in tasks.values()):  # False for NaN too
        raise ClipartError(f"tasks: expected finite positive weights for some of {list(TASKS)}, got {tasks!r}")
    if n < 1 or shard_size < 1:
        raise ClipartError(f"n and shard_size: expected integers >= 1, got {n} and {shard_size}")
    found = catalogue(root)
    out = check_output_dir(out_dir, overwrite, "output folder", ours=("clipart-000000.tar",))
    names, weights = list(tasks), np.array(list(tasks.values()), dtype=np.float64)
    with staging_dir(out) as staged:
        if kind == "pairs":
            _write_pairs(staged, found, n, split, seed, shard_size, image_size)
        else:
            _write_documents(staged, found, n, names, weights, seed, shard_size, image_size)
        publish(staged, out)
    return sorted(out.glob("clipart-*.tar"))


def _shard_writer(folder: Path, shard_size: int):
    from webdataset import ShardWriter

    return ShardWriter(str(folder / "clipart-%06d.tar"), maxcount=shard_size, verbose=0, encoder=False, mtime=0)


def _write_pairs(folder: Path, found: ClipartCatalogue, n: int, split: Split, seed: int, shard_size: int,
                 image_size: int) -> None:
    import io

    with _shard_writer(folder, shard_size) as writer:
        for index in range(n):
            image, caption = pair(found, keyed_rng(seed, index), image_size, split)
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=90)  # ~8x smaller than PNG
            writer.write({"__key__": f"{index:09d}", "jpg": buffer.getvalue(), "txt": caption.encode()})


def _write_documents(folder: Path, found: ClipartCatalogue, n: int, names: list[str], weights: np.ndarray, seed: int,
                     shard_size: int, image_size: int) -> None:
    import io
    import json

    with _shard_writer(folder, shard_size) as writer:
        for index in range(n):
            rng = keyed_rng(seed, index)
            task = names[int(rng.choice(len(names), p=weights / weights.sum()))]
            sample: dict[str, bytes] = {}
            texts: list[str | None] = []
            images: list[str | None] = []
            for segment in training_document(found, task, rng, image_size):
                member = f"img{len(sample)}.png"
                buffer = io.BytesIO()
                segment.image.save(buffer, format="PNG")
                sample[member] = buffer.getvalue()
                texts += [None, "".join(piece for piece, _ in segment.text)]
                images += [member, None]
            sample["json"] = json.dumps({"texts": texts, "images": images, "source": task}).encode()
            writer.write({"__key__": f"{index:09d}", **sample})
