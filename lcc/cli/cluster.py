"""``lcc cluster``: cluster latents, match clusters to classes and write correction targets.

Reads ``z`` (N, ...) and ``y`` (N,) from LATENTS (``.npz`` or ``.safetensors``), runs
:func:`lcc.engine.refresh.refresh` and writes OUT, an ``.npz`` with ``clusters`` (N,) int64,
``cluster_class`` (K,) int64, ``misclustered`` (N,) bool, ``correctible`` (N,) bool and
``targets`` (N, D) float32 (NaN rows for samples without a target). stdout gets exactly one
JSON line (the refresh summary plus ``latents`` and ``out``); stage progress goes to stderr
only when stderr is a terminal. Without LATENTS (or with ``--example``) a seeded generated
example is clustered, so ``lcc cluster`` alone runs and writes ``lcc-clusters.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from lcc.cli import HelpFormatter
from lcc.errors import LCCInputError
from lcc.io import npz_kind

DEFAULT_OUT = "lcc-clusters.npz"
#: What OUT holds; an existing OUT of another kind is overwritten only with --force.
CLUSTER_RESULT = npz_kind(
    "an lcc cluster result", "clusters", "cluster_class", "misclustered", "correctible", "targets"
)

DESCRIPTION = """\
Cluster latents with a k-NN graph, match each cluster to its majority class, and compute
the LCC correction target of every correctible (misclustered but fixable) sample.

LATENTS is a .npz or .safetensors file holding z (N, ...) float latents and y (N,)
non-negative integer labels (need not be contiguous). Without LATENTS, or with --example,
a seeded Gaussian-mixture example is generated instead.

OUT (.npz) receives: clusters (N,) int64, cluster_class (K,) int64, misclustered (N,) bool,
correctible (N,) bool, targets (N, D) float32 with NaN rows for non-correctible samples
(D is the flattened latent dimension, or --pca DIM). stdout gets one JSON line of statistics.
OUT may not be LATENTS (also via a symlink or ..); an existing OUT that is not an lcc cluster
result is overwritten only with --force.

examples:
  lcc cluster                                   # generated example -> lcc-clusters.npz
  lcc cluster latents.npz clusters.npz --k 10 --method louvain
  lcc cluster latents.npz fast.npz --knn approximate --pca 64 --targets approximate
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``cluster`` subcommand to ``subparsers``."""
    from lcc.engine.refresh import CLUSTER_METHODS, KNN_MODES, METRICS, TARGET_MODES, WEIGHTS

    parser = subparsers.add_parser(
        "cluster",
        help="cluster latents and compute LCC correction targets",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "latents",
        nargs="?",
        default=argparse.SUPPRESS,
        metavar="LATENTS",
        help=".npz or .safetensors file with keys z (N, ...) and y (N,); "
        "omit to cluster a generated example",
    )
    parser.add_argument(
        "out",
        nargs="?",
        default=DEFAULT_OUT,
        metavar="OUT",
        help="output .npz file (written atomically)",
    )
    parser.add_argument("--k", type=int, default=5, help="neighbours per sample in the k-NN graph")
    parser.add_argument(
        "--method",
        choices=CLUSTER_METHODS,
        default="leiden",
        help="graph clustering: Leiden or Louvain modularity, or k-NN peer pressure",
    )
    parser.add_argument(
        "--targets",
        choices=TARGET_MODES,
        default="exact",
        help="exact: mean of the k nearest correctly clustered same-class samples (eq. 7); "
        "approximate: nearest random representative of a matched cluster (eq. 13-14)",
    )
    parser.add_argument(
        "--knn",
        choices=KNN_MODES,
        default="exact",
        help="k-NN search: exact (flat) or approximate (faster, recall >= 0.95)",
    )
    parser.add_argument(
        "--pca",
        type=_positive_int,
        default=None,
        metavar="DIM",
        help="project latents to DIM principal components first (targets then live in DIM); "
        "None: no PCA",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="unweighted",
        help="graph edge weights: unweighted, or rbf exp(-d^2/s^2) with s the median k-NN distance",
    )
    parser.add_argument("--metric", choices=METRICS, default="l2", help="k-NN distance")
    parser.add_argument(
        "--resolution",
        type=float,
        default=1.0,
        help="modularity resolution of Leiden/Louvain (higher: more, smaller clusters)",
    )
    parser.add_argument(
        "--classes",
        type=_int_list,
        default=None,
        metavar="C1,C2,...",
        help="only samples of these classes get targets; None: every class",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every random choice (and of the example)"
    )
    parser.add_argument(
        "--example",
        action="store_true",
        help="cluster a generated Gaussian-mixture example; the only positional is then OUT",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite OUT even when it exists and is not an lcc cluster result "
        "(OUT may never be LATENTS)",
    )
    parser.add_argument(
        "--example-samples",
        type=_positive_int,
        default=2000,
        metavar="N",
        help="number of samples of the generated example",
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``lcc cluster`` with parsed ``args``; returns the exit code."""
    from lcc.engine.refresh import RefreshConfig, refresh
    from lcc.io import check_output_path, load_latents, save_npz_atomic

    latents, out = _paths(args)
    check_output_path(out, [latents], force=args.force, kind=CLUSTER_RESULT)
    _check_writable(out)
    progress = _Progress(sys.stderr) if _is_terminal(sys.stderr) else None
    if latents is None:
        z, y = example(args.example_samples, seed=args.seed)
    else:
        if progress:
            progress("load")
        z, y = load_latents(latents)
    config = RefreshConfig(
        k=args.k,
        method=args.method,
        targets=args.targets,
        knn=args.knn,
        metric=args.metric,
        pca=args.pca,
        weights=args.weights,
        resolution=args.resolution,
        seed=args.seed,
    )
    result = refresh(z, y, config, classes=args.classes, progress=progress)
    if progress:
        progress("write")
    save_npz_atomic(
        out,
        clusters=result.clusters.astype(np.int64, copy=False),
        cluster_class=result.cluster_class.astype(np.int64, copy=False),
        misclustered=result.misclustered.astype(bool, copy=False),
        correctible=result.correctible.astype(bool, copy=False),
        targets=result.targets.dense().astype(np.float32, copy=False),
    )
    if progress:  # before the JSON line, which may go to the same terminal
        progress.finish(
            f"wrote {out}: {result.n} samples, {result.n_clusters} clusters, "
            f"{result.misclustered_fraction:.1%} misclustered, "
            f"{result.correctible_fraction:.1%} correctible"
        )
    summary = result.summary()
    summary["latents"] = "example" if latents is None else str(latents)
    summary["out"] = str(out)
    print(json.dumps(summary), flush=True)
    return 0


def example(n_samples: int = 2000, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The generated example: 10 classes of 3 overlapping sub-clusters in 64 dimensions.

    About 10% of the samples are misclustered at the default size.

    >>> z, y = example(100)
    >>> z.shape, y.shape
    ((100, 64), (100,))
    """
    from lcc.synthetic import gaussian_mixture

    z, y, _ = gaussian_mixture(
        n_samples=n_samples,
        dim=64,
        n_classes=10,
        clusters_per_class=3,
        separation=1.9,
        noise=1.0,
        intrinsic_dim=16,
        seed=seed,
    )
    return z, y


def _paths(args: argparse.Namespace) -> tuple[Path | None, Path]:
    """(LATENTS or None for the example, OUT) from the positionals and ``--example``."""
    latents, out = getattr(args, "latents", None), args.out
    if args.example:
        if latents is not None and out != DEFAULT_OUT:
            raise LCCInputError(
                f"with --example, pass only OUT (got LATENTS {latents} and OUT {out}); "
                "drop --example to cluster a file"
            )
        if latents is not None:
            latents, out = None, latents
    out_path = Path(out)
    if out_path.suffix.lower() != ".npz":
        raise LCCInputError(f"OUT must be a .npz file name, got {out}; e.g. {out_path.stem}.npz")
    return (None if latents is None else Path(latents)), out_path


def _check_writable(out: Path) -> None:
    """Fail before the (possibly long) computation when OUT cannot be written."""
    directory = out.parent
    if not directory.is_dir():
        raise LCCInputError(f"cannot write {out}: directory {directory} does not exist")
    if out.is_dir():
        raise LCCInputError(f"cannot write {out}: it is a directory; pass a file name")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise LCCInputError(f"cannot write {out}: no write permission in {directory}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated class labels such as 3,7,42, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one class label")
    return values


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Progress:
    """One self-overwriting status line on a terminal: the current stage and elapsed time."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.start = time.perf_counter()

    def __call__(self, stage: str) -> None:
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r\x1b[Klcc cluster: {stage}... ({elapsed:.1f} s)")
        self.stream.flush()

    def finish(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r\x1b[Klcc cluster: {message} ({elapsed:.1f} s)\n")
        self.stream.flush()
