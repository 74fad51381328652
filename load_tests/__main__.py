"""Entry point: `python -m load_tests --help`."""

import sys

from load_tests.cli import main

sys.exit(main())
