"""Pieces shared by the subcommands of the command-line layer (flamingo.cli and the packages'
cli modules): argparse types for numeric options, each refusing a bad value with a message naming
the range, so no command runs (and prints a meaningless table) on a negative count or an absurd
size; the common options; the quiet model load."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from flamingo.config_io import MAX_SEED

MAX_COUNT = 10**9  # episodes, samples, shards: more would run for years
MAX_SHOTS = 1024  # the paper's most is 32; far more exceeds any LM's context


def int_range(low: int, high: int = MAX_COUNT) -> Callable[[str], int]:
    """An integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text[:80]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {text[:80]}")
        return value

    return parse


def float_range(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in [low, high] (or (low, high] with low_open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text[:80]!r}") from None
        above = value > low if low_open else value >= low
        if not (math.isfinite(value) and above and value <= high):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"expected a finite number in {interval}, got {text[:80]}")
        return value

    return parse


def int_list(low: int = 0, high: int = MAX_COUNT) -> Callable[[str], list[int]]:
    """Comma-separated distinct integers in [low, high], e.g. 0,4,8."""
    item = int_range(low, high)

    def parse(text: str) -> list[int]:
        try:
            values = [item(v) for v in text.split(",") if v.strip()]
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,4,8: {err}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,4,8, got {text[:80]!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"repeated values in {text[:80]}")
        return values

    return parse


seed = int_range(0, MAX_SEED)
positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0, low_open=True)


def torch_device(text: str) -> str:
    """A torch device that exists here: cpu, cuda, cuda:N (N < the number of GPUs), mps."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text[:80]!r}") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available()
                                  or (parsed.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text[:80]!r}")
    return text


def add_trust_remote_code_option(parser: argparse.ArgumentParser) -> None:
    """`--trust-remote-code`: the only way a language model's own Python code gets to run."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the language model run the Python code that comes with it (configs with "
                             "lm.trust_remote_code: true, e.g. MPT); only for sources you trust")


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of user errors too (bad options, files, configs)")


def quiet_transformers() -> None:
    """No per-tensor progress bars and load reports from transformers on the terminal."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def add_quantize_option(parser: argparse.ArgumentParser) -> None:
    """`--quantize int8|int4`: weight-only quantization of the frozen backbones (flamingo.model.quantize)."""
    # flamingo.model.quantize.QUANTIZE_MODES (not imported here: it imports torch)
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only quantize the frozen LM's and vision tower's linear layers with torchao "
                             "(smaller weights; trained layers keep their dtype; needs the quantize extra)")


def add_revision_option(parser: argparse.ArgumentParser) -> None:
    """`--revision`: the branch, tag or commit of a hub id given as --model."""
    parser.add_argument("--revision", default=None, metavar="REV",
                        help="with a hub id as --model: its branch, tag or commit (default: main)")


def load_model_quietly(spec: str, trust_remote_code: bool, quantize: str | None = None, revision: str | None = None):
    """Load a model without the LM loader's progress bars and reports (`quantize`, `revision`: see load_model)."""
    from flamingo.model.weights import load_model

    quiet_transformers()
    return load_model(spec, trust_remote_code=trust_remote_code, quantize=quantize, revision=revision)
