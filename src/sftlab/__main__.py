"""`python -m sftlab`: the same command line as `sftlab`."""

import sys

from sftlab.cli import main

sys.exit(main())
