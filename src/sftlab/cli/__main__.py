"""`python -m sftlab.cli`."""

import sys

from sftlab.cli import main

sys.exit(main())
