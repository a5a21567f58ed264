"""`flamingo batch IN OUT`: offline batch inference over a dataset of prompts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flamingo.cli_options import (
    add_quantize_option,
    add_trust_remote_code_option,
    positive_int,
    quiet_transformers,
    torch_device,
)

EPILOG = """examples:
  flamingo batch prompts.jsonl answers.jsonl          the embedded model over a JSONL file of prompts
  flamingo batch photos/ captions.jsonl --prompt "<image>Output:" --max-tokens 20
  flamingo batch "shards/{000..099}.tar" out.jsonl --model my-flamingo \\
      --prompt "<image>Output: a cat.<|endofchunk|><image>Output:" --prompt-image cat.jpg    1-shot captions
  flamingo batch prompts.jsonl answers.jsonl --ray --ray-actors 4 --cpus-per-actor 4      on a Ray cluster
a JSONL record: {"id": "q1", "prompt": "<image>Question: what colour? Answer:", "images": ["img/q1.png"],
"max_tokens": 10} (images: paths relative to the file, or data: URLs), or {"id": ..., "messages": [OpenAI chat
messages]}; options: max_tokens, temperature, top_p, n, beams, stop, seed. Results: OUT, one line per id; rejected
records: OUT's name with .rejects.jsonl, with the reason. A stopped run leaves OUT.partial: the same command
resumes it."""


def register(sub: argparse._SubParsersAction) -> None:
    from flamingo.serving.limits import ServerSettings

    defaults = ServerSettings()
    p = sub.add_parser("batch", help="offline batch inference: a JSONL file, folder or shards of prompts -> JSONL",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("input", metavar="IN", help="a .jsonl file of records, a folder of images, or WebDataset shards "
                                               "(a .tar, a brace pattern, or a folder of them)")
    p.add_argument("output", metavar="OUT", type=Path, help="the results file (JSONL)")
    p.add_argument("--model", default="embedded",
                   help="a saved model directory, a hub id (org/name), or 'embedded' (the default, offline)")
    p.add_argument("--prompt", help="the prompt of records that give none (<image> where each image goes; the "
                                    "record's own images take the last ones)")
    p.add_argument("--prompt-image", action="append", default=[], type=Path, metavar="PATH",
                   help="an image of --prompt before the record's own (a few-shot support set; repeatable)")
    p.add_argument("--max-tokens", type=positive_int, default=defaults.default_max_tokens,
                   help=f"max_tokens of records that give none (default {defaults.default_max_tokens})")
    p.add_argument("--device", default="cpu", type=torch_device, help="cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_quantize_option(p)
    add_trust_remote_code_option(p)
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-running", type=positive_int, default=64, help="sequences decoded together (default 64)")
    engine.add_argument("--prefill-chunk", type=positive_int, default=16,
                        help="records prefilled together (default 16)")
    engine.add_argument("--prefix-cache-mb", type=positive_int, default=1024,
                        help="memory bound of the shared prompt-prefix cache (default 1024)")
    ray = p.add_argument_group("Ray Data (the ray extra)")
    ray.add_argument("--ray", action="store_true", help="read and run the dataset with Ray Data, one engine per actor")
    ray.add_argument("--ray-address", default=None, help="the cluster to join (default: RAY_ADDRESS, else a local one)")
    ray.add_argument("--ray-actors", type=positive_int, default=1, help="actors, one model and engine each (default 1)")
    ray.add_argument("--cpus-per-actor", type=positive_int, default=1, help="CPU cores per actor (default 1)")
    ray.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor (default 0; 1 with --device cuda)")
    ray.add_argument("--parquet", type=Path, metavar="DIR", help="also write the results as Parquet files in DIR")
    p.set_defaults(func=_cmd_batch)


def _cmd_batch(args: argparse.Namespace) -> None:
    from flamingo.errors import UserError, import_extra

    for module in ("pydantic", "httpx", "anyio"):  # the server's request checks: one line, not a traceback
        import_extra(module, "serve", "flamingo batch")
    from flamingo.model.quantize import check_quantize_mode
    from flamingo.outputs import check_writable
    from flamingo.serving.batch.records import BatchDefaults, data_url, open_dataset
    from flamingo.serving.batch.runner import batch_limits
    from flamingo.serving.engine import EngineConfig

    # Mistakes are reported before the (slow) model load.
    dataset = open_dataset(args.input)
    check_writable(args.output, "OUT", folder=False)
    images = []
    for path in args.prompt_image:
        if not path.is_file():
            raise UserError(f"--prompt-image {path}: no such file")
        images.append(data_url(path.read_bytes(), path.suffix.lstrip(".") or "png"))
    if images and args.prompt is None:
        raise UserError("--prompt-image: give the prompt they belong to with --prompt")
    defaults = BatchDefaults(args.prompt, tuple(images))
    settings = batch_limits(args.max_tokens)
    engine_config = EngineConfig(max_queue=2 * args.max_running, max_running=args.max_running,
                                 prefill_chunk=args.prefill_chunk, prefix_cache_bytes=args.prefix_cache_mb << 20)
    check_quantize_mode(args.quantize)
    try:
        summary = _run(args, dataset, defaults, settings, engine_config)
    except KeyboardInterrupt:
        partial = args.output.with_name(args.output.name + ".partial")
        print(f"\ninterrupted: the results so far are in {partial}; run the same command to resume", file=sys.stderr)
        raise
    earlier = f" ({summary.earlier} done by an earlier run)" if summary.earlier else ""
    print(f"{summary.written} results written to {summary.out}{earlier}", flush=True)
    if summary.rejected:
        kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(summary.reasons.items(), key=lambda kv: -kv[1]))
        print(f"{summary.rejected} records rejected ({kinds}); reasons in {summary.rejects}", file=sys.stderr)


def _run(args: argparse.Namespace, dataset: Any, defaults: Any, settings: Any, engine_config: Any) -> Any:
    """The run, on Ray or in this process: its BatchSummary."""
    from flamingo.errors import UserError

    if args.ray:
        from flamingo.serving.batch.on_ray import RaySettings, run_batch_on_ray

        ray_settings = RaySettings(actors=args.ray_actors, cpus_per_actor=args.cpus_per_actor,
                                   gpus_per_actor=args.gpus_per_actor or (1.0 if args.device.startswith("cuda") else 0),
                                   address=args.ray_address, parquet=args.parquet)
        return run_batch_on_ray(args.model, dataset, args.output, ray_settings, defaults=defaults, settings=settings,
                                engine_config=engine_config, device=args.device, quantize=args.quantize,
                                trust_remote_code=args.trust_remote_code, progress=not args.no_progress)
    from flamingo.serving.batch.runner import load_engine_model, run_batch

    if args.parquet:
        raise UserError("--parquet: needs --ray (Ray Data writes the Parquet files)")
    quiet_transformers()
    model = load_engine_model(args.model, device=args.device, quantize=args.quantize,
                              trust_remote_code=args.trust_remote_code)
    return run_batch(model, dataset, args.output, defaults=defaults, settings=settings, engine_config=engine_config,
                     progress=not args.no_progress)
