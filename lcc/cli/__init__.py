"""The ``lcc`` command line: one module per subcommand, each with ``register`` and ``run``.

A subcommand module defines ``register(subparsers)``, which adds its parser and sets
``handler=run`` on it, and ``run(args) -> int``; its one-line summary is its ``HELP``
constant (else the first line of its docstring). Bad input (:class:`LCCInputError`)
becomes one line on stderr and exit code 2; a warning raised by ``lcc`` code is one line,
``lcc COMMAND: warning: ...``.

Start-up stays fast: ``lcc COMMAND ...`` builds the full parser of COMMAND only (the others
are one-line entries), and ``lcc --help`` builds none, so ``--help`` never imports torch,
scikit-learn or the engine (``bench/bench_startup.py`` times it).

>>> parser = build_parser("report")
>>> sorted(parser._subparsers._group_actions[0].choices) == sorted(SUBCOMMANDS)
True
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from lcc.errors import LCCInputError

SUBCOMMANDS = (
    "cluster", "layers", "train", "demo", "measure", "report", "sweep", "evaluate", "study"
)  # fmt: skip


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps description paragraphs as written."""


def add_command(
    subparsers: Any, name: str, help: str, description: str, run: Any
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` to ``subparsers``: its parser, with ``handler=run``."""
    parser = subparsers.add_parser(
        name, help=help, description=description, formatter_class=HelpFormatter
    )
    parser.set_defaults(handler=run)
    return parser


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"lcc.cli.{name.replace('-', '_')}")


def summary(name: str) -> str:
    """The one-line help of subcommand ``name``: its module's ``HELP``, else the text after the
    first colon of the first docstring line.

    >>> summary("sweep")
    'run a grid of lcc train runs (resumable) and write their table'
    """
    module = _module(name)
    text = getattr(module, "HELP", None)
    if text is None:
        first = (module.__doc__ or name).strip().splitlines()[0]
        text = first.split(":", 1)[-1].strip().rstrip(".").replace("``", "")
    return str(text)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``lcc`` parser; with ``command``, only that subcommand's parser is built in full
    (every other subcommand is listed with its summary but accepts nothing)."""
    parser = argparse.ArgumentParser(
        prog="lcc",
        description="Latent Cluster Correction: cluster latents, fine-tune classifiers with LCC.",
        formatter_class=HelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        if command is None or name == command:
            _module(name).register(subparsers)
        else:
            subparsers.add_parser(name, help=summary(name), add_help=False)
    return parser


def _command(argv: Sequence[str]) -> str:
    """The subcommand named in ``argv`` ("" when none is: top-level help or a usage error)."""
    for item in argv:
        if item in SUBCOMMANDS:
            return item
        if item.startswith("-") and item not in ("-h", "--help"):
            continue
        return ""
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = _command(arguments)
    parser = build_parser(command or "")
    args = parser.parse_args(arguments)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return int(args.handler(args) or 0)
    except LCCInputError as error:
        print(f"lcc {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lcc {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(command: str) -> Any:
    """``warnings.showwarning`` printing warnings raised in ``lcc`` code as one line on stderr
    (others keep Python's format)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if os.path.abspath(filename).startswith(package + os.sep):
            print(f"lcc {command}: warning: {message}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, *rest)

    return show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
