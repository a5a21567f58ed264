"""Procedural images with known content, and text about them, for training and measuring
few-shot learning offline (the embedded default model).

A `Scene` is a background and one or more objects, each with a kind (shape), colour, texture,
size and position; `render` draws it with PIL. Every label is a field of the scene, so captions,
answers and word bindings are correct by construction (the tests check this by rendering and
measuring pixels).

Three kinds of text use the scenes:
- captions ("two small red stars") and question/answer pairs (colour, shape, count, position);
- binding episodes: new words are bound to object kinds inside the prompt ("This is a dax."
  ... "This is a") — the model can only answer from the examples in its context;
- task-induction episodes: "Output: X" where X is the colour or the kind, decided per episode
  and shown only by the examples.

Held-out splits make the evaluation honest: `HELD_OUT_KINDS` and `HELD_OUT_COLOURS` never appear
in training scenes, and words are split by a hash so evaluation words are never trained on.
Everything is a pure function of the numpy Generator passed in.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from flamingo.config_io import short
from flamingo.errors import UserError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 205, 30),
    "purple": (135, 55, 175), "orange": (245, 135, 25), "black": (25, 25, 25), "white": (250, 250, 250),
    "grey": (128, 128, 128), "pink": (245, 130, 190), "brown": (120, 72, 35), "cyan": (40, 200, 215),
}
KINDS = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "pentagon", "crescent",
         "heart", "arrow", "ring")
TEXTURES = ("solid", "striped", "dotted")
HELD_OUT_KINDS = ("heart", "arrow", "ring")
HELD_OUT_COLOURS = ("pink", "brown", "cyan")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
Split = Literal["train", "eval"]


def kinds(split: Split) -> tuple[str, ...]:
    return tuple(k for k in KINDS if (k in HELD_OUT_KINDS) == (split == "eval"))


def colours(split: Split) -> tuple[str, ...]:
    return tuple(c for c in COLOURS if (c in HELD_OUT_COLOURS) == (split == "eval"))


@dataclass(frozen=True)
class SceneObject:
    kind: str
    colour: str
    texture: str
    centre: tuple[float, float]  # in [0, 1] image coordinates
    radius: float  # fraction of the image side

    @property
    def size_word(self) -> str:
        return "small" if self.radius < 0.2 else "large"

    @property
    def position_word(self) -> str:
        x, y = self.centre
        if abs(x - 0.5) >= abs(y - 0.5):
            return "left" if x < 0.5 else "right"
        return "top" if y < 0.5 else "bottom"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    background_style: str = "plain"  # plain | gradient | noise
    seed: int = 0  # of the background noise

    @property
    def kind(self) -> str:
        return self.objects[0].kind

    @property
    def colour(self) -> str:
        return self.objects[0].colour


# --------------------------------------------------------------------------------- rendering
def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(phase + 2 * math.pi * i / n), cy + radius * math.sin(phase + 2 * math.pi * i / n))
                for i in range(n)]

    if kind == "square":
        return ring(4, r * 1.25, math.pi / 4)
    if kind == "triangle":
        return ring(3, r * 1.2, -math.pi / 2)
    if kind == "diamond":
        return [(cx, cy - r * 1.2), (cx + r * 0.8, cy), (cx, cy + r * 1.2), (cx - r * 0.8, cy)]
    if kind == "hexagon":
        return ring(6, r, 0.0)
    if kind == "pentagon":
        return ring(5, r * 1.05, -math.pi / 2)
    if kind == "star":
        outer, inner = ring(5, r * 1.2, -math.pi / 2), ring(5, r * 0.5, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if kind == "cross":
        a = r * 0.38
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    if kind == "arrow":
        a = r * 0.35
        return [(cx - r, cy - a), (cx + 0.1 * r, cy - a), (cx + 0.1 * r, cy - r), (cx + r, cy),
                (cx + 0.1 * r, cy + r), (cx + 0.1 * r, cy + a), (cx - r, cy + a)]
    if kind == "heart":
        points = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + r * x / 16, cy - r * (y + 2) / 16))
        return points
    raise UserError(f"unknown object kind {short(kind)}; expected one of {KINDS}")


def _shape_mask(kind: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    elif kind == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - 0.45 * r, cy - 1.05 * r, cx + 1.35 * r, cy + 0.75 * r), fill=0)
    else:
        draw.polygon(_polygon(kind, cx, cy, r), fill=255)
    return mask


def _texture_fill(obj: SceneObject, size: int) -> Image.Image:
    """The object's colour, with stripes or dots of a darker/lighter shade for textures."""
    base = np.array(COLOURS[obj.colour], dtype=np.float32)
    shade = base * 0.55 if base.mean() > 90 else base * 0.4 + 150
    fill = np.broadcast_to(base, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(4, int(size * 0.06))
    if obj.texture == "striped":
        fill[((xx + yy) // period) % 2 == 1] = shade
    elif obj.texture == "dotted":
        dots = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 4) ** 2
        fill[dots] = shade
    return Image.fromarray(fill.astype(np.uint8))


def render(scene: Scene, size: int = 224) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size` pixels."""
    bg = np.array(scene.background, dtype=np.float32)
    if scene.background_style == "gradient":
        ramp = np.linspace(0.75, 1.15, size, dtype=np.float32)[:, None, None]
        pixels = np.broadcast_to(bg * ramp, (size, size, 3))
    elif scene.background_style == "noise":
        noise = np.random.default_rng(scene.seed).normal(0, 12, (size, size, 1)).astype(np.float32)
        pixels = bg + noise
    else:
        pixels = np.broadcast_to(bg, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    for obj in scene.objects:
        cx, cy, r = obj.centre[0] * size, obj.centre[1] * size, obj.radius * size
        image.paste(_texture_fill(obj, size), (0, 0), _shape_mask(obj.kind, size, cx, cy, r))
    return image


def render_sketch(scene: Scene, size: int = 224) -> Image.Image:
    """The scene's objects as dark ink outlines on ruled or checkered paper: a drawing style and a
    background family that `render` never produces (the synthetic distribution shift of `flamingo
    data shapes --kind shift`). The paper and ink are a pure function of `scene.seed`."""
    rng = np.random.default_rng(scene.seed)
    paper = rng.integers(200, 256, 3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(3, int(size * rng.uniform(0.06, 0.14)))
    if rng.random() < 0.5:
        marks = (yy % period) == 0  # ruled lines
    else:
        marks = ((xx // period) + (yy // period)) % 2 == 1  # a checkerboard
    pixels = np.broadcast_to(paper, (size, size, 3)).copy()
    pixels[marks] = paper * 0.85
    image = Image.fromarray(pixels.astype(np.uint8))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    width = max(1, size // 48)
    for obj in scene.objects:
        mask = _shape_mask(obj.kind, size, obj.centre[0] * size, obj.centre[1] * size, obj.radius * size)
        inner = mask.filter(ImageFilter.MinFilter(2 * width + 1))
        outline = Image.fromarray(((np.array(mask) > 0) & (np.array(inner) == 0)).astype(np.uint8) * 255)
        image.paste(ink, (0, 0), outline)
    return image


# ---------------------------------------------------------------------------------- sampling
def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _background(rng: np.random.Generator, object_colours: set[str]) -> tuple[tuple[int, int, int], str]:
    """A background colour far enough from every object colour to keep the objects visible."""
    while True:
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if all(np.abs(np.array(colour) - COLOURS[c]).sum() > 150 for c in object_colours):
            return colour, _pick(rng, ("plain", "plain", "gradient", "noise"))


def sample_scene(rng: np.random.Generator, split: Split = "train", *, kind: str | None = None,
                 colour: str | None = None, count: int = 1, texture: str | None = None) -> Scene:
    """A scene of `count` objects of one kind and colour (random unless given), placed without overlap."""
    kind = kind or _pick(rng, kinds(split))
    colour = colour or _pick(rng, colours(split))
    texture = texture or _pick(rng, TEXTURES)
    radius = float(rng.uniform(0.12, 0.3)) if count == 1 else float(rng.uniform(0.08, 0.13))
    objects: list[SceneObject] = []
    while len(objects) < count:
        centre = (float(rng.uniform(radius + 0.05, 0.95 - radius)), float(rng.uniform(radius + 0.05, 0.95 - radius)))
        if all(math.dist(centre, o.centre) > 2.3 * radius for o in objects):
            objects.append(SceneObject(kind, colour, texture, centre, radius))
    background, style = _background(rng, {colour})
    return Scene(tuple(objects), background, style, int(rng.integers(2**31)))


# ------------------------------------------------------------------------------------ words
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "bl", "dr", "gl", "sn", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "x", "g", "k", "p", "t", "m", "n", "sh", "ck")


def word_split(word: str) -> Split:
    """Which split a made-up word belongs to: one in five words is reserved for evaluation."""
    return "eval" if zlib.crc32(word.encode()) % 5 == 0 else "train"


def new_word(rng: np.random.Generator, split: Split = "train") -> str:
    """A pronounceable made-up word ("dax", "blicket"-like) of the given split."""
    while True:
        syllables = 1 + int(rng.integers(2))
        word = "".join(_pick(rng, _ONSETS) + _pick(rng, _VOWELS) for _ in range(syllables)) + _pick(rng, _CODAS)
        if 3 <= len(word) <= 8 and word_split(word) == split:
            return word


# -------------------------------------------------------------------------------- documents
@dataclass
class Segment:
    """One chunk of a document: an image (or None for text only) followed by text pieces.

    `text` is a list of (piece, is_target): targets are what a model is trained/evaluated to
    produce; the rest is prompt. The chunk ends with <|endofchunk|>.
    """

    image: Image.Image | None
    text: list[tuple[str, bool]] = field(default_factory=list)
    scene: Scene | None = None
    caption: str | None = None  # the image's true caption when it is not a rendered scene

    def true_caption(self) -> str:
        """What the image shows, as a sentence ("A small red star.")."""
        text = self.caption if self.caption is not None else describe(self.scene) + "."
        return text[0].upper() + text[1:]


def plural(kind: str) -> str:
    return kind + ("es" if kind.endswith(("s", "x", "sh", "ch")) else "s")


def describe(scene: Scene) -> str:
    """A caption: "a small striped red star" / "three red stars"."""
    obj = scene.objects[0]
    texture = "" if obj.texture == "solid" else f"{obj.texture} "
    if len(scene.objects) > 1:
        return f"{NUMBER_WORDS[len(scene.objects)]} {texture}{obj.colour} {plural(obj.kind)}"
    article = "an" if (obj.size_word + texture)[0] in "aeiou" else "a"
    return f"{article} {obj.size_word} {texture}{obj.colour} {obj.kind}"


def question_answer(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    obj = scene.objects[0]
    choices = [(f"What colour is the {obj.kind}?", obj.colour), ("What shape is this?", obj.kind),
               (f"How many {plural(obj.kind)} are there?", NUMBER_WORDS[len(scene.objects)])]
    if len(scene.objects) == 1:
        choices.append((f"Where is the {obj.kind}?", f"on the {obj.position_word}"))
    return choices[int(rng.integers(len(choices)))]


def caption_document(rng: np.random.Generator, size: int, split: Split = "train") -> list[Segment]:
    scene = sample_scene(rng, split, count=1 + int(rng.integers(3)) if rng.random() < 0.3 else 1)
    return [Segment(render(scene, size), [(describe(scene), True)], scene)]


def qa_document(rng: np.random.Generator, size: int, split: Split = "train") -> list[Segment]:
    scene = sample_scene(rng, split, count=1 + int(rng.integers(4)) if rng.random() < 0.3 else 1)
    question, answer = question_answer(scene, rng)
    return [Segment(render(scene, size), [(f"Question: {question} Answer:", False), (f" {answer}", True)], scene)]


def binding_episode(rng: np.random.Generator, size: int, split: Split = "train", *, ways: int = 2, shots: int = 4,
                    by: Literal["kind", "colour"] = "kind") -> tuple[list[Segment], Segment, str, list[str]]:
    """Support chunks binding new made-up words to object kinds (or colours) — "This is a dax." —
    then a query chunk. Returns (support, query, answer, candidate labels); the query's text is
    the prompt only."""
    pool = kinds(split) if by == "kind" else colours(split)
    categories = [str(c) for c in rng.choice(pool, size=ways, replace=False)]

    def draw(category: str) -> Segment:
        scene = sample_scene(rng, split, **({"kind": category} if by == "kind" else {"colour": category}))
        return Segment(render(scene, size), [], scene)

    return word_binding_episode(rng, categories, split, shots, draw)


def word_binding_episode(rng: np.random.Generator, categories: list[str], split: Split, shots: int,
                         draw: Callable[[str], Segment]) -> tuple[list[Segment], Segment, str, list[str]]:
    """A binding episode over any categories: `draw(category)` makes an image chunk of that
    category (text empty); one new word of `split` per category, each shown once before any
    repeats, then a query of a random category. Returns (support, query, answer, candidates)."""
    ways = len(categories)
    labels = [new_word(rng, split) for _ in categories]
    while len(set(labels)) < ways:
        labels = [new_word(rng, split) for _ in categories]
    order = [i % ways for i in range(shots)]  # every category shown once before any repeats
    rng.shuffle(order)

    def chunk(index: int, answer: bool | None) -> Segment:
        segment = draw(categories[index])
        segment.text = [("This is a", False)] + ([(f" {labels[index]}.", answer)] if answer is not None else [])
        return segment

    # A label is a target only once it has been shown: its first appearance is unpredictable.
    support = [chunk(i, i in order[:n]) for n, i in enumerate(order)]
    target = int(rng.integers(ways))
    return support, chunk(target, None), f" {labels[target]}.", [f" {w}." for w in labels]


def answered_episode(shots: int, draw: Callable[[], tuple[Segment, str, str]]) -> tuple[list[Segment], Segment, str]:
    """`shots` chunks of a new image each, its prompt and its answer (a target), then a query
    chunk whose text is the prompt only; `draw()` gives (image chunk, prompt, answer). Returns
    (support, query, the query's answer)."""
    def chunk(with_answer: bool) -> tuple[Segment, str]:
        segment, prompt, answer = draw()
        segment.text = [(prompt, False)] + ([(answer, True)] if with_answer else [])
        return segment, answer

    support = [chunk(True)[0] for _ in range(shots)]
    query, answer = chunk(False)
    return support, query, answer


def _answered_episode(rng: np.random.Generator, size: int, split: Split, shots: int,
                      prompt_and_answer: Callable[[Scene], tuple[str, str]]) -> tuple[list[Segment], Segment, str]:
    def draw() -> tuple[Segment, str, str]:
        scene = sample_scene(rng, split)
        return Segment(render(scene, size), [], scene), *prompt_and_answer(scene)

    return answered_episode(shots, draw)


def induction_episode(rng: np.random.Generator, size: int, split: Split = "train", *, shots: int = 4,
                      attribute: str | None = None) -> tuple[list[Segment], Segment, str, list[str]]:
    """"Output: X" chunks where X is the colour or the kind of the object, fixed per episode and
    shown only by example; candidates are every colour and kind word of the split."""
    attribute = attribute or _pick(rng, ("colour", "kind"))
    support, query, answer = _answered_episode(
        rng, size, split, shots, lambda scene: ("Output:", f" {scene.colour if attribute == 'colour' else scene.kind}"))
    return support, query, answer, [f" {w}" for w in (*colours(split), *kinds(split))]


def question_episode(rng: np.random.Generator, size: int, split: Split = "train", *, shots: int = 4,
                     attribute: Literal["kind", "colour"] = "kind") -> tuple[list[Segment], Segment, str, list[str]]:
    """Perception: "What shape is this?" / "What colour is the X?" about new scenes, after `shots`
    answered examples; candidates are every kind (or colour) of the split."""
    def prompt_and_answer(scene: Scene) -> tuple[str, str]:
        if attribute == "kind":
            return "Question: What shape is this? Answer:", f" {scene.kind}"
        return f"Question: What colour is the {scene.kind}? Answer:", f" {scene.colour}"

    support, query, answer = _answered_episode(rng, size, split, shots, prompt_and_answer)
    return support, query, answer, [f" {w}" for w in (kinds(split) if attribute == "kind" else colours(split))]


def training_document(task: str, rng: np.random.Generator, size: int) -> list[Segment]:
    """One training document of `task` (caption | qa | binding | induction); episode queries
    become ordinary chunks with their answers as targets."""
    if task == "caption":
        return caption_document(rng, size)
    if task == "qa":
        return qa_document(rng, size)
    if task in ("binding", "induction"):
        if task == "binding":
            by = "kind" if rng.random() < 0.8 else "colour"
            support, query, answer, _ = binding_episode(rng, size, ways=2 + int(rng.integers(2)),
                                                        shots=3 + int(rng.integers(5)), by=by)
        else:
            support, query, answer, _ = induction_episode(rng, size, shots=2 + int(rng.integers(4)))
        query.text.append((answer, True))
        return [*support, query]
    raise UserError(f"unknown procedural task {short(task)}; expected caption, qa, binding or induction")
