"""`flamingo train` and `flamingo plot`: `register(subparsers)` adds them to the main CLI.

Run standalone as `python -m flamingo.training train ...` (same arguments).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

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


def _cmd_train(args: argparse.Namespace) -> None:
    from flamingo.training.config import load_train_config

    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.append(args.resume)  # `--resume key=value`: an override, not a checkpoint
        args.resume = "auto"

    config = load_train_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return
    import transformers

    from flamingo.training.trainer import TrainingError, train

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        result = train(config, resume=args.resume)
    except TrainingError as err:
        print(f"flamingo train: error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if result.interrupted_by:
        if main_rank:
            print(f"flamingo train: stopped by {result.interrupted_by} at step {result.step}; checkpoint: "
                  f"{result.last_checkpoint}; continue with: flamingo train {args.config} --resume", file=sys.stderr)
        raise SystemExit(128 + getattr(signal.Signals, result.interrupted_by, signal.SIGTERM))
    if main_rank:
        print(f"trained to step {result.step} ({result.skipped_steps} skipped); model: {result.final_dir}; "
              f"checkpoint: {result.last_checkpoint}")


def _cmd_plot(args: argparse.Namespace) -> None:
    from flamingo.training.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` and `plot` subcommands to the `flamingo` command line."""
    train = subparsers.add_parser(
        "train", help="train the Flamingo bridge (resampler, xattn layers) from a training config",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    train.add_argument("config", help="training config YAML (see configs/train/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, dotted keys")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                       help="continue the run: from its latest checkpoint (no value), or from CHECKPOINT")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=_cmd_train)
    train.__class__ = type("TrainArgumentParser", (_Intermixed, type(train)), {})

    plot = subparsers.add_parser("plot", help="PNG plots of a training run: losses per dataset, gate values per layer")
    plot.add_argument("run_dir", help="the run directory (holding metrics.jsonl)")
    plot.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    plot.set_defaults(func=_cmd_plot)


def main(argv: list[str] | None = None) -> int:
    """`python -m flamingo.training` (what `torchrun -m` runs): the train and plot subcommands."""
    from flamingo.cli import main as run

    parser = argparse.ArgumentParser(prog="flamingo", description="Flamingo training")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run(argv, parser)


if __name__ == "__main__":
    sys.exit(main())
