"""Load test of `flamingo serve` on loopback: N requests (default 200) at concurrency C (default 16),
each with images (rendered procedural scenes), chat / few-shot completions / rank mixed, half of the
generating ones streamed. Prints statuses, 5xx, lost requests, p50/p95 latency and time to first
token; exits 1 on any 5xx or lost request. Bounded: every request has a timeout, and the run stops.

    python benchmarks/serve_load.py                       # the embedded model, 200 requests at 16
    python benchmarks/serve_load.py --requests 40 --concurrency 8 --max-tokens 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per request")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    from flamingo.serving.app import create_app
    from flamingo.serving.engine import Engine, EngineConfig
    from flamingo.serving.limits import ServerSettings
    from loadtest import mixed_requests, png_data_url, procedural_images, run_load, served_model
    from flamingo.serving.server import BackgroundServer

    model = served_model(args.model, args.threads)
    images = [png_data_url(image) for image in procedural_images(8)]
    requests = mixed_requests(args.requests, images, "bench", max_tokens=args.max_tokens)
    engine = Engine(model, EngineConfig(max_queue=max(64, args.concurrency), max_running=args.concurrency))
    with BackgroundServer(create_app(engine, ServerSettings(model_name="bench"))) as server:
        print(f"{args.requests} requests at concurrency {args.concurrency} against {server.url} "
              f"({args.model}, max_tokens {args.max_tokens})", flush=True)
        result = asyncio.run(run_load(server.url, requests, args.concurrency, request_timeout_s=args.timeout))
    for problem in result.problems[:5]:
        print("problem:", problem)
    print(result.summary())
    return 1 if result.server_errors or result.lost else 0


if __name__ == "__main__":
    sys.exit(main())
