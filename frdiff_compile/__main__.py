"""`python -m frdiff_compile ...` runs the command line (see frdiff_compile/cli.py)."""

import sys

from .cli import main

sys.exit(main())
