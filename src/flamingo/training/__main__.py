"""`python -m flamingo.training train|plot ...` (also what torchrun's `-m` runs): the training
subcommands under the `flamingo` command's error handling."""

import argparse
import sys

from flamingo.cli import main
from flamingo.cli_options import add_debug_option
from flamingo.training.cli import register

parser = argparse.ArgumentParser(prog="flamingo", description="Flamingo training")
add_debug_option(parser)
register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
sys.exit(main(None, parser))
