"""`flamingo train`, `finetune`, `wise-ft`, `merge-lora`, `pretrain-vision` and `plot`: `register(subparsers)`
adds them to the main CLI.

Run standalone as `python -m flamingo.training train ...` (same arguments).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flamingo.cli_options import add_trust_remote_code_option, float_range, quiet_transformers

TRAIN_EPILOG = """examples:
  flamingo train configs/train/tiny-cpu.yaml
  flamingo train configs/train/tiny-cpu.yaml steps=50 optim.lr=3e-4 model.cross_attention.every=2
  flamingo train configs/train/tiny-cpu.yaml --resume          # continue from the latest checkpoint
  flamingo train my.yaml --resume runs/my/checkpoints/step-00001000
  torchrun --nproc_per_node 8 -m flamingo.training train configs/train/openflamingo-9b.yaml
overrides are dotted KEY=VALUE pairs (values read as YAML; list items by index: datasets.0.weight=0.5).
outputs in run_dir: metrics.jsonl, checkpoints/step-*/ (each a loadable model directory), final/."""


class _Intermixed:
    """Lets KEY=VALUE overrides and options come in any order (`train CONFIG --resume a=1 b=2`)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if self._intermixing:
            return super().parse_known_args(args, namespace)  # type: ignore[misc]
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)  # type: ignore[attr-defined]
        finally:
            self._intermixing = False


def _split_resume(args: argparse.Namespace) -> None:
    """`--resume key=value`: an override, not a checkpoint."""
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.append(args.resume)
        args.resume = "auto"


def _cmd_train(args: argparse.Namespace) -> None:
    from flamingo.training.config import load_train_config

    _split_resume(args)
    config = load_train_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return
    from flamingo.training.trainer import train

    quiet_transformers()
    _run_training("train", args.config,
                  lambda: train(config, resume=args.resume, trust_remote_code=args.trust_remote_code))


def _trained(result: Any) -> str:
    return (f"trained to step {result.step} ({result.skipped_steps} skipped); model: {result.final_dir}; "
            f"checkpoint: {result.last_checkpoint}")


def _run_training(command: str, config_path: str, run: Callable[[], Any],
                  report: Callable[[Any], str] = _trained) -> Any:
    """Run `run()` (returning a TrainResult or PretrainResult, or a tuple starting with one), report
    how it ended; exit 3 on a TrainingError, 128 + signal number when a signal stopped it."""
    from flamingo.training.trainer import TrainingError

    try:
        out = run()
    except TrainingError as err:
        print(f"flamingo {command}: error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    result = out[0] if isinstance(out, tuple) else out
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if result.interrupted_by:
        if main_rank:
            print(f"flamingo {command}: stopped by {result.interrupted_by} at step {result.step}; checkpoint: "
                  f"{result.last_checkpoint}; continue with: flamingo {command} {config_path} --resume",
                  file=sys.stderr)
        raise SystemExit(128 + getattr(signal.Signals, result.interrupted_by, signal.SIGTERM))
    if main_rank:
        print(report(result))
    return out


FINETUNE_EPILOG = """examples:
  flamingo finetune configs/finetune/tiny-vqa.yaml                     # the embedded model on generated VQA data
  flamingo finetune configs/finetune/vqav2.yaml train.steps=500 unfreeze.vision=false --wise-alpha 0.5
  flamingo finetune configs/finetune/vqav2.yaml --resume               # continue from the latest checkpoint
  torchrun --nproc_per_node 8 -m flamingo.training finetune configs/finetune/vqav2.yaml
  flamingo eval --model runs/vqav2/final --task vqav2 --shots 0 --data data.yaml --out runs/vqav2/eval
overrides are dotted KEY=VALUE pairs of the fine-tuning config (training fields under train.).
outputs in train.run_dir: metrics.jsonl, checkpoints/, final/ (a model directory), wise-ft-ALPHA/."""


def _cmd_finetune(args: argparse.Namespace) -> None:
    import yaml

    from flamingo.training.finetune import load_finetune_config

    _split_resume(args)
    overrides = list(args.overrides)
    if args.wise_alpha:
        overrides.append(f"wise_alpha=[{', '.join(map(str, args.wise_alpha))}]")
    config = load_finetune_config(args.config, overrides)
    if args.print_config:
        import dataclasses

        print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), end="")
        return
    from flamingo.training.finetune import finetune

    quiet_transformers()
    _, wise_dirs = _run_training("finetune", args.config, lambda: finetune(config, resume=args.resume,
                                                                          trust_remote_code=args.trust_remote_code))
    if wise_dirs:
        print("WiSE-FT models: " + ", ".join(str(d) for d in wise_dirs))


def _cmd_wise_ft(args: argparse.Namespace) -> None:
    from flamingo.model.weights import model_directory
    from flamingo.training.wise_ft import wise_ft

    out = wise_ft(model_directory(args.zero_shot), model_directory(args.fine_tuned), args.alpha, args.out,
                  overwrite=args.overwrite, trust_remote_code=args.trust_remote_code, force=args.force,
                  zero_shot_spec=args.zero_shot, fine_tuned_spec=args.fine_tuned)
    print(f"WiSE-FT model (alpha {args.alpha:g}): {out}")


def _cmd_merge_lora(args: argparse.Namespace) -> None:
    from flamingo.model.merged import merge_lora_directory

    out = merge_lora_directory(args.model, args.out, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    print(f"merged model: {out}")


PRETRAIN_EPILOG = """examples:
  flamingo pretrain-vision configs/pretrain/tiny-cpu.yaml
  flamingo pretrain-vision configs/pretrain/tiny-cpu.yaml steps=400 optim.lr=3e-4 --resume
  torchrun --nproc_per_node 8 -m flamingo.training pretrain-vision my-pretrain.yaml
outputs in run_dir: metrics.jsonl, checkpoints/step-*/, vision/ (use it as vision: {kind: local, name_or_path: ...})."""


def _cmd_pretrain_vision(args: argparse.Namespace) -> None:
    from flamingo.training.contrastive_config import load_pretrain_config

    _split_resume(args)
    config = load_pretrain_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return
    from flamingo.training.contrastive import pretrain_vision

    def pretrained(result: Any) -> str:
        last = next((r["heldout"] for r in reversed(result.records) if "heldout" in r), None)
        heldout = (f"; held-out recall@1 i2t {last['i2t_recall']:.3f} t2i {last['t2i_recall']:.3f} "
                   f"(chance {last['chance']:.3f})" if last else "")
        return (f"pretrained to step {result.step} ({result.skipped_steps} skipped){heldout}; vision encoder: "
                f"{result.vision_dir} (use it as vision: {{kind: local, name_or_path: {result.vision_dir}}})")

    quiet_transformers()
    _run_training("pretrain-vision", args.config,
                  lambda: pretrain_vision(config, resume=args.resume, trust_remote_code=args.trust_remote_code),
                  pretrained)


def _cmd_plot(args: argparse.Namespace) -> None:
    from flamingo.training.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)


def _run_parser(subparsers: argparse._SubParsersAction, name: str, help: str, epilog: str, config_help: str,
                func: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
    """A subcommand that runs a config: CONFIG [KEY=VALUE ...] [--resume [CHECKPOINT]] [--print-config]."""

    parser = subparsers.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=epilog)
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, dotted keys")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue the run: from its latest checkpoint (no value), or from CHECKPOINT")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_trust_remote_code_option(parser)
    parser.set_defaults(func=func)
    parser.__class__ = type(f"{name.title()}ArgumentParser", (_Intermixed, type(parser)), {})
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train`, `finetune`, `wise-ft`, `merge-lora`, `pretrain-vision` and `plot` subcommands to the
    `flamingo` command line."""

    _run_parser(subparsers, "train", "train the Flamingo bridge (resampler, xattn layers) from a training config",
                TRAIN_EPILOG, "training config YAML (see configs/train/)", _cmd_train)
    finetune = _run_parser(subparsers, "finetune", "fine-tune a model on a benchmark's training split (paper "
                           "B.2.2), optionally with WiSE-FT", FINETUNE_EPILOG,
                           "fine-tuning config YAML (see configs/finetune/)", _cmd_finetune)
    finetune.add_argument("--wise-alpha", type=float_range(0, 1), action="append", default=[], metavar="ALPHA",
                          help="also write the WiSE-FT model (1-ALPHA)*base + ALPHA*fine-tuned to "
                               "RUN_DIR/wise-ft-ALPHA (repeatable; replaces the config's wise_alpha)")

    wise = subparsers.add_parser(
        "wise-ft", help="WiSE-FT: interpolate the weights of a model and its fine-tuned version",
        description="Write (1-alpha)*ZERO_SHOT + alpha*FINE_TUNED over every weight that can differ (the bridge "
                    "and the backbone parts either model unfroze) as a model directory.")
    wise.add_argument("zero_shot", help="the zero-shot model: a saved model directory, a hub id or 'embedded'")
    wise.add_argument("fine_tuned", help="its fine-tuned version (a saved model directory)")
    wise.add_argument("--alpha", type=float_range(0, 1), required=True, help="weight of the fine-tuned model, in [0, 1]")
    wise.add_argument("--out", required=True, help="output model directory")
    wise.add_argument("--overwrite", action="store_true", help="replace an existing model directory --out")
    wise.add_argument("--force", action="store_true",
                      help="interpolate even when ZERO_SHOT is not the base FINE_TUNED records in its "
                           "provenance.json (or it records none)")
    add_trust_remote_code_option(wise)
    wise.set_defaults(func=_cmd_wise_ft)

    merge = subparsers.add_parser(
        "merge-lora", help="fold a model directory's LoRA adapters into a plain model directory",
        description="Write OUT: the model DIR (trained with a lora section) with its adapters merged into the layers "
                    "they adapt; adapted language-model layers are saved with the LM as OUT/lm.")
    merge.add_argument("model", metavar="DIR", help="a model directory holding LoRA adapters (or a hub id)")
    merge.add_argument("out", metavar="OUT", help="output model directory")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing model directory OUT")
    add_trust_remote_code_option(merge)
    merge.set_defaults(func=_cmd_merge_lora)

    _run_parser(subparsers, "pretrain-vision", "contrastive pretraining of a vision encoder with a text encoder "
                "(paper B.1.3)", PRETRAIN_EPILOG, "pretraining config YAML (see configs/pretrain/)",
                _cmd_pretrain_vision)

    plot = subparsers.add_parser("plot", help="PNG plots of a training run: losses per dataset, gate values per layer")
    plot.add_argument("run_dir", help="the run directory (holding metrics.jsonl)")
    plot.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    plot.set_defaults(func=_cmd_plot)
