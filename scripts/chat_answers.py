"""Do chats with the embedded model answer, and about the image? (issue 22, "chats that answer")

Each image is sent to `/v1/chat/completions` of the real server app (`flamingo.serving.app.create_app`
over the serving `Engine`, in-process through Starlette's TestClient: the same request parsing, the
family's dialogue prompt (the paper's B.1.6), the engine's greedy decoding and stop strings as
`flamingo serve`, without a socket), once with each question, greedy (temperature 0). Reported, with n
and a 95% Wilson interval:

- the share of non-empty answers;
- procedural scenes (the training kinds and colours): the share naming the object's shape or colour;
- clip-art objects (when Debian's openclipart-png and tuxpaint-stamps-default are installed), half
  of the training categories and half held out, composed on backgrounds as in the episodes: the
  share naming the right coarse category (`flamingo.data.clipart.names_coarse_category`).

    python scripts/chat_answers.py                                # 100 procedural + 50 clip-art images
    python scripts/chat_answers.py --procedural 40 --clipart 20 --show 6
    python scripts/chat_answers.py --model runs/embedded-chat/final --json /tmp/chat.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUESTIONS = ("What is in this image?", "Describe this image.")


@dataclass
class Image:
    image: object  # PIL image
    truth: str  # what it shows, for the report
    group: str  # "procedural" | "clip-art, training categories" | "clip-art, held-out categories"
    right: object  # answer text -> whether it names what the image shows


def procedural_images(n: int, seed: int) -> list[Image]:
    from flamingo.data import procedural

    out = []
    for index in range(n):
        scene = procedural.sample_scene(np.random.default_rng([seed, index]), "train")
        words = {scene.kind, procedural.plural(scene.kind), scene.colour}
        out.append(Image(procedural.render(scene), procedural.describe(scene), "procedural",
                         lambda text, words=words: bool(set(re.findall(r"[a-z]+", text.lower())) & words)))
    return out


def clipart_images(n: int, seed: int) -> list[Image]:
    from flamingo.data import clipart

    catalogue = clipart.catalogue()
    vocabulary = clipart.coarse_vocabulary(catalogue)
    out = []
    for index in range(n):
        rng = np.random.default_rng([seed, 1, index])
        split = "eval" if index % 2 else "train"
        segment, item = clipart.object_segment(catalogue, rng, 224, split)
        coarse = item.category.coarse
        group = f"clip-art, {'held-out' if split == 'eval' else 'training'} categories"
        out.append(Image(segment.image, f"{item.name} ({coarse})", group,
                         lambda text, coarse=coarse: clipart.names_coarse_category(text, coarse, vocabulary)))
    return out


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wilson(correct: int, n: int) -> str:
    from flamingo.evaluation.robustness import wilson_interval

    low, high = wilson_interval(correct, n)
    return f"{100 * correct / max(n, 1):.1f}% ({correct}/{n}; 95% CI {low:.1f}-{high:.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="what `flamingo serve --model` takes (default embedded)")
    parser.add_argument("--procedural", type=int, default=100, help="procedural images (default 100)")
    parser.add_argument("--clipart", type=int, default=50, help="clip-art images, when installed (default 50)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=4, help="answers printed per group")
    parser.add_argument("--json", help="write every answer here")
    args = parser.parse_args()

    from starlette.testclient import TestClient

    from flamingo.cli_options import load_model_quietly
    from flamingo.data.clipart import ClipartError
    from flamingo.errors import UserError
    from flamingo.serving.app import create_app
    from flamingo.serving.engine import Engine
    from flamingo.serving.limits import ServerSettings

    images = procedural_images(args.procedural, args.seed)
    if args.clipart:
        try:
            images += clipart_images(args.clipart, args.seed)
        except ClipartError as error:
            print(f"chat_answers: no clip-art ({error}); procedural images only", file=sys.stderr)
    try:
        model = load_model_quietly(args.model, trust_remote_code=False)
    except UserError as error:
        print(f"chat_answers: {error}", file=sys.stderr)
        return 2
    records = []
    with TestClient(create_app(Engine(model), ServerSettings(model_name="chat-answers"))) as client:
        for number, shown in enumerate(images):
            url = data_url(shown.image)
            for question in QUESTIONS:
                body = {"model": "chat-answers", "temperature": 0, "max_tokens": args.max_tokens,
                        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                  {"type": "text", "text": question}]}]}
                response = client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                choice = response.json()["choices"][0]
                text = choice["message"]["content"] or ""
                records.append({"group": shown.group, "truth": shown.truth, "question": question, "answer": text,
                                "finish": choice["finish_reason"], "non_empty": bool(text.strip()),
                                "right": bool(shown.right(text))})
            if number % 20 == 19:
                print(f"  {number + 1}/{len(images)} images", file=sys.stderr, flush=True)
    print(f"model {args.model}; greedy, max_tokens {args.max_tokens}, questions {' / '.join(QUESTIONS)}; "
          f"one chat per image and question")
    print("| images | chats | non-empty | names the right shape/colour (procedural) or coarse category (clip-art) |")
    print("|---|---|---|---|")
    for group in dict.fromkeys(r["group"] for r in records):
        rows = [r for r in records if r["group"] == group]
        print(f"| {group} | {len(rows)} | {wilson(sum(r['non_empty'] for r in rows), len(rows))} | "
              f"{wilson(sum(r['right'] for r in rows), len(rows))} |")
    clip = [r for r in records if r["group"].startswith("clip-art")]
    if clip:
        print(f"| clip-art, all | {len(clip)} | {wilson(sum(r['non_empty'] for r in clip), len(clip))} | "
              f"{wilson(sum(r['right'] for r in clip), len(clip))} |")
    for group in dict.fromkeys(r["group"] for r in records):
        for r in [r for r in records if r["group"] == group][:args.show]:
            print(f"  {r['truth']:>32} | {r['question']:<24} -> {r['answer']!r} ({r['finish']})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
