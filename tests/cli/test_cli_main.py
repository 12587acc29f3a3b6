"""``lcc`` itself: the top-level help lists every command, and building a command's parser
(``--help``) imports none of the heavy packages (the start-up time of bench/bench_startup.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lcc.cli import SUBCOMMANDS, build_parser, main, summary

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "sklearn", "faiss", "lightning", "igraph", "matplotlib")
PROBE = """
import sys
from lcc.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def heavy_imports(*argv: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("HEAVY="), done.stderr[-2000:]
    return [name for name in last[len("HEAVY=") :].split(",") if name]


@pytest.mark.parametrize("argv", [("--help",), *((name, "--help") for name in SUBCOMMANDS)])
def test_help_imports_no_heavy_package(argv):
    assert heavy_imports(*argv) == []


def test_top_level_help_lists_every_command_with_its_summary(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in text and summary(name)[:40] in " ".join(text.split())


def test_a_command_parses_with_only_its_parser_built():
    args = build_parser("report").parse_args(["report", "run", "--out", "rep"])
    assert (args.command, args.runs, args.out) == ("report", ["run"], "rep")
    full = build_parser().parse_args(["report", "run", "--out", "rep"])
    assert vars(full).keys() == vars(args).keys()
