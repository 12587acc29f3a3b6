"""The ``lcc`` command line: one module per subcommand, each with ``register`` and ``run``.

A subcommand module defines ``register(subparsers)``, which adds its parser and sets
``handler=run`` on it, and ``run(args) -> int``. Bad input (:class:`LCCInputError`)
becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lcc.errors import LCCInputError

SUBCOMMANDS = ("cluster", "layers", "train", "demo", "measure", "report", "sweep")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps description paragraphs as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcc",
        description="Latent Cluster Correction: cluster latents, fine-tune classifiers with LCC.",
        formatter_class=HelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"lcc.cli.{name.replace('-', '_')}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except LCCInputError as error:
        print(f"lcc {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lcc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
