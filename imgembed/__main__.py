"""``python -m imgembed``: the command line."""

import sys

from imgembed.cli import main

sys.exit(main())
