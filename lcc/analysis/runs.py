"""Reading finished ``lcc train`` run directories: config, metrics, refreshes, saved latents.

A run directory (``lcc train --out DIR``) holds ``config.yaml``, ``metrics.json`` (test top-1/top-5
and a per-epoch ``history``), ``refreshes.jsonl`` (one line per refresh and layer) and
``refresh/epoch_E_<layer>.npz`` (clusters; with ``--save-latents`` also ``z`` and ``y``); every
epoch in them counts from 1, as on the console (E: the refresh at the start of the E-th epoch).
:func:`load_run` reads the text files once; keys it does not know (other regularisers' terms)
are kept as they are, and missing optional files give empty lists.

>>> import tempfile, pathlib, json
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "config.yaml").write_text("model: small-cnn\\n")
>>> _ = (folder / "metrics.json").write_text(json.dumps({"test_top1": 0.5, "history": []}))
>>> run = load_run(folder, name="base")
>>> run.name, run.metrics["test_top1"], run.refreshes
('base', 0.5, [])
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcc.errors import LCCInputError
from lcc.io import load_arrays, read_jsonl_tolerant, read_yaml

__all__ = [
    "LatentSnapshot",
    "Run",
    "latent_files",
    "load_latent_snapshot",
    "load_run",
    "load_runs",
    "refresh_stage_seconds",
    "run_summary",
    "safe_layer_name",
]

_NPZ_NAME = re.compile(r"^epoch_(\d+)_(.+)\.npz$")
#: refresh stages shared by all layers of one refresh (counted once per refresh)
SHARED_STAGES: tuple[str, ...] = ("collect",)
#: stage keys that are sums of the others, not stages
TOTAL_STAGES: tuple[str, ...] = ("total",)


def safe_layer_name(layer: str) -> str:
    """The layer name as it appears in ``refresh/epoch_E_<layer>.npz`` file names.

    >>> safe_layer_name("layer3.0/conv")
    'layer3.0_conv'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer)


@dataclass(frozen=True)
class Run:
    """One finished run directory, read: ``config`` (config.yaml), ``metrics`` (metrics.json),
    ``refreshes`` (refreshes.jsonl lines, in file order)."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    refreshes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch records of metrics.json, sorted by epoch."""
        records = [r for r in self.metrics.get("history") or [] if isinstance(r, dict)]
        return sorted(records, key=lambda record: record.get("epoch", 0))

    @property
    def layers(self) -> list[str]:
        """Layers with refresh records, in the order they first appear."""
        return list(dict.fromkeys(str(r["layer"]) for r in self.refreshes if "layer" in r))


@dataclass(frozen=True)
class LatentSnapshot:
    """Latents saved by one refresh (``--save-latents``): per layer ``z`` (N, D), the labels
    ``y`` (N,), and per layer the misclustered mask from the saved clusters and their matching
    to classes (:func:`lcc.engine.match.match_clusters`) and the clusters themselves;
    ``epoch``: the E of its ``epoch_E_<layer>.npz`` files (counted from 1)."""

    epoch: int
    z: dict[str, np.ndarray]
    y: np.ndarray
    misclustered: dict[str, np.ndarray]
    clusters: dict[str, np.ndarray] = field(default_factory=dict)


def load_run(path: str | os.PathLike[str], *, name: str | None = None) -> Run:
    """Read a finished run directory, or raise :class:`LCCInputError` naming what is missing."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LCCInputError(f"run directory {folder} not found; pass the --out DIR of lcc train")
    metrics_file, config_file = folder / "metrics.json", folder / "config.yaml"
    if not metrics_file.is_file():
        hint = (
            "its training has not finished: finish it with `lcc train --out DIR --resume`"
            if config_file.is_file()
            else "pass the --out DIR of a finished lcc train run"
        )
        raise LCCInputError(f"{folder} holds no metrics.json; {hint}")
    metrics = _read_json(metrics_file)
    if not isinstance(metrics, dict):
        raise LCCInputError(f"{metrics_file} must hold a JSON object; rerun lcc train")
    config = read_yaml(config_file) if config_file.is_file() else {}
    return Run(
        path=folder,
        name=name or folder.name,
        config=config,
        metrics=metrics,
        refreshes=read_jsonl_tolerant(folder / "refreshes.jsonl"),  # a torn last line: dropped
    )


def load_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """:func:`load_run` for each path; names are the folder names, made unique with as many
    parent folders as needed; a folder given twice gets `` (2)``, `` (3)``, ... after its name.

    >>> [r.name for r in load_runs([])]
    []
    """
    folders = [Path(p).expanduser() for p in paths]
    places = [folder.resolve() for folder in folders]
    distinct = list(dict.fromkeys(places))
    depth = 1
    labels = {place: place.name for place in distinct}
    deepest = max((len(place.parts) for place in places), default=1)
    while len(set(labels.values())) < len(labels) and depth < deepest:
        depth += 1
        labels = {place: "/".join(place.parts[1:][-depth:]) for place in distinct}
    names: list[str] = []
    for place in places:
        copies = places[: len(names)].count(place)
        names.append(labels[place] if copies == 0 else f"{labels[place]} ({copies + 1})")
    return [load_run(f, name=n) for f, n in zip(folders, names, strict=True)]


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise LCCInputError(f"cannot read {file}: {error.strerror or error}") from None
    except ValueError as error:
        raise LCCInputError(f"{file} is not valid JSON ({error}); rerun lcc train") from None


def latent_files(run: Run) -> dict[int, dict[str, Path]]:
    """``{epoch: {layer: refresh/epoch_E_<layer>.npz}}`` for the saved refreshes of ``run``.

    Layer names come from ``refreshes.jsonl`` where their file-safe form matches.
    """
    folder = run.path / "refresh"
    if not folder.is_dir():
        return {}
    known = {safe_layer_name(layer): layer for layer in run.layers}
    found: dict[int, dict[str, Path]] = {}
    for file in sorted(folder.glob("epoch_*.npz")):
        match = _NPZ_NAME.match(file.name)
        if match:
            epoch, safe = int(match.group(1)), match.group(2)
            found.setdefault(epoch, {})[known.get(safe, safe)] = file
    order = {layer: i for i, layer in enumerate(run.layers)}
    return {
        epoch: dict(sorted(files.items(), key=lambda item: order.get(item[0], len(order))))
        for epoch, files in sorted(found.items())
    }


def load_latent_snapshot(run: Run, epoch: int | None = None) -> LatentSnapshot | None:
    """The latents saved at ``epoch`` (default: the last refresh that saved ``z`` and ``y``),
    with misclustered masks; ``None`` when the run saved no latents (no ``--save-latents``)."""
    from lcc.engine.match import match_clusters

    by_epoch = latent_files(run)
    candidates = [epoch] if epoch is not None else sorted(by_epoch, reverse=True)
    for candidate in candidates:
        files = by_epoch.get(candidate, {})
        if not files or not all(_has_latents(file) for file in files.values()):
            continue
        z: dict[str, np.ndarray] = {}
        misclustered: dict[str, np.ndarray] = {}
        clusters: dict[str, np.ndarray] = {}
        y: np.ndarray | None = None
        for layer, file in files.items():
            arrays = load_arrays(file, keys=("z", "y", "clusters"))
            z[layer] = arrays["z"].reshape(arrays["z"].shape[0], -1)
            y = arrays["y"] if y is None else y
            if arrays["y"].shape != y.shape or not np.array_equal(arrays["y"], y):
                raise LCCInputError(f"{file} holds other labels than the other layers' files")
            misclustered[layer] = match_clusters(arrays["clusters"], arrays["y"]).misclustered
            clusters[layer] = np.asarray(arrays["clusters"], dtype=np.int64)
        assert y is not None
        return LatentSnapshot(
            epoch=candidate, z=z, y=y, misclustered=misclustered, clusters=clusters
        )
    return None


def _has_latents(file: Path) -> bool:
    try:
        with np.load(file, allow_pickle=False) as archive:
            return {"z", "y", "clusters"} <= set(archive.files)
    except Exception:  # corrupt file: treated as holding no latents
        return False


def refresh_stage_seconds(records: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Seconds per refresh stage, ``{epoch: {stage: seconds}}``, summed over layers.

    Stages shared by all layers of a refresh (``collect``: one pass over the data) count once;
    ``total`` is left out (it sums the others).

    >>> refresh_stage_seconds([
    ...     {"epoch": 1, "layer": "a", "seconds": {"collect": 2.0, "knn": 1.0, "total": 1.0}},
    ...     {"epoch": 1, "layer": "b", "seconds": {"collect": 2.0, "knn": 0.5, "total": 0.5}}])
    {1: {'collect': 2.0, 'knn': 1.5}}
    """
    out: dict[int, dict[str, float]] = {}
    for record in records:
        seconds = record.get("seconds")
        if not isinstance(seconds, dict) or "epoch" not in record:
            continue
        stages = out.setdefault(int(record["epoch"]), {})
        for stage, value in seconds.items():
            if stage in TOTAL_STAGES or not isinstance(value, (int, float)):
                continue
            if stage in SHARED_STAGES:
                stages[stage] = max(stages.get(stage, 0.0), float(value))
            else:
                stages[stage] = stages.get(stage, 0.0) + float(value)
    return dict(sorted(out.items()))


def _mean(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(present) / len(present) if present else None


def run_summary(run: Run) -> dict[str, Any]:
    """The numbers the report's comparison table shows for ``run`` (``None`` where absent).

    ``misclustered_fraction``, ``accuracy_cc`` and ``accuracy_mc`` are the last refresh's, as
    the mean over its layers; per-layer values are in ``last_refresh``.
    """
    metrics = run.metrics
    history = run.history
    last = metrics.get("last_refresh") or {}
    if not last:
        refreshed = [r for r in history if r.get("refresh")]
        last = refreshed[-1]["refresh"] if refreshed else {}
    seconds = [r.get("seconds") for r in history]
    refresh_seconds = metrics.get("total_refresh_seconds")
    if refresh_seconds is None and history:
        refresh_seconds = sum(float(r.get("refresh_seconds") or 0.0) for r in history)
    refreshes = metrics.get("refreshes", sum(1 for r in history if r.get("refresh")))
    if not refreshes:
        refresh_seconds = None  # no refresh (a baseline): nothing was timed
    return {
        "name": run.name,
        "test_top1": metrics.get("test_top1"),
        "test_top5": metrics.get("test_top5"),
        "epochs": metrics.get("epochs", len(history) or None),
        "mean_epoch_seconds": metrics.get("mean_epoch_seconds", _mean(seconds)),
        "refreshes": refreshes,
        "total_refresh_seconds": refresh_seconds,
        "misclustered_fraction": _mean([s.get("misclustered_fraction") for s in last.values()]),
        "accuracy_cc": _mean([s.get("accuracy_cc") for s in last.values()]),
        "accuracy_mc": _mean([s.get("accuracy_mc") for s in last.values()]),
        "last_refresh": last,
    }
