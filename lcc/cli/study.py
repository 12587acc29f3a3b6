"""``lcc study``: which latent measure predicts generalisation (:mod:`lcc.train.study`)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from lcc.cli import add_command

HELP = "train a set of models and rank latent measures by how well they predict generalisation"

DESCRIPTION = """\
The intraclass-clustering study (Carbonnelle & De Vleeschouwer, sec. 3-4) for the whole family
of latent measures: train the models of a grid one after the other, measure each on a seeded
sample of its training set, and rank the measures by the granulated Kendall coefficient of
Jiang et al. (2020) against the test accuracy.

CONFIG.yaml (a sweep file plus two blocks):
  base:      options of every model (any lcc train option; e.g. dataset: fashion-mnist:super)
  grid:      option: [values, ...]; every combination is a model, `seed` gives repeats (not a
             hyperparameter); the keys with 2+ values are the hyperparameters of the Kendall table
  exclude:   list of partial settings never trained, e.g. [{weight_decay: 4e-5, lr: [0.01]},
             {dropout: [0.2], augment: basic}, {width: 1.5, depth: 3}]
  measures:  names (c1, c2, c3, c4, misclustered, cc_mc_gap, label-variation, sharpness_sigma,
             sharpness_alpha; default all), layers (default: every BatchNorm layer and fc1),
             samples (training samples measured, 1000), top_k, top_layers, variant
             (paper|authors), k (k-NN of the graph measures), sharpness ({depth, samples,
             steps, ...} of lcc.analysis.sharpness.SharpnessConfig), sharpness_samples (500)

Direction: c1-c4 and cc_mc_gap count larger values as better generalisation; misclustered,
label-variation, sharpness_sigma (1/sigma') and sharpness_alpha (1/alpha') smaller, so their
sign is flipped in the Kendall table (a positive coefficient always means "ranks the models
like their test accuracy").

Outputs in DIR: models.csv (one row per model), kendall.csv and kendall.md (one row per
measure column), report.html with figures/ (PNG + SVG). A model whose loss diverges is
recorded as failed (DIR/<model>/failed.json), left out of the correlations and counted. The
study is resumable: run it again after an interruption (SIGTERM: exit 143).

examples:
  lcc study studies/intraclass_fashion.yaml --out runs/study
  lcc study studies/intraclass_fashion.yaml --out runs/study --dry-run   # models and states
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``study`` subcommand to ``subparsers``."""
    parser = add_command(subparsers, "study", HELP, DESCRIPTION, run)
    parser.add_argument("config", metavar="CONFIG.yaml", help="the study file")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="folder of the models and outputs (default: runs/<CONFIG name>)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the models and their state; train nothing"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from lcc.train.study import load_study, plan_study, run_study, states
    from lcc.train.sweep import SweepStopped

    study = load_study(args.config)
    out = Path(getattr(args, "out", None) or Path("runs") / Path(args.config).stem)
    if args.dry_run:
        runs = plan_study(study, out)
        for name, state in states(runs).items():
            print(f"{state:<8} {name}")
        print(f"lcc study: {len(runs)} models; hyperparameters: "
              f"{', '.join(study.hyperparameters)}", file=sys.stderr)  # fmt: skip
        return 0

    def stop(signum: int, frame: Any) -> None:  # outside training (measuring, writing)
        raise SweepStopped(f"stopped by signal {signum}", 128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        final = run_study(study, out)
    except SweepStopped as stopped:
        again = f"lcc study {args.config} --out {out}"
        print(f"lcc study: {stopped}; run it again to continue: {again}", file=sys.stderr)
        return stopped.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stdout.write((Path(out) / "kendall.md").read_text(encoding="utf-8"))
    failed = sum(state == "failed" for state in final.values())
    print(f"lcc study: {len(final)} models ({failed} failed); {out}/report.html",
          file=sys.stderr)  # fmt: skip
    return 0
