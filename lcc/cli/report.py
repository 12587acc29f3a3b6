"""``lcc report``: pictures and tables comparing finished runs (:mod:`lcc.analysis.report`)."""

from __future__ import annotations

import argparse
from typing import Any

from lcc.cli import add_command

HELP = "pictures, report.md and report.html comparing finished runs"

DESCRIPTION = """\
Compare finished `lcc train` runs: writes into --out DIR a report.md, a self-contained
report.html (pictures embedded) and the pictures as PNG and SVG:

  top1                     training top-1 and loss per epoch, all runs overlaid; final test top-1
  RUN-refresh-quality      misclustered fraction and CC/MC accuracy per refresh and layer
  RUN-refresh-seconds      refresh seconds per stage (stacked bars)
  RUN-layers               values per layer at the last refresh (several layers), plus the
                           lines of RUN_DIR/measures.jsonl (`lcc measure` output) if present
  RUN-latents              2-D map of each layer's latents at the last refresh, coloured by
                           class, misclustered samples ringed (runs trained with --save-latents)
  RUN-class-NAME-LAYER     with --class NAME: that class's latents only, coloured by cluster,
                           misclustered samples ringed (the LCC paper's Fig. 2, right)

Tables: test top-1/top-5, epochs, mean epoch seconds, refresh seconds, and the last refresh's
misclustered fraction and CC/MC accuracy (mean over layers; per layer in a second table).
Latent maps use UMAP when umap-learn is installed (--embedding auto), else PCA; at most
--max-points samples (a seeded uniform sample, the same in every panel) are drawn.
--out must not be a run or sweep folder; an earlier report in it is replaced (a report.md or
report.html that lcc report did not write only with --force).

examples:
  lcc report runs/baseline runs/lcc --out report
  lcc report runs/lcc --out report-lcc --embedding tsne --max-points 2000
  lcc report runs/lcc --out report-shirt --class Shirt   # or --class 6
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to ``subparsers``."""
    from lcc.analysis.plots import EMBEDDINGS, MAX_POINTS

    parser = add_command(subparsers, "report", HELP, DESCRIPTION, run)
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (lcc train --out DIR)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder of the report")
    parser.add_argument(
        "--max-points",
        type=int,
        default=MAX_POINTS,
        metavar="N",
        help="most samples drawn in a latent map",
    )
    parser.add_argument(
        "--embedding",
        choices=EMBEDDINGS,
        default="auto",
        help="2-D embedding of the latent maps (auto: UMAP if installed, else PCA)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and embedding")
    parser.add_argument(
        "--class",
        dest="class_name",
        metavar="NAME",
        help="also draw this class's latents coloured by cluster, misclustered samples ringed "
        "(runs trained with --save-latents): an integer label or a class name of the run's "
        "dataset",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a report.md / report.html in --out that lcc report did not write",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from lcc.analysis.report import write_report

    report = write_report(
        args.runs,
        args.out,
        max_points=args.max_points,
        method=args.embedding,
        seed=args.seed,
        force=args.force,
        class_name=args.class_name,
    )
    pictures = sum(1 for path in report.images if path.suffix == ".png")
    print(f"report: {report.html} (and {report.markdown.name}, {_count(pictures, 'picture')})")
    return 0


def _count(number: int, noun: str) -> str:
    """``1 picture``, ``2 pictures``.

    >>> _count(1, "picture"), _count(0, "picture")
    ('1 picture', '0 pictures')
    """
    return f"{number} {noun}{'' if number == 1 else 's'}"
