"""The `flamingo` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  flamingo demo                                  run a small Flamingo end to end, offline
  flamingo params configs/openflamingo-9b.yaml   parameter counts per component (Table 1 style)
  flamingo params runs/my-model                  ... of a saved model directory
  flamingo convert-openflamingo checkpoint.pt --config configs/openflamingo-9b.yaml --out of9b
"""


def _cmd_demo(args: argparse.Namespace) -> None:
    from flamingo.inference.demo import run_demo

    run_demo(seed=args.seed, max_new_tokens=args.max_new_tokens)


def _load_model(spec: str):
    from flamingo.model.config import FlamingoConfig
    from flamingo.model.weights import CONFIG_FILE, build_flamingo, load_pretrained

    path = Path(spec)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a saved Flamingo model directory (no {CONFIG_FILE})")
        return load_pretrained(path)
    return build_flamingo(FlamingoConfig.load(path))


def _cmd_params(args: argparse.Namespace) -> None:
    from flamingo.model.params import format_parameter_report, parameter_report

    print(format_parameter_report(parameter_report(_load_model(args.model))))


def _cmd_convert(args: argparse.Namespace) -> None:
    from flamingo.model.config import FlamingoConfig
    from flamingo.model.convert_openflamingo import convert_openflamingo

    out = convert_openflamingo(args.checkpoint, FlamingoConfig.load(args.config), args.out)
    print(f"converted {args.checkpoint} -> {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flamingo", description="Flamingo visual language models: build, convert, inspect, run.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run a small Flamingo end to end on rendered images (offline)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.set_defaults(func=_cmd_demo)

    params = sub.add_parser("params", help="parameter counts per component (frozen LM, vision, xattn, resampler)")
    params.add_argument("model", help="a config YAML/JSON file or a saved model directory")
    params.set_defaults(func=_cmd_params)

    convert = sub.add_parser("convert-openflamingo", help="convert an OpenFlamingo checkpoint.pt into a model directory")
    convert.add_argument("checkpoint", help="OpenFlamingo checkpoint (.pt/.bin, loaded with weights_only, or .safetensors)")
    convert.add_argument("--config", required=True, help="our config describing the same architecture")
    convert.add_argument("--out", required=True, help="output model directory")
    convert.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        # User mistakes (bad config, mismatched checkpoint, missing file/package): one clear line.
        print(f"flamingo {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
