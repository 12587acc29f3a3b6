"""The outputs of ``lcc study``: ``models.csv``, ``kendall.csv`` / ``kendall.md`` and
``report.html`` with the intraclass paper's figures (every file written atomically).

- ``models.csv``: one row per model: each grid key under its grid name (``seed`` too),
  ``status`` (``ok``, ``failed``, ``pending``), ``train_top1`` (the last epoch's running
  training accuracy, in train mode, from ``metrics.json``), ``test_top1``, ``gap``
  (train - test), then one column per measure (``c3`` over all layers, ``c3@LAYER`` one layer).
- ``kendall.csv`` / ``.md``: the granulated Kendall coefficient
  (:mod:`lcc.analysis.kendall`) of every measure column against ``test_top1``: one column per
  varying hyperparameter, ``overall``, the sign used (+1: larger = better generalisation,
  -1: flipped) and the counts of groups used and skipped.
- ``figures/``: Fig. 3 (each measure vs test accuracy, one row per hyperparameter, coloured by
  its value), Fig. 4 (Kendall overall of c1 and c3 as a function of ``k``, from the stored
  per-neuron values, no retraining), Fig. 5 (each measure across layers averaged over the
  models of one ``depth``), as PNG and SVG; when the models tracked measures during training
  (``track_measures:`` in ``base:``), Fig. 6 (the tracked measures per epoch of the models
  with the highest, median and lowest test accuracy) and Fig. 7 (the most selective neuron of
  the max- and median-selectivity subclasses over training, :mod:`selective_neurons`).
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcc.analysis.kendall import kendall_rows
from lcc.analysis.selective_neurons import agg_pyplot, save_pyplot
from lcc.analysis.study_measures import HIGHER_IS_BETTER
from lcc.io import atomic_write

__all__ = ["k_curve", "kendall_markdown", "model_rows", "write_study"]

_FIXED = ("status", "train_top1", "test_top1", "gap")
#: the counts of groups in ``kendall.csv`` after the ``kendall.md`` columns
_GROUP_COUNTS = ("groups", "skipped_small", "skipped_undefined", "left_out")


def _read(file: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _base(column: str) -> str:
    return column.split("@", 1)[0]


def model_rows(
    grid_keys: Sequence[str], runs: Sequence[Any], states: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One dict per model (columns as in ``models.csv``; measure columns sorted)."""
    rows = []
    for run in runs:
        folder = Path(run.config.out)
        options = dict(run.options)
        row: dict[str, Any] = {key: options.get(key, getattr(run.config, key)) for key in grid_keys}
        metrics = _read(folder / "metrics.json") or {}
        measures = _read(folder / "measures.json") or {}
        state = states.get(run.name, "new")
        row["status"] = {"failed": "failed", "measured": "ok"}.get(state, "pending")
        train, test = metrics.get("train_top1"), metrics.get("test_top1")
        row.update(train_top1=train, test_top1=test)
        row["gap"] = None if train is None or test is None else train - test
        row.update(measures if row["status"] == "ok" else {})
        rows.append(row)
    return rows


def _columns(grid_keys: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Grid keys, the fixed columns, then the measures in :data:`HIGHER_IS_BETTER` order, the
    all-layer column first and the layers in the order they were measured."""
    order = {name: i for i, name in enumerate(HIGHER_IS_BETTER)}
    seen: dict[str, int] = {}
    for row in rows:
        for key in row:
            if key not in grid_keys and key not in _FIXED:
                seen.setdefault(key, len(seen))
    ranked = sorted(seen, key=lambda c: (order.get(_base(c), 99), "@" in c, seen[c]))
    return [*grid_keys, *_FIXED, *ranked]


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return buffer.getvalue().encode("utf-8")


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def kendall_markdown(table: Sequence[Mapping[str, Any]], hyperparameters: Sequence[str]) -> str:
    """The Kendall table as markdown (2 decimals; '-' where no group was usable)."""
    head = ["measure", *hyperparameters, "overall", "sign"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["measure"]]
        cells += ["-" if row[h] is None else f"{row[h]:.2f}" for h in [*hyperparameters, "overall"]]
        cells.append("+" if row["sign"] > 0 else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def k_curve(
    folders: Sequence[Path], rows: Sequence[dict[str, Any]], hyperparameters: Sequence[str]
) -> dict[str, list[tuple[int, float | None]]]:
    """Kendall overall of c1 and c3 for a range of ``k`` from each model's neurons.npz."""
    stored = []
    for folder in folders:
        try:
            with np.load(folder / "neurons.npz", allow_pickle=False) as data:
                stored.append({key: data[key] for key in data.files})
        except OSError:
            stored.append({})
    out: dict[str, list[tuple[int, float | None]]] = {}
    for name, reduce in (("c1", np.median), ("c3", np.mean)):
        sizes = [values[name].shape[1] for values in stored if name in values]
        if not sizes:
            continue
        ks = sorted({k for k in (1, 2, 3, 5, 8, 13, 20, 30, 50, 80, 130, 200) if k <= min(sizes)})
        curve = []
        for k in ks:
            table = []
            for row, values in zip(rows, stored, strict=True):
                value = None
                if name in values:
                    top = np.sort(values[name], axis=1)[:, -k:].mean(axis=1)
                    value = float(reduce(top))
                table.append({**row, f"{name}_k": value})
            result = kendall_rows(table, hyperparameters, {f"{name}_k": True})[0]
            curve.append((k, result["overall"]))
        out[name] = curve
    return out


def _figures(
    root: Path,
    rows: list[dict[str, Any]],
    hps: Sequence[str],
    curves: Mapping[str, Any],
    columns: Sequence[str],
) -> list[str]:
    plt = agg_pyplot()
    (root / "figures").mkdir(exist_ok=True)
    ok = [row for row in rows if row["status"] == "ok" and row.get("test_top1") is not None]
    overall = [c for c in columns if c in HIGHER_IS_BETTER]  # over all layers
    layered = [c for c in columns if "@" in c]
    for name in ("misclustered", "cc_mc_gap", "label-variation"):  # per layer only: the one
        # measured on the most models (every model's penultimate layer), the last on a tie
        found = [c for c in layered if _base(c) == name]
        if found and name not in overall:
            counts = [sum(row.get(c) is not None for row in ok) for c in found]
            overall.append(found[max(range(len(found)), key=lambda i: (counts[i], i))])
    names = []
    figure, axes = plt.subplots(
        len(hps), len(overall), figsize=(2.6 * len(overall), 2.3 * len(hps)), squeeze=False
    )
    for i, hp in enumerate(hps):
        values = sorted({str(row[hp]) for row in ok})
        colours = {v: plt.cm.viridis(j / max(1, len(values) - 1)) for j, v in enumerate(values)}
        for j, column in enumerate(overall):
            axis = axes[i][j]
            for value in values:
                pts = [
                    (r[column], r["test_top1"])
                    for r in ok
                    if str(r[hp]) == value and r.get(column) is not None
                ]
                if pts:
                    x, y = zip(*pts, strict=True)
                    axis.scatter(x, y, s=10, color=colours[value], label=f"{hp}={value}")
            axis.set_xlabel(column, fontsize=7)
            axis.tick_params(labelsize=6)
            if j == 0:
                axis.set_ylabel("test top-1", fontsize=7)
                axis.legend(fontsize=5, loc="best")
    names.append(_save(figure, root, "fig3_measures_vs_test"))
    if curves:
        figure, axis = plt.subplots(figsize=(4, 3))
        for name, curve in curves.items():
            ks = [k for k, v in curve if v is not None]
            axis.plot(ks, [v for _, v in curve if v is not None], marker="o", label=name)
        axis.set_xscale("log")
        axis.set_xlabel("k (neurons per (sub)class)")
        axis.set_ylabel("granulated Kendall (overall)")
        axis.legend()
        names.append(_save(figure, root, "fig4_kendall_vs_k"))
    names += _fig5(root, ok, layered, plt)
    return names


def _fig5(root: Path, ok: list[dict[str, Any]], layered: Sequence[str], plt: Any) -> list[str]:
    bases = [b for b in HIGHER_IS_BETTER if any(_base(c) == b for c in layered)]
    if not bases:
        return []
    figure, axes = plt.subplots(1, len(bases), figsize=(2.8 * len(bases), 2.6), squeeze=False)
    depths = sorted({str(row.get("depth", "")) for row in ok})
    for axis, base in zip(axes[0], bases, strict=True):
        for depth in depths:
            group = [row for row in ok if str(row.get("depth", "")) == depth]
            columns = [
                c for c in layered if _base(c) == base and any(r.get(c) is not None for r in group)
            ]
            means = [
                np.nanmean([np.nan if r.get(c) is None else r[c] for r in group]) for c in columns
            ]
            label = f"depth={depth}" if depth else "all models"
            axis.plot(range(1, len(columns) + 1), means, marker="o", label=label)
        axis.set_title(base, fontsize=8)
        axis.set_xlabel("layer", fontsize=7)
        axis.legend(fontsize=5)
    return [_save(figure, root, "fig5_measures_across_layers")]


def _fig6(root: Path, scored: Sequence[tuple[float, Any]]) -> list[str]:
    """Fig. 6: the tracked measures (over all layers) per epoch of the models with the highest,
    median and lowest test accuracy (``scored``: (test top-1, run), sorted), when the models
    tracked their measures."""
    from lcc.io import read_jsonl_tolerant

    if not scored:
        return []
    picks = [scored[-1], scored[(len(scored) - 1) // 2], scored[0]]
    tracks = [
        (acc, read_jsonl_tolerant(Path(run.config.out) / "measures.jsonl")) for acc, run in picks
    ]
    names = list(
        dict.fromkeys(r["measure"] for _, lines in tracks for r in lines if r.get("layer") == "all")
    )
    if not names:
        return []
    figure, axes = agg_pyplot().subplots(
        1, len(names), figsize=(3.4 * len(names), 2.8), squeeze=False
    )
    for axis, name in zip(axes[0], names, strict=True):
        for acc, lines in tracks:
            points = sorted((r["epoch"], r["value"]) for r in lines
                            if r.get("measure") == name and r.get("layer") == "all")  # fmt: skip
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=f"test {acc:.1%}")
        axis.set_title(name, fontsize=8)
        axis.set_xlabel("epoch", fontsize=7)
        axis.legend(fontsize=6)
    return [_save(figure, root, "fig6_measures_over_training")]


def _fig7(root: Path, scored: Sequence[tuple[float, Any]]) -> list[str]:
    """Fig. 7 of the model with the best test accuracy, when its measures were tracked."""
    from lcc.analysis.selective_neurons import write_figure

    if not scored:
        return []
    best = max(scored, key=lambda pair: pair[0])[1]
    name = "fig7_selective_neurons"
    return [name] if write_figure(Path(best.config.out), root / "figures" / name) else []


def _save(figure: Any, root: Path, name: str) -> str:
    save_pyplot(figure, root / "figures" / name)
    return name


def _html(
    table_md: str, counts: Mapping[str, int], figures: Sequence[str], hps: Sequence[str]
) -> bytes:
    head, _, *body = [line.strip("|").split("|") for line in table_md.strip().splitlines()]
    cells = "".join(  # the header's cells are th, the others td; markdown's "|---|" line dropped
        "<tr>" + "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row) + "</tr>"
        for tag, row in [("th", head)] + [("td", row) for row in body]
    )
    images = "".join(
        f'<figure><img src="figures/{n}.png" alt="{n}"><figcaption>{n} '
        f'(<a href="figures/{n}.svg">SVG</a>)</figcaption></figure>'
        for n in figures
    )
    count = ", ".join(f"{v} {k}" for k, v in counts.items())
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>lcc study</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 6px;border:1px solid #ccc}"
        "img{max-width:100%}</style></head><body><h1>lcc study</h1>"
        f"<p>Models: {html.escape(count)}. Hyperparameters: {html.escape(', '.join(hps))}. "
        "Granulated Kendall coefficient against test top-1 (sign -: the measure is flipped, "
        "lower values predicted better generalisation).</p>"
        f"<table>{cells}</table>{images}"
        + (
            ""
            if "fig7_selective_neurons" in figures
            else "<p>Figs. 6 and 7 (measures and neurons over training) need measures tracked "
            "during training (base: track_measures); not recorded by this study.</p>"
        )
        + "</body></html>"
    )
    return body.encode("utf-8")


def write_study(
    study: Any, runs: Sequence[Any], states: Mapping[str, str], root: Path
) -> dict[str, Path]:
    """Write models.csv, kendall.csv/.md, figures/ and report.html into ``root``."""
    grid_keys = list(study.sweep.grid)
    hps = study.hyperparameters
    rows = model_rows(grid_keys, runs, states)
    columns = _columns(grid_keys, rows)
    _write(root / "models.csv", _csv(columns, rows))
    measures = {c: HIGHER_IS_BETTER[_base(c)] for c in columns if _base(c) in HIGHER_IS_BETTER}
    table = kendall_rows(rows, hps, measures)
    head = ["measure", *hps, "overall", "sign", *_GROUP_COUNTS]
    _write(root / "kendall.csv", _csv(head, table))
    markdown = kendall_markdown(table, hps)
    _write(root / "kendall.md", markdown.encode("utf-8"))
    counts = Counter(row["status"] for row in rows)
    curves = k_curve([Path(run.config.out) for run in runs], rows, hps)
    figures = _figures(root, rows, hps, curves, columns) if counts.get("ok") else []
    scored = sorted(
        (
            (row["test_top1"], run)
            for run, row in zip(runs, rows, strict=True)
            if row["status"] == "ok" and row.get("test_top1") is not None
        ),
        key=lambda pair: pair[0],
    )
    figures += _fig6(root, scored) + _fig7(root, scored)
    _write(root / "report.html", _html(markdown, counts, figures, hps))
    return {
        name: root / name for name in ("models.csv", "kendall.csv", "kendall.md", "report.html")
    }
