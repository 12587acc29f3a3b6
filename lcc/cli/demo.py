"""``lcc demo``: placeholder while helper G writes it."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="(being written)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    raise SystemExit("lcc demo: not implemented yet")
