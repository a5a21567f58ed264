"""`flamingo eval`: the few-shot evaluation suite from the command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flamingo.cli_options import (
    MAX_SHOTS,
    add_quantize_option,
    add_revision_option,
    add_trust_remote_code_option,
    float_range,
    int_list,
    int_range,
    load_model_quietly,
    positive_int,
    seed,
    torch_device,
)

EPILOG = """examples:
  flamingo eval --model of-9b --task coco --shots 0,4,8,16,32 --trials 3 --data data.yaml --out runs/eval
  flamingo eval --model of-9b --task vqav2,okvqa --shots 4,8 --data data.yaml --out runs/eval
  flamingo eval --model of-9b --task imagenet --shots 16 --rices --ensemble --data data.yaml --out runs/in
  torchrun --nproc-per-node 8 -m flamingo.evaluation --model of-9b --task coco --data data.yaml --out runs/eval
an interrupted run continues where it stopped when run again with the same --out and options.
outputs in --out: predictions/TASK.jsonl, results.json (settings, seeds, demo ids), results.md, results.png.
data.yaml maps each task to its files, e.g.
  tasks:
    coco:
      test:  {annotations: coco/dataset_coco.json, media: coco/images}
      train: {annotations: coco/dataset_coco.json, media: coco/images}
tasks: """


def _cmd_eval(args: argparse.Namespace) -> None:
    from flamingo.data.benchmarks.data_config import load_data_config
    from flamingo.data.benchmarks.tasks import get_task
    from flamingo.errors import import_extra
    from flamingo.evaluation.settings import EvalSettings
    from flamingo.model.quantize import check_quantize_mode, quantize_model

    for module in ("pycocoevalcap", "nltk", "matplotlib"):  # the metrics and results.png
        import_extra(module, "eval", "flamingo eval")
    # Bad tasks, data config and options are reported before the (slow) model load.
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    for name in tasks:
        get_task(name)
    data = load_data_config(args.data)
    for name in tasks:
        data.task(name)
    settings = EvalSettings(
        shots=args.shots, trials=args.trials, rices=args.rices, ensemble=args.ensemble, split=args.split,
        support_size=args.support_size, query_size=args.max_queries, seed=args.seed, demo_mode=args.demo_mode,
        batch_size=args.batch_size, num_beams=args.beams, max_new_tokens=args.max_new_tokens,
        length_normalize=args.length_normalize, video_frames=args.video_frames, video_fps=args.video_fps,
        max_prompt_tokens=args.max_prompt_tokens)
    settings.validate()
    check_quantize_mode(args.quantize)  # torchao missing: said before the model load

    import torch

    from flamingo.evaluation.suite import evaluate, world

    rank, size = world()
    if size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")  # only barriers: CPU collectives suffice
    try:
        model = load_model_quietly(args.model, args.trust_remote_code, revision=args.revision)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and size > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        model.to(device)
        if args.quantize:  # on the evaluation device: quantized weights are packed for their backend
            quantize_model(model, args.quantize)
        results = evaluate(model, tasks, data, settings, args.out, model_name=str(args.model),
                           cache_dir=args.cache_dir, progress=not args.no_progress)
    finally:
        if size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if results is not None:
        table = (Path(args.out) / "results.md").read_text()
        print(table, end="")
        _record_on_card(args, table)


def _record_on_card(args: argparse.Namespace, table: str) -> None:
    """The results table into the model card of a local model directory (its Evaluation section,
    one table per --out, replaced when that --out is run again): the card on the Hub then shows
    how the model scores. Hub snapshots and hand-written cards are left alone."""
    from flamingo.model.card import record_eval

    if args.no_card or args.revision is not None or not Path(args.model).is_dir():
        return
    card = record_eval(args.model, str(args.out), table)
    if card is not None:
        print(f"results recorded in the model card {card}")


def register(sub: argparse._SubParsersAction) -> None:
    from flamingo.data.benchmarks.tasks import TASKS
    from flamingo.evaluation.settings import MAX_BATCH_SIZE
    from flamingo.inference.generation import MAX_BEAMS, MAX_NEW_TOKENS

    p = sub.add_parser("eval", help="few-shot evaluation on the paper's benchmarks (resumable, torchrun)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG + ", ".join(TASKS))
    p.add_argument("--model", required=True, help="a saved model directory, a hub id of one, or a config file")
    p.add_argument("--task", required=True, help="task name(s), comma-separated")
    p.add_argument("--data", required=True, type=Path, help="YAML file with each task's annotation and media paths")
    p.add_argument("--out", required=True, type=Path, help="output directory (reused to resume)")
    p.add_argument("--shots", type=int_list(0, MAX_SHOTS), default=[0, 4, 8, 16, 32], help="comma-separated (default 0,4,8,16,32)")
    p.add_argument("--trials", type=int_range(1, 1000), default=3, help="random demo draws per shot count (default 3)")
    p.add_argument("--rices", action="store_true", help="retrieval-based demo selection (RICES)")
    p.add_argument("--ensemble", action="store_true", help="close-ended: average over 6 demo orders")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="test: test support + official split; validation: subsets of the train split")
    p.add_argument("--support-size", type=positive_int, default=2048, help="support set size (default 2048, B.1.4)")
    p.add_argument("--max-queries", type=positive_int, default=None, help="evaluate a seeded subset of this many queries")
    p.add_argument("--demo-mode", choices=["shared", "per_query"], default="shared",
                   help="shared: one random draw of demos per trial for all queries (fast); per_query: one per query")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--batch-size", type=int_range(1, MAX_BATCH_SIZE), default=8, help="queries per forward pass")
    p.add_argument("--beams", type=int_range(1, MAX_BEAMS), default=3, help="beam width for open-ended tasks (paper: 3)")
    p.add_argument("--max-new-tokens", type=int_range(1, MAX_NEW_TOKENS), default=None, help="default: per task")
    p.add_argument("--length-normalize", action="store_true", help="close-ended: rank by mean log-likelihood")
    p.add_argument("--video-frames", type=int_range(1, 10_000), default=30, help="frames per video (paper: 30 at 3 FPS)")
    p.add_argument("--video-fps", type=float_range(0, 1000, low_open=True), default=3.0)
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None, help="OOC above this (default: the LM's context)")
    p.add_argument("--device", type=torch_device, default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="RICES support features cache (default CACHE/rices, CACHE being $FLAMINGO_CACHE or ~/.cache/flamingo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-card", action="store_true",
                   help="do not record the results in the model card (README.md) of a local --model directory")
    add_quantize_option(p)
    add_revision_option(p)
    add_trust_remote_code_option(p)
    p.set_defaults(func=_cmd_eval)
