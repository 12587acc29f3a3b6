"""Benchmark the start-up of the command line: seconds until ``lcc ... --help`` has printed.

Run ``python bench/bench_startup.py`` (every command's ``--help``, ``lcc --help``,
``lcc train --help-reg`` and ``--help-reg NAME``; best and median of ``--repeats`` fresh
processes each) and read one row per command line, with the heavy packages (torch,
scikit-learn, faiss, lightning) the process imported. ``--importtime`` also prints the slowest
imports of each line (``python -X importtime``), to find what to import lazily. Target: every
``--help`` under 1 s.
Wall-clock times on a shared machine are noisy: compare the best column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lcc.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "faiss", "lightning", "igraph", "scipy", "matplotlib")
TARGET_SECONDS = 1.0
#: what each row runs after ``lcc``
LINES: tuple[tuple[str, ...], ...] = (
    ("--help",),
    *((name, "--help") for name in SUBCOMMANDS),
    ("train", "--help-reg"),
    ("train", "--help-reg", "lcc"),
    ("train", "--help-reg", "label-variation"),
)
#: reports the heavy packages a command line imported (run in the same process, after it)
_PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['lcc', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('lcc', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\n"
)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def time_line(line: tuple[str, ...], repeats: int) -> list[float]:
    """Wall-clock seconds of ``python -m lcc LINE`` in fresh processes."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "lcc", *line], capture_output=True, env=_env(), check=False
        )
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"lcc {' '.join(line)} failed: {done.stderr.decode()[-500:]}")
    return seconds


def heavy_imports(line: tuple[str, ...]) -> str:
    """The heavy packages ``lcc LINE`` imports (comma-separated; empty when none)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), *line],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    found = [text for text in done.stderr.splitlines() if text.startswith("HEAVY=")]
    return found[-1][len("HEAVY=") :] if found else "?"


def slowest_imports(line: tuple[str, ...], count: int = 8) -> list[str]:
    """The ``count`` imports with the largest cumulative time (``-X importtime``)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lcc", *line],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    rows = []
    for text in done.stderr.splitlines():
        parts = text.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return [f"{micro / 1e6:7.3f} s {name}" for micro, name in sorted(rows)[-count:][::-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per line")
    parser.add_argument("--importtime", action="store_true", help="also list the slowest imports")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load (1 min) {load:.1f}")
    print()
    print(f"| command line | best (s) | median (s) | under {TARGET_SECONDS:g} s | heavy imports |")
    print("|---|---|---|---|---|")
    for line in LINES:
        seconds = time_line(line, args.repeats)
        best, median = min(seconds), statistics.median(seconds)
        met = "yes" if best < TARGET_SECONDS else "no"
        text = " ".join(("lcc", *line))
        print(f"| `{text}` | {best:.2f} | {median:.2f} | {met} | {heavy_imports(line) or '-'} |")
        if args.importtime:
            for row in slowest_imports(line):
                print(f"|   {row} | | | | |")


if __name__ == "__main__":
    main()
