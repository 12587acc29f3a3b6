"""``lcc cluster``: cluster latents, match clusters to classes and write correction targets.

Reads ``z`` (N, ...) and ``y`` (N,) from LATENTS (``.npz`` or ``.safetensors``; or a ``.npy``
pair, memory-mapped: a directory holding ``z.npy`` and ``y.npy``, or a latents ``.npy`` with
``--labels Y.npy``), runs :func:`lcc.engine.refresh.refresh` and writes OUT, an ``.npz`` with
``clusters`` (N,) int64, ``cluster_class`` (K,) int64, ``misclustered`` (N,) bool,
``correctible`` (N,) bool and ``targets`` (N, D) float32 (NaN rows for samples without a
target). stdout gets exactly one JSON line (the refresh summary plus ``latents`` and ``out``).
Stage progress with per-stage seconds goes to stderr: a live line on a terminal; elsewhere
plain lines, only once the run has taken more than :data:`QUIET_SECONDS`. Without LATENTS (or
with ``--example``) a seeded generated example is clustered, so ``lcc cluster`` alone runs and
writes ``lcc-clusters.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from lcc.cli import add_command
from lcc.cli.flags import add_flag, option_field, positive_int
from lcc.errors import LCCInputError
from lcc.io import npz_kind

DEFAULT_OUT = "lcc-clusters.npz"
#: What OUT holds; an existing OUT of another kind is overwritten only with --force.
CLUSTER_RESULT = npz_kind(
    "an lcc cluster result", "clusters", "cluster_class", "misclustered", "correctible", "targets"
)

#: Off a terminal, stage lines appear only once a run has taken this many seconds.
QUIET_SECONDS = 5.0

DESCRIPTION = """\
Cluster latents with a k-NN graph, match each cluster to its majority class, and compute
the LCC correction target of every correctible (misclustered but fixable) sample.

LATENTS is a .npz or .safetensors file holding z (N, ...) float latents and y (N,)
non-negative integer labels (need not be contiguous); or, for large data, a .npy pair read
memory-mapped (nothing copied through a zip archive): a directory holding z.npy (float16 or
float32) and y.npy (integers), or a latents .npy with --labels Y.npy. Without LATENTS, or
with --example, a seeded Gaussian-mixture example is generated instead.

OUT (.npz) receives: clusters (N,) int64, cluster_class (K,) int64, misclustered (N,) bool,
correctible (N,) bool, targets (N, D) float32 with NaN rows for non-correctible samples
(D is the flattened latent dimension, or --pca DIM). stdout gets one JSON line of statistics.
OUT may not be LATENTS (also via a symlink or ..); an existing OUT that is not an lcc cluster
result is overwritten only with --force.

examples:
  lcc cluster                                   # generated example -> lcc-clusters.npz
  lcc cluster latents.npz clusters.npz --k 10 --method louvain
  lcc cluster latents.npz fast.npz --knn approximate --pca 64 --targets approximate
  lcc cluster run/latents/ out.npz --knn approximate --pca 64   # run/latents/{z,y}.npy
  lcc cluster z.npy out.npz --labels y.npy
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``cluster`` subcommand to ``subparsers``."""
    parser = add_command(
        subparsers,
        "cluster",
        "cluster latents and compute LCC correction targets",
        DESCRIPTION,
        run,
    )
    parser.add_argument(
        "latents",
        nargs="?",
        default=argparse.SUPPRESS,
        metavar="LATENTS",
        help=".npz or .safetensors file with keys z (N, ...) and y (N,), a directory holding "
        "z.npy and y.npy, or a latents .npy (with --labels); omit to cluster a generated example",
    )
    parser.add_argument(
        "out",
        nargs="?",
        default=DEFAULT_OUT,
        metavar="OUT",
        help="output .npz file (written atomically)",
    )
    parser.add_argument(
        "--labels",
        metavar="Y.npy",
        help="labels .npy (N,) integers, when LATENTS is a latents .npy; None: y.npy in a "
        "LATENTS directory",
    )
    _add_refresh_flags(parser)
    parser.add_argument(
        "--classes",
        type=_int_list,
        metavar="C1,C2,...",
        help="only samples of these classes get targets; None: every class",
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
        type=positive_int,
        default=2000,
        metavar="N",
        help="number of samples of the generated example",
    )
    return parser


#: where ``lcc cluster`` departs from LCC's training defaults: one refresh searches exactly
CLUSTER_DEFAULTS = {"knn": "exact"}


def _add_refresh_flags(parser: argparse.ArgumentParser) -> None:
    """The refresh's flags, generated from LCC's options (the ones ``lcc train`` has too)."""
    from lcc.regularisers.lcc_options import REFRESH_OPTIONS, LCCOptions

    for name in REFRESH_OPTIONS:
        item = option_field(LCCOptions, name)
        default = CLUSTER_DEFAULTS.get(name, item.default)
        text = "seed of every random choice (and of the example)" if name == "seed" else None
        add_flag(parser, item, default=default, help=text, show_default=False)


def run(args: argparse.Namespace) -> int:
    """Run ``lcc cluster`` with parsed ``args``; returns the exit code."""
    from lcc.engine.refresh import RefreshConfig, refresh
    from lcc.io import check_output_path, load_latents, save_npz_atomic
    from lcc.regularisers.lcc_options import REFRESH_OPTIONS

    latents, out = _paths(args)
    check_output_path(out, [latents], force=args.force, kind=CLUSTER_RESULT)
    _check_writable(out)
    progress = _Progress(sys.stderr, terminal=_is_terminal(sys.stderr))
    if latents is None:
        if args.labels is not None:
            raise LCCInputError("--labels applies to a LATENTS .npy; drop it for the example")
        z, y = example(args.example_samples, seed=args.seed)
    else:
        with progress.stage("load"):
            z, y = load_latents(latents, labels=args.labels)
    config = RefreshConfig(**{name: getattr(args, name) for name in REFRESH_OPTIONS})
    result = refresh(
        z, y, config, classes=args.classes, progress=progress.start, stage_done=progress.done
    )
    with progress.stage("write"):
        save_npz_atomic(
            out,
            clusters=result.clusters.astype(np.int64, copy=False),
            cluster_class=result.cluster_class.astype(np.int64, copy=False),
            misclustered=result.misclustered.astype(bool, copy=False),
            correctible=result.correctible.astype(bool, copy=False),
            targets=result.targets.dense().astype(np.float32, copy=False),
        )
    progress.finish(  # before the JSON line, which may go to the same terminal
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
    """Stage progress on stderr, with the seconds of every finished stage.

    On a terminal: a self-overwriting line for the running stage, and one line per finished
    stage. Elsewhere (a log file, a pipe): nothing for quick runs; once the run has taken more
    than :data:`QUIET_SECONDS`, the finished stages so far and then each stage as it finishes,
    one plain line each.
    """

    def __init__(self, stream: IO[str], *, terminal: bool) -> None:
        self.stream, self.terminal = stream, terminal
        self.start_time = time.perf_counter()
        self.pending: list[str] = []
        self.shown = terminal
        self.prefix = "\r\x1b[K" if terminal else ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def start(self, stage: str) -> None:
        """A stage begins (the live line, on a terminal only)."""
        if self.terminal:
            self.stream.write(f"\r\x1b[Klcc cluster: {stage}... ({self.elapsed():.1f} s)")
            self.stream.flush()

    def done(self, stage: str, seconds: float) -> None:
        """A stage ended after ``seconds``."""
        line = f"lcc cluster: {stage} {seconds:.2f} s (total {self.elapsed():.1f} s)"
        if not self.shown and self.elapsed() > QUIET_SECONDS:
            self.shown = True
        if not self.shown:
            self.pending.append(line)
            return
        self.stream.write("".join(f"{self.prefix}{text}\n" for text in [*self.pending, line]))
        self.stream.flush()
        self.pending = []

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Time a stage of the command itself (loading, writing)."""
        self.start(stage)
        started = time.perf_counter()
        yield
        self.done(stage, time.perf_counter() - started)

    def finish(self, message: str) -> None:
        if self.shown:
            self.stream.write(f"{self.prefix}lcc cluster: {message} ({self.elapsed():.1f} s)\n")
            self.stream.flush()
