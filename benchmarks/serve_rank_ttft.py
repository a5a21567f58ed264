"""Time to first token of chats while a heavy /v1/rank runs, in the serving engine: the ranking
runs as a batch of its own, and between its forward passes the decode batch takes a step or
admits waiting requests (`--no-interleave`: as before, the chats wait for the whole ranking).

A chat (one image, the dialogue prompt) is asked alone a few times (its TTFT alone), then a
ranking of N candidates (their tokens: the server's default --max-rank-tokens) is started and
chats are asked one after another until it ends: their TTFT, the ranking's time, and that
ranking's time alone.

    python benchmarks/serve_rank_ttft.py                    # the embedded model, 64 x 16 tokens
    python benchmarks/serve_rank_ttft.py --no-interleave    # the engine without interleaving
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--candidate-tokens", type=int, default=16, help="tokens of each candidate")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each chat")
    parser.add_argument("--no-interleave", action="store_true", help="rank without decode steps between passes")
    parser.add_argument("--tokens-per-pass", type=int, default=None,
                        help="candidate tokens per forward pass of a ranking (default: the engine's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    from flamingo.inference.chat import DIALOGUE_PROMPT, DIALOGUE_STOP_STRINGS
    from flamingo.serving import model_runner as engine_module
    from flamingo.serving.engine import Engine, EngineRequest, SamplingParams

    from loadtest import png_bytes, procedural_images, served_model

    model = served_model(args.model, args.threads)
    images = [png_bytes(image) for image in procedural_images(4)]
    token = model.config.media_token
    chat_text = f"{DIALOGUE_PROMPT}User: {token}What is in this image?\nFlamingo:"
    chat_params = SamplingParams(max_tokens=args.max_tokens, stop=DIALOGUE_STOP_STRINGS)
    words = model.tokenizer.convert_ids_to_tokens(list(range(1000, 1000 + args.candidates * args.candidate_tokens)))
    candidates = [model.tokenizer.convert_tokens_to_string(words[i * args.candidate_tokens:(i + 1) *
                                                                 args.candidate_tokens])
                  for i in range(args.candidates)]
    rank_tokens = sum(len(model.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in candidates)
    if args.tokens_per_pass is not None:
        engine_module.RANK_TOKENS_PER_PASS = args.tokens_per_pass
    engine = Engine(model)
    if args.no_interleave:  # the engine before interleaving: nothing happens between a ranking's passes
        run_alone = engine.runner.run_alone
        engine.runner.run_alone = lambda job, between_passes: run_alone(job, lambda: None)

    async def ttft(i: int) -> float:
        start = time.perf_counter()
        first = None
        async for _ in engine.generate(EngineRequest(chat_text, [images[i % len(images)]], chat_params)):
            first = time.perf_counter() - start if first is None else first
        return first

    async def run() -> None:
        await engine.start()
        try:
            await ttft(0)  # warm-up
            await engine.rank(f"{token}This is a picture of", [images[0]], candidates[:4])
            alone = [await ttft(i) for i in range(1, 6)]
            start = time.perf_counter()
            await engine.rank(f"{token}This is a picture of", [images[1]], candidates)
            rank_alone = time.perf_counter() - start
            start = time.perf_counter()
            ranking = asyncio.ensure_future(engine.rank(f"{token}This is a picture of", [images[2]], candidates))
            await asyncio.sleep(0.2)  # the ranking is under way
            during = []
            while not ranking.done():
                during.append(await ttft(len(during)))
            await ranking
            rank_loaded = time.perf_counter() - start
        finally:
            await engine.stop()
        mode = "without interleaving" if args.no_interleave else "interleaved"
        print(f"{args.model}, {args.threads} threads, ranking of {args.candidates} candidates, "
              f"{rank_tokens} tokens in all ({mode}, {engine_module.RANK_TOKENS_PER_PASS} tokens per pass)")
        print(f"chat TTFT alone: median {statistics.median(alone):.3f} s (5 chats)")
        print(f"chat TTFT during the ranking: median {statistics.median(during):.3f} s, max {max(during):.3f} s "
              f"({len(during)} chats, one after another)")
        print(f"ranking: {rank_alone:.2f} s alone, {rank_loaded:.2f} s with the chats")

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
