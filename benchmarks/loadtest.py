"""A bounded load test of a running server: N requests at concurrency C, with images, half of them
streamed; counts statuses, lost requests (no complete answer) and measures latency and
time to first token. Used by `benchmarks/serve_load.py` and the tests; loopback targets only.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class LoadResult:
    requests: int
    wall_s: float
    statuses: Counter = field(default_factory=Counter)   # HTTP status -> count (0: no response at all)
    latencies_s: list[float] = field(default_factory=list)  # of complete answers
    ttfts_s: list[float] = field(default_factory=list)      # streamed answers: until the first text
    lost: int = 0                                            # no complete answer (no [DONE], cut, timeout)
    problems: list[str] = field(default_factory=list)        # the first few, for the report

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    def summary(self) -> str:
        def ms(values: list[float], q: float) -> str:
            return f"{np.percentile(values, q) * 1000:.0f} ms" if values else "n/a"

        statuses = ", ".join(f"{s}: {c}" for s, c in sorted(self.statuses.items()))
        return (f"{self.requests} requests in {self.wall_s:.1f} s ({self.requests / self.wall_s:.2f} req/s); "
                f"statuses {{{statuses}}}; 5xx: {self.server_errors}; lost: {self.lost}\n"
                f"latency p50 {ms(self.latencies_s, 50)}, p95 {ms(self.latencies_s, 95)}; "
                f"time to first token (streamed) p50 {ms(self.ttfts_s, 50)}, p95 {ms(self.ttfts_s, 95)}")


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def procedural_images(count: int, seed: int = 0) -> list:
    """`count` procedural scenes (PIL images), the same for a given seed: the benchmarks' pictures."""
    from flamingo.data.procedural import render, sample_scene

    rng = np.random.default_rng(seed)
    return [render(sample_scene(rng)) for _ in range(count)]


def served_model(name: str, threads: int):
    """The model `name` as `flamingo serve` runs it: in eval mode, its vision encoder fused, on `threads`
    torch threads."""
    import torch

    from flamingo.cli_options import load_model_quietly

    torch.set_num_threads(threads)
    model = load_model_quietly(name, trust_remote_code=False).eval()
    model.fuse_for_inference()
    return model


def mixed_requests(count: int, images: list[str], model: str, max_tokens: int = 8) -> list[tuple[str, dict]]:
    """`count` requests cycling through chat (1 image), completions (2 images, a 1-shot prompt) and
    rank; every other chat/completion request is streamed."""
    out = []
    for i in range(count):
        first, second = images[i % len(images)], images[(i + 1) % len(images)]
        stream = i % 2 == 0
        kind = i % 5
        if kind in (0, 1, 2):
            out.append(("/v1/chat/completions", {
                "model": model, "max_tokens": max_tokens, "stream": stream, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": first}},
                    {"type": "text", "text": f"What is in this image? ({i})"}]}]}))
        elif kind == 3:
            out.append(("/v1/completions", {
                "model": model, "max_tokens": max_tokens, "stream": stream, "images": [first, second],
                "prompt": "<image>Output: a shape.<|endofchunk|><image>Output:"}))
        else:
            out.append(("/v1/rank", {"model": model, "prompt": "<image>This is a", "images": [first],
                                     "candidates": [" circle", " square", " star"]}))
    return out


async def _one(client: httpx.AsyncClient, path: str, body: dict, result: LoadResult) -> None:
    start = time.perf_counter()
    first_text = None
    try:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as response:
                result.statuses[response.status_code] += 1
                if response.status_code != 200:
                    result.problems.append(f"{path}: HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                    return
                done = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        result.problems.append(f"{path}: error in stream: {chunk['error']['message'][:200]}")
                        break
                    if first_text is None and any(c.get("text") or c.get("delta", {}).get("content")
                                                  for c in chunk["choices"]):
                        first_text = time.perf_counter() - start
                if not done:
                    result.lost += 1
                    return
        else:
            response = await client.post(path, json=body)
            result.statuses[response.status_code] += 1
            if response.status_code != 200 or not response.json().get("choices", response.json().get("results")):
                result.problems.append(f"{path}: HTTP {response.status_code}: {response.text[:200]}")
                if response.status_code >= 500:
                    result.lost += 1
                return
    except (httpx.HTTPError, asyncio.TimeoutError, json.JSONDecodeError) as err:
        result.statuses[0] += 1
        result.lost += 1
        result.problems.append(f"{path}: {type(err).__name__}: {err}")
        return
    result.latencies_s.append(time.perf_counter() - start)
    if first_text is not None:
        result.ttfts_s.append(first_text)


async def run_load(base_url: str, requests: list[tuple[str, dict]], concurrency: int,
                   request_timeout_s: float = 300.0, api_key: str | None = None) -> LoadResult:
    """Send `requests` (path, JSON body) with at most `concurrency` in flight; each is bounded by
    `request_timeout_s` (a request over it counts as lost)."""
    result = LoadResult(requests=len(requests), wall_s=0.0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=request_timeout_s,
                                 limits=limits) as client:
        async def bounded(path: str, body: dict) -> None:
            async with gate:
                try:
                    await asyncio.wait_for(_one(client, path, body, result), request_timeout_s)
                except asyncio.TimeoutError:
                    result.statuses[0] += 1
                    result.lost += 1
                    result.problems.append(f"{path}: no answer within {request_timeout_s} s")

        start = time.perf_counter()
        await asyncio.gather(*(bounded(path, body) for path, body in requests))
        result.wall_s = time.perf_counter() - start
    return result
