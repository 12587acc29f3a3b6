"""Pictures of runs and latent spaces, written as PNG and SVG files (matplotlib, Agg).

Every ``plot_*`` function (and :func:`latent_map`) takes a ``path`` (with or without
``.png``/``.svg``), writes one file per format in ``formats`` atomically
(:func:`lcc.io.atomic_write`: temp file + rename) and returns the paths written; the matching
``*_figure`` function returns the :class:`matplotlib.figure.Figure` instead. Nothing is shown on
screen and no pyplot state is used (figures are drawn by the Agg canvas).

- :func:`latent_map`: a 2-D embedding of each layer's latents, coloured by class, misclustered
  samples ringed in black, one panel per layer (the LCC paper's Fig. 1-2).
- :func:`plot_top1`: training top-1 and loss per epoch, several runs overlaid (baseline vs LCC).
- :func:`plot_refresh_quality`: misclustered fraction and accuracy of correctly clustered (CC)
  vs misclustered (MC) samples per refresh and layer (the paper's Fig. 3-4).
- :func:`plot_refresh_seconds`: refresh seconds per stage, stacked bars per refresh.
- :func:`plot_measures`: measure values per layer (dicts with ``measure``, ``value``, ``layer``).
- :func:`plot_robustness`: top-1 against noise, FGSM/PGD eps and corruption severity, runs
  overlaid (``lcc evaluate`` results).

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> paths = plot_measures([{"measure": "c3", "value": 0.4, "layer": "fc1"},
...                        {"measure": "c3", "value": 0.2, "layer": "act1"}], folder / "m.png")
>>> [p.name for p in paths]
['m.png', 'm.svg']
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lcc.errors import LCCInputError, as_label_vector, as_latent_matrix, check_choice

__all__ = [
    "EMBEDDINGS",
    "FORMATS",
    "MAX_POINTS",
    "Embedding",
    "embed_2d",
    "latent_map",
    "latent_map_figure",
    "measures_figure",
    "plot_measures",
    "plot_refresh_quality",
    "plot_refresh_seconds",
    "plot_robustness",
    "plot_top1",
    "refresh_quality_figure",
    "refresh_seconds_figure",
    "resolve_method",
    "robustness_curves",
    "robustness_figure",
    "sample_indices",
    "save_figure",
    "top1_figure",
]

#: file formats written by default
FORMATS: tuple[str, ...] = ("png", "svg")
#: embedding methods of :func:`embed_2d`; ``auto`` is UMAP when umap-learn imports, else PCA
EMBEDDINGS: tuple[str, ...] = ("auto", "umap", "pca", "tsne")
#: default number of samples drawn in a latent map (a seeded uniform sample of them)
MAX_POINTS = 5000
DPI = 110
_PANEL = (4.4, 4.0)  # inches per panel
_Record = Mapping[str, Any]
_Rows = Sequence[_Record]
_StrPath = str | os.PathLike[str]


# --------------------------------------------------------------------------- files


def _figure(width: float, height: float, title: str | None = None, room: float = 0.3) -> Any:
    """A figure drawn by the Agg canvas, ``room`` inches taller with ``title`` on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height + (room if title else 0.0)), layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def _stem(path: _StrPath) -> Path:
    target = Path(path).expanduser()
    if target.suffix.lower().lstrip(".") in FORMATS:
        target = target.with_suffix("")
    return target


def save_figure(figure: Any, path: _StrPath, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``figure`` to ``path`` in each of ``formats`` atomically; returns the paths."""
    from lcc.io import atomic_write

    stem = _stem(path)
    written = []
    for fmt in formats:
        check_choice(fmt, FORMATS, name="format")
        target = stem.with_name(f"{stem.name}.{fmt}")

        def write(handle: Any, fmt: str = fmt) -> None:
            metadata = {"Software": None} if fmt == "png" else {"Date": None}
            figure.savefig(handle, format=fmt, dpi=DPI, metadata=metadata)

        written.append(atomic_write(target, write))
    return written


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class Embedding:
    """2-D coordinates ``coords`` (M, 2) of the input rows ``index`` (M,), made by ``method``."""

    coords: np.ndarray
    index: np.ndarray
    method: str


def sample_indices(n: int, max_points: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """Sorted rows to draw: all ``n`` of them, or a seeded uniform sample of ``max_points``.

    >>> sample_indices(5, 10).tolist()
    [0, 1, 2, 3, 4]
    >>> len(sample_indices(100, 10, seed=1))
    10
    """
    if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)):
        raise LCCInputError(f"max_points must be an integer, got {max_points!r}")
    if max_points < 2:
        raise LCCInputError(f"max_points={max_points} must be at least 2")
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_points), replace=False))


def _umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_method(method: str) -> str:
    """``auto`` -> ``umap`` when umap-learn is importable, else ``pca``; others unchanged."""
    check_choice(method, EMBEDDINGS, name="method")
    if method == "auto":
        return "umap" if _umap_available() else "pca"
    if method == "umap" and not _umap_available():
        raise LCCInputError(
            "method 'umap' needs umap-learn: pip install umap-learn, or choose pca or tsne"
        )
    return method


def _pca_2d(data: np.ndarray) -> np.ndarray:
    """Scores on the top two principal components (SVD of the centred rows); each component's
    sign is fixed so that its largest loading is positive, for reproducible pictures."""
    centred = data - data.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    components = components[:2]
    signs = np.sign(components[np.arange(2), np.abs(components).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return centred @ (components * signs[:, None]).T


def embed_2d(
    z: Any,
    *,
    method: str = "auto",
    max_points: int = MAX_POINTS,
    seed: int = 0,
    index: np.ndarray | None = None,
) -> Embedding:
    """Embed the rows of ``z`` (N, ...) in 2-D with UMAP, PCA or t-SNE (seeded).

    ``index``: the rows to embed (default :func:`sample_indices` of ``max_points``). PCA is
    an SVD of the centred sampled rows; t-SNE (scikit-learn) runs on their first 50 principal
    components.

    >>> e = embed_2d(np.random.default_rng(0).normal(size=(50, 4)), method="pca", max_points=20)
    >>> e.coords.shape, e.method
    ((20, 2), 'pca')
    """
    matrix = as_latent_matrix(z)
    chosen = resolve_method(method)
    rows = sample_indices(matrix.shape[0], max_points, seed) if index is None else index
    data = matrix[rows].astype(np.float64)
    if data.shape[1] < 2:
        data = np.hstack([data, np.zeros((data.shape[0], 2 - data.shape[1]))])
    if chosen == "pca":
        coords = _pca_2d(data)
    elif chosen == "tsne":
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        if data.shape[1] > 50 and data.shape[0] > 50:
            data = PCA(n_components=50, random_state=seed).fit_transform(data)
        perplexity = float(min(30.0, max(2.0, (data.shape[0] - 1) / 3.0)))
        coords = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed
        ).fit_transform(data)
    else:
        import umap

        neighbours = int(min(15, max(2, data.shape[0] - 1)))
        coords = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed).fit_transform(
            data
        )
    return Embedding(coords=np.asarray(coords, dtype=np.float64), index=rows, method=chosen)


# --------------------------------------------------------------------------- colours


def _class_colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / max(n - 1, 1)) for i in range(n)]


def _series_colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]


def _grid(n: int, columns: int = 3) -> tuple[int, int]:
    """(rows, columns) of panels: one row up to ``columns`` panels, 2 x 2 for four."""
    cols = 2 if n == 4 else max(1, min(columns, n))
    return math.ceil(n / cols), cols


def _panels(figure: Any, n: int, rows: int, cols: int) -> list[Any]:
    """The first ``n`` axes of a ``rows`` x ``cols`` grid (row by row); the others hidden."""
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for axis in axes[n:]:
        axis.set_visible(False)
    return list(axes[:n])


# --------------------------------------------------------------------------- latent map


def latent_map(
    z_by_layer: Mapping[str, Any],
    y: Any,
    misclustered: Mapping[str, Any] | None = None,
    *,
    method: str = "auto",
    max_points: int = MAX_POINTS,
    seed: int = 0,
    path: _StrPath,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Write :func:`latent_map_figure` to ``path`` (PNG and SVG); returns the paths."""
    figure = latent_map_figure(
        z_by_layer, y, misclustered, method=method, max_points=max_points, seed=seed, title=title
    )
    return save_figure(figure, path, formats)


def latent_map_figure(
    z_by_layer: Mapping[str, Any],
    y: Any,
    misclustered: Mapping[str, Any] | None = None,
    *,
    method: str = "auto",
    max_points: int = MAX_POINTS,
    seed: int = 0,
    title: str | None = None,
    legend: str = "class",
) -> Any:
    """One panel per layer: a 2-D embedding of its latents coloured by class (``y``),
    misclustered samples (``misclustered[layer]``, a (N,) bool mask) ringed in black.

    At most ``max_points`` samples are drawn (the same seeded sample in every panel);
    ``legend`` names what ``y`` holds in the legend's title.
    """
    if not z_by_layer:
        raise LCCInputError("latent_map needs the latents of at least one layer")
    layers = list(z_by_layer)
    matrices = {layer: as_latent_matrix(z_by_layer[layer], name=f"z[{layer}]") for layer in layers}
    n = next(iter(matrices.values())).shape[0]
    labels = as_label_vector(y, n)
    masks: dict[str, np.ndarray] = {}
    for layer in layers:
        if matrices[layer].shape[0] != n:
            raise LCCInputError(
                f"z[{layer}] has {matrices[layer].shape[0]} rows but the first layer has {n}; "
                "pass latents of the same samples for every layer"
            )
        mask = None if misclustered is None else misclustered.get(layer)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != (n,) or mask.dtype != bool:
                raise LCCInputError(
                    f"misclustered[{layer}] must be a boolean mask of shape ({n},), "
                    f"got {mask.dtype} {mask.shape}"
                )
            masks[layer] = mask
    rows = sample_indices(n, max_points, seed)
    classes = np.unique(labels)
    colours = _class_colours(len(classes))
    point_colours = np.array(colours)[np.searchsorted(classes, labels[rows])]
    size = float(np.clip(3000.0 / max(len(rows), 1), 3.0, 30.0))

    n_rows, n_cols = _grid(len(layers))
    figure = _figure(_PANEL[0] * n_cols + 1.4, _PANEL[1] * n_rows, title, room=0.4)
    for axis, layer in zip(_panels(figure, len(layers), n_rows, n_cols), layers, strict=True):
        embedding = embed_2d(matrices[layer], method=method, seed=seed, index=rows)
        x, y2 = embedding.coords[:, 0], embedding.coords[:, 1]
        axis.scatter(x, y2, c=point_colours, s=size, linewidths=0, alpha=0.75, rasterized=True)
        heading = f"{layer} ({embedding.method.upper()})"
        if layer in masks:
            drawn = masks[layer][rows]
            ring = {"facecolors": "none", "edgecolors": "black", "linewidths": 0.45}
            axis.scatter(x[drawn], y2[drawn], s=size * 3.5, rasterized=True, **ring)
            share = 100.0 * float(masks[layer].mean())
            heading += f"\nmisclustered: {int(masks[layer].sum())} ({share:.1f}%)"
        axis.set_title(heading, fontsize=10)
        axis.set(xticks=[], yticks=[])
    _latent_legend(
        figure, classes, colours, with_ring=bool(masks), shown=len(rows), total=n, what=legend
    )
    return figure


def class_map(
    layer: str,
    z: Any,
    clusters: Any,
    misclustered: Any,
    *,
    method: str = "auto",
    max_points: int = MAX_POINTS,
    seed: int = 0,
    path: _StrPath,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """The LCC paper's Fig. 2 (right) for one layer: the latents ``z`` of the samples of one
    class, coloured by the cluster each is in (``clusters``), misclustered samples
    (``misclustered``, (N,) bool) ringed in black; written to ``path`` (PNG and SVG)."""
    figure = latent_map_figure(
        {layer: z},
        clusters,
        {layer: np.asarray(misclustered, dtype=bool)},
        method=method,
        max_points=max_points,
        seed=seed,
        title=title,
        legend="cluster",
    )
    return save_figure(figure, path, formats)


def _latent_legend(
    figure: Any,
    classes: np.ndarray,
    colours: list[Any],
    *,
    with_ring: bool,
    shown: int,
    total: int,
    what: str = "class",
) -> None:
    from matplotlib.lines import Line2D

    dot = partial(Line2D, [], [], marker="o", linestyle="")
    handles: list[Any] = []
    if len(classes) <= 20:
        handles = [
            dot(color=colour, markersize=6, label=str(value))
            for value, colour in zip(classes.tolist(), colours, strict=True)
        ]
    if with_ring:
        handles.append(
            dot(markerfacecolor="none", markeredgecolor="black", markersize=8, label="misclustered")
        )
    if not handles:
        return
    sample = f"{shown} of {total} samples" if shown < total else f"{total} samples"
    figure.legend(
        handles=handles,
        loc="outside right center",
        title=f"{what}\n({sample})",
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )


# --------------------------------------------------------------------------- training curves


def _epoch_axis(axis: Any, epochs: Sequence[int]) -> None:
    """Integer epoch ticks (at most ~12) and half an epoch of room on both sides."""
    if not epochs:
        return
    low, high = min(epochs), max(epochs)
    step = max(1, math.ceil((high - low + 1) / 12))
    axis.set_xticks(range(low, high + 1, step))
    axis.set_xlim(low - 0.5, high + 0.5)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def plot_top1(
    histories: Mapping[str, _Rows],
    path: _StrPath,
    *,
    test_top1: Mapping[str, float | None] | None = None,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Write :func:`top1_figure` to ``path`` (PNG and SVG); returns the paths."""
    return save_figure(top1_figure(histories, test_top1=test_top1, title=title), path, formats)


def top1_figure(
    histories: Mapping[str, _Rows],
    *,
    test_top1: Mapping[str, float | None] | None = None,
    title: str | None = None,
) -> Any:
    """Training top-1 (%) and loss per epoch, one line per run (``{name: history}``, records
    with ``epoch`` counted from 1 as in metrics.json, ``train_top1``, ``loss``); each run's
    final test top-1 as a star."""
    if not histories:
        raise LCCInputError("plot_top1 needs at least one run's history")
    figure = _figure(11.0, 4.2, title)
    accuracy, loss = figure.subplots(1, 2)
    seen: list[int] = []
    for position, (colour, (name, history)) in enumerate(
        zip(_series_colours(len(histories)), histories.items(), strict=True)
    ):
        records = sorted(
            (r for r in history if _number(r.get("epoch")) is not None),
            key=lambda r: r["epoch"],
        )
        epochs = [int(r["epoch"]) for r in records]
        seen += epochs
        top1 = [_number(r.get("train_top1")) for r in records]
        values = [(e, 100 * v) for e, v in zip(epochs, top1, strict=True) if v is not None]
        if values:
            accuracy.plot(
                *zip(*values, strict=True), marker="o", color=colour, label=f"{name} (train)"
            )
        losses = [(e, _number(r.get("loss"))) for e, r in zip(epochs, records, strict=True)]
        losses = [(e, v) for e, v in losses if v is not None]
        if losses:
            loss.plot(*zip(*losses, strict=True), marker="o", color=colour, label=name)
        test = None if test_top1 is None else _number(test_top1.get(name))
        if test is not None and epochs:
            star = {"marker": "*", "markersize": 13, "linestyle": "", "markeredgecolor": "black"}
            beside = epochs[-1] + 0.15 + 0.1 * position  # shifted per run so equal values show
            accuracy.plot(
                [beside], [100 * test], color=colour, label=f"{name} (test, final)", **star
            )
    accuracy.set(xlabel="epoch", ylabel="top-1 accuracy (%)")
    accuracy.set_title("top-1 per epoch", fontsize=10)
    loss.set(xlabel="epoch", ylabel="training loss (CE + regularisers)")
    loss.set_title("training loss per epoch", fontsize=10)
    for axis in (accuracy, loss):
        axis.grid(alpha=0.3)
        _epoch_axis(axis, seen)
        if axis.has_data():  # below the axes: a legend inside could hide a test star
            axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    if seen:
        accuracy.set_xlim(min(seen) - 0.5, max(seen) + 0.6 + 0.1 * len(histories))
    return figure


def plot_refresh_quality(
    records: _Rows, path: _StrPath, *, title: str | None = None, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Write :func:`refresh_quality_figure` to ``path`` (PNG and SVG); returns the paths."""
    return save_figure(refresh_quality_figure(records, title=title), path, formats)


def refresh_quality_figure(records: _Rows, *, title: str | None = None) -> Any:
    """Per refresh (epoch) and layer: misclustered fraction, and the model's training accuracy
    on correctly clustered (CC, solid) vs misclustered (MC, dashed) samples and on all (dotted).

    ``records``: refreshes.jsonl lines (``epoch`` counted from 1, ``layer``,
    ``misclustered_fraction``, ``accuracy``, ``accuracy_cc``, ``accuracy_mc``).
    """
    usable = [r for r in records if "layer" in r and _number(r.get("epoch")) is not None]
    if not usable:
        raise LCCInputError("plot_refresh_quality needs refresh records with epoch and layer")
    layers = list(dict.fromkeys(str(r["layer"]) for r in usable))
    figure = _figure(11.0, 4.2, title)
    share, accuracy = figure.subplots(1, 2)
    styles = (
        ("accuracy_cc", "-", "o", "CC"),
        ("accuracy_mc", "--", "s", "MC"),
        ("accuracy", ":", "x", "all"),
    )
    for colour, layer in zip(_series_colours(len(layers)), layers, strict=True):
        rows = sorted((r for r in usable if str(r["layer"]) == layer), key=lambda r: r["epoch"])
        epochs = [int(r["epoch"]) for r in rows]

        def series(key: str, rows: list = rows, epochs: list = epochs) -> list:
            values = [_number(r.get(key)) for r in rows]
            return [(e, 100 * v) for e, v in zip(epochs, values, strict=True) if v is not None]

        if points := series("misclustered_fraction"):
            share.plot(*zip(*points, strict=True), marker="o", color=colour, label=layer)
        for key, style, marker, label in styles:
            if points := series(key):
                accuracy.plot(
                    *zip(*points, strict=True),
                    linestyle=style,
                    marker=marker,
                    color=colour,
                    label=f"{layer} {label}",
                )
    share.set_title("misclustered samples per refresh", fontsize=10)
    share.set_ylabel("misclustered (% of training samples)")
    accuracy.set_title("training accuracy: CC vs MC samples", fontsize=10)
    accuracy.set_ylabel("accuracy (%)")
    epochs = sorted({int(r["epoch"]) for r in usable})
    shares = [v for r in usable if (v := _number(r.get("misclustered_fraction"))) is not None]
    share.set_ylim(0, 100 * max([*shares, 0.05]) * 1.15)
    accuracy.set_ylim(0, 102)
    for axis in (share, accuracy):
        axis.set_xlabel("epoch (refresh at its start)")
        axis.grid(alpha=0.3)
        _epoch_axis(axis, epochs)
        if axis.has_data():
            axis.legend(fontsize=8, loc="best")
    return figure


def plot_refresh_seconds(
    records: _Rows, path: _StrPath, *, title: str | None = None, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Write :func:`refresh_seconds_figure` to ``path`` (PNG and SVG); returns the paths."""
    return save_figure(refresh_seconds_figure(records, title=title), path, formats)


def refresh_seconds_figure(records: _Rows, *, title: str | None = None) -> Any:
    """Seconds per refresh stage (collect, knn, graph, cluster, match, targets, ...) as stacked
    bars, one bar per refresh, summed over layers (see
    :func:`lcc.analysis.runs.refresh_stage_seconds`)."""
    from lcc.analysis.runs import refresh_stage_seconds

    by_epoch = refresh_stage_seconds(records)
    if not by_epoch:
        raise LCCInputError("plot_refresh_seconds needs refresh records with a seconds dict")
    stages = list(dict.fromkeys(stage for stages in by_epoch.values() for stage in stages))
    epochs = list(by_epoch)
    figure = _figure(max(6.0, 2.0 + 0.5 * len(epochs)), 4.2, title)
    axis = figure.subplots()
    positions = np.arange(len(epochs))
    bottom = np.zeros(len(epochs))
    for colour, stage in zip(_series_colours(len(stages)), stages, strict=True):
        heights = np.array([by_epoch[e].get(stage, 0.0) for e in epochs])
        axis.bar(positions, heights, bottom=bottom, color=colour, label=stage, width=0.7)
        bottom += heights
    axis.set_xticks(positions, [str(e) for e in epochs])
    axis.set_xlabel("epoch (refresh at its start)")
    axis.set_ylabel("seconds")
    axis.set_title("refresh seconds per stage (all layers)", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    figure.legend(loc="outside right center", fontsize=8, frameon=False, title="stage")
    return figure


def plot_measures(
    measures: _Rows, path: _StrPath, *, title: str | None = None, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Write :func:`measures_figure` to ``path`` (PNG and SVG); returns the paths."""
    return save_figure(measures_figure(measures, title=title), path, formats)


def measures_figure(measures: _Rows, *, title: str | None = None) -> Any:
    """One panel per measure: its value per layer (layers in order of first appearance).

    ``measures``: dicts with ``measure``, ``value`` and ``layer`` (e.g. ``lcc measure``'s JSON
    lines); records that also carry ``epoch`` or ``run`` give one line per epoch or run.
    """
    usable = [m for m in measures if "measure" in m and _number(m.get("value")) is not None]
    if not usable:
        raise LCCInputError("plot_measures needs dicts with a measure name and a numeric value")
    names = list(dict.fromkeys(str(m["measure"]) for m in usable))
    layers = list(dict.fromkeys(str(m.get("layer", "")) for m in usable))
    n_rows, n_cols = _grid(len(names))
    width = max(3.6, 0.9 * len(layers) + 1.6)
    figure = _figure(width * n_cols, 3.4 * n_rows, title)
    for axis, name in zip(_panels(figure, len(names), n_rows, n_cols), names, strict=True):
        rows = [m for m in usable if str(m["measure"]) == name]
        groups = list(dict.fromkeys(_group(m) for m in rows))
        for colour, group in zip(_series_colours(len(groups)), groups, strict=True):
            points = {
                str(m.get("layer", "")): float(m["value"]) for m in rows if _group(m) == group
            }
            xs = [i for i, layer in enumerate(layers) if layer in points]
            ys = [points[layers[i]] for i in xs]
            axis.plot(xs, ys, marker="o", color=colour, label=group or None)
        axis.set_xticks(range(len(layers)), layers, rotation=30 if len(layers) > 3 else 0)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("layer")
        axis.grid(alpha=0.3)
        if any(groups):
            axis.legend(fontsize=8)
    return figure


def _group(measure: Mapping[str, Any]) -> str:
    parts = []
    if "run" in measure:
        parts.append(str(measure["run"]))
    if _number(measure.get("epoch")) is not None:
        parts.append(f"epoch {int(measure['epoch'])}")
    return " ".join(parts)


# --------------------------------------------------------------------------- robustness

#: panels of :func:`robustness_figure`: (evaluation key, x-axis label)
ROBUSTNESS_PANELS: tuple[tuple[str, str], ...] = (
    ("noise", "Gaussian noise sigma (normalised-input units)"),
    ("fgsm", "FGSM eps (pixel units, [0, 1])"),
    ("pgd", "PGD eps (pixel units, [0, 1])"),
    ("corruption", "corruption severity (mean over types)"),
)


def robustness_curves(evaluation: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """``{panel: [(x, top-1), ...]}`` of one ``lcc evaluate`` result, x sorted, starting at the
    clean top-1 (x = 0); PGD keys ``EPS:STEPS:ALPHA`` by eps; corruptions: the mean over types.

    >>> robustness_curves({"top1": 0.9, "fgsm": {"0.1": 0.5}, "corruption": {
    ...     "fog": {"1": 0.8, "2": 0.6}, "snow": {"1": 0.6, "2": 0.4}}})
    {'fgsm': [(0.0, 0.9), (0.1, 0.5)], 'corruption': [(0.0, 0.9), (1.0, 0.7), (2.0, 0.5)]}
    """
    clean = _number(evaluation.get("top1"))
    curves: dict[str, list[tuple[float, float]]] = {}
    for key, _ in ROBUSTNESS_PANELS:
        values = evaluation.get(key) or {}
        points: dict[float, list[float]] = {}
        if key == "corruption":
            for by_severity in values.values():
                for severity, accuracy in by_severity.items():
                    points.setdefault(float(severity), []).append(float(accuracy))
        else:
            for setting, accuracy in values.items():
                points.setdefault(float(str(setting).split(":")[0]), []).append(float(accuracy))
        if not points:
            continue
        if clean is not None:
            points.setdefault(0.0, [clean])
        curves[key] = [(x, float(np.mean(ys))) for x, ys in sorted(points.items())]
    return curves


def plot_robustness(
    evaluations: Mapping[str, _Record], path: _StrPath, *, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Write :func:`robustness_figure` to ``path`` (PNG and SVG); returns the paths."""
    return save_figure(robustness_figure(evaluations), path, formats)


def robustness_figure(evaluations: Mapping[str, _Record]) -> Any:
    """Top-1 (%) against noise sigma, FGSM/PGD eps and corruption severity, one panel per kind
    that some run has, runs overlaid (``{name: lcc evaluate result}``)."""
    curves = {name: robustness_curves(result) for name, result in evaluations.items()}
    panels = [item for item in ROBUSTNESS_PANELS if any(item[0] in c for c in curves.values())]
    if not panels:
        raise LCCInputError("no robustness results to draw (run lcc evaluate with --noise, "
                            "--fgsm, --pgd or --corruptions)")  # fmt: skip
    rows, cols = _grid(len(panels), columns=4)
    figure = _figure(_PANEL[0] * cols, _PANEL[1] * rows + 0.4)
    colours = _series_colours(len(curves))
    for axis, (key, label) in zip(_panels(figure, len(panels), rows, cols), panels, strict=True):
        for colour, (name, by_panel) in zip(colours, curves.items(), strict=True):
            if key in by_panel:
                xs, ys = zip(*by_panel[key], strict=True)
                axis.plot(xs, [100 * y for y in ys], marker="o", color=colour, label=name)
        axis.set_xlabel(label, fontsize=9)
        axis.set_ylabel("top-1 accuracy (%)")
        axis.set_title(key, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return figure
