"""``lcc evaluate``: robustness, calibration and probes of runs (:mod:`lcc.analysis.evaluate`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lcc.cli import add_command
from lcc.errors import LCCInputError

HELP = "robustness (noise, FGSM/PGD, corruptions), calibration and probes of finished runs"

DESCRIPTION = """\
Evaluate finished `lcc train` runs beyond clean top-1. Each RUN_DIR's final model
(checkpoints/last.ckpt) is tested on the run's own test set (the same subset and seed, so
top1/top5 equal its metrics.json), or on a seeded stratified --subset of it. Accuracies are
fractions, as in metrics.json.

  always         top1, top5, per_class accuracy, ece (expected calibration error, 15 equal
                 bins of the top-1 confidence, L1, torchmetrics), nll (mean cross-entropy)
  --noise        top-1 with Gaussian noise N(0, sigma^2) added to the NORMALISED inputs (the
                 units the network sees: sigma 1 = one dataset standard deviation), seeded
  --fgsm, --pgd  top-1 under L-inf attacks (foolbox) in PIXEL units before normalisation:
                 images in [0, 1], eps 0.1 = 25.5 grey levels, adversarial images clipped to
                 [0, 1]; FGSM one step of eps * sign(gradient); PGD STEPS steps of ALPHA from a
                 seeded uniform random start in the eps-ball (Madry et al.)
  --corruptions  top-1 per type and severity of the common corruptions (Hendrycks & Dietterich
                 2019, package imagecorruptions): the benchmark's 15 types (common) and its 4
                 validation types (speckle_noise, gaussian_blur, spatter, saturate); saturate
                 does not apply to grey images. Images under 32 pixels are edge-padded to 32
                 and cropped back; grey images are corrupted as RGB and turned back into grey
                 by their luminance. Seeded; cached in --cache-dir per dataset, type,
                 severity, seed and test images
  --baseline     with --corruptions: corruption error per type CE = sum_s E(s) / sum_s E_base(s),
                 mce = its mean over the evaluated types among the 15, and the relative
                 versions with (E(s) - E_clean) (H&D 2019); ratios, 1 = as the baseline
  --probe LAYER  linear (logistic regression) and k-NN probes on the standardised features of
                 LAYER ('output' = logits), fitted on the run's training set, scored on the test
                 set: how a model trained with --ce-weight 0 (label variation) is read
  --read-with L  measure EVERY accuracy (clean, noise, attacks, corruptions) through the linear
                 probe of layer L instead of the logits: for a model trained with --ce-weight 0,
                 whose logits are not a classifier (the attacks go through the probe too)

Output: one JSON line per run on stdout (keys top1, top5, per_class, ece, nll, noise, fgsm, pgd,
corruption, corruption_error, relative_corruption_error, mce, relative_mce, probe, seconds),
RUN_DIR/evaluation.json (written atomically), and with --out DIR a comparison table
(evaluation.md, evaluation.csv). `lcc report` draws the robustness curves of runs that have an
evaluation.json.

examples:
  lcc evaluate runs/base runs/smooth --noise 0.1,0.5,1.0 --fgsm 0.05,0.1 --pgd 0.1:10:0.025
  lcc evaluate runs/base runs/smooth --corruptions --baseline runs/base --subset 2000 --out eval
  lcc evaluate runs/lv --probe act1 --probe output --probe-train 10000
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to ``subparsers``."""
    parser = add_command(subparsers, "evaluate", HELP, DESCRIPTION, run)
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (lcc train --out DIR)"
    )
    _robustness_options(parser.add_argument_group("robustness"))
    _probe_options(parser.add_argument_group("probes"))
    _data_options(parser.add_argument_group("data and output"))
    return parser


def _robustness_options(group: Any) -> None:
    group.add_argument(
        "--noise",
        metavar="SIGMAS",
        help="comma-separated noise standard deviations, normalised-input units (e.g. 0.1,0.5,1)",
    )
    group.add_argument(
        "--fgsm",
        metavar="EPS",
        help="comma-separated FGSM radii, pixel units in [0, 1] (e.g. 0.05,0.1 or 8/255)",
    )
    group.add_argument(
        "--pgd",
        metavar="EPS:STEPS:ALPHA",
        help="PGD settings, comma-separated (e.g. 0.1:10:0.025), pixel units in [0, 1]",
    )
    group.add_argument(
        "--corruptions",
        nargs="?",
        const="all",
        metavar="NAMES",
        help="corruption types (comma-separated names, 'common' for the benchmark's 15, 'all' "
        "or no value: every type that applies); None: no corruption",
    )
    group.add_argument(
        "--severities",
        default="1,2,3,4,5",
        metavar="LIST",
        help="corruption severities (1-5), comma-separated",
    )
    group.add_argument(
        "--baseline",
        metavar="RUN_DIR",
        help="baseline run (same dataset and test set) for the corruption errors and mCE",
    )


def _probe_options(group: Any) -> None:
    group.add_argument(
        "--probe",
        action="append",
        metavar="LAYER",
        help="layer to probe (repeat for several; 'output' = logits; `lcc layers MODEL`)",
    )
    group.add_argument(
        "--read-with",
        metavar="LAYER",
        help="read every accuracy through the linear probe of LAYER ('output' = logits); None: "
        "the model's logits",
    )
    group.add_argument("--probe-k", type=int, default=10, help="neighbours of the k-NN probe")
    group.add_argument(
        "--probe-train",
        type=int,
        metavar="N",
        help="fit the probes on a seeded stratified subset of N training samples; None: all",
    )
    group.add_argument(
        "--probe-pool",
        choices=("flatten", "avg", "max"),
        default="flatten",
        help="how conv feature maps of the probed layer become vectors",
    )


def _data_options(group: Any) -> None:
    group.add_argument(
        "--subset",
        type=int,
        metavar="N",
        help="evaluate on a seeded stratified subset of N test samples; None: the whole test set",
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of the subset, noise, PGD starts, corruptions"
    )
    group.add_argument("--batch-size", type=int, default=500, help="samples per forward pass")
    group.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="cache of corrupted test sets; None: $LCC_DATA_DIR/corruptions or "
        "~/.cache/lcc/corruptions",
    )
    group.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the comparison table (evaluation.md, evaluation.csv); None: no table",
    )


def _numbers(text: str | None, name: str) -> tuple[float, ...]:
    values = []
    for piece in filter(None, (part.strip() for part in (text or "").split(","))):
        try:
            value = float(piece)
        except ValueError:
            raise LCCInputError(
                f"{name}: cannot read {piece!r}; write numbers like 0.1,0.5"
            ) from None
        if not value >= 0 or value == float("inf"):
            raise LCCInputError(f"{name}: values must be finite and >= 0, got {piece}")
        values.append(value)
    return tuple(values)


def options_from_args(args: argparse.Namespace) -> Any:
    """The :class:`lcc.analysis.evaluate.EvalOptions` of parsed arguments (validated)."""
    from lcc.analysis.attacks import parse_eps_list, parse_pgd
    from lcc.analysis.evaluate import EvalOptions

    severities = []
    for piece in filter(None, (part.strip() for part in args.severities.split(","))):
        if piece not in ("1", "2", "3", "4", "5"):
            raise LCCInputError(f"--severities: each must be 1..5, got {piece!r}")
        severities.append(int(piece))
    return EvalOptions(
        noise=_numbers(args.noise, "--noise"),
        fgsm=tuple(parse_eps_list(args.fgsm, "--fgsm")) if args.fgsm is not None else (),
        pgd=tuple(parse_pgd(args.pgd)) if args.pgd is not None else (),
        corruptions=args.corruptions,
        severities=tuple(dict.fromkeys(severities)),
        probe=tuple(dict.fromkeys(args.probe or ())),
        probe_k=args.probe_k,
        probe_train=args.probe_train,
        probe_pool=args.probe_pool,
        read_with=args.read_with,
        subset=args.subset,
        seed=args.seed,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
    ).check()


def run(args: argparse.Namespace) -> int:
    from lcc.analysis.evaluate import evaluate_runs, evaluation_table
    from lcc.io import atomic_write, check_output_path

    options = options_from_args(args)
    out = None
    if args.out is not None:
        out = Path(args.out).expanduser()
        check_output_path(out, [*args.runs, args.baseline or None], label="--out")
        if out.exists() and not out.is_dir():
            raise LCCInputError(f"--out {out} is a file; pass a folder for the tables")

    def emit(result: dict[str, Any]) -> None:
        print(json.dumps(result, default=str), flush=True)

    def say(text: str) -> None:
        print(f"lcc evaluate: {text}", file=sys.stderr, flush=True)

    results = evaluate_runs(args.runs, options, baseline=args.baseline, say=say, emit=emit)
    if out is not None:
        markdown, table = evaluation_table(results)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LCCInputError(f"cannot create --out {out}: {error.strerror or error}") from None
        atomic_write(out / "evaluation.md", lambda handle: handle.write(markdown.encode()))
        atomic_write(out / "evaluation.csv", lambda handle: handle.write(table.encode()))
        say(f"table: {out / 'evaluation.md'} and {out / 'evaluation.csv'}")
    return 0
