"""`python -m flamingo.training train|plot ...` (also what torchrun's `-m` runs)."""

import sys

from flamingo.training.cli import main

sys.exit(main())
