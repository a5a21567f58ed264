"""The serving engine's image cache: time to first token of requests that send images the server has
seen before, in new contexts, with the cache vs without it (`image_cache_bytes=0`), on the embedded
default model.

A pool of `--images` procedural images. Each measured request shows `--per-request` of them, drawn
from the pool in a new order, and asks a short question about them (`<image>...<image>Question:
which of these shows a red circle? Answer:`): every image was seen before, but no prompt shares its
images' order with an earlier one, so the prefix cache does not help and every image is encoded
again without the image cache. Greedy, one new token (the time to the first token is what the cache
changes), one request at a time on an idle engine. The gain is the share of the images' encoding in
the time to the first token: the LM's prefill of the prompt's text is the rest, so prompts with
long text around their images (few-shot captions) gain less.

Fairness: both configurations are the same `Engine` in this process, with the prefix cache on, on
the same model (its vision encoder fused, as `flamingo serve` runs it), each a fresh engine warmed
up by one request per pool image (which fills the image cache, as a server that has seen them); the
order is without, with, without, with, ... (`--reps` pairs), and each side's figure is the median
over all its requests, so a drifting machine load biases neither side. The answers of the two are
compared (the cache must not change them).

    flock /tmp/flamingo-cpu.lock python benchmarks/image_cache.py [--requests 16] [--reps 2] [--per-request 8]

The last line is `image cache: TTFT of requests reusing images in new contexts X.XXx faster (...)`
(median without / median with).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
import torch
from loadtest import png_bytes, served_model

from flamingo.data.procedural import describe, render, sample_scene
from flamingo.serving.engine import Engine, EngineConfig, EngineRequest, SamplingParams


def make_requests(pool: list, captions: list[str], count: int, per_request: int, seed: int = 1
                  ) -> list[EngineRequest]:
    """`count` questions, each about `per_request` images of the pool in an order not used before."""
    rng = np.random.default_rng(seed)
    seen, requests = set(), []
    while len(requests) < count:
        order = tuple(int(i) for i in rng.permutation(len(pool))[:per_request])
        if order in seen:
            continue
        seen.add(order)
        text = "<image>" * per_request + f"Question: which of these shows {captions[order[0]]}? Answer:"
        requests.append(EngineRequest(text, [pool[i] for i in order], SamplingParams(max_tokens=1)))
    return requests


async def first_token(engine: Engine, request: EngineRequest) -> tuple[str, float]:
    start = time.perf_counter()
    text, seconds = "", None
    async for delta in engine.generate(request):
        if seconds is None:
            seconds = time.perf_counter() - start
        text += delta.text
    return text, seconds


async def run_side(model, cache_bytes: int, warm_up: list[EngineRequest], requests: list[EngineRequest]
                   ) -> tuple[list[str], list[float], tuple[float, float]]:
    engine = Engine(model, EngineConfig(image_cache_bytes=cache_bytes))
    await engine.start()
    try:
        for request in warm_up:
            await first_token(engine, request)
        texts, seconds = [], []
        for request in requests:
            text, ttft = await first_token(engine, request)
            texts.append(text)
            seconds.append(ttft)
        metrics = engine.metrics
        return texts, seconds, (metrics.image_cache_hits._value.get(), metrics.image_cache_misses._value.get())
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--images", type=int, default=12, help="images in the pool")
    parser.add_argument("--per-request", type=int, default=8, help="images per request")
    parser.add_argument("--requests", type=int, default=16, help="measured requests per run")
    parser.add_argument("--reps", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not 1 <= args.per_request <= args.images:
        parser.error("--per-request: expected 1 to --images")

    model = served_model(args.model, args.threads)
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(args.images)]
    pool, captions = [png_bytes(render(scene)) for scene in scenes], [describe(scene) for scene in scenes]
    warm_up = [EngineRequest("<image>Output:", [image], SamplingParams(max_tokens=1)) for image in pool]
    requests = make_requests(pool, captions, args.requests, args.per_request)

    sides = {"without": 0, "with": EngineConfig().image_cache_bytes}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    texts: dict[str, list[str]] = {}
    counts: dict[str, tuple[float, float]] = {}
    with torch.inference_mode():
        for _ in range(args.reps):
            for name, cache_bytes in sides.items():
                got, times, counts[name] = asyncio.run(run_side(model, cache_bytes, warm_up, requests))
                assert texts.setdefault(name, got) == got, f"{name}: answers changed between runs"
                seconds[name] += times

    differing = sum(a != b for a, b in zip(texts["without"], texts["with"]))
    print(f"model {args.model}, {args.threads} torch threads; {args.requests} requests x {args.reps} runs per side, "
          f"each {args.per_request} images from a pool of {args.images} in a new order, and a question")
    for name in sides:
        values = sorted(seconds[name])
        hits, misses = counts[name]
        print(f"{name:>7} the image cache: TTFT median {1000 * statistics.median(values):.0f} ms, "
              f"p90 {1000 * values[int(0.9 * (len(values) - 1))]:.0f} ms (image cache hits {hits:.0f}, "
              f"misses {misses:.0f} in the last run, warm-up included)")
    print(f"answers differing between the two: {differing} of {len(requests)}")
    without, with_cache = (statistics.median(seconds[name]) for name in ("without", "with"))
    print(f"image cache: TTFT of requests reusing images in new contexts {without / with_cache:.2f}x faster "
          f"({1000 * without:.0f} ms without, {1000 * with_cache:.0f} ms with)")


if __name__ == "__main__":
    main()
