"""`python -m flamingo.evaluation ARGS` = `flamingo eval ARGS` (what `torchrun -m` runs)."""

import sys

from flamingo.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
