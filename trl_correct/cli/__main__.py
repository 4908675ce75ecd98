"""`python -m trl_correct.cli COMMAND ...`: the `trl-correct` console script without the installed entry point (the
benches use it with their own interpreter)."""

import sys

from . import main

sys.exit(main())
