"""``lcc sweep``: a grid of ``lcc train`` runs and their table (:mod:`lcc.train.sweep`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lcc.cli import add_command

HELP = "run a grid of lcc train runs (resumable) and write their table"

DESCRIPTION = """\
Run a grid of `lcc train` runs one after the other, then write the table of the LCC paper's
Tables III-IV: per setting the test top-1 and top-5, mean ± sample standard deviation over the
seeds, and the gain over the baseline: with the same seeds in a setting and its baseline, the
mean paired difference with its 95 % t interval and the number of pairs (the CSV adds a sign
test and a bootstrap interval); otherwise the difference of the means (percentage points).

CONFIG.yaml:
  base:       options of every run (any lcc train option: model, dataset, epochs, subset, ...)
  grid:       option: [values, ...]; every combination is a setting, `seed` gives the repeats
              (layers, k, weight, warmup, regularisers, ... any lcc train option)
  baseline:   true: per seed, a run of base without correction (--no-lcc); or a mapping of
              the options that make the baseline
  pretrain:   (optional) options of a first run in DIR/pretrain; every other run starts from
              its last checkpoint (model defaults to base's)
  evaluate:   (optional) `lcc evaluate` options (noise, fgsm, pgd, corruptions, probe, ...;
              baseline: true compares each seed with its baseline run): every finished run is
              evaluated and DIR/evaluation.md / .csv hold mean ± std per setting

Each run goes to DIR/<grid values> (e.g. DIR/layers=act1_k=5_seed=0, DIR/baseline_seed=0).
Every run's options and layers are checked before the first one trains. Finished runs
(metrics.json) are skipped and started ones resumed, so an interrupted sweep (SIGTERM or
Ctrl+C: exit 143 / 130) continues where it stopped when run again; DIR may have been moved
or copied. DIR/table.md and DIR/table.csv (fractions, as in metrics.json)
hold the table; the markdown table is also printed on stdout.

examples:
  lcc sweep sweeps/table3.yaml --out runs/table3
  lcc sweep sweeps/table3.yaml --out runs/table3 --dry-run      # list the runs
  lcc sweep sweeps/table3.yaml --out runs/table3 --table-only   # table of the finished runs
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to ``subparsers``."""
    parser = add_command(subparsers, "sweep", HELP, DESCRIPTION, run)
    parser.add_argument("config", metavar="CONFIG.yaml", help="the sweep file")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="folder of the runs and the table (default: runs/<CONFIG name>)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", action="store_true", help="list the runs and their state; train nothing"
    )
    mode.add_argument(
        "--table-only", action="store_true", help="write the table of the finished runs only"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from lcc.train.sweep import (
        SweepStopped,
        check_layers,
        check_out,
        load_sweep,
        plan_runs,
        run_state,
        run_sweep,
    )

    sweep = load_sweep(args.config)
    out = Path(getattr(args, "out", None) or Path("runs") / Path(args.config).stem)
    if args.dry_run:
        check_out(out)
        runs = plan_runs(sweep, out)
        states = [run_state(run)[0] for run in runs]
        check_layers([run for run, state in zip(runs, states, strict=True) if state != "done"])
        for run, state in zip(runs, states, strict=True):
            print(f"{state:<7} {run.name}")
        return 0
    try:
        result = run_sweep(sweep, out, train_runs=not args.table_only)
    except SweepStopped as stopped:
        again = f"lcc sweep {args.config} --out {out}"
        print(f"lcc sweep: {stopped}; run the sweep again to continue: {again}", file=sys.stderr)
        return stopped.exit_code
    sys.stdout.write(result.markdown.read_text(encoding="utf-8"))
    print(f"lcc sweep: table in {result.markdown} and {result.csv}", file=sys.stderr)
    return 0
