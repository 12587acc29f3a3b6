"""``lcc train``: fine-tune a classifier with Latent Cluster Correction (or without: --no-lcc).

Every option is a field of :class:`lcc.train.config.TrainConfig`; the parser and its help texts are
built from those fields, so defaults shown here are the ones used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from lcc.cli import add_command
from lcc.cli.flags import add_flag, default_text
from lcc.train.config import TrainConfig

DESCRIPTION = """\
Fine-tune MODEL on DATASET with loss CE + w * LCC: at the start of every post-warmup epoch
(every --interval epochs) the latents of --layers over the training set are clustered with a
k-NN graph, clusters are matched to classes, and each misclustered sample gets a target (the
mean of its k nearest correctly clustered neighbours of its class). SGD with momentum and a
cosine learning-rate schedule over --epochs.

--reg NAME[:key=value,...] (repeatable) picks any combination of the family instead: lcc,
label-variation, smoothness, gkd, kmeans (`--help-reg NAME` lists a regulariser's options;
lcc takes the LCC options below as defaults). --labeled-fraction / --labels-per-class /
--unlabeled train with few labels. SIGTERM or Ctrl+C saves a mid-epoch checkpoint and says
how to resume (exit 143 / 130).

Run directory --out DIR: config.yaml (the resolved config; reusable with --config),
checkpoints/last.ckpt (every epoch, LCC state included), metrics.json (test top-1/top-5,
per-epoch times), refreshes.jsonl (per refresh and layer: clusters, misclustered and
correctible fractions, modularity, stage seconds, CC/MC accuracy), refresh/epoch_E_LAYER.npz
(clusters), logs/metrics.csv and tensorboard/; every epoch E in them counts from 1, as the
per-epoch lines. stdout gets one JSON line of final metrics.

A YAML --config file may set any option (keys are the option names, e.g. batch_size: 64,
layers: [act1]); options given on the command line override it.

examples:
  lcc train small-cnn fashion-mnist --out runs/lcc --epochs 5 --subset 10000
  lcc train small-cnn fashion-mnist --out runs/base --epochs 5 --no-lcc
  lcc train small-resnet digits --out runs/r --layers layer3 --pool avg --k 10
  lcc train --config runs/lcc/config.yaml --out runs/lcc2 --seed 1
  lcc train small-cnn fashion-mnist --out runs/lv --reg lcc --reg label-variation:w=0.1
  lcc train --help-reg label-variation         # a regulariser's options
  lcc train --out runs/lcc --resume            # continue a killed run
"""

GROUPS = {
    "run": "run",
    "lcc": "latent cluster correction",
    "training": "training",
    "data": "model and data",
    "system": "system",
}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``subparsers``."""
    parser = add_command(
        subparsers,
        "train",
        "fine-tune a classifier with LCC (Lightning; checkpoints, logs, DDP)",
        DESCRIPTION,
        run,
    )
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for item in dataclasses.fields(TrainConfig):
        meta = item.metadata
        text = meta["help"]
        group = groups[meta["group"]]
        if item.name in ("model", "dataset"):
            group.add_argument(
                item.name,
                nargs="?",
                metavar=item.name.upper(),
                default=argparse.SUPPRESS,
                help=f"{text} (may come from --config)",
            )
        elif item.name == "regularisers":
            group.add_argument(
                "--reg",
                dest="regularisers",
                action="append",
                default=argparse.SUPPRESS,
                metavar="NAME[:key=value,...]",
                help=f"{text} (default: {default_text(item)})",
            )
        elif item.name == "out":
            add_flag(group, item, help=f"{text} (required)")
        else:
            add_flag(group, item)
    groups["lcc"].add_argument(
        "--help-reg",
        metavar="NAME",
        nargs="?",
        const="",
        default=argparse.SUPPRESS,
        help="print the options of regulariser NAME (no NAME: list the regularisers) and exit",
    )
    groups["run"].add_argument(
        "--config",
        metavar="FILE.yaml",
        default=argparse.SUPPRESS,
        help="read options from this YAML file (command-line options override it) (default: none)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if hasattr(args, "help_reg"):  # before the trainer's imports
        print(_regulariser_help(args.help_reg))
        return 0
    from lcc.train.config import field_names
    from lcc.train.lightning import NonFiniteLossError
    from lcc.train.run import launched_rank, resolve_config, train
    from lcc.train.stopping import TrainingStopped

    options = {name: getattr(args, name) for name in field_names() if hasattr(args, name)}
    config = resolve_config(options, getattr(args, "config", None))
    try:
        metrics = train(config)
    except NonFiniteLossError as error:
        if launched_rank() == 0:
            print(f"lcc train: error: {error}", file=sys.stderr)
        return 1
    except TrainingStopped as stopped:
        if launched_rank() == 0:
            print(f"lcc train: {stopped}", file=sys.stderr, flush=True)
        return stopped.exit_code
    if launched_rank() == 0:
        summary = {k: v for k, v in metrics.items() if k != "history"}
        summary["out"] = config.out
        print(json.dumps(summary, default=str))
        if config.ce_weight == 0:
            print(
                "lcc train: note: --ce-weight 0 trained no classifier: the top-1 above reads "
                "logits that no loss made class scores; read the model with "
                f"`lcc evaluate {config.out} --probe LAYER` (linear and k-NN probes) or "
                f"`lcc evaluate {config.out} --read-with LAYER`",
                file=sys.stderr,
            )
    return 0


def _regulariser_help(name: str) -> str:
    """``--help-reg``: one regulariser's options, or the list of them."""
    from lcc.regularisers import REGISTRY, regulariser_help, regulariser_summary

    if name:
        return regulariser_help(name)
    lines = ["regularisers (lcc train --reg NAME[:key=value,...]; --help-reg NAME for options):"]
    for key in sorted(REGISTRY):
        lines.append(f"  {key:<16} {regulariser_summary(key)}")
    return "\n".join(lines)
