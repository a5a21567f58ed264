"""Batch inference throughput: `flamingo batch` (its in-process API, `run_batch`) vs a loop of
`generate_text` per record (what a user writes today), on the embedded default model.

The dataset: `--records` JSONL records (512 by default) over PNG files in a temporary folder:
three in four are few-shot captioning prompts (`--shots` examples `<image>Output: <caption>.
<|endofchunk|>` from one of 4 support sets, in turn, then `<image>Output:` with a new scene),
one in four a zero-shot caption (`<image>Output:`); greedy, up to `--max-tokens` new tokens
(both sides stop at <|endofchunk|>, their default).

- Ours: `run_batch(model, "records.jsonl", "out.jsonl")`: the records checked as the server checks
  requests, through the serving engine (continuous batching; the prefix cache: each support set
  encoded once); the results file written, as the command does. Timed from the JSONL file.
- Baseline: for each record, its images opened from their files and `generate_text(model,
  text_prompt(prompt, images), max_new_tokens=...)`: each prompt encoded from scratch.

Both run in this process on the same model (its vision encoder fused for inference, as the command
does), after a warm-up of a few records each. The order is ours, baseline, ours again: ours is the
mean of its two runs, so a load that drifts during the run favours neither side. The answers that
differ between the two are counted (near-ties may flip: the engine pads and batches prompts).

    flock /tmp/flamingo-cpu.lock python benchmarks/batch_throughput.py [--records 512] [--max-tokens 10]

The last line is `batch inference vs per-record loop: X.XXx` (baseline time / ours).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402,F401  (offline Hugging Face settings)
from flamingo.data.procedural import describe, render, sample_scene  # noqa: E402
from flamingo.inference import generate_text, text_prompt  # noqa: E402
from flamingo.model.weights import load_model  # noqa: E402
from flamingo.serving.batch import run_batch  # noqa: E402

SUPPORT_SETS = 4


def make_dataset(folder: Path, count: int, shots: int, max_tokens: int, seed: int = 0) -> Path:
    """records.jsonl and its images in `folder` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)

    def image(name: str, scene) -> str:
        render(scene).save(folder / "img" / f"{name}.png")
        return f"img/{name}.png"

    supports = []
    for s in range(SUPPORT_SETS):
        scenes = [sample_scene(rng) for _ in range(shots)]
        text = "".join(f"<image>Output: {describe(scene)}.<|endofchunk|>" for scene in scenes)
        supports.append((text, [image(f"support{s}-{i}", scene) for i, scene in enumerate(scenes)]))
    with open(folder / "records.jsonl", "w") as f:
        for i in range(count):
            query = image(f"query{i}", sample_scene(rng))
            if i % 4 == 3:
                prompt, images = "<image>Output:", [query]
            else:
                text, support_images = supports[i % SUPPORT_SETS]
                prompt, images = text + "<image>Output:", support_images + [query]
            f.write(json.dumps({"id": f"r{i}", "prompt": prompt, "images": images, "max_tokens": max_tokens})
                    + "\n")
    return folder / "records.jsonl"


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def loop(model, records: list[dict], folder: Path) -> tuple[float, dict[str, str]]:
    """The per-record loop: seconds, and the answer of each id."""
    start = time.perf_counter()
    answers = {}
    for record in records:
        images = [Image.open(folder / path).convert("RGB") for path in record["images"]]
        answers[record["id"]] = generate_text(model, text_prompt(record["prompt"], images),
                                              max_new_tokens=record["max_tokens"])
    return time.perf_counter() - start, answers


def batch(model, jsonl: Path, out: Path) -> tuple[float, dict[str, str]]:
    """`flamingo batch`'s in-process run: seconds, and the answer of each id."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    summary = run_batch(model, jsonl, out, progress=False)
    seconds = time.perf_counter() - start
    assert summary.rejected == 0, f"{summary.rejected} records rejected: {summary.reasons}"
    return seconds, {r["id"]: r["text"] for r in read_records(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=10)
    parser.add_argument("--warm-up", type=int, default=4, help="records each side runs before it is timed")
    args = parser.parse_args()

    model = load_model("embedded")
    model.fuse_for_inference()  # as flamingo batch does; the loop uses the same model
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jsonl = make_dataset(folder, args.records, args.shots, args.max_tokens)
        warm = make_dataset(folder / "warm", args.warm_up, args.shots, args.max_tokens, seed=1)
        records = read_records(jsonl)
        print(f"{len(records)} records ({sum(len(r['images']) > 1 for r in records)} {args.shots}-shot over "
              f"{SUPPORT_SETS} support sets, the others zero-shot captions), up to {args.max_tokens} new tokens, "
              f"greedy; torch threads {torch.get_num_threads()}")
        batch(model, warm, folder / "warm" / "out.jsonl")  # allocator, kernels
        loop(model, read_records(warm), folder / "warm")
        first, ours = batch(model, jsonl, folder / "out.jsonl")
        baseline, theirs = loop(model, records, folder)
        second, _ = batch(model, jsonl, folder / "out.jsonl")
    mean = statistics.fmean([first, second])
    differ = sorted((key for key in theirs if ours.get(key) != theirs[key]), key=lambda k: int(k[1:]))
    print(f"per-record loop {baseline:8.2f} s   {len(records) / baseline:7.2f} records/s")
    print(f"flamingo batch  {mean:8.2f} s   {len(records) / mean:7.2f} records/s   (its two runs, before and after "
          f"the loop: {first:.2f} s and {second:.2f} s)")
    print(f"answers that differ from the loop's: {len(differ)} of {len(records)} {differ[:10]}")
    print(f"batch inference vs per-record loop: {baseline / mean:.2f}x")


if __name__ == "__main__":
    main()
