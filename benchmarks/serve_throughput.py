"""Serving throughput: our engine vs a sequential baseline, on the embedded default model.

The same 64 requests, all arriving at once: 32 few-shot requests (8-shot prompts
`<image>Output: <caption>.<|endofchunk|>` over one shared support set, then a query image) and
32 chat requests (the paper's dialogue prompt, one image, a question), greedy, up to
`--max-tokens` new tokens.

- Ours: `flamingo.serving.engine.Engine` in this process (continuous batching up to
  `--max-running` sequences, prefills of `--prefill-chunk` requests before decode steps, the prefix
  cache: the support set is encoded once).
- Baseline: one request at a time, Hugging Face-style: each prompt encoded from scratch (its
  images re-encoded, no state shared between requests), then KV-cached greedy decoding
  (`encode_prompts` + `generate`, i.e. `generate_text`).

Fairness: both sides run in this process (not through HTTP) on the same model (its vision encoder
fused for inference, as `flamingo serve` does) with the same torch threads, and are
warmed up on a chat and a few-shot prompt first (the engine then has the chat preamble cached, as a
server that has answered one chat; the warm-up few-shot prompt has its own support set, so the
measured run still encodes its support set once). The order is engine, baseline, engine again (a
fresh engine, same warm-up): the engine's figures are the mean of its two runs, so a machine load
that drifts during the run biases neither side. Only one thread computes at a time, and only it
holds OpenMP worker threads (the engine's thread, or the main thread for the baseline, with the
engine stopped): an idle second team makes libgomp throttle the other's parallel regions.

Printed: requests/s and generated tokens/s of each, p50/p95 latency (arrival to last token),
the answers that differ between the two, and the time to first token of prefix-cache hits vs the
baseline's for the same prompts: under load (the few-shot requests of the 64 after the first) and
one request at a time (8 new few-shot queries sent to the idle, warm engine, then to the baseline).

    flock /tmp/flamingo-cpu.lock python benchmarks/serve_throughput.py [--requests 64] [--max-tokens 16]

The last line is `serving throughput vs sequential baseline: X.XXx` (baseline time / ours).

With `--quantize int8` (or int4), the model is then loaded again with its frozen linear layers
weight-only quantized (`load_model(..., quantize=)`, torchao), a fresh engine over it is warmed up
the same way and its support set cached, and the same probes measure its time to first token of a
prefix-cache hit one at a time, against the fp32 baseline of this run; that ratio is then the last
line: `int8 engine, prefix-cache hit, one at a time, vs the fp32 baseline: X.XXx`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time

import numpy as np
import torch

from flamingo.data.procedural import describe, render, sample_scene
from flamingo.inference.chat import DIALOGUE_PROMPT
from flamingo.inference.generation import GenerationConfig, generate
from flamingo.inference.prompt import Prompt, encode_prompt_media
from flamingo.inference.state import encode_prompts
from flamingo.model.image_processing import decode_image
from flamingo.model.weights import load_model
from flamingo.serving.engine import Engine, EngineConfig, EngineRequest, SamplingParams

CHAT_STOPS = ("\nUser:", "User:")


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_requests(count: int, shots: int, max_tokens: int, seed: int = 0) -> list[EngineRequest]:
    """Few-shot and chat requests, alternating; the few-shot ones share one support set."""
    rng = np.random.default_rng(seed)
    support = [sample_scene(rng) for _ in range(shots)]
    support_text = "".join(f"<image>Output: {describe(scene)}.<|endofchunk|>" for scene in support)
    support_images = [png(render(scene)) for scene in support]
    requests = []
    for i in range(count):
        scene = sample_scene(rng)
        if i % 2 == 0:
            requests.append(EngineRequest(support_text + "<image>Output:", support_images + [png(render(scene))],
                                          SamplingParams(max_tokens=max_tokens)))
        else:
            question = f"What colour is the {scene.kind}?" if i % 4 == 1 else "What shape is this?"
            requests.append(EngineRequest(f"{DIALOGUE_PROMPT}User: <image>{question}\nFlamingo:", [png(render(scene))],
                                          SamplingParams(max_tokens=max_tokens, stop=CHAT_STOPS)))
    return requests


def baseline_one(model, request: EngineRequest) -> tuple[str, int, float]:
    """(text, generated tokens, seconds to the first visible text) of one request, from scratch."""
    start = time.perf_counter()
    first: list[float] = []
    prompt = Prompt(request.text, [[decode_image(data)] for data in request.images])
    state = encode_prompts(model, [prompt], max_new_tokens=request.params.max_tokens)
    config = GenerationConfig(max_new_tokens=request.params.max_tokens, stop_strings=request.params.stop)
    result = generate(model, state, config, on_text=lambda row, text: first or first.append(time.perf_counter()))[0]
    return result.text, len(result.token_ids), (first[0] if first else time.perf_counter()) - start


def hit_floor(model, probes: list[EngineRequest]) -> float:
    """Seconds of the least work any prefix-cache hit needs (median over the probes): its query
    image through the vision encoder and resampler, and one forward pass of the bare LM over the
    tokens after the cached support set (no context, no cross-attention: on a CPU this pass is
    bound by reading the LM's weights)."""
    def work(request: EngineRequest) -> float:
        suffix = request.text.rsplit(model.config.end_of_chunk_token, 1)[-1]  # "<image>Output:"
        ids = torch.tensor([model.tokenizer(suffix, add_special_tokens=False)["input_ids"]])
        start = time.perf_counter()
        encode_prompt_media(model, [Prompt("<image>", [[decode_image(request.images[-1])]])])
        model.lm(input_ids=ids, logits_to_keep=1)
        return time.perf_counter() - start

    with torch.inference_mode():
        work(probes[0])
        return statistics.median(work(probe) for probe in probes)


def run_baseline(model, requests: list[EngineRequest]) -> dict:
    start = time.perf_counter()
    texts, tokens, first, latencies = [], 0, [], []
    for request in requests:  # all arrived at `start`: each waits for the ones before it
        began = time.perf_counter() - start
        text, generated, ttft = baseline_one(model, request)
        texts.append(text)
        tokens += generated
        first.append(began + ttft)
        latencies.append(time.perf_counter() - start)
    return {"seconds": time.perf_counter() - start, "texts": texts, "tokens": tokens, "first": first,
            "latencies": latencies}


async def engine_one(engine: Engine, request: EngineRequest, start: float, stream=None) -> tuple[str, int, float, float]:
    """(text, generated tokens, time to first text, latency), times from `start`."""
    text, tokens, first = "", 0, None
    async for delta in stream or engine.generate(request):
        if delta.text and first is None:
            first = time.perf_counter() - start
        text += delta.text
        if delta.finish_reason is not None:
            tokens = delta.completion_tokens
    return text, tokens, first if first is not None else time.perf_counter() - start, time.perf_counter() - start


async def run_engine(engine: Engine, requests: list[EngineRequest]) -> dict:
    start = time.perf_counter()
    streams = [engine.generate(request) for request in requests]  # all arrive at once
    results = await asyncio.gather(*(engine_one(engine, r, start, s) for r, s in zip(requests, streams)))
    return {"seconds": time.perf_counter() - start, "texts": [r[0] for r in results],
            "tokens": sum(r[1] for r in results), "first": [r[2] for r in results],
            "latencies": [r[3] for r in results]}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def report(name: str, run: dict, count: int) -> None:
    lat = run["latencies"]
    print(f"{name:9s} {run['seconds']:7.2f} s   {count / run['seconds']:6.2f} requests/s   "
          f"{run['tokens'] / run['seconds']:7.1f} tokens/s   latency p50 {percentile(lat, 50):6.2f} s  "
          f"p95 {percentile(lat, 95):6.2f} s")


async def warm_engine(model, config: EngineConfig, warm_up: list[EngineRequest]) -> Engine:
    engine = Engine(model, config)
    await engine.start()
    for request in warm_up:
        await engine_one(engine, request, time.perf_counter())
    return engine


def mean_run(runs: list[dict]) -> dict:
    """The mean of runs of the same requests: seconds and times per request (texts, tokens: the first run's)."""
    def mean(key: str) -> list[float]:
        return [statistics.fmean(values) for values in zip(*(run[key] for run in runs))]
    return {**runs[0], "seconds": statistics.fmean(run["seconds"] for run in runs), "first": mean("first"),
            "latencies": mean("latencies")}


async def main_async(args: argparse.Namespace) -> None:
    model = load_model("embedded")
    model.fuse_for_inference()  # as flamingo serve does; the baseline uses the same model
    requests = make_requests(args.requests, args.shots, args.max_tokens)
    probes = [r for r in make_requests(2 * args.ttft_probes, args.shots, args.max_tokens, seed=1)[::2]]
    probes = [EngineRequest(requests[0].text, requests[0].images[:-1] + p.images[-1:], p.params) for p in probes]
    # Warm-up: a chat and a few-shot prompt over another support set (the measured support set stays uncached).
    warm_up = make_requests(2, args.shots, args.max_tokens, seed=2)
    print(f"{len(requests)} requests ({sum(len(r.images) > 1 for r in requests)} {args.shots}-shot, the others "
          f"chat), max {args.max_tokens} new tokens, greedy; torch threads {torch.get_num_threads()}")

    config = EngineConfig(max_queue=max(64, args.requests), max_running=args.max_running,
                          prefill_chunk=args.prefill_chunk)
    for request in warm_up:  # allocator, kernels
        baseline_one(model, request)
    engine = await warm_engine(model, config, warm_up)
    try:
        first_run = await run_engine(engine, requests)
    finally:
        await engine.stop()
    baseline = run_baseline(model, requests)
    engine = await warm_engine(model, config, warm_up)
    try:
        runs = [first_run, await run_engine(engine, requests)]
        ours = mean_run(runs)
        report("baseline", baseline, len(requests))
        report("engine", ours, len(requests))
        print(f"          (the engine's two runs, before and after the baseline: "
              f"{runs[0]['seconds']:.2f} s and {runs[1]['seconds']:.2f} s)")
        differ = sorted({i for run in runs for i, (a, b) in enumerate(zip(run["texts"], baseline["texts"])) if a != b})
        print(f"answers that differ from the baseline's (either engine run): {len(differ)} of {len(requests)} "
              f"{differ[:10]}")
        # Under load: the few-shot requests after the first are prefix-cache hits in the engine.
        hits = [i for i, r in enumerate(requests) if len(r.images) > 1][1:]
        ours_load = statistics.median(ours["first"][i] for i in hits)
        base_load = statistics.median(baseline["first"][i] for i in hits)
        print(f"time to first token under load, the {len(hits)} prefix-cache hits: {ours_load:.2f} s vs baseline "
              f"{base_load:.2f} s (medians, from the arrival of all {len(requests)}): {base_load / ours_load:.2f}x")

        # Time to first token of prefix-cache hits, one request at a time: the support set is cached by now.
        hits_before = engine.metrics.prefix_cache_hits._value.get()
        engine_ttft = [(await engine_one(engine, probe, time.perf_counter()))[2] for probe in probes]
        assert engine.metrics.prefix_cache_hits._value.get() - hits_before == len(probes), "expected cache hits"
    finally:
        await engine.stop()
    baseline_ttft = [baseline_one(model, probe)[2] for probe in probes]
    ours_ttft, base_ttft = statistics.median(engine_ttft), statistics.median(baseline_ttft)
    print(f"time to first token of one request at a time, {args.shots}-shot prompt, prefix-cache hit: "
          f"{ours_ttft * 1000:.0f} ms vs baseline {base_ttft * 1000:.0f} ms (medians of {len(probes)}): "
          f"{base_ttft / ours_ttft:.2f}x")
    floor = hit_floor(model, probes)
    quantized_ttft = await quantized_hit_ttft(args.quantize, config, warm_up, requests[0], probes) \
        if args.quantize else None
    print(f"  the most a prefix cache can give here: a hit still encodes its query image and runs the LM over "
          f"the query's tokens ({floor * 1000:.0f} ms with no other cost), so at most {base_ttft / floor:.2f}x")
    cache = engine.metrics
    print(f"prefix cache (second engine): {cache.prefix_cache_hits._value.get():.0f} hits, "
          f"{cache.prefix_cache_misses._value.get():.0f} misses, {cache.prefix_cache_bytes._value.get() / 2**20:.1f} MiB")
    print(f"serving throughput vs sequential baseline: {baseline['seconds'] / ours['seconds']:.2f}x")
    if quantized_ttft is not None:
        print(f"{args.quantize} engine, prefix-cache hit, one at a time: {quantized_ttft * 1000:.0f} ms (fp32 engine "
              f"{ours_ttft * 1000:.0f} ms, fp32 baseline {base_ttft * 1000:.0f} ms, medians of {len(probes)})")
        print(f"{args.quantize} engine, prefix-cache hit, one at a time, vs the fp32 baseline: "
              f"{base_ttft / quantized_ttft:.2f}x")


async def quantized_hit_ttft(mode: str, config: EngineConfig, warm_up: list[EngineRequest], support: EngineRequest,
                             probes: list[EngineRequest]) -> float:
    """Median time to first token of the probes (prefix-cache hits: `support` is sent first) on an
    engine over the embedded model quantized with `mode`."""
    quantized = load_model("embedded", quantize=mode)
    quantized.fuse_for_inference()
    engine = await warm_engine(quantized, config, warm_up)
    try:
        await engine_one(engine, support, time.perf_counter())  # its support set, cached
        hits_before = engine.metrics.prefix_cache_hits._value.get()
        ttft = [(await engine_one(engine, probe, time.perf_counter()))[2] for probe in probes]
        assert engine.metrics.prefix_cache_hits._value.get() - hits_before == len(probes), "expected cache hits"
    finally:
        await engine.stop()
    return statistics.median(ttft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=EngineConfig.max_running)
    parser.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk)
    parser.add_argument("--ttft-probes", type=int, default=8)
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="also measure a prefix-cache hit's TTFT on the model quantized so (see above)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
