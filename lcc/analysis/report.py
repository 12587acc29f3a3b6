"""A report comparing finished runs: PNG/SVG pictures, ``report.md`` and ``report.html``.

:func:`write_report` reads run directories (:mod:`lcc.analysis.runs`), draws the pictures of
:mod:`lcc.analysis.plots` and writes, in ``out``:

- ``report.md``: the comparison tables and links to the PNG files beside it;
- ``report.html``: the same, self-contained (PNGs embedded as base64 ``data:`` URIs, all text
  escaped), for a browser or an e-mail;
- ``robustness.png`` and a table when runs hold an ``evaluation.json`` (``lcc evaluate``):
  top-1 against noise sigma, FGSM/PGD eps and corruption severity, runs overlaid;
- ``top1.png`` (runs overlaid) and per run ``<run>-refresh-quality``, ``<run>-refresh-seconds``,
  ``<run>-layers`` (values per layer at the last refresh, plus any ``measures.jsonl`` lines of
  the run directory: dicts with ``measure``, ``value``, ``layer``, as printed by
  ``lcc measure``), ``<run>-latents`` (when the run saved latents, ``--save-latents``), each as
  ``.png`` and ``.svg``. ``measures.jsonl`` lines with ``"layer": "all"`` (the value over
  all layers) are left out of the per-layer picture.

Percentages in the tables are ``100 * value`` rounded to 2 decimals; ``-`` marks a value the
run does not have (a baseline has no refresh). ``out`` must not be a run or sweep folder;
an earlier report in it is replaced atomically (other files named report.md / report.html
only with ``force``).
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lcc.analysis.plots import FORMATS, MAX_POINTS
from lcc.analysis.runs import Run, load_latent_snapshot, load_runs, run_summary
from lcc.errors import LCCInputError
from lcc.io import read_jsonl_tolerant

__all__ = [
    "LAYER_COLUMNS",
    "RUN_COLUMNS",
    "Report",
    "format_percent",
    "format_seconds",
    "write_report",
]

#: the comparison table: (header, summary key, formatter name)
RUN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "name", "text"),
    ("test top-1 (%)", "test_top1", "percent"),
    ("test top-5 (%)", "test_top5", "percent"),
    ("epochs", "epochs", "integer"),
    ("mean epoch (s)", "mean_epoch_seconds", "seconds"),
    ("refreshes", "refreshes", "integer"),
    ("refresh total (s)", "total_refresh_seconds", "seconds"),
    ("misclustered, last (%)", "misclustered_fraction", "percent"),
    ("CC accuracy, last (%)", "accuracy_cc", "percent"),
    ("MC accuracy, last (%)", "accuracy_mc", "percent"),
)
#: the per-layer table of the last refresh: (header, key, formatter name)
LAYER_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("clusters", "n_clusters", "integer"),
    ("misclustered (%)", "misclustered_fraction", "percent"),
    ("correctible (%)", "correctible_fraction", "percent"),
    ("modularity", "modularity", "fixed"),
    ("accuracy (%)", "accuracy", "percent"),
    ("CC accuracy (%)", "accuracy_cc", "percent"),
    ("MC accuracy (%)", "accuracy_mc", "percent"),
    ("training's accuracy (%)", "train_accuracy", "percent"),
    ("CE", "cross_entropy", "fixed"),
    ("CC CE", "cross_entropy_cc", "fixed"),
    ("MC CE", "cross_entropy_mc", "fixed"),
)
#: values per layer drawn in ``<run>-layers`` from the last refresh
LAYER_MEASURES: tuple[str, ...] = (
    "misclustered_fraction",
    "modularity",
    "accuracy_cc",
    "accuracy_mc",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_percent(value: Any) -> str:
    """``0.8123`` -> ``'81.23'``; missing -> ``'-'``.

    >>> format_percent(0.8123), format_percent(None)
    ('81.23', '-')
    """
    return f"{100 * value:.2f}" if _is_number(value) else "-"


def format_seconds(value: Any) -> str:
    """Seconds with 2 decimals; missing -> ``'-'``.

    >>> format_seconds(1.234)
    '1.23'
    """
    return f"{value:.2f}" if _is_number(value) else "-"


def _format(value: Any, kind: str) -> str:
    if kind == "percent":
        return format_percent(value)
    if kind == "seconds":
        return format_seconds(value)
    if kind == "fixed":
        return f"{value:.3f}" if _is_number(value) else "-"
    if kind == "integer":
        return str(int(value)) if _is_number(value) else "-"
    return "-" if value is None else str(value)


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    caption: str
    png: Path


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    """Paths written by :func:`write_report`: ``markdown``, ``html`` and every picture file."""

    markdown: Path
    html: Path
    images: list[Path]


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
    slug, number = base, 2
    while slug in taken:
        slug, number = f"{base}-{number}", number + 1
    taken.add(slug)
    return slug


#: files that make a folder an ``lcc train`` run or an ``lcc sweep`` folder: never a report's
RUN_MARKERS: tuple[str, ...] = ("config.yaml", "metrics.json", "checkpoints", "table.csv")
#: the first bytes of the files :func:`write_report` writes, by name
_REPORT_HEADS: dict[str, bytes] = {
    "report.md": b"# lcc report: ",
    "report.html": b"<!DOCTYPE html>",
}


def _is_report(path: Path) -> bool:
    """Whether ``path`` is a ``report.md`` / ``report.html`` that :func:`write_report` wrote."""
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return False
    return head.startswith(_REPORT_HEADS[path.name]) and b"lcc report: " in head


def _check_out(out: Path, runs: Sequence[Run], force: bool) -> None:
    from lcc.io import OutputKind, check_output_path

    if out.exists() and not out.is_dir():
        raise LCCInputError(f"--out {out} is a file; pass a folder for the report")
    target = out.resolve()
    for run in runs:
        if run.path.resolve() == target:
            raise LCCInputError(
                f"--out {out} is the run directory {run.path}; write the report to another folder"
            )
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    if found:
        raise LCCInputError(
            f"--out {out} holds {found[0]}: it is the folder of a run or a sweep; write the "
            "report to another folder"
        )
    kind = OutputKind("an lcc report", _is_report)
    for name in _REPORT_HEADS:
        check_output_path(out / name, [], force=force, kind=kind, label="--out file")


def _read_measures(run: Run) -> list[dict[str, Any]]:
    return [
        record
        for record in read_jsonl_tolerant(run.path / "measures.jsonl")
        # "layer": "all" is lcc measure's value over all layers: not a layer
        if "measure" in record and "value" in record and record.get("layer") != "all"
    ]


def _layer_measures(run: Run) -> list[dict[str, Any]]:
    last = run_summary(run)["last_refresh"]
    values = [
        {"measure": key, "value": stats.get(key), "layer": layer}
        for key in LAYER_MEASURES
        for layer, stats in last.items()
        if _is_number(stats.get(key))
    ]
    return values + _read_measures(run)


def _comparison(runs: Sequence[Run]) -> list[Table]:
    summaries = [run_summary(run) for run in runs]
    rows = [[_format(s.get(key), kind) for _, key, kind in RUN_COLUMNS] for s in summaries]
    tables = [Table(header=[header for header, _, _ in RUN_COLUMNS], rows=rows)]
    layer_rows = []
    for summary, run in zip(summaries, runs, strict=True):
        refreshed = [r for r in run.history if r.get("refresh")]
        epoch = run.metrics.get("last_refresh_epoch")
        if epoch is None and refreshed:
            epoch = refreshed[-1].get("epoch")
        for layer, stats in summary["last_refresh"].items():
            cells = [_format(stats.get(key), kind) for _, key, kind in LAYER_COLUMNS]
            layer_rows.append([summary["name"], str(layer), _format(epoch, "integer"), *cells])
    if layer_rows:
        header = ["run", "layer", "epoch"] + [header for header, _, _ in LAYER_COLUMNS]
        tables.append(Table(header=header, rows=layer_rows))
    return tables


def _evaluation_section(runs: Sequence[Run], draw: Any) -> Section | None:
    """The ``lcc evaluate`` results of the runs that have an ``evaluation.json``: their table and
    robustness curves (top-1 vs noise, eps and severity, runs overlaid); None when none has."""
    from lcc.analysis import plots
    from lcc.analysis.evaluate import TABLE_NOTE, evaluation_rows, load_evaluation

    found = [(run.name, load_evaluation(run.path)) for run in runs]
    evaluations = [(name, result) for name, result in found if result]
    if not evaluations:
        return None
    header, rows = evaluation_rows(evaluations)
    section = Section(
        title="Robustness and calibration (lcc evaluate)",
        text=TABLE_NOTE,
        tables=[Table(header=header, rows=rows)],
    )
    curves = dict(evaluations)
    if any(plots.robustness_curves(result) for result in curves.values()):
        caption = "Top-1 under noise, attacks and corruptions"
        draw(section, caption, plots.plot_robustness, "robustness", curves)
    return section


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    max_points: int = MAX_POINTS,
    method: str = "auto",
    seed: int = 0,
    formats: Sequence[str] = FORMATS,
    force: bool = False,
    class_name: str | None = None,
) -> Report:
    """Write the report of ``run_dirs`` into ``out`` (created); returns the paths written.

    ``max_points``, ``method``, ``seed``: the latent maps' sample size, embedding
    (:func:`lcc.analysis.plots.embed_2d`) and seed. ``formats`` must include ``png``.
    ``out`` may not be a run or sweep folder (:data:`RUN_MARKERS`); an existing
    ``report.md`` / ``report.html`` there that another program wrote is replaced only with
    ``force``. ``class_name`` (a label, or a class name of the run's dataset): also draw,
    per run with saved latents and per layer, that class's latents coloured by cluster.
    """
    from lcc.analysis import plots
    from lcc.io import atomic_write

    if not run_dirs:
        raise LCCInputError("pass at least one run directory")
    if "png" not in formats:
        raise LCCInputError("the report embeds PNG pictures: formats must include 'png'")
    runs = load_runs(run_dirs)
    folder = Path(out).expanduser()
    _check_out(folder, runs, force)
    plots.resolve_method(method)
    plots.sample_indices(max_points + 1, max_points)  # validates max_points up front
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LCCInputError(
            f"cannot create --out {folder}: {error.strerror or error}; choose a writable folder"
        ) from None

    written: list[Path] = []

    def draw(
        section: Section, caption: str, plot: Any, name: str, *args: Any, **options: Any
    ) -> None:
        """Draw ``plot`` (a :mod:`lcc.analysis.plots` function) to ``out/name``; show its PNG."""
        paths = plot(*args, path=folder / name, formats=formats, **options)
        written.extend(paths)
        section.images.append(Image(caption, next(p for p in paths if p.suffix == ".png")))

    overview = Section(
        title="Runs",
        text="Test accuracy and time per run; the last refresh's values are the mean over "
        "its layers (per layer below). CC/MC: training accuracy on correctly clustered / "
        "misclustered samples, in the refresh's latent pass; training's accuracy: that of the "
        "training forwards of the epoch before; CE: cross-entropy of the pass (the LCC "
        "paper's sec. IV.C expects CC CE < CE < MC CE).",
        tables=_comparison(runs),
    )
    histories = {run.name: run.history for run in runs if run.history}
    if histories:
        tests = {run.name: run.metrics.get("test_top1") for run in runs}
        caption = "Training top-1 and loss per epoch; stars: final test top-1"
        draw(overview, caption, plots.plot_top1, "top1", histories, test_top1=tests)
    sections = [overview]
    evaluated = _evaluation_section(runs, draw)
    if evaluated is not None:
        sections.append(evaluated)
    sampling = {"method": method, "max_points": max_points, "seed": seed}
    taken: set[str] = set()
    for run in runs:
        slug = _slug(run.name, taken)
        section = Section(title=f"Run {run.name}", text=f"Directory: {run.path}.")
        regularisers = run.metrics.get("regularisers")
        if isinstance(regularisers, list):
            listed = "; ".join(map(str, regularisers)) or "none (baseline)"
            section.text += f" Regularisers: {listed}."
        add = partial(draw, section)  # a picture in this run's section
        if any("layer" in r for r in run.refreshes):
            caption = "Misclustered fraction and CC/MC accuracy per refresh and layer"
            add(caption, plots.plot_refresh_quality, f"{slug}-refresh-quality", run.refreshes)
        if any(isinstance(r.get("seconds"), dict) for r in run.refreshes):
            caption = "Refresh seconds per stage"
            add(caption, plots.plot_refresh_seconds, f"{slug}-refresh-seconds", run.refreshes)
        measures = _layer_measures(run)
        if len({str(m.get("layer")) for m in measures}) > 1 or _read_measures(run):
            caption = "Values per layer at the last refresh (and measures.jsonl)"
            add(caption, plots.plot_measures, f"{slug}-layers", measures)
        snapshot = load_latent_snapshot(run)
        if snapshot is not None:
            add(
                f"Latents at the refresh of epoch {snapshot.epoch}, coloured by class, "
                "misclustered samples ringed",
                plots.latent_map,
                f"{slug}-latents",
                snapshot.z,
                snapshot.y,
                snapshot.misclustered,
                title=f"{run.name}: epoch {snapshot.epoch}",
                **sampling,
            )
        if snapshot is not None and class_name is not None:
            label, shown = _class_label(run, class_name, snapshot.y)
            rows = np.flatnonzero(snapshot.y == label)
            for layer in snapshot.z:
                clusters = snapshot.clusters[layer][rows]
                add(
                    f"Class {shown}, layer {layer}: its latents coloured by cluster "
                    f"({len(np.unique(clusters))} clusters), misclustered samples ringed",
                    plots.class_map,
                    f"{slug}-class-{_slug(shown, set())}-{layer}",
                    layer,
                    snapshot.z[layer][rows],
                    clusters,
                    snapshot.misclustered[layer][rows],
                    title=f"{run.name}: class {shown}, {layer}",
                    **sampling,
                )
        if not section.images:
            section.text += " No refreshes: nothing to draw."
        sections.append(section)

    title = "lcc report: " + ", ".join(run.name for run in runs)
    markdown = _markdown(title, sections, folder).encode("utf-8")
    page = _html(title, sections).encode("utf-8")
    md_path = atomic_write(folder / "report.md", lambda handle: handle.write(markdown))
    html_path = atomic_write(folder / "report.html", lambda handle: handle.write(page))
    return Report(markdown=md_path, html=html_path, images=written)


def _class_label(run: Run, name: str, y: np.ndarray) -> tuple[int, str]:
    """``(label, shown name)`` of ``--class NAME``: an integer label, or a class name of the
    run's dataset (loaded only then); a one-line error when the class has no saved sample."""
    text = str(name).strip()
    if text.lstrip("-").isdigit():
        label, shown = int(text), text
    else:
        from lcc.zoo.datasets import load_dataset

        dataset = run.config.get("dataset")
        names = load_dataset(str(dataset), subset=None).classes if dataset else None
        folded = [str(n).casefold() for n in names or []]
        if text.casefold() not in folded:
            known = ", ".join(map(str, names)) if names else "none (pass an integer label)"
            raise LCCInputError(f"--class {text!r} is not a class of run {run.name}; {known}")
        label, shown = folded.index(text.casefold()), text
    if not np.any(y == label):
        present = ", ".join(map(str, np.unique(y).tolist()))
        raise LCCInputError(
            f"--class {text!r}: run {run.name} saved no latent of label {label}; labels: {present}"
        )
    return label, shown


# --------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown(title: str, sections: Sequence[Section], folder: Path) -> str:
    lines = [f"# {_md_cell(title)}", ""]
    for section in sections:
        lines += [f"## {_md_cell(section.title)}", ""]
        if section.text:
            lines += [_md_cell(section.text), ""]
        for table in section.tables:
            lines.append("| " + " | ".join(_md_cell(h) for h in table.header) + " |")
            lines.append("|" + "|".join("---" for _ in table.header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
            lines.append("")
        for image in section.images:
            link = image.png.relative_to(folder).as_posix()
            lines += [f"![{_md_cell(image.caption)}]({link})", ""]
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.5em 0; } img { max-width: 100%; } figcaption { color: #555; }
"""


def _html(title: str, sections: Sequence[Section]) -> str:
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{escape(section.text)}</p>")
        for table in section.tables:
            parts.append("<table><thead><tr>")
            parts += [f"<th>{escape(h)}</th>" for h in table.header]
            parts.append("</tr></thead><tbody>")
            for row in table.rows:
                parts.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>")
            parts.append("</tbody></table>")
        for image in section.images:
            data = base64.b64encode(image.png.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" '
                f'alt="{escape(image.caption)}" data-file="{escape(image.png.name)}">'
                f"<figcaption>{escape(image.caption)} ({escape(image.png.name)})</figcaption>"
                "</figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
