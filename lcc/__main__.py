"""``python -m lcc`` runs the command line."""

import sys

from lcc.cli import main

sys.exit(main())
