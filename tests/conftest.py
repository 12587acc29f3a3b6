"""Test setup: the shared oracles (``tests/oracles.py``) import from any test folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
